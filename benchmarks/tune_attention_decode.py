"""Sweep the decode launch configuration of the unified attention kernel on the GPU.

    python benchmarks/tune_attention_decode.py [out.json] [--sections configs,splits,order,layout]
        [--heads 32 --context 256,300 --batches 1,8,32,128 --split-batches 1,8,32,128]

The nano-vllm bench's attention (Qwen3-0.6B: 16 query heads, 8 KV heads, head_dim 128, bf16,
block 16) at batches of mixed context lengths (uniform in [100, 2048], block ids shuffled):
every (tile, num_warps, num_stages) is timed as bench_attention.py times a kernel (L2 flushed,
median of 20) and reported in GB/s of KV read, beside the copy bandwidth measured in the same run;
`--configs tile:warps:stages[:maxnreg]` picks some, a fourth number capping the registers of a
thread (Triton's `maxnreg`: more programs an SM, spilling the rest; the long-context decode's 196
registers with 4 warps leave two programs an SM where its shared memory allows three:
benchmarks/attention_resources.py, RESULTS thirty-eighth sitting).
The current choice (attention_config.launch_config) is marked; configurations that do not fit
the GPU's shared memory are skipped. Then the current tiles with 1-16 KV splits at batches 8-256,
choose_num_splits's pick marked. Then ("order") the current launch at batches 16-256 with the
batch in random order against longest context first, as build_step_inputs orders a decode step.
Then ("layout") the current launch over caches of other layouts, read through their strides:
blocks of 16 / 32 / 64 tokens, token-major (the engine's [block, token, kv_head, dim]: a KV
head's row of a token is 256 contiguous bytes) or head-major ([block, kv_head, token, dim]: a KV
head's rows of a block are contiguous), beside a plain read-only Triton pass over 2 GiB for
comparison (it read less than attention does at batch 256: RESULTS, fourteenth sitting).
`--heads` and `--context` give other shapes: the 8B latency benchmark's is 32 query heads over
contexts of 129-384 tokens (`--heads 32 --context 129,384`)."""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # the timing helper

import atom.kernels.unified_attention as ua
from atom.kernels.attention_config import LaunchConfig, choose_num_splits, launch_config, num_sms

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 16
BATCHES = [64, 256]
SPLIT_BATCHES, SPLITS = [8, 16, 32, 64, 128, 256], [1, 2, 4, 8, 16]
ORDER_BATCHES = [16, 32, 64, 96, 128, 192, 256]
LAYOUT_BATCHES, LAYOUT_BLOCKS = [64, 256], [16, 32, 64]
TILES, WARPS, STAGES = [64, 128, 256], [2, 4, 8], [1, 2, 3, 4]
CONTEXT = (100, 2048)  # each sequence's context, uniform in [lo, hi]


def inputs(
    batch: int, longest_first: bool = False, block: int = BLOCK, head_major: bool = False
) -> dict:
    gen = torch.Generator().manual_seed(batch)
    lens = torch.randint(CONTEXT[0], CONTEXT[1] + 1, (batch,), generator=gen)
    if longest_first:
        lens = lens.sort(descending=True).values
    blocks = (lens + block - 1) // block
    max_blocks = int(blocks.max())
    perm = torch.randperm(int(blocks.sum()), generator=gen)
    table = torch.zeros(batch, max_blocks, dtype=torch.int32)
    start = 0
    for i, n in enumerate(blocks.tolist()):
        table[i, :n] = perm[start : start + n]
        start += n
    kw = {"dtype": torch.bfloat16, "device": "cuda"}
    if head_major:  # the kernel's view [2, blocks, block, kv_heads, dim] of other strides
        cache = torch.randn(2, start, KV_HEADS, block, HEAD_DIM, **kw).transpose(2, 3)
    else:
        cache = torch.randn(2, start, block, KV_HEADS, HEAD_DIM, **kw)
    return {
        "query": torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda"),
        "kv_cache": cache,
        "block_tables": table.cuda(),
        "seq_lens": lens.to(torch.int32).cuda(),
        "query_start_loc": torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        "max_query_len": 1,
        "max_seq_len": int(lens.max()),
        "scale": HEAD_DIM**-0.5,
        "kv_bytes": int(lens.sum()) * 2 * KV_HEADS * HEAD_DIM * 2,
    }


