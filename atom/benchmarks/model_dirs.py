"""Benchmark models without checkpoints: `--model qwen3-0.6b` names a folder of `configs/` holding
the real checkpoint's config.json and generation_config.json; with `--load-format dummy` the weights
are random. The tokenizers of these models ship in no PyPI package and are megabytes of JSON, so a
stand-in (WordLevel, one token per id of the real vocabulary) is written on first use into a cache
folder, next to copies of the two configs; that folder is what the engine loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from atom.cache_dir import cache_root, publish_folder

logger = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).parent / "configs"
COPIED_FILES = ("config.json", "generation_config.json")
TOKENIZER_SPEC = "tokenizer_spec.json"
# Bump when write_stand_in_tokenizer writes something else: cached folders are then rebuilt.
RECIPE_VERSION = "1"
STAMP_FILE = ".atom-benchmark-model"


def benchmark_model_names() -> list[str]:
    return sorted(p.name for p in CONFIGS_DIR.iterdir() if (p / "config.json").is_file())


def default_cache_dir() -> Path:
    return cache_root() / "benchmark_models"


def benchmark_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The cache folder of benchmark model `name` (config, generation config, tokenizer), made or
    refreshed when missing or stale."""
    if name not in benchmark_model_names():
        raise ValueError(
            f"unknown benchmark model {name!r}; known: {', '.join(benchmark_model_names())}"
        )
    src = CONFIGS_DIR / name
    dst = (cache_dir or default_cache_dir()) / name
    stamp = _stamp(src)

    def current(folder: Path) -> bool:
        return (folder / STAMP_FILE).is_file() and (folder / STAMP_FILE).read_text() == stamp

    def build(folder: Path) -> None:
        for file in COPIED_FILES:
            shutil.copyfile(src / file, folder / file)
        config = json.loads((src / "config.json").read_text())
        spec = json.loads((src / TOKENIZER_SPEC).read_text())
        write_stand_in_tokenizer(folder, spec, int(config["vocab_size"]))
        (folder / STAMP_FILE).write_text(stamp)
        logger.info("wrote benchmark model folder %s", dst)

    publish_folder(dst, build, current)
    return dst


def resolve_benchmark_model(model: str | None, cache_dir: Path | None = None) -> str | None:
    """A benchmark model name becomes its cache folder; a path or a hub id passes through (an
    existing path wins over a name)."""
    if model is None or Path(model).expanduser().exists():
        return model
    if model in benchmark_model_names():
        return str(benchmark_model_dir(model, cache_dir))
    return model


def write_stand_in_tokenizer(dst: Path, spec: dict[str, Any], vocab_size: int) -> None:
    """A WordLevel tokenizer with exactly `vocab_size` ids: `t<id>` below
    spec["special_tokens_start"], special tokens from there on (named as in spec["special_tokens"],
    `<|reserved_<id>|>` otherwise), so that every id a random-weight model samples decodes."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    start = int(spec["special_tokens_start"])
    if not 0 < start <= vocab_size:
        raise ValueError(f"special_tokens_start {start} is outside (0, {vocab_size}]")
    named = {int(k): v for k, v in spec.get("special_tokens", {}).items()}
    specials = [named.get(i, f"<|reserved_{i}|>") for i in range(start, vocab_size)]
    vocab = {f"t{i}": i for i in range(start)} | {s: start + k for k, s in enumerate(specials)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    roles = {r: spec.get(r) for r in ("bos_token", "eos_token", "pad_token") if spec.get(r)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", **roles)
    tokenizer.save_pretrained(str(dst))


def _stamp(src: Path) -> str:
    digest = hashlib.sha256(RECIPE_VERSION.encode())
    for file in (*COPIED_FILES, TOKENIZER_SPEC):
        digest.update((src / file).read_bytes())
    return digest.hexdigest()
