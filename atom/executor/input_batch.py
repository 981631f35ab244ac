"""The runner's view of live requests and the flat tensors of one step built from it."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from atom.engine.outputs import SchedulerOutput
from atom.executor.forward_context import AttentionMetadata
from atom.executor.sampler import SamplingMetadata, to_device
from atom.sampling_params import SamplingParams


@dataclass(eq=False)
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    generator: torch.Generator | None = None
    num_pending: int = 0  # tokens a submitted step is sampling, not yet in output_token_ids
    # Its row in the runner's BlockTableRows (-1: none yet) and how many of block_ids it holds.
    block_row: int = -1
    row_synced: int = 0
    num_tokens: int = field(init=False)  # prompt + output: kept by append_output

    def __post_init__(self) -> None:
        self.num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]


@dataclass(slots=True)
class StepInputs:
    input_ids: Tensor  # [T] (T includes CUDA-graph padding rows, if any)
    positions: Tensor  # [T]
    attn: AttentionMetadata
    req_ids: list[str]  # batch order
    logits_indices: Tensor  # [S] token index of each sampling row's last query token
    sample_rows: list[int]  # batch index of each sampling row
    prompt_logprob_spans: dict[int, tuple[int, int]] = field(default_factory=dict)
    # (token index, request) of decode inputs still being sampled by the step in flight: their
    # input_ids entries are placeholders until the runner copies them on the device.
    pending_inputs: list[tuple[int, str]] = field(default_factory=list)
    num_tokens: int = 0  # the step's own tokens (input_ids may hold padding after them)
    mixed_graph: bool = False  # padded for a mixed step's graph (pad_mixed)

    @property
    def is_decode_only(self) -> bool:
        """One query token per sequence, each sampled, no prompt logprobs: CUDA-graph material."""
        return (
            self.attn.max_query_len == 1
            and len(self.sample_rows) == len(self.req_ids)
            and not self.prompt_logprob_spans
        )


class BlockTableRows:
    """Every live request's block ids in a row of one persistent host array: a step gathers its
    batch's rows with one numpy call, and a request's row is written only where it gained
    blocks (copying each request's row every step cost ~1 us a request: 0.27 ms of a batch-256
    step's host work)."""

    def __init__(self, max_blocks: int, num_rows: int) -> None:
        self.table = np.zeros((max(num_rows, 1), max_blocks), dtype=np.int32)
        self._free = list(range(len(self.table) - 1, -1, -1))

    def sync(self, state: CachedRequestState) -> int:
        """The state's row, holding all its block ids."""
        if state.block_row < 0:
            if not self._free:  # more live requests than rows: double them
                n = len(self.table)
                self.table = np.concatenate([self.table, np.zeros_like(self.table)])
                self._free = list(range(2 * n - 1, n - 1, -1))
            state.block_row, state.row_synced = self._free.pop(), 0
        n, m = state.row_synced, len(state.block_ids)
        if m > n:
            self.table[state.block_row, n:m] = state.block_ids[n:]
            state.row_synced = m
        return state.block_row

    def release(self, state: CachedRequestState) -> None:
        if state.block_row >= 0:
            self._free.append(state.block_row)
            state.block_row = -1


class StepBuffers:
    """Persistent per-step input tensors. CUDA graphs replay over slices of the device side; the
    host side is pinned so each step's inputs go up in one asynchronous copy per tensor."""

    def __init__(
        self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device
    ) -> None:
        self.device = device
        pin = device.type == "cuda"

        def pair(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[np.ndarray, Tensor, Tensor]:
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            dev = torch.zeros(shape, dtype=dtype, device=device) if pin else host
            return host.numpy(), host, dev

        self.ids_np, self._ids_host, self.input_ids = pair((max_tokens,), torch.int64)
        self.pos_np, self._pos_host, self.positions = pair((max_tokens,), torch.int64)
        self.slots_np, self._slots_host, self.slot_mapping = pair((max_tokens,), torch.int64)
        # A step's table goes up compact ([B, its widest row], contiguous): a column slice of
        # the [max_seqs, max_blocks] buffer is not contiguous, and torch copies such a slice
        # through a pageable temporary, which the driver may upload only after syncing the
        # stream. Graph replays read the static block_tables; eager steps the compact copy.
        self.tables_np, self._tables_host, self._tables_dev = pair(
            (max_seqs * max_blocks,), torch.int32
        )
        self.block_tables = torch.zeros((max_seqs, max_blocks), dtype=torch.int32, device=device)
        self.block_rows = BlockTableRows(max_blocks, 2 * max_seqs)
        self.seq_lens_np, self._seq_lens_host, self.seq_lens = pair((max_seqs,), torch.int32)
        self.qsl_np, self._qsl_host, self.query_start_loc = pair((max_seqs + 1,), torch.int32)
        self.logits_np, self._logits_host, self.logits_indices = pair((max_seqs,), torch.int64)
        # Staged by the runner after the inputs (put): sampling columns, pending-token indices.
        self.temperature = pair((max_seqs,), torch.float32)
        self.seeds = pair((max_seqs,), torch.int64)
        self.pending = pair((2 * max_seqs,), torch.int64)
        self._copied = torch.cuda.Event() if pin else None

    def wait_writable(self) -> None:
        """The host side may be rewritten once the last step's uploads have left it (a step
        with nothing to sample has no host sync of its own)."""
        if self._copied is not None:
            self._copied.synchronize()

    def staged(self) -> None:
        """Marks the end of a step's uploads (upload, then any put): wait_writable waits for
        them. One event a step: a record costs the host ~10 us, most of it finding the stream."""
        if self._copied is not None:
            self._copied.record()

    def put(
        self, staged: tuple[np.ndarray, Tensor, Tensor], values: Sequence | np.ndarray
    ) -> Tensor:
        """values on the device in one of the persistent pairs (no pinned allocation, no sync):
        written on the host, their upload queued after the step's inputs (before `staged`)."""
        array, host, dev = staged
        n = len(values)
        array[:n] = values
        if self._copied is not None:
            dev[:n].copy_(host[:n], non_blocking=True)
        return dev[:n]

    def upload(
        self, num_tokens: int, num_seqs: int, num_blocks: int, num_samples: int, graph: bool
    ) -> Tensor:
        """Queues the step's inputs (written on the host) to the device (`staged` marks the end
        of the step's uploads); returns its block table [num_seqs, num_blocks]: the static
        buffer's rows for a graph replay, else the compact upload."""
        compact = self._tables_dev[: num_seqs * num_blocks].view(num_seqs, num_blocks)
        if self._copied is not None:  # on the CPU host and device are the same tensors

            def up(host: Tensor, dev: Tensor, n: int) -> None:
                dev[:n].copy_(host[:n], non_blocking=True)

            up(self._ids_host, self.input_ids, num_tokens)
            up(self._pos_host, self.positions, num_tokens)
            up(self._slots_host, self.slot_mapping, num_tokens)
            up(self._seq_lens_host, self.seq_lens, num_seqs)
            up(self._qsl_host, self.query_start_loc, num_seqs + 1)
            up(self._logits_host, self.logits_indices, num_samples)
            up(self._tables_host, self._tables_dev, num_seqs * num_blocks)
        if not graph:
            return compact
        table = self.block_tables[:num_seqs, :num_blocks]
        table.copy_(compact)  # on the device: one small kernel
        return table


def build_step_inputs(
    sched: SchedulerOutput,
    states: dict[str, CachedRequestState],
    block_size: int,
    buffers: StepBuffers,
    pad_to: Callable[[int], int | None] = lambda n: None,
    pad_mixed: Callable[[int], tuple[int, int] | None] = lambda n: None,
    pad_eager: Callable[[int], int | None] = lambda n: None,
) -> StepInputs:
    """Writes the step's flat inputs into `buffers`. A decode-only batch of B sequences for which
    pad_to(B) gives G > B gets G - B padding rows (one token each, seq_len 0, slot -1). Any other
    step of T tokens (not decode-only) for which pad_mixed(T) gives (T', S'), S' > B, is padded
    to T' tokens (id 0, position 0, slot -1) in S' sequences: the B + 1st owns the padding
    tokens, and every padding sequence has seq_len 0 (executor/mixed_graphs.py). Such a step
    that no mixed graph holds, for which pad_eager(T) gives T' > T, runs eagerly padded the same
    way in B + 1 sequences, its max_query_len raised to the padding's (executor/eager_steps.py)."""
    req_ids = [r.req_id for r in sched.new_reqs] + [r.req_id for r in sched.cached_reqs]
    if sched.total_num_scheduled_tokens == len(req_ids):
        # One token each: longest context first. Decode attention launches its programs in
        # batch order, so the longest start first and the last wave holds the shortest.
        req_ids.sort(key=lambda r: states[r].num_computed_tokens, reverse=True)
    b = buffers
    b.wait_writable()
    t = 0  # tokens written
    seq_lens, qsl = [], [0]
    logits_indices, sample_rows = [], []
    spans: dict[int, tuple[int, int]] = {}
    pending: list[tuple[int, str]] = []
    max_blocks = 0
    rows = b.block_rows
    row_ids = []
    for i, req_id in enumerate(req_ids):
        state = states[req_id]
        start, n = state.num_computed_tokens, sched.num_scheduled_tokens[req_id]
        end = start + n
        num_blocks = len(state.block_ids)
        row_ids.append(rows.sync(state))
        known = state.num_tokens
        if n == 1:  # decode: plain ints beat numpy's per-call overhead at batch 256
            if start < known:
                b.ids_np[t] = state.token_ids(start, end)[0]
            else:  # sampled by the step in flight
                b.ids_np[t] = 0
                pending.append((t, req_id))
            b.pos_np[t] = start
            b.slots_np[t] = state.block_ids[start // block_size] * block_size + start % block_size
        else:
            assert end <= known, "a pending token is only ever a decode input"
            b.ids_np[t : t + n] = state.token_ids(start, end)
            pos = np.arange(start, end, dtype=np.int64)
            b.pos_np[t : t + n] = pos
            blocks = rows.table[state.block_row, pos // block_size].astype(np.int64)
            b.slots_np[t : t + n] = blocks * block_size + pos % block_size
        if num_blocks > max_blocks:
            max_blocks = num_blocks
        t += n
        seq_lens.append(end)
        qsl.append(t)
        if state.sampling_params.prompt_logprobs is not None:
            last = min(end, len(state.prompt_token_ids) - 1)  # positions scoring prompt tokens
            if last > start:
                spans[i] = (qsl[-2], qsl[-2] + last - start)
        if end >= known + state.num_pending:  # reached the end: this step yields a token
            logits_indices.append(t - 1)
            sample_rows.append(i)
    num_seqs = len(req_ids)
    max_query_len = max(b - a for a, b in itertools.pairwise(qsl))
    decode_only = max_query_len == 1 and len(sample_rows) == num_seqs and not spans
    padded = pad_to(num_seqs) if decode_only else None
    mixed = None if decode_only else pad_mixed(t)  # a decode past every graph runs eagerly
    eager = None if decode_only or mixed is not None else pad_eager(t)
    eager = eager if eager is not None and eager > t else None
    if eager is not None:
        max_query_len = max(max_query_len, eager - t)  # the padding sequence's query
    # Row i holds request i's block ids; its columns past the request's own blocks hold stale
    # ids, and padding rows stale rows: attention reads only a row's seq_len worth of blocks.
    table = b.tables_np[: num_seqs * max_blocks].reshape(num_seqs, max_blocks)
    table[:] = rows.table[row_ids, :max_blocks]
    num_real_tokens = t
    if padded is not None and padded > num_seqs:
        b.ids_np[t:padded] = 0
        b.pos_np[t:padded] = 0
        b.slots_np[t:padded] = -1
        seq_lens += [0] * (padded - num_seqs)
        qsl += list(range(t + 1, padded + 1))
        b.tables_np[num_seqs * max_blocks : padded * max_blocks] = 0
        num_seqs = t = padded
    elif mixed is not None or eager is not None:
        tokens, seqs = mixed or (eager, num_seqs + 1)
        assert tokens >= t and seqs > num_seqs, (mixed, t, num_seqs)
        b.ids_np[t:tokens] = 0
        b.pos_np[t:tokens] = 0
        b.slots_np[t:tokens] = -1
        seq_lens += [0] * (seqs - num_seqs)
        qsl += [tokens] * (seqs - num_seqs)
        b.tables_np[num_seqs * max_blocks : seqs * max_blocks] = 0
        num_seqs, t = seqs, tokens
    b.seq_lens_np[:num_seqs] = seq_lens
    b.qsl_np[: num_seqs + 1] = qsl
    b.logits_np[: len(logits_indices)] = logits_indices
    graph = padded is not None or mixed is not None
    tables = b.upload(t, num_seqs, max_blocks, len(logits_indices), graph)
    attn = AttentionMetadata(
        slot_mapping=b.slot_mapping[:t],
        block_tables=tables,
        seq_lens=b.seq_lens[:num_seqs],
        query_start_loc=b.query_start_loc[: num_seqs + 1],
        seq_lens_cpu=seq_lens,
        query_start_loc_cpu=qsl,
        max_query_len=max_query_len,
        max_seq_len=max(seq_lens),
    )
    return StepInputs(
        input_ids=b.input_ids[:t],
        positions=b.positions[:t],
        attn=attn,
        req_ids=req_ids,
        logits_indices=b.logits_indices[: len(logits_indices)],
        sample_rows=sample_rows,
        prompt_logprob_spans=spans,
        pending_inputs=pending,
        num_tokens=num_real_tokens,
        mixed_graph=mixed is not None,
    )


def _draw_seed(state: CachedRequestState) -> int:
    """A seeded request's seed for the token it is about to draw (pending ones counted).

    A draw depends only on (seed, position), so preemption, recompute and batch composition
    change no sampled token.
    """
    assert state.sampling_params.seed is not None
    position = len(state.output_token_ids) + state.num_pending
    return position_seed(state.sampling_params.seed, position)


def _positioned(state: CachedRequestState) -> torch.Generator:
    """The request's (CPU) generator, seeded for the token it is about to draw."""
    assert state.generator is not None
    return state.generator.manual_seed(_draw_seed(state))


def _philox_seeds(rows: list[CachedRequestState]) -> np.ndarray:
    """The CUDA sampler's per-row seeds: a seeded request's from (seed, position), as its CPU
    generator is seeded; the others' from one draw of the global generator (on the host: no
    device sync), so a run under torch.manual_seed repeats. position_seed(base, i) for row i,
    in one numpy pass: per-row Python ints cost ~0.3 us a row."""
    base = int(torch.randint(0, 2**62, (1,)))
    start = np.uint64(position_seed(base, 0))
    seeds = (np.arange(len(rows), dtype=np.uint64) + start) & np.uint64(_SEED_MASK)
    for i, s in enumerate(rows):
        if s.sampling_params.seed is not None:
            seeds[i] = _draw_seed(s)
    return seeds.astype(np.int64)


def position_seed(seed: int, position: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + position) % (1 << 63)


_SEED_MASK = (1 << 63) - 1  # position_seed's modulus, as a mask


def build_sampling_metadata(
    rows: list[CachedRequestState], staging: StepBuffers
) -> SamplingMetadata:
    """The step's sampling columns on the staging buffers' device: those every step has
    (temperature, CUDA seeds) in its persistent buffers, the optional ones as fresh tensors."""
    params = [s.sampling_params for s in rows]
    device = staging.device
    cuda = device.type == "cuda"

    def col(values: list[float], dtype: torch.dtype = torch.float32) -> Tensor:
        return to_device(torch.tensor(values, dtype=dtype), device)

    temperature = staging.put(
        staging.temperature, [0.0 if p.greedy else p.temperature for p in params]
    )
    seeds = staging.put(staging.seeds, _philox_seeds(rows)) if cuda else None

    vocab_off = 1 << 62
    needs_penalty = any(
        p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params
    )
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    blocked = [
        (i, sorted(p.all_stop_token_ids))
        for i, (p, s) in enumerate(zip(params, rows, strict=True))
        if len(s.output_token_ids) + s.num_pending < p.min_tokens and p.all_stop_token_ids
    ]
    return SamplingMetadata(
        temperature=temperature,
        all_greedy=all(p.greedy for p in params),
        top_k=col([p.top_k or vocab_off for p in params], torch.int64)
        if any(p.top_k for p in params)
        else None,
        top_p=col([p.top_p for p in params]) if any(p.top_p < 1.0 for p in params) else None,
        min_p=col([p.min_p for p in params]) if any(p.min_p > 0 for p in params) else None,
        generators={i: _positioned(s) for i, s in enumerate(rows) if s.generator is not None},
        seeds=seeds,
        presence_penalty=col([p.presence_penalty for p in params]) if needs_penalty else None,
        frequency_penalty=col([p.frequency_penalty for p in params]) if needs_penalty else None,
        repetition_penalty=col([p.repetition_penalty for p in params]) if needs_penalty else None,
        output_token_ids=[s.output_token_ids for s in rows] if needs_penalty else [],
        prompt_token_ids=[s.prompt_token_ids for s in rows] if needs_penalty else [],
        blocked_tokens=blocked,
        max_num_logprobs=max(wanted) if wanted else None,
        max_top_k=max(p.top_k for p in params) if all(p.top_k > 0 for p in params) else None,
    )