def copy_gbps() -> float:
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_attention.bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def main() -> None:
    global HEADS, CONTEXT, SPLIT_BATCHES
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="attention_decode_tune.json")
    parser.add_argument("--sections", default="configs,splits,order")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="the configs section's batches")  # fmt: skip
    parser.add_argument("--configs", default="",
                        help="tile:warps:stages[:maxnreg][:d],... (default all; 0: no cap, d: "
                        "one-block tiles through tensor descriptors)")  # fmt: skip
    parser.add_argument("--block", type=int, default=BLOCK,
                        help="the cache's block size (the configs section)")  # fmt: skip
    parser.add_argument("--heads", type=int, default=HEADS, help="query heads (8 KV heads)")
    parser.add_argument("--context", default="", help="LO,HI: contexts uniform in [LO, HI]")
    parser.add_argument("--split-batches", default="", help="the splits section's batches")
    args = parser.parse_args()
    HEADS = args.heads
    if args.context:
        CONTEXT = tuple(int(v) for v in args.context.split(","))
    if args.split_batches:
        SPLIT_BATCHES = [int(b) for b in args.split_batches.split(",")]
    sections = args.sections.split(",")
    current = launch_config(1, HEADS // KV_HEADS, HEAD_DIM)  # at long contexts
    results = {"copy_GBps": copy_gbps(), "current": str(current), "runs": []}
    print(f"copy bandwidth {results['copy_GBps']:.0f} GB/s; long contexts {current}", flush=True)
    if "configs" in sections:
        configs = [parse_config(c) for c in args.configs.split(",") if c]
        batches = [int(b) for b in args.batches.split(",")]
        results["runs"] = sweep_configs(current, batches, configs, args.block)
    if "splits" in sections:
        results["splits"] = sweep_splits()
    if "order" in sections:
        results["order"] = sweep_order()
    if "layout" in sections:
        results["read_GBps"] = read_gbps()
        print(f"read-only pass {results['read_GBps']:.0f} GB/s", flush=True)
        results["layout"] = sweep_layout()
    Path(args.out).write_text(json.dumps(results, indent=1))


Config = tuple[int, int, int, int | None, bool, int | None]


def parse_config(text: str) -> Config:
    """tile:warps:stages[:maxnreg][:d][:sN] -> (tile, warps, stages, maxnreg or None,
    descriptors, KV splits or None: choose_num_splits's)."""
    fields = text.split(":")
    splits = int(fields.pop()[1:]) if fields[-1].startswith("s") else None
    desc = fields[-1] == "d"
    nums = [int(f) for f in fields[: len(fields) - desc]]
    return nums[0], nums[1], nums[2], (nums[3] or None) if len(nums) > 3 else None, desc, splits


def sweep_configs(
    base: LaunchConfig,
    batches: list[int],
    configs: list[Config],
    block: int = BLOCK,
) -> list[dict]:
    runs = []
    original = ua.launch_config
    default = [(*c, None, False, None) for c in itertools.product(TILES, WARPS, STAGES)]
    for batch in batches:
        inp = inputs(batch, True, block)
        current = original(
            1, HEADS // KV_HEADS, HEAD_DIM, batch * KV_HEADS, inp["max_seq_len"],
            num_sms(inp["query"].device),
        )  # fmt: skip
        kv_bytes = inp.pop("kv_bytes")
        out = torch.empty_like(inp["query"])
        for tile, warps, stages, maxnreg, desc, splits in configs or default:
            cfg = LaunchConfig(base.block_m, base.block_q, tile, True, warps, stages, maxnreg, desc)
            ua.launch_config = lambda *_, cfg=cfg: cfg
            try:
                call = lambda inp=inp, out=out, n=splits: ua.unified_attention(  # noqa: E731
                    **inp, out=out, num_splits=n
                )
                ms = bench_attention.bench(call)
            except Exception as e:  # out of shared memory, say
                print(
                    f"batch {batch} tile {tile} warps {warps} stages {stages}: {type(e).__name__}"
                )
                continue
            finally:
                ua.launch_config = original
            gbps = kv_bytes / ms / 1e6
            is_current = cfg == current and splits is None
            mark = " <- current" if is_current else ""
            print(f"batch {batch} block {block} tile {tile:3d} warps {warps} stages {stages} "
                  f"maxnreg {maxnreg} desc {int(desc)} splits {splits}: {ms * 1e3:.1f} us "
                  f"{gbps:6.0f} GB/s{mark}",
                  flush=True)  # fmt: skip
            runs.append(
                {"batch": batch, "block": block, "tile": tile, "warps": warps, "stages": stages,
                 "maxnreg": maxnreg, "desc": desc, "splits": splits, "ms": ms, "gb_per_s": gbps,
                 "current": is_current}
            )  # fmt: skip
    return runs


def time_launch(inp: dict, **kwargs: object) -> tuple[float, float]:
    """(ms, GB/s of KV read) of the engine's launch over inputs() (kwargs: forced settings)."""
    inp = dict(inp)
    kv_bytes = inp.pop("kv_bytes")
    out = torch.empty_like(inp["query"])
    ms = bench_attention.bench(lambda: ua.unified_attention(**inp, out=out, **kwargs))
    return ms, kv_bytes / ms / 1e6


def sweep_splits() -> list[dict]:
    """The current tiles at each batch with 1..16 KV splits: where splitting each sequence
    evens out the programs' lengths (contexts of 100-2,048 tokens) beyond choose_num_splits's
    rule (two splits below two programs per SM, more below one)."""
    runs = []
    for batch in SPLIT_BATCHES:
        inp = inputs(batch)
        chosen = choose_num_splits(
            batch, KV_HEADS, 1, inp["max_seq_len"], num_sms(inp["query"].device)
        )
        for splits in SPLITS:
            ms, gbps = time_launch(inp, num_splits=splits)
            mark = " <- chosen" if splits == chosen else ""
            print(
                f"batch {batch} splits {splits:2d}: {ms:.3f} ms {gbps:6.0f} GB/s{mark}", flush=True
            )
            runs.append({"batch": batch, "splits": splits, "ms": ms, "gb_per_s": gbps,
                         "chosen": splits == chosen})  # fmt: skip
    return runs


def sweep_order() -> list[dict]:
    """The launch the engine makes (tiles, chosen splits) with the batch in random order and
    longest context first: programs start in batch order, so the longest-first order leaves the
    shortest programs for the last wave."""
    runs = []
    for batch in ORDER_BATCHES:
        for longest_first in (False, True):
            ms, gbps = time_launch(inputs(batch, longest_first))
            order = "longest first" if longest_first else "random order"
            print(f"batch {batch} {order}: {ms:.3f} ms {gbps:6.0f} GB/s", flush=True)
            runs.append({"batch": batch, "longest_first": longest_first, "ms": ms,
                         "gb_per_s": gbps})  # fmt: skip
    return runs


@triton.jit
def _read_kernel(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Each program sums its strided share of src: a pass that reads and writes nothing back."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(pid * BLOCK, n, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def read_gbps() -> float:
    src = torch.randn(1 << 30, dtype=torch.bfloat16, device="cuda")
    best = 0.0
    for per_sm in (4, 8, 16):
        programs = per_sm * num_sms(src.device)
        out = torch.empty(programs, dtype=torch.float32, device="cuda")
        grid = (programs,)
        ms = bench_attention.bench(lambda: _read_kernel[grid](src, out, src.numel(), BLOCK=4096))  # noqa: B023
        best = max(best, 2 * src.numel() / ms / 1e6)
    return best


def sweep_layout() -> list[dict]:
    """The current launch over block sizes 16-64, token-major and head-major (module doc)."""
    runs = []
    for batch, block, head_major in itertools.product(LAYOUT_BATCHES, LAYOUT_BLOCKS, (False, True)):
        ms, gbps = time_launch(inputs(batch, True, block, head_major))
        layout = "head-major" if head_major else "token-major"
        print(f"batch {batch} block {block} {layout}: {ms:.3f} ms {gbps:6.0f} GB/s", flush=True)
        runs.append({"batch": batch, "block": block, "head_major": head_major, "ms": ms,
                     "gb_per_s": gbps})  # fmt: skip
    return runs


if __name__ == "__main__":
    main()
