"""A GGUF file's config, tokenizer and (for small models) dequantized weights, converted once
by transformers and kept as an ordinary model folder (config.json, the tokenizer's files,
model.safetensors) under the cache directory.

transformers builds each of them by parsing the whole file: 8.8 s for SmolLM2's tokenizer, 12.8 s
for its config and ~20 s for its weights on a 2-core CPU, again in every process that loads them
(a server's API process and its engine core both do). From the folder they load in about a
second. Weights are kept only up to MAX_CACHED_WEIGHT_BYTES (dequantized to float32, a 7B model
would take 28 GB): larger models read their weights from the GGUF file every time.

The folder's name holds a hash of the file's path, size and modification time, and of
transformers' and gguf's versions, so a changed file or another converter converts again. It is
built aside and renamed into place, so a concurrent start never sees half a folder. Where the
cache cannot be written, callers read the GGUF file as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import xxhash
from torch import Tensor

from atom.cache_dir import cache_root, publish_folder

logger = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump when what a folder holds changes
DONE_FILE = ".atom-gguf-source"  # written last: a folder without it is incomplete
WEIGHTS_FILE = "model.safetensors"
MAX_CACHED_WEIGHT_BYTES = 4 << 30


def default_cache_dir() -> Path:
    return cache_root() / "gguf"


def cache_key(gguf: Path) -> str:
    import gguf as gguf_py  # dequantizes the weights
    import transformers

    st = gguf.stat()
    versions = (transformers.__version__, getattr(gguf_py, "__version__", ""))
    parts = (str(gguf.resolve()), st.st_size, st.st_mtime_ns, *versions)
    return xxhash.xxh64_hexdigest("|".join(map(str, (CACHE_VERSION, *parts))).encode())


def convert(gguf: Path, dst: Path) -> None:
    """Write the GGUF file's config and tokenizer into dst, as transformers reads them."""
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dst)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dst)


def converted(
    gguf: Path, cache_dir: Path | None = None, build: Callable[[Path, Path], None] = convert
) -> Path | None:
    """The folder holding the GGUF file's config and tokenizer, converted on first use; None
    where the cache cannot be written (the caller reads the GGUF file)."""
    root = cache_dir or default_cache_dir()

    def complete(folder: Path) -> bool:
        return (folder / DONE_FILE).is_file()

    def convert_into(folder: Path) -> None:
        build(gguf, folder)
        (folder / DONE_FILE).write_text(str(gguf.resolve()))
        logger.info("converted %s's config and tokenizer into %s", gguf.name, dst)

    try:
        dst = root / f"{gguf.stem}-{cache_key(gguf)}"  # a missing file: the caller reports it
        publish_folder(dst, convert_into, complete)
    except OSError:
        logger.warning("not using the GGUF cache under %s", root, exc_info=True)
        return None
    return dst


def cached_weights(folder: Path) -> Path | None:
    path = folder / WEIGHTS_FILE
    return path if path.is_file() else None


def save_weights(folder: Path, tensors: dict[str, Tensor]) -> bool:
    """Keep a GGUF file's dequantized weights in its folder, where they are small enough;
    written aside and renamed, so a reader sees the whole file or none."""
    from safetensors.torch import save_file

    if sum(t.numel() * t.element_size() for t in tensors.values()) > MAX_CACHED_WEIGHT_BYTES:
        return False
    tmp = folder / f".{WEIGHTS_FILE}.{os.getpid()}"
    try:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp))
        tmp.rename(folder / WEIGHTS_FILE)
    except Exception:  # a full disk, tensors sharing memory: the cache is only a shortcut
        logger.warning("cannot keep the GGUF weights in %s", folder, exc_info=True)
        tmp.unlink(missing_ok=True)
        return False
    return True
