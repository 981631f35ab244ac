"""Registers, spills and shared memory of the unified attention's decode variants, compiled for
sm90 on any machine (no GPU): `python benchmarks/attention_resources.py [--maxnreg 128,168]
[--warps 2,8]`.

Each launch configuration attention_config picks for decode (and the alternatives given) is
compiled with Triton for an H100/H200 and read back with the CUDA toolkit's `cuobjdump` that
Triton bundles. Programs an SM = min(by registers, by shared memory, by warps); H200: 65,536
registers, 228 KB of shared memory and 64 warps an SM. The bench's long-context decode (128-key
tiles, two stages, 4 warps) takes 196 registers a thread: two programs an SM, where its 72 KB of
shared memory would allow three (RESULTS, thirty-eighth sitting); at 132 sequences and more its
descriptor tiles (one warp, 41 KB) run five (forty-first sitting). Run with TRITON_INTERPRET
unset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from atom.kernels.attention_config import DO_NOT_SPECIALIZE
from atom.kernels.unified_attention import _unified_attention_kernel

REGISTERS, SHARED, MAX_WARPS = 65536, 228 * 1024, 64  # an H100/H200 SM
POINTERS = ("out_ptr", "q_ptr", "k_ptr", "v_ptr", "block_tables_ptr", "seq_lens_ptr", "qsl_ptr",
            "ws_acc_ptr", "ws_m_ptr", "ws_l_ptr", "sinks_ptr")  # fmt: skip
INTS = ("num_seqs", "num_splits", "stride_qt", "stride_qh", "stride_ot", "stride_oh",
        "stride_kb", "stride_ks", "stride_kh", "stride_bt")  # fmt: skip
# Strides that are multiples of 16 in the engine: Triton specialises those not in
# DO_NOT_SPECIALIZE on it.
STRIDES = (
    "stride_qt",
    "stride_qh",
    "stride_ot",
    "stride_oh",
    "stride_kb",
    "stride_ks",
    "stride_kh",
)
ALIGNED = tuple(name for name in STRIDES if name not in DO_NOT_SPECIALIZE)
# (name, query heads per KV head, tile, warps, stages, descriptors): the benchmarks' decodes
VARIANTS = [
    ("8B short contexts, batch >= 33 (64-key tiles)", 4, 64, 4, 1, False),
    ("8B short contexts, batch <= 32 (128-key tiles)", 4, 128, 4, 1, False),
    ("0.6B long contexts (the bench), batch < 132", 2, 128, 4, 2, False),
    ("0.6B long contexts (the bench), batch >= 132 (descriptor tiles)", 2, 32, 1, 6, True),
]


def compile_attention(
    const: dict, num_warps: int, num_stages: int, maxnreg: int | None = None
) -> Any:
    """The attention kernel compiled for sm90 with these constexprs (a full set) as a launch
    specialises it: 16-byte aligned pointers and strides that are multiples of 16 (the K/V loads
    vectorise on them; without, they are scalar 2-byte loads at 255 registers)."""
    ints = ("tables_ptr", "lens_ptr", "qsl_ptr")
    types = {name: "*i32" if name.endswith(ints) else "*fp32"
             if name.startswith(("ws_", "sinks")) else "*bf16" for name in POINTERS}  # fmt: skip
    types.update(qk_scale="fp32", softcap="fp32", v_scale="fp32")
    types.update(dict.fromkeys(INTS, "i32"))
    box = f"tensordesc<bf16[{const['BLOCK_SIZE']}, {const['HEAD_DIM']}]>"
    types.update(dict.fromkeys(("k_desc", "v_desc"), box if const["KV_DESC"] else "*bf16"))
    types.update(dict.fromkeys(const, "constexpr"))
    names = _unified_attention_kernel.arg_names
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in (*POINTERS, *ALIGNED)}
    options: dict = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        options["maxnreg"] = maxnreg
    source = ASTSource(fn=_unified_attention_kernel, signature={n: types[n] for n in names},
                       constexprs=const, attrs=attrs)  # fmt: skip
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def decode_const(group: int, tile: int, kv_desc: bool = False) -> dict:
    """The constexprs of an unsplit bf16 decode launch (head_dim 128, 8 KV heads, 16-token
    blocks, PDL) with `group` query heads per KV head."""
    return {"NUM_HEADS": 8 * group, "GROUP": group, "HEAD_DIM": 128, "HEAD_DIM_P": 128,
            "BLOCK_SIZE": 16, "BLOCK_M": 16, "BLOCK_Q": 16 // group, "TILE": tile,
            "ONE_BLOCK_PER_SEQ": True, "SPLIT": False, "SLIDING_WINDOW": 0,
            "USE_SOFTCAP": False, "USE_SINKS": False, "KV_FP8": False,
            "DOT_PRECISION": "tf32", "KV_DESC": kv_desc, "PDL": True}  # fmt: skip


def resources(
    group: int, tile: int, warps: int, stages: int, maxnreg: int | None, kv_desc: bool = False
) -> dict:
    """Registers a thread, spill stack bytes, shared memory and programs an SM of one decode
    variant, and how many tensor-memory-accelerator copies its PTX issues."""
    kernel = compile_attention(decode_const(group, tile, kv_desc), warps, stages, maxnreg)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    # "REG:196 STACK:0 SHARED:1024 LOCAL:0 ..." (SHARED: the static part only)
    line = next(line for line in usage.splitlines() if "REG:" in line)
    fields = dict(item.split(":") for item in line.split() if ":" in item)
    regs, shared = int(fields["REG"]), kernel.metadata.shared
    by_regs = REGISTERS // (32 * warps * -(-regs // 8) * 8)  # registers go out 8 a thread
    programs = min(by_regs, SHARED // max(shared, 1), MAX_WARPS // warps)
    return {"registers": regs, "spill_bytes": int(fields["STACK"]), "shared": shared,
            "programs_per_sm": programs,
            "tma_copies": kernel.asm["ptx"].count("cp.async.bulk.tensor")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maxnreg", default="", help="register caps to try, e.g. 128,168")
    parser.add_argument("--warps", default="", help="other warp counts to try, e.g. 2,8")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: this compiles for sm90")
    caps = [None] + [int(c) for c in args.maxnreg.split(",") if c]
    for name, group, tile, warps, stages, kv_desc in VARIANTS:
        for w in [warps] + [int(c) for c in args.warps.split(",") if c]:
            for cap in caps:
                r = resources(group, tile, w, stages, cap, kv_desc)
                print(f"{name}: warps {w} stages {stages} maxnreg {cap}: {r['registers']} "
                      f"registers, {r['spill_bytes']} bytes spilled, {r['shared']} B shared, "
                      f"{r['programs_per_sm']} programs an SM", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
