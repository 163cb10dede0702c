"""Where the testbed keeps what is slow to build and what it runs."""

from __future__ import annotations

import os
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
    """Return where `pilotfleet testbed up` keeps pids, ports, kubeconfig and logs."""
    return project_root() / ".testbed"
