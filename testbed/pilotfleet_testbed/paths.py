"""Where the testbed keeps what is slow to build and what it runs."""

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


def project_root() -> Path:
    """Return the project's root folder (the one holding pyproject.toml)."""
    return Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """Return where `pilotfleet testbed up` keeps pids, ports, kubeconfig and logs:
    `PILOTFLEET_TESTBED_STATE`, default `.testbed/` at the project root (a test sets it, so that its
    testbed never meets a developer's)."""
    return Path(os.environ.get("PILOTFLEET_TESTBED_STATE") or project_root() / ".testbed")


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
