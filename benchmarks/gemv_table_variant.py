"""A copy of gemv's tuned table with some entries changed, for an A/B of tiles in the engine
(`gpu_run.sh ab` swaps a file in for a variant's runs).

    python benchmarks/gemv_table_variant.py OUT.json SPEC [SPEC ...]

SPEC is SHAPE:BUCKET:CHANGES, CHANGES either FIELD=VALUE,... (GemvConfig's fields, over the
committed entry or over GemvConfig's defaults where it is null) or `null` (cuBLAS). E.g. the 8B's
o_proj at 1-16 rows split 8 ways, and its qkv in 32-wide tiles:

    python benchmarks/gemv_table_variant.py /tmp/o8.json 4096x4096:16:split_k=8
    python benchmarks/gemv_table_variant.py /tmp/qkv32.json 6144x4096:16:block_n=32,split_k=4
    T=atom/kernels/gemv_configs.json AB_WHAT=latency LATENCY_BATCHES=1 \
        AB_VARIANTS="base o8:$T</tmp/o8.json qkv32:$T</tmp/qkv32.json" bash benchmarks/gpu_run.sh ab

A tuner picks tiles in isolation (bench_gemv.py --tune, without PDL); the engine runs them beside
its norms and attention, with PDL, which is what an A/B of variants measures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from atom.kernels.gemv import TUNED_BUCKETS, TUNED_CONFIGS, GemvConfig

FIELDS = tuple(f.name for f in dataclasses.fields(GemvConfig))


def apply(table: dict, spec: str) -> None:
    """Changes one entry of table["shapes"] as SPEC says (module doc)."""
    try:
        shape, bucket, changes = spec.split(":")
    except ValueError:
        raise ValueError(f"{spec!r}: expected SHAPE:BUCKET:CHANGES") from None
    if int(bucket) not in TUNED_BUCKETS:
        raise ValueError(f"{spec!r}: bucket {bucket} is not one of {TUNED_BUCKETS}")
    entries = table["shapes"].setdefault(shape, {})
    if changes == "null":
        entries[bucket] = None
        return
    entry = dict(entries.get(bucket) or dataclasses.asdict(GemvConfig()))
    for change in changes.split(","):
        field, _, value = change.partition("=")
        if field not in FIELDS or not value:
            raise ValueError(f"{spec!r}: {change!r} is not FIELD=VALUE of {', '.join(FIELDS)}")
        entry[field] = value.lower() in ("1", "true") if field == "descriptor" else int(value)
    entries[bucket] = dataclasses.asdict(GemvConfig(**entry))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    args = parser.parse_args(argv)
    table = json.loads(TUNED_CONFIGS.read_text())
    for spec in args.specs:
        try:
            apply(table, spec)
        except ValueError as e:
            parser.error(str(e))
    table["_comment"] += f"; variant: {' '.join(args.specs)}"
    args.out.write_text(json.dumps(table, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
