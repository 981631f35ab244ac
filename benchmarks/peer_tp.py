"""Runs one of ../shared/peer's vLLM scripts with vLLM at tensor parallel size PEER_TP.

    PEER_TP=2 PYTHONPATH=~/site-vllm python3 benchmarks/peer_tp.py .peer/peer_latency.py DIR

The peer scripts build `vllm.LLM(...)` without a tensor parallel size: here `vllm.LLM` gives
each construction `tensor_parallel_size=PEER_TP` (unless the script names one), then the script
runs as its own `__main__`. vLLM's workers are spawned processes that import this file again as
`__mp_main__`: everything runs under the main guard, so they run nothing of it. The script's
roofline percentages stay against one GPU's copy bandwidth: at tp N, N GPUs stream the bytes,
so compare the ms per step (gpu_run.sh's tp_latency stage is ours at the same tp).
"""

from __future__ import annotations

import os
import runpy
import sys
from typing import Any


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    import vllm

    tp = int(os.environ.get("PEER_TP", "1"))
    plain = vllm.LLM

    def llm(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("tensor_parallel_size", tp)
        return plain(*args, **kwargs)

    vllm.LLM = llm
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
