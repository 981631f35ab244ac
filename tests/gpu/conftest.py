"""GPU test helpers: engines sized for a few sequences, and each test's time printed as it ends
(a run cut short by the device call's limit still says where the minutes went)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

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


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.failed:
        print(
            f"\n[{report.duration:6.1f} s] {report.when} {report.outcome} {report.nodeid}",
            file=sys.stderr,
            flush=True,
        )
        if report.outcome == "failed":
            print(report.longreprtext[-3000:], file=sys.stderr, flush=True)
