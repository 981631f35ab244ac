"""benchmarks/gemv_table_variant.py: a copy of the tuned table with entries changed, run as the
module doc says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from atom.kernels.gemv import TUNED_CONFIGS, GemvConfig

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gemv_table_variant.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_changes_only_the_entries_named(tmp_path: Path) -> None:
    committed = json.loads(TUNED_CONFIGS.read_text())
    out = tmp_path / "v.json"
    run = _run(str(out), "4096x4096:16:split_k=8,block_n=32", "4096x4096:256:null",
               "28672x4096:32:block_m=32,descriptor=0")  # fmt: skip
    assert run.returncode == 0, run.stderr
    variant = json.loads(out.read_text())
    o16 = {**committed["shapes"]["4096x4096"]["16"], "split_k": 8, "block_n": 32}
    assert variant["shapes"]["4096x4096"]["16"] == o16
    assert variant["shapes"]["4096x4096"]["256"] is None
    # a null entry changed: GemvConfig's defaults under the changes
    assert GemvConfig(**variant["shapes"]["28672x4096"]["32"]) == GemvConfig(
        block_m=32, descriptor=False
    )
    for key, by_bucket in committed["shapes"].items():  # the rest as committed
        for bucket, entry in by_bucket.items():
            if (key, bucket) not in {("4096x4096", "16"), ("4096x4096", "256"),
                                     ("28672x4096", "32")}:  # fmt: skip
                assert variant["shapes"][key][bucket] == entry
    assert variant["_comment"].endswith("28672x4096:32:block_m=32,descriptor=0")


def test_bad_specs_are_usage_errors(tmp_path: Path) -> None:
    for spec in ("4096x4096:16", "4096x4096:17:split_k=2", "4096x4096:16:warps=8",
                 "4096x4096:16:split_k="):  # fmt: skip
        run = _run(str(tmp_path / "v.json"), spec)
        assert run.returncode == 2 and spec.split(":")[0] in run.stderr, (spec, run.stderr)
    assert not (tmp_path / "v.json").exists()
