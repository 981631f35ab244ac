"""A hand-made Kineto trace of a GPU run: what a CUDA profile holds, written without a GPU.

Host ranges and launches on one CPU thread; kernels, memcpys and device-side ranges on stream 7.
Each launch and its GPU event share a correlation id, as CUPTI's records do.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path
from typing import Any

CPU = (100, 1)
GPU = (0, 7)


class TraceBuilder:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def _add(self, cat: str, name: str, ts: float, dur: float, where: tuple, args: dict) -> None:
        pid, tid = where
        event = {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid}
        self.events.append(event | {"ts": ts, "dur": dur, "args": args})

    def host(self, name: str, ts: float, dur: float) -> int:
        """A record_function range; returns its External id."""
        ext = next(self._ids)
        self._add("user_annotation", name, ts, dur, CPU, {"External id": ext})
        return ext

    def device_range(self, name: str, ts: float, dur: float, ext: int) -> None:
        self._add("gpu_user_annotation", name, ts, dur, GPU, {"External id": ext})

    def launch(self, name: str, ts: float, cat: str = "cuda_runtime", dur: float = 1.0) -> int:
        corr = next(self._ids)
        self._add(cat, name, ts, dur, CPU, {"correlation": corr})
        return corr

    def op(self, name: str, ts: float, dur: float) -> None:
        """A host op (aten::mm and the like)."""
        self._add("cpu_op", name, ts, dur, CPU, {})

    def sync(self, ts: float, dur: float) -> None:
        """The host waiting on the GPU (no launch: no correlation id)."""
        self._add("cuda_runtime", "cudaEventSynchronize", ts, dur, CPU, {})

    def gpu(self, name: str, ts: float, dur: float, corr: int, cat: str = "kernel") -> None:
        self._add(cat, name, ts, dur, GPU, {"correlation": corr, "stream": GPU[1]})

    def kernel(
        self, name: str, launch_ts: float, ts: float, dur: float, cat: str = "kernel"
    ) -> None:
        """A kernel (or memcpy/memset) with its own launch."""
        self.gpu(name, ts, dur, self.launch("cudaLaunchKernel", launch_ts), cat)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"schemaVersion": 1, "traceEvents": self.events}).encode()
        path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
        return path


# A two-layer model. Layer ranges hold one GEMM and one attention kernel each.
LAYER_KERNELS = [("self_attn.qkv_proj", "gemm_a"), ("self_attn.attn", "attn_kernel")]
# What a replay of that graph runs (kernel, us), 2 us apart.
REPLAY = [
    ("gemm_a", 10),
    ("attn_kernel", 8),
    ("triton_poi_fused_add", 3),
    ("gemm_a", 10),
    ("attn_kernel", 8),
]


def capture_trace(path: Path) -> Path:
    """The tagged warm-up forward of the graph of 4 rows, partly compiled: the `## Call
    CompiledFxGraph` range after layer 0's attention holds an untagged fused kernel."""
    t = TraceBuilder()
    t.host("capture_warmup[bs=4]", 0, 200)
    ts = 10.0
    for layer in (0, 1):
        for module, kernel in LAYER_KERNELS:
            t.host(f"model.layers.{layer}.{module}", ts, 10)
            t.kernel(kernel, ts + 2, 1000 + ts, 5)
            ts += 20
        if layer == 0:
            t.host("## Call CompiledFxGraph fabc ##", ts, 10)
            t.kernel("triton_poi_fused_add", ts + 2, 1000 + ts, 3)
            ts += 20
    return t.write(path)


