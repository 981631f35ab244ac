"""A queued step's output on its way to the host: the sampled ids and logprobs copied to pinned
memory behind the step's kernels, the one wait for them, and their record into the requests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from atom.engine.outputs import ModelRunnerOutput, TokenLogprobs
from atom.executor.input_batch import CachedRequestState, StepInputs
from atom.executor.sampler import SamplerOutput


class QueuedStep:
    """A step on the device: calling it waits for the output (the step's one host sync); done()
    asks without waiting (EngineCore.step's busy())."""

    __slots__ = ("_event", "_wait")

    def __init__(self, wait: Callable[[], ModelRunnerOutput], event: torch.cuda.Event | None):
        self._wait, self._event = wait, event

    def __call__(self) -> ModelRunnerOutput:
        return self._wait()

    def done(self) -> bool:
        return self._event is None or self._event.query()


def to_host(t: Tensor | None) -> Tensor | None:
    """A device tensor's copy in pinned host memory, queued (read it after the step's event)."""
    if t is None or t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def record_samples(
    inputs: StepInputs,
    rows: list[CachedRequestState],
    sampled: list[int],
    result: SamplerOutput,
    out: ModelRunnerOutput,
) -> None:
    """The step's sampled ids (and logprobs) into its sampling rows' states and `out`."""
    lp_ids = result.logprob_token_ids.tolist() if result.logprob_token_ids is not None else None
    lps = result.logprobs.tolist() if result.logprobs is not None else None
    ranks = result.ranks.tolist() if result.ranks is not None else None
    for j, (i, state) in enumerate(zip(inputs.sample_rows, rows, strict=True)):
        state.num_pending -= 1
        state.append_output(sampled[j])
        out.sampled_token_ids[i] = [sampled[j]]
        k = state.sampling_params.logprobs
        if k is not None and lp_ids is not None and lps is not None and ranks is not None:
            out.logprobs[i] = TokenLogprobs(lp_ids[j][: k + 1], lps[j][: k + 1], ranks[j])
