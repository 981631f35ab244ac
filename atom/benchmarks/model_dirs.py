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
import tempfile
from pathlib import Path
from typing import Any

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
    return Path.home() / ".cache" / "atom" / "benchmark_models"


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
    if (dst / STAMP_FILE).is_file() and (dst / STAMP_FILE).read_text() == stamp:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed into place, so that a concurrent or interrupted run never sees half
    # a folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dst.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        for file in COPIED_FILES:
            shutil.copyfile(src / file, tmp / file)
        config = json.loads((src / "config.json").read_text())
        spec = json.loads((src / TOKENIZER_SPEC).read_text())
        write_stand_in_tokenizer(tmp, spec, int(config["vocab_size"]))
        (tmp / STAMP_FILE).write_text(stamp)
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
        logger.info("wrote benchmark model folder %s", dst)
    except OSError:
        if not ((dst / STAMP_FILE).is_file() and (dst / STAMP_FILE).read_text() == stamp):
            raise
        # Another process renamed its copy into place first: use that one.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
