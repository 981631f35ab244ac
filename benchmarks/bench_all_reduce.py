"""All-reduce latency across this host's GPUs: NCCL against the custom all-reduce's kernels
(PyTorch's symmetric-memory one-shot with the copy in, and the two-shot into a new tensor after
a copy into the buffer: atom/custom_all_reduce.py), bf16 rows of --hidden values, each captured
--reps times in one CUDA graph (a decode step's all-reduces: 64 for a 32-layer model), the
median of 10 replays; every method's sum is checked against NCCL's.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/bench_all_reduce.py [OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

ROWS = (1, 8, 32, 128, 256, 512, 1024)


def time_in_graph(fn: Callable[[], object], reps: int) -> float:
    """us per call of fn, replayed from a CUDA graph of `reps` calls."""
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                fn()
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def measure(
    rows: int, hidden: int, reps: int, buffer: torch.Tensor, name: str, rank: int
) -> dict[str, float]:
    gen = torch.Generator(device="cuda").manual_seed(100 + rank)
    x = torch.randn(rows, hidden, generator=gen, device="cuda").bfloat16()
    view = buffer[: x.numel()]
    want = x.clone()
    dist.all_reduce(want)
    nccl_x = x.clone()

    def one_shot() -> torch.Tensor:
        return torch.ops.symm_mem.one_shot_all_reduce_copy(view, x.view(-1), "sum", name)

    out = torch.empty_like(x).view(-1)

    def two_shot() -> torch.Tensor:  # as CustomAllReduce makes it
        view.copy_(x.view(-1))
        return torch.ops.symm_mem.two_shot_all_reduce_out(view, "sum", name, out)

    entry = {"nccl_us": time_in_graph(lambda: dist.all_reduce(nccl_x), reps)}
    for label, fn in (("one_shot_copy", one_shot), ("two_shot", two_shot)):
        got = fn().view(rows, hidden)
        torch.cuda.synchronize()
        entry[f"{label}_max_diff"] = (got.float() - want.float()).abs().max().item()
        entry[f"{label}_us"] = time_in_graph(fn, reps)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=None)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=64)
    args = parser.parse_args()
    import torch.distributed._symmetric_memory as symm_mem

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    name = dist.group.WORLD.group_name
    buffer = symm_mem.empty(max(ROWS) * args.hidden, dtype=torch.bfloat16, device="cuda")
    symm_mem.rendezvous(buffer, name)
    record: dict[str, object] = {"world": dist.get_world_size(), "hidden": args.hidden}
    for rows in ROWS:
        record[str(rows)] = entry = measure(rows, args.hidden, args.reps, buffer, name, rank)
        if rank == 0:
            print(rows, json.dumps(entry), flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
