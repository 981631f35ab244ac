"""OutputProcessor on hand-made core outputs: snapshots per step, or only final ones."""

from __future__ import annotations

from atom.engine.output_processor import OutputProcessor
from atom.engine.outputs import EngineCoreOutput
from atom.sampling_params import SamplingParams
from tests.engine.test_detokenizer_stream import llama3_tokenizer


def _processor() -> OutputProcessor:
    processor = OutputProcessor(tokenizer=None)
    for rid in ("a", "b"):
        processor.add_request(rid, None, [1, 2, 3], SamplingParams(max_tokens=3), 0.0)
    return processor


def _steps() -> list[list[EngineCoreOutput]]:
    return [
        [EngineCoreOutput("a", [7]), EngineCoreOutput("b", [8])],
        [EngineCoreOutput("a", [9], finish_reason="length"), EngineCoreOutput("b", [10])],
        [EngineCoreOutput("b", [11], finish_reason="length")],
    ]


def test_snapshots_every_step() -> None:
    processor = _processor()
    seen = [
        [(o.request_id, o.outputs[0].token_ids) for o in processor.process(s)[0]] for s in _steps()
    ]
    assert seen == [
        [("a", [7]), ("b", [8])],
        [("a", [7, 9]), ("b", [8, 10])],
        [("b", [8, 10, 11])],
    ]


def test_final_only_returns_finished_requests_alone() -> None:
    processor = _processor()
    seen = [
        [(o.request_id, o.outputs[0].token_ids, o.finished) for o in processor.process(s, True)[0]]
        for s in _steps()
    ]
    assert seen == [[], [("a", [7, 9], True)], [("b", [8, 10, 11], True)]]


def test_deferred_final_outputs_are_built_by_take_finished() -> None:
    """defer=True keeps finished requests; take_finished builds what final_only would have."""
    plain, deferred = _processor(), _processor()
    expected = [o for s in _steps() for o in plain.process(s, True)[0]]
    taken = []
    for s in _steps():
        assert deferred.process(s, True, defer=True)[0] == []
        taken += deferred.take_finished()
    assert deferred.take_finished() == []
    assert [(o.request_id, o.outputs, o.finished) for o in taken] == [
        (o.request_id, o.outputs, o.finished) for o in expected
    ]


def test_drop_finished_forgets_deferred_requests() -> None:
    processor = _processor()
    for s in _steps():
        processor.process(s, True, defer=True)
    processor.drop_finished()
    assert processor.take_finished() == []


def test_take_finished_takes_the_first_finished_first() -> None:
    processor = _processor()
    for s in _steps():
        processor.process(s, True, defer=True)
    assert processor.num_finished == 2
    assert [o.request_id for o in processor.take_finished()] == ["a", "b"]
    assert processor.take_finished() == [] and processor.num_finished == 0


def test_take_finished_decodes_at_most_max_ids_a_call() -> None:
    """A bounded call decodes that many deferred ids of the first finished requests and builds
    those whose text is complete; the next call goes on where it stopped. The text is what an
    unbounded call gives."""
    tokenizer = llama3_tokenizer()
    ids = {r: tokenizer.encode(f"request {r}: héllo wörld 😀 " * 3) for r in "ab"}

    def finished() -> OutputProcessor:
        processor = OutputProcessor(tokenizer)
        for r, out in ids.items():
            params = SamplingParams(max_tokens=len(out))
            processor.add_request(r, None, [1, 2, 3], params, 0.0, streamed=False)
            last = [EngineCoreOutput(r, out, finish_reason="length")]
            assert processor.process(last, True, defer=True)[0] == []
        return processor

    whole = {o.request_id: o.outputs[0].text for o in finished().take_finished()}
    assert whole == {r: tokenizer.decode(out) for r, out in ids.items()}
    processor, calls, taken = finished(), 0, []
    while processor.num_finished:
        calls += 1
        taken += [(o.request_id, o.outputs[0].text) for o in processor.take_finished(5)]
    assert taken == list(whole.items())
    assert calls == -(-sum(map(len, ids.values())) // 5)
