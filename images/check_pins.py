"""Fail the image build when an installed distribution is not pinned, at that version, in a lock file.

Run with the image's own Python: `python check_pins.py LOCK [IGNORED_NAME ...]`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger("check_pins")


def normalize(name: str) -> str:
    """PEP 503 name normalization, so `PyYAML`, `pyyaml` and `py_yaml` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """Return {normalized name: version} for every `name==version` line of a requirements lock."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep:
            pins[normalize(name.split("[", 1)[0])] = version.strip()
    return pins


def unpinned(pins: dict[str, str], ignored: set[str]) -> list[str]:
    """Return `name==version` of each installed distribution that the lock does not pin at that version."""
    found = []
    for dist in importlib.metadata.distributions():
        name = normalize(dist.metadata["Name"])
        if name not in ignored and pins.get(name) != dist.version:
            found.append(f"{dist.metadata['Name']}=={dist.version} (lock: {pins.get(name, 'absent')})")
    return sorted(found)


def main(argv: list[str]) -> int:
    """Check the running environment against the lock; return the exit status."""
    logging.basicConfig(format="%(name)s: %(message)s")
    lock, *ignored = argv
    bad = unpinned(read_lock(Path(lock)), {normalize(name) for name in ignored})
    for line in bad:
        log.error("not pinned in %s: %s", lock, line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
