"""Profiler labels of one runner step, in the reference's grammar (its `run_labels.py`).

  prefill[bs=N tok=T ctx=C]            a batch with any prefill; mixed batches add ` p=P d=D`
  decode[bs=R/G tok=T]                 decode-only, replayed from the CUDA graph of G >= R rows
  eager_decode[bs=N tok=T ctx=C]       decode-only, run eagerly (CPU, --enforce-eager, N > graphs)
  draft[i/k bs=N]                      draft step i of k (speculative decoding)

bs counts sequences (padding rows excluded), tok their scheduled tokens, ctx each sequence's
context length after the step (the first 3 and a count when there are more than 5). Built from
host-side lists only: a label costs no device sync. `tools/parse_trace.py` and
`tools/analyze_trace_summary.py` read these labels back.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_CTX_SHOWN = 5


def _ctx(seq_lens: Sequence[int], n: int) -> str:
    """The first n context lengths, the first 3 and a count when n > MAX_CTX_SHOWN."""
    if n == 1:
        return str(seq_lens[0])
    if n <= MAX_CTX_SHOWN:
        return str(list(seq_lens[:n]))
    return f"{list(seq_lens[:3])}...+{n - 3}"


def step_label(
    query_start_loc: Sequence[int],
    seq_lens: Sequence[int],
    num_seqs: int,
    decode_only: bool,
    graph_size: int | None,
) -> str:
    """query_start_loc [B+1] and seq_lens [B] may carry CUDA-graph padding past num_seqs;
    graph_size is the replayed graph's batch, None when the step runs eagerly."""
    tokens = query_start_loc[num_seqs]
    if decode_only and graph_size is not None:
        return f"decode[bs={num_seqs}/{graph_size} tok={tokens}]"
    ctx = _ctx(seq_lens, num_seqs)
    if decode_only:
        return f"eager_decode[bs={num_seqs} tok={tokens} ctx={ctx}]"
    decodes = sum(query_start_loc[i + 1] - query_start_loc[i] == 1 for i in range(num_seqs))
    mixed = f" p={num_seqs - decodes} d={decodes}" if 0 < decodes < num_seqs else ""
    return f"prefill[bs={num_seqs} tok={tokens} ctx={ctx}{mixed}]"


def draft_label(step: int, num_steps: int, num_seqs: int) -> str:
    """Step `step` (0-based) of `num_steps` draft forwards over num_seqs sequences."""
    return f"draft[{step}/{num_steps} bs={num_seqs}]"
