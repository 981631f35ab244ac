"""ATOM's cache folder ($XDG_CACHE_HOME/atom, else ~/.cache/atom), and how a folder in it is
published: built aside and renamed into place, so that a concurrent or interrupted run never
sees half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atom"


def publish_folder(
    dst: Path, build: Callable[[Path], None], complete: Callable[[Path], bool]
) -> None:
    """Make dst with build(folder) unless complete(dst) already holds: build writes into a
    fresh folder beside dst, which then replaces dst (an incomplete or stale one). Where another
    process publishes dst first, its folder is kept. Raises OSError where dst cannot be made."""
    if complete(dst):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        build(tmp)
        if complete(dst):  # another process finished first
            return
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    except OSError:
        if not complete(dst):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