def run_trace(path: Path) -> Path:
    """An eager prefill (tags around each launch), then two decode steps replaying the graph of
    4 rows; the second replay also runs a memset its capture never saw."""
    t = TraceBuilder()
    ext = t.host("prefill[bs=1 tok=4 ctx=4]", 0, 100)
    t.device_range("prefill[bs=1 tok=4 ctx=4]", 200, 140, ext)
    t.kernel("memcpy_h2d", -5, 190, 5, cat="gpu_memcpy")  # before any step: no step's work
    t.host("model.layers.0.self_attn.qkv_proj", 10, 10)
    t.kernel("gemm_a", 12, 200, 30)
    t.host("model.layers.0.self_attn.attn", 25, 10)
    t.gpu("attn_kernel", 235, 20, t.launch("cuLaunchKernel", 27, cat="cuda_driver"))
    t.host("model.layers.1.self_attn.qkv_proj", 40, 10)
    t.kernel("gemm_a", 42, 260, 30)
    t.host("model.layers.1.self_attn.attn", 55, 10)
    t.kernel("attn_kernel", 57, 295, 20)
    t.host("sampler", 70, 10)
    t.kernel("Memcpy DtoH", 72, 320, 5, cat="gpu_memcpy")
    # No launch event recorded: the device-side ranges place it (layer 1's MLP, the prefill).
    t.device_range("model.layers.1.mlp", 329, 6, 0)
    t.gpu("orphan_kernel", 330, 4, corr=999)
    for start, gpu_start, extra in ((400, 500, False), (460, 600, True)):
        t.host("decode[bs=3/4 tok=3]", start, 40)
        graph = t.launch("cudaGraphLaunch", start + 5)
        ts = gpu_start
        for kernel, dur in REPLAY + ([("memset_x", 2)] if extra else []):
            t.gpu(kernel, ts, dur, graph, cat="gpu_memset" if kernel == "memset_x" else "kernel")
            ts += dur + 2
        t.host("compute_logits", start + 20, 5)
        t.kernel("gemm_logits", start + 21, ts + 1, 5)
    t.sync(445, 10)  # the host waits for the first decode's ids before the second step
    return t.write(path)


def gpu_only_trace(path: Path) -> Path:
    """What ATOM_TORCH_PROFILER_GPU_ONLY=1 records: GPU events only, no host range. Two steps,
    each ending with its sampled ids' copy to the host (int64: 3 rows, then 4)."""
    t = TraceBuilder()
    for name, ts, dur, cat, args in (
        ("gemm_a", 0, 10, "kernel", {}),
        ("attn_kernel", 12, 8, "kernel", {}),
        ("Memcpy DtoH (Device -> Pinned)", 21, 1, "gpu_memcpy", {"bytes": 24}),
        ("Memcpy HtoD (Pinned -> Device)", 39, 1, "gpu_memcpy", {"bytes": 64}),
        ("gemm_a", 40, 10, "kernel", {}),
        ("Memcpy DtoH (Device -> Pinned)", 51, 1, "gpu_memcpy", {"bytes": 32}),
    ):
        t._add(cat, name, ts, dur, GPU, {"correlation": 0, **args})
    return t.write(path)


def overlapping_trace(path: Path) -> Path:
    """A GPU-only step whose second kernel starts before the first ends, as a kernel launched with
    programmatic dependent launch does (it waits inside its own duration)."""
    t = TraceBuilder()
    for name, ts, dur, cat, args in (
        ("gemm_a", 0, 10, "kernel", {}),
        ("attn_kernel", 5, 7, "kernel", {}),  # 5-12: 2 us past gemm_a
        ("gemm_a", 20, 5, "kernel", {}),
        ("Memcpy DtoH (Device -> Pinned)", 26, 1, "gpu_memcpy", {"bytes": 24}),
    ):
        t._add(cat, name, ts, dur, GPU, {"correlation": 0, **args})
    return t.write(path)


def blocked_trace(path: Path) -> Path:
    """A prefill whose GEMM launch waits 3 ms (a full launch queue) inside aten::mm in layer 0's
    MLP, then a decode whose host waits 1.5 ms for its ids, and a 2 ms copy before any step."""
    t = TraceBuilder()
    t.kernel("memcpy_h2d", 0, 10, 1, cat="gpu_memcpy")
    t.gpu("Memcpy HtoD (Pageable -> Device)", 20, 5, t.launch("cudaMemcpyAsync", 10, dur=2000))
    t.host("prefill[bs=1 tok=4 ctx=4]", 3000, 5000)
    t.host("model.layers.0.mlp", 3100, 3500)
    t.op("aten::mm", 3200, 3200)
    t.gpu("gemm_a", 3300, 4000, t.launch("cudaLaunchKernel", 3250, dur=3000))
    t.kernel("attn_kernel", 6300, 7300, 50)
    t.host("decode[bs=1/1 tok=1]", 8100, 1700)
    t.kernel("gemm_b", 8110, 8120, 100)
    t.sync(8200, 1500)
    return t.write(path)
