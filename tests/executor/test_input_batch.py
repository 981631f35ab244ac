"""Step inputs written into the persistent buffers, with CUDA-graph padding of decode batches."""

from __future__ import annotations

import torch

from atom.engine.outputs import CachedRequestData, SchedulerOutput
from atom.executor.input_batch import (
    BlockTableRows,
    CachedRequestState,
    StepBuffers,
    build_step_inputs,
)
from atom.sampling_params import SamplingParams

BS = 4


def _state(req_id: str, prompt: list[int], out: list[int], blocks: list[int], done: int):
    return CachedRequestState(req_id, prompt, out, SamplingParams(), blocks, done)


def _buffers() -> StepBuffers:
    return StepBuffers(max_tokens=32, max_seqs=8, max_blocks=6, device=torch.device("cpu"))


def _chunk_beside_a_decode() -> tuple[dict[str, CachedRequestState], SchedulerOutput]:
    states = {
        "a": _state("a", list(range(10, 20)), [], [7, 3, 9], 4),  # prefill chunk 4..10
        "b": _state("b", [1, 2, 3], [5], [2], 3),  # decode of its 4th token
    }
    sched = SchedulerOutput(
        cached_reqs=[CachedRequestData("a", [], 4), CachedRequestData("b", [], 3)],
        num_scheduled_tokens={"a": 6, "b": 1},
        total_num_scheduled_tokens=7,
    )
    return states, sched


def test_mixed_batch_layout() -> None:
    states, sched = _chunk_beside_a_decode()
    inputs = build_step_inputs(sched, states, BS, _buffers(), lambda n: 8)
    assert inputs.input_ids.tolist() == [14, 15, 16, 17, 18, 19, 5]
    assert inputs.positions.tolist() == [4, 5, 6, 7, 8, 9, 3]
    # position p of "a" lives in block [7, 3, 9][p // 4] at offset p % 4
    assert inputs.attn.slot_mapping.tolist() == [12, 13, 14, 15, 36, 37, 11]
    assert inputs.attn.block_tables[0].tolist() == [7, 3, 9]
    assert inputs.attn.block_tables[1, 0].item() == 2
    assert inputs.attn.seq_lens.tolist() == [10, 4]
    assert inputs.attn.query_start_loc.tolist() == [0, 6, 7]
    assert inputs.logits_indices.tolist() == [5, 6]
    assert not inputs.is_decode_only  # a prefill chunk: not padded, no graph


def test_decode_batch_padded_for_a_graph() -> None:
    states = {r: _state(r, [1, 2, 3, 4, 5], [6], [i + 1, i + 5], 5) for i, r in enumerate("xyz")}
    sched = SchedulerOutput(
        cached_reqs=[CachedRequestData(r, [], 5) for r in "xyz"],
        num_scheduled_tokens=dict.fromkeys("xyz", 1),
        total_num_scheduled_tokens=3,
    )
    bufs = _buffers()
    bufs.slots_np[:] = 99  # stale values from an earlier step must not survive padding
    inputs = build_step_inputs(sched, states, BS, bufs, lambda n: 4 if n <= 4 else None)
    assert inputs.is_decode_only
    assert inputs.input_ids.tolist() == [6, 6, 6, 0]
    assert inputs.attn.slot_mapping.tolist() == [(i + 5) * BS + 1 for i in range(3)] + [-1]
    assert inputs.attn.seq_lens.tolist() == [6, 6, 6, 0]
    assert inputs.attn.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    # A graph replays over the static table: its rows, padding row included, copied there.
    table = inputs.attn.block_tables
    assert table.data_ptr() == bufs.block_tables.data_ptr() and table.shape == (4, 2)
    assert table.tolist() == [[i + 1, i + 5] for i in range(3)] + [[0, 0]]
    # The graph path takes the first len(sample_rows) rows instead of gathering these.
    assert inputs.logits_indices.tolist() == [0, 1, 2]
    assert inputs.req_ids == list("xyz")


