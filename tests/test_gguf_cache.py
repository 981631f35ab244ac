"""The GGUF config/tokenizer cache's mechanics, with a stand-in converter (the real conversion
against the file itself: tests/models/test_smollm2.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from atom import gguf_cache
from atom.model_source import _converted_gguf


def _gguf(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "tiny.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF stand-in")
    return path


def _builder(calls: list[Path]) -> Callable[[Path, Path], None]:
    def build(gguf: Path, dst: Path) -> None:
        calls.append(gguf)
        (dst / "config.json").write_text("{}")

    return build


def test_converted_once_then_reused(tmp_path: Path) -> None:
    gguf, cache, calls = _gguf(tmp_path), tmp_path / "cache", []
    first = gguf_cache.converted(gguf, cache, _builder(calls))
    again = gguf_cache.converted(gguf, cache, _builder(calls))
    assert first == again and first is not None and calls == [gguf]
    assert (first / "config.json").is_file() and first.name.startswith("tiny.Q4_1-")
    assert [p.name for p in cache.iterdir()] == [first.name]  # no half-built folder left
    # A changed file converts again, into a folder of its own.
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))
    changed = gguf_cache.converted(gguf, cache, _builder(calls))
    assert changed not in (None, first) and len(calls) == 2


def test_a_folder_renamed_first_by_another_process_is_used(tmp_path: Path) -> None:
    gguf, cache = _gguf(tmp_path), tmp_path / "cache"
    dst = cache / f"{gguf.stem}-{gguf_cache.cache_key(gguf)}"

    def racing(gguf: Path, tmp: Path) -> None:  # the other process finishes during our build
        dst.mkdir(parents=True)
        (dst / gguf_cache.DONE_FILE).write_text(str(gguf))
        (tmp / "config.json").write_text("{}")

    assert gguf_cache.converted(gguf, cache, racing) == dst
    assert [p.name for p in cache.iterdir()] == [dst.name]


def test_no_cache_where_it_cannot_be_written(tmp_path: Path) -> None:
    gguf = _gguf(tmp_path)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert gguf_cache.converted(gguf, blocked / "cache", _builder([])) is None

    def failing(gguf: Path, dst: Path) -> None:
        raise OSError("disk full")

    assert gguf_cache.converted(gguf, tmp_path / "cache", failing) is None
    assert list((tmp_path / "cache").iterdir()) == []
    # A missing file is the caller's error to report, not the cache's.
    assert gguf_cache.converted(tmp_path / "missing.gguf", tmp_path / "cache") is None


def test_loaders_read_the_folder_or_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = _gguf(tmp_path)
    folder = tmp_path / "converted"
    monkeypatch.setattr(gguf_cache, "converted", lambda path: folder)
    assert _converted_gguf(str(gguf.parent), gguf.name) == (str(folder), None)
    monkeypatch.setattr(gguf_cache, "converted", lambda path: None)
    assert _converted_gguf(str(gguf.parent), gguf.name) == (str(gguf.parent), gguf.name)
    assert _converted_gguf("some/dir", None) == ("some/dir", None)


def test_weights_kept_exactly_up_to_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dequantized weights are kept bit for bit (float32) and read back as a model folder's
    safetensors; past MAX_CACHED_WEIGHT_BYTES they are not kept."""
    from atom.executor.loader import iter_safetensors

    tensors = {
        "model.embed_tokens.weight": torch.randn(7, 5),
        "lm_head.weight": torch.randn(5, 7).t(),
    }
    assert gguf_cache.cached_weights(tmp_path) is None
    monkeypatch.setattr(gguf_cache, "MAX_CACHED_WEIGHT_BYTES", 2 * 35 * 4 - 1)
    assert not gguf_cache.save_weights(tmp_path, tensors)
    assert gguf_cache.cached_weights(tmp_path) is None
    monkeypatch.setattr(gguf_cache, "MAX_CACHED_WEIGHT_BYTES", 2 * 35 * 4)
    assert gguf_cache.save_weights(tmp_path, tensors)
    assert gguf_cache.cached_weights(tmp_path) == tmp_path / gguf_cache.WEIGHTS_FILE
    read = dict(iter_safetensors(str(tmp_path)))
    assert read.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(read[name], tensor) and read[name].dtype == torch.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == [gguf_cache.WEIGHTS_FILE]
