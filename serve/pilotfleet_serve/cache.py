"""Where pilotfleet keeps what is slow to build or download, shared by every run on a machine."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


def cache_dir() -> Path:
    """Return the cache for slow-to-build parts (`PILOTFLEET_CACHE`, default `~/.cache/pilotfleet`)."""
    root = os.environ.get("PILOTFLEET_CACHE") or str(Path.home() / ".cache" / "pilotfleet")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on `<cache>/locks/<name>.lock`, so parallel runs install a part only once."""
    lock_path = cache_dir() / "locks" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