def test_mixed_step_padded_for_a_graph() -> None:
    """A step that is not decode-only, padded as a mixed graph replays it: tokens to 12 (id 0,
    position 0, slot -1), sequences to 5; the third owns the padding tokens, all three pad
    sequences have seq_len 0."""
    states, sched = _chunk_beside_a_decode()
    bufs = _buffers()
    bufs.slots_np[:] = 99  # stale values from an earlier step must not survive padding
    asked = []

    def pad_mixed(n: int) -> tuple[int, int]:
        asked.append(n)
        return 12, 5

    inputs = build_step_inputs(sched, states, BS, bufs, lambda n: 8, pad_mixed)
    assert asked == [7] and inputs.mixed_graph and inputs.num_tokens == 7
    assert inputs.input_ids.tolist() == [14, 15, 16, 17, 18, 19, 5, 0, 0, 0, 0, 0]
    assert inputs.positions.tolist() == [4, 5, 6, 7, 8, 9, 3, 0, 0, 0, 0, 0]
    assert inputs.attn.slot_mapping.tolist() == [12, 13, 14, 15, 36, 37, 11] + [-1] * 5
    assert inputs.attn.seq_lens.tolist() == [10, 4, 0, 0, 0]
    assert inputs.attn.query_start_loc.tolist() == [0, 6, 7, 12, 12, 12]
    table = inputs.attn.block_tables  # the static table's rows, as a graph reads them
    assert table.data_ptr() == bufs.block_tables.data_ptr() and table.shape == (5, 3)
    assert table.tolist() == [[7, 3, 9], [2, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert inputs.logits_indices.tolist() == [5, 6]  # the real rows' last tokens
    assert inputs.req_ids == ["a", "b"] and inputs.sample_rows == [0, 1]

    # The fewest sequences a mixed graph has: one more than the step's, owning the padding.
    inputs = build_step_inputs(sched, states, BS, _buffers(), lambda n: 8, lambda n: (12, 3))
    assert inputs.attn.seq_lens.tolist() == [10, 4, 0]
    assert inputs.attn.query_start_loc.tolist() == [0, 6, 7, 12]

    # Without a graph that fits, the step is left as it is.
    plain = build_step_inputs(sched, states, BS, _buffers(), lambda n: 8, lambda n: None)
    assert not plain.mixed_graph and plain.input_ids.shape[0] == 7
    assert plain.attn.query_start_loc.tolist() == [0, 6, 7]


def test_step_past_every_mixed_graph_padded_eagerly() -> None:
    """A step no mixed graph holds, padded to the size pad_eager gives (executor/eager_steps.py):
    as a mixed graph's padding but in one more sequence than the step's, the compact block table
    (no graph reads the static one), and max_query_len raised to the padding sequence's query."""
    states, sched = _chunk_beside_a_decode()
    bufs = _buffers()
    bufs.slots_np[:] = 99  # stale values from an earlier step must not survive padding
    asked = []

    def pad_eager(n: int) -> int:
        asked.append(n)
        return 16

    inputs = build_step_inputs(sched, states, BS, bufs, lambda n: 8, lambda n: None, pad_eager)
    assert asked == [7] and not inputs.mixed_graph and inputs.num_tokens == 7
    assert inputs.input_ids.tolist() == [14, 15, 16, 17, 18, 19, 5] + [0] * 9
    assert inputs.positions.tolist() == [4, 5, 6, 7, 8, 9, 3] + [0] * 9
    assert inputs.attn.slot_mapping.tolist() == [12, 13, 14, 15, 36, 37, 11] + [-1] * 9
    assert inputs.attn.seq_lens.tolist() == [10, 4, 0]
    assert inputs.attn.query_start_loc.tolist() == [0, 6, 7, 16]
    assert inputs.attn.max_query_len == 9 and inputs.attn.max_seq_len == 10
    table = inputs.attn.block_tables
    assert table.data_ptr() != bufs.block_tables.data_ptr()
    assert table.tolist() == [[7, 3, 9], [2, 0, 0], [0, 0, 0]]
    assert inputs.logits_indices.tolist() == [5, 6] and inputs.sample_rows == [0, 1]

    # A size that adds nothing leaves the step as it is; a mixed graph that holds it wins.
    plain = build_step_inputs(
        sched, states, BS, _buffers(), lambda n: 8, lambda n: None, lambda n: 7
    )
    assert plain.input_ids.shape[0] == 7 and plain.attn.query_start_loc.tolist() == [0, 6, 7]
    assert plain.attn.max_query_len == 6

    def no_eager(n: int) -> int:
        raise AssertionError("a step a mixed graph holds asked for an eager size")

    graphed = build_step_inputs(
        sched, states, BS, _buffers(), lambda n: 8, lambda n: (12, 3), no_eager
    )
    assert graphed.mixed_graph and graphed.input_ids.shape[0] == 12


def test_decode_batch_past_every_graph_runs_eagerly() -> None:
    """A decode-only batch larger than every decode graph is not padded as a mixed step (its
    launches differ: split-KV among them)."""
    states = {r: _state(r, [1, 2, 3, 4, 5], [6], [i + 1, i + 5], 5) for i, r in enumerate("xyz")}
    sched = SchedulerOutput(
        cached_reqs=[CachedRequestData(r, [], 5) for r in "xyz"],
        num_scheduled_tokens=dict.fromkeys("xyz", 1),
        total_num_scheduled_tokens=3,
    )

    def pad_mixed(n: int) -> tuple[int, int]:
        raise AssertionError("a decode-only step asked for a mixed graph")

    inputs = build_step_inputs(sched, states, BS, _buffers(), lambda n: None, pad_mixed)
    assert inputs.is_decode_only and not inputs.mixed_graph and inputs.input_ids.shape[0] == 3


def test_decode_batch_runs_longest_context_first() -> None:
    """A decode step's rows go longest context first (attention launches its programs in batch
    order), every per-row input moving with its request; a step with a prefill keeps the
    scheduler's order."""
    done = {"p": 3, "q": 9, "r": 5, "s": 9}
    states = {
        r: _state(r, list(range(n)), [100 + i], [i + 1, i + 5, i + 9], n)
        for i, (r, n) in enumerate(done.items())
    }
    sched = SchedulerOutput(
        cached_reqs=[CachedRequestData(r, [], n) for r, n in done.items()],
        num_scheduled_tokens=dict.fromkeys(done, 1),
        total_num_scheduled_tokens=4,
    )
    inputs = build_step_inputs(sched, states, BS, _buffers())
    assert inputs.req_ids == ["q", "s", "r", "p"]  # ties keep the scheduler's order
    assert inputs.input_ids.tolist() == [101, 103, 102, 100]
    assert inputs.positions.tolist() == [9, 9, 5, 3]
    assert inputs.attn.seq_lens.tolist() == [10, 10, 6, 4]
    assert inputs.attn.block_tables[:, 0].tolist() == [2, 4, 3, 1]
    assert inputs.sample_rows == [0, 1, 2, 3]
    states["p"].num_computed_tokens = 1  # "p" now prefills two tokens
    sched.num_scheduled_tokens["p"] = 2
    sched.total_num_scheduled_tokens = 5
    assert build_step_inputs(sched, states, BS, _buffers()).req_ids == list(done)


def test_block_rows_follow_growth_release_and_batch_order() -> None:
    """Persistent rows: blocks a request gains land in its row, a released row serves a new
    request from its first column, rows double when every one is taken, and each step's table
    lists the batch's rows in batch order."""
    bufs = StepBuffers(max_tokens=32, max_seqs=3, max_blocks=6, device=torch.device("cpu"))
    states = {r: _state(r, [1] * 5, [], [10 * i + 1, 10 * i + 2], 5) for i, r in enumerate("abc")}

    def step(order: str) -> list[list[int]]:
        sched = SchedulerOutput(
            cached_reqs=[CachedRequestData(r, [], states[r].num_computed_tokens) for r in order],
            num_scheduled_tokens=dict.fromkeys(order, 1),
            total_num_scheduled_tokens=len(order),
        )
        inputs = build_step_inputs(sched, states, BS, bufs)
        # Compact [B, widest row]: a contiguous upload (a column slice of the wide buffer would
        # go up through a pageable temporary, which may sync the stream).
        assert inputs.attn.block_tables.is_contiguous()
        assert inputs.attn.block_tables.shape == (
            len(order),
            max(len(states[r].block_ids) for r in order),
        )
        return [
            row[: len(states[r].block_ids)]
            for r, row in zip(order, inputs.attn.block_tables.tolist(), strict=True)
        ]

    assert step("abc") == [[1, 2], [11, 12], [21, 22]]
    states["b"].block_ids.append(13)
    assert step("cb") == [[21, 22], [11, 12, 13]]
    bufs.block_rows.release(states.pop("a"))
    states["d"] = _state("d", [1] * 5, [], [31, 32], 5)  # takes a's row: no stale block of a's
    assert step("dbc") == [[31, 32], [11, 12, 13], [21, 22]]
    rows = BlockTableRows(max_blocks=2, num_rows=2)
    many = [_state(str(i), [1], [], [i, i + 100], 1) for i in range(5)]
    synced = [rows.sync(s) for s in many]
    assert [rows.table[r].tolist() for r in synced] == [[i, i + 100] for i in range(5)]
    assert len(rows.table) == 8  # doubled twice
