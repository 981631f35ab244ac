"""The torch profiler of one rank, and the module tags of `--mark-trace`.

Run traces go to DIR/rank_<r>/<model>_ts_<unix ms>.pt.trace.json.gz. With mark-trace, every
module forward runs inside a `record_function` named after the module path
(`model.layers.3.self_attn`), so the kernels it launches can be attributed to it. CUDA-graph
replays launch nothing per module on the host: for them, capturing each graph also writes
DIR/capture_traces/bs_<G>_rank<r>.json.gz, a trace of one tagged warm-up forward of that graph,
whose kernels come in the replay's order (`tools/parse_trace.py` matches the two).

With ATOM_TORCH_PROFILER_GPU_ONLY=1 a run trace records GPU activity only (kernels, copies, CUDA
API calls): no CPU ops and no ranges (a plain trace of the nano-vllm bench records ~130 ops a
step and makes the run 1.3x slower, which shows as GPU idle). The trace tools then split steps
at their sampled-token copies; module tags and capture traces cannot be matched to such a trace.

Under torch.compile the tags are left out (Dynamo would drop them anyway, with a warning): a
compiled forward shows Inductor's `## Call CompiledFxGraph` ranges, and only attention, an opaque
custom op that runs eagerly at every level, keeps its tag. Exact per-module attribution of
compiled code needs `--level 0`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, record_function

logger = logging.getLogger(__name__)

CAPTURE_TRACES = "capture_traces"
GPU_ONLY_ENV = "ATOM_TORCH_PROFILER_GPU_ONLY"


def capture_warmup_label(size: int) -> str:
    return f"capture_warmup[bs={size}]"


def tag_modules(root: nn.Module, prefix: str = "") -> int:
    """Wraps the forward of every submodule of `root` (and root itself when prefix is given) in
    a record_function named after its path, and the methods a module names in
    `traced_methods` (RMSNorm.rows and RowParallelLinear.forward_add_norm, which models call
    instead of forward). Returns the number of modules tagged."""
    count = 0
    for name, module in root.named_modules(prefix=prefix):
        if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            continue
        module.forward = tagged(module.forward, name)
        for method in getattr(module, "traced_methods", ()):
            setattr(module, method, tagged(getattr(module, method), name))
        if hasattr(module, "trace_tag"):  # attention: compiled forwards call it through an op
            module.trace_tag = name
        count += 1
    return count


def tagged(forward: Callable[..., Any], name: str) -> Callable[..., Any]:
    """forward inside a record_function named `name`, except while Dynamo traces it."""

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # constant to Dynamo: no graph break, no guard
            return forward(*args, **kwargs)
        with record_function(name):
            return forward(*args, **kwargs)

    return run


class TorchProfiler:
    def __init__(
        self,
        trace_dir: str | None,
        rank: int,
        model_name: str,
        device: torch.device,
        mark_trace: bool,
    ) -> None:
        self.trace_dir = None if trace_dir is None else Path(trace_dir)
        self.rank = rank
        self.model_name = Path(model_name.rstrip("/")).name or "model"
        self.activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(ProfilerActivity.CUDA)
        self.gpu_only = os.environ.get(GPU_ONLY_ENV, "0") == "1"
        self.device = device
        self.mark_trace = mark_trace
        self._profiler: torch.profiler.profile | None = None

    @property
    def running(self) -> bool:
        return self._profiler is not None

    @property
    def records_captures(self) -> bool:
        return self.mark_trace and self.trace_dir is not None

    def start(self) -> None:
        if self.trace_dir is None:
            raise ValueError("profiling needs --torch-profiler-dir")
        if self._profiler is not None:
            raise ValueError("the profiler is already running")
        # Shapes (and with them Inductor's ranges as user annotations, which the trace tools
        # read as tags) only with --mark-trace: a plain trace costs the host less per op, so its
        # GPU-idle figures are closer to an untraced run's.
        activities = self.activities
        if self.gpu_only:
            if self.device.type != "cuda":
                raise ValueError(f"{GPU_ONLY_ENV}=1 traces GPU activity: it needs a CUDA device")
            activities = [ProfilerActivity.CUDA]
        self._profiler = torch.profiler.profile(
            activities=activities, record_shapes=self.mark_trace and not self.gpu_only
        )
        self._profiler.start()

    def stop(self) -> Path:
        """Writes DIR/rank_<r>/<model>_ts_<unix ms>.pt.trace.json.gz and returns its path."""
        if self._profiler is None:
            raise ValueError("the profiler is not running")
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        assert self.trace_dir is not None
        folder = self.trace_dir / f"rank_{self.rank}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.model_name}_ts_{int(time.time() * 1000)}.pt.trace.json.gz"
        profiler.export_chrome_trace(str(path))
        logger.info("profile written to %s", path)
        return path

    @contextmanager
    def capture_trace(self, size: int) -> Iterator[None]:
        """Profiles the body (one warm-up forward of the graph of `size` rows) into
        DIR/capture_traces/bs_<size>_rank<r>.json.gz."""
        assert self.trace_dir is not None and self._profiler is None
        folder = self.trace_dir / CAPTURE_TRACES
        folder.mkdir(parents=True, exist_ok=True)
        # As a --mark-trace run trace: without record_shapes Inductor's `## Call CompiledFxGraph`
        # ranges come out as cpu_op, not user_annotation, and the tools would not see them.
        profiler = torch.profiler.profile(activities=self.activities, record_shapes=True)
        profiler.start()
        try:
            with record_function(capture_warmup_label(size)):
                yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the kernels land before the stop
        finally:
            profiler.stop()
        path = folder / f"bs_{size}_rank{self.rank}.json.gz"
        profiler.export_chrome_trace(str(path))
        logger.debug("capture trace written to %s", path)
