"""Staging, manifest, reuse and the atomic move into place.

Everything is assembled in `.<name>.fetch/` beside the destination (same filesystem, so `rename(2)` is
atomic); the destination appears or is replaced only after verification, with `manifest.json` inside.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def staging_dir(dest: Path) -> Path:
    """The staging area of `dest`: a hidden sibling, kept across restarts so downloads resume."""
    return dest.parent / f".{dest.name}.fetch"


def read_manifest(dest: Path) -> dict[str, Any] | None:
    """The manifest of a published copy, or None if there is none (or it is unreadable)."""
    try:
        data = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reusable(dest: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest if `dest` holds a verified copy for `key` whose listed files are all present."""
    manifest = read_manifest(dest)
    if not manifest or manifest.get("version") != MANIFEST_VERSION or manifest.get("key") != key:
        return None
    for entry in manifest.get("files", []):
        path = dest / entry["path"]
        try:
            if path.stat().st_size != entry["size"]:
                log.warning("%s changed size since it was published; fetching again", path)
                return None
        except OSError:
            log.warning("%s is gone since it was published; fetching again", path)
            return None
    return manifest


def build_manifest(
    repo: Path, key: dict[str, Any], downloads: list[dict[str, Any]], extra: dict[str, Any]
) -> dict[str, Any]:
    """The manifest of the tree in `repo`: its identity, what was downloaded, every file and its size."""
    files = sorted(
        (
            {"path": str(p.relative_to(repo)), "size": p.stat().st_size}
            for p in repo.rglob("*")
            if p.is_file()
        ),
        key=lambda e: str(e["path"]),
    )
    return {
        "version": MANIFEST_VERSION,
        "key": key,
        "source": key["source"],
        "revision": key.get("revision"),
        "sha256": downloads[0]["sha256"] if len(downloads) == 1 else None,
        "downloads": downloads,
        "files": files,
        "total_bytes": sum(f["size"] for f in files),
        "fetched_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **extra,
    }


def _fsync_tree(root: Path) -> None:
    """Make the files durable before the rename that publishes them (a crash must not publish holes)."""
    for dirpath, _dirs, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with renameat2(RENAME_EXCHANGE); False where the filesystem cannot."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def publish(repo: Path, dest: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into `repo` and move `repo` to `dest`, replacing an older copy atomically."""
    (repo / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync_tree(repo)
    if not dest.exists():
        os.rename(repo, dest)
    elif _exchange(repo, dest):
        # `repo` now holds the previous copy.
        shutil.rmtree(repo)
    else:
        # No atomic swap here: the old copy leaves for a moment, but nothing partial is ever at `dest`.
        old = dest.parent / f".{dest.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
        os.rename(repo, dest)
        shutil.rmtree(old)
    _fsync_dir(dest.parent)
    log.info("published %s", dest)
