"""Where the project lives and where `pilotfleet testbed up` keeps what it runs (the cache of slow-to-build
parts is `pilotfleet_serve.cache`)."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """Return the project's root folder (the one holding pyproject.toml)."""
    return Path(__file__).resolve().parents[2]


def state_dir() -> Path:
    """Return where `pilotfleet testbed up` keeps pids, ports, kubeconfig and logs:
    `PILOTFLEET_TESTBED_STATE`, default `.testbed/` at the project root (a test sets it, so that its
    testbed never meets a developer's)."""
    return Path(os.environ.get("PILOTFLEET_TESTBED_STATE") or project_root() / ".testbed")
