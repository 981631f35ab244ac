"""GPU test helpers: engines sized for a few sequences, a check of graphs captured without their
own warm-up forward, and each test's time printed as it ends (a run cut short by the device
call's limit still says where the minutes went)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from atom import LLM, SamplingParams
from atom.executor.cuda_graphs import DecodeGraphs

# Engines in these tests run a handful of sequences: a few graph sizes and a small KV cache keep
# each engine's start (graph capture, cache allocation) to seconds.
SMALL_ENGINE: dict[str, Any] = {
    "cudagraph_capture_sizes": [1, 2, 4, 8, 16],
    "max_num_seqs": 16,
    "kv_cache_memory_bytes": 1 << 30,
}


@pytest.fixture(scope="module")
def save_random_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Any], Path]:
    """save(config) -> the directory of a seed-0 random model of that transformers config."""

    def save(config: Any) -> Path:
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(config.model_type)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        return path

    return save


def unwarmed_sizes_change_no_token(path: Path, vocab: int, level: int, **engine: Any) -> None:
    """Sizes 24 and 32 are captured after their attention warm-up alone (DecodeGraphs.capture:
    the largest size and those of 16 rows or fewer run a whole forward first; MLA models every
    size). 40 sequences of different lengths decode through every size as they finish: tokens as
    eager, float32."""
    gen = torch.Generator().manual_seed(5)
    prompts = [
        {"prompt_token_ids": torch.randint(3, vocab, (int(k),), generator=gen).tolist()}
        for k in torch.randint(1, 200, (40,), generator=gen)
    ]
    params = [SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True) for i in range(40)]
    replayed: set[int] = set()
    replay = DecodeGraphs.replay

    def spy(self: DecodeGraphs, size: int, max_seq_len: int) -> torch.Tensor:
        replayed.add(size)
        return replay(self, size, max_seq_len)

    def tokens(**kwargs: Any) -> list[list[int]]:
        llm = LLM(
            str(path),
            skip_tokenizer_init=True,
            device="cuda",
            dtype="float32",
            max_num_seqs=40,
            kv_cache_memory_bytes=1 << 30,
            level=level,
            **engine,
            **kwargs,
        )
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
        return [o.outputs[0].token_ids for o in outs]

    eager = tokens(enforce_eager=True)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(DecodeGraphs, "replay", spy)
        graphs = tokens(cudagraph_capture_sizes=[1, 2, 4, 8, 16, 24, 32, 40])
    assert {24, 32} <= replayed  # rank 0's, at tp > 1: it runs in this process
    assert graphs == eager


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.failed:
        print(
            f"\n[{report.duration:6.1f} s] {report.when} {report.outcome} {report.nodeid}",
            file=sys.stderr,
            flush=True,
        )
        if report.outcome == "failed":
            print(report.longreprtext[-3000:], file=sys.stderr, flush=True)
