"""Recognise and safely extract `.tar.zst`, `.tar.gz` and `.tar` archives (anything else is a plain file).

Safe means: only regular files and directories, every path inside the target directory (no absolute paths,
no `..`, no links, no devices), permissions not taken from the archive, and a truncated archive is an error
rather than a shorter tree (zstd's stream reader ends quietly at a cut frame, so we read frames ourselves).
"""

from __future__ import annotations

import errno
import gzip
import io
import logging
import posixpath
import tarfile
from enum import StrEnum
from pathlib import Path
from typing import IO

import zstandard

from pilotfleet_fetch.errors import BadArchive, DiskFull

log = logging.getLogger(__name__)

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"
# Compressed bytes per decompression call: bounds memory for very compressible members.
_ZSTD_INPUT = 32 * 1024
_COPY_BUFFER = 1 << 20


class Kind(StrEnum):
    """What a downloaded file is."""

    TAR_ZST = "tar.zst"
    TAR_GZ = "tar.gz"
    TAR = "tar"
    PLAIN = "plain"


def kind_of(path: Path) -> Kind:
    """Tell the kind from the content (magic bytes), not the name: URLs often hide the extension."""
    with path.open("rb") as fh:
        head = fh.read(512)
    if head.startswith(_ZSTD_MAGIC):
        return Kind.TAR_ZST
    if head.startswith(_GZIP_MAGIC):
        return Kind.TAR_GZ
    if len(head) >= 262 and head[257:262] == b"ustar":
        return Kind.TAR
    return Kind.PLAIN


class _ZstdReader(io.RawIOBase):
    """Decompresses a (multi-frame) zstd stream; raises EOFError if the input ends inside a frame."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj = self._dctx.decompressobj()
        self._fresh = True
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._pending:
            chunk = self._raw.read(_ZSTD_INPUT)
            if not chunk:
                if not (self._dobj.eof or self._fresh):
                    raise EOFError("the zstd stream ends in the middle of a frame")
                return 0
            out = []
            while chunk:
                if self._dobj.eof:
                    self._dobj = self._dctx.decompressobj()
                self._fresh = False
                out.append(self._dobj.decompress(chunk))
                chunk = self._dobj.unused_data if self._dobj.eof else b""
                if self._dobj.eof and not chunk:
                    self._fresh = True
            self._pending = memoryview(b"".join(out))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def _member_target(dest: Path, member: tarfile.TarInfo) -> Path | None:
    """Where a member goes, or None for the archive's root entry; BadArchive for anything unsafe."""
    name = member.name
    if name.startswith("/") or "\\" in name:
        raise BadArchive(f"unsafe path in archive: {name!r}")
    norm = posixpath.normpath(name)
    if norm == ".":
        return None
    if norm.startswith("../") or norm == ".." or "/../" in f"/{name}/":
        raise BadArchive(f"path escapes the target directory: {name!r}")
    if not (member.isfile() or member.isdir()):
        raise BadArchive(f"archive member {name!r} is a link or special file; only files and directories")
    return dest / norm


def _copy(src: IO[bytes], dst: Path, size: int) -> None:
    buf = bytearray(_COPY_BUFFER)
    view = memoryview(buf)
    left = size
    with dst.open("wb") as out:
        while left:
            n = src.readinto(view[: min(left, len(buf))])  # type: ignore[attr-defined]
            if not n:
                raise EOFError(f"{dst.name}: member data ends early")
            try:
                out.write(view[:n])
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(f"no space left on the volume while extracting {dst.name}") from exc
                raise
            left -= n


def _open_stream(kind: Kind, raw: IO[bytes]) -> IO[bytes]:
    if kind is Kind.TAR_ZST:
        return io.BufferedReader(_ZstdReader(raw), buffer_size=_COPY_BUFFER)
    if kind is Kind.TAR_GZ:
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def extract(archive: Path, dest: Path) -> list[Path]:
    """Extract `archive` into `dest` (created); return the files written, relative to `dest`."""
    kind = kind_of(archive)
    if kind is Kind.PLAIN:
        raise BadArchive(f"{archive.name} is not a tar archive (.tar.zst, .tar.gz or .tar)")
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        # "r|" reads the archive front to back once: no seeking in a compressed stream.
        with (
            archive.open("rb") as raw,
            _open_stream(kind, raw) as stream,
            tarfile.open(fileobj=stream, mode="r|") as tar,
        ):
            for member in tar:
                target = _member_target(dest, member)
                if target is None:
                    continue
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None  # regular files always have data
                _copy(src, target, member.size)
                written.append(target.relative_to(dest))
    except (tarfile.TarError, EOFError, zstandard.ZstdError, gzip.BadGzipFile) as exc:
        raise BadArchive(f"{archive.name}: truncated or corrupt {kind} archive ({exc})") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(f"no space left on the volume while extracting {archive.name}") from exc
        raise
    if not written:
        raise BadArchive(f"{archive.name}: the archive holds no files")
    log.info("extracted %d files from %s", len(written), archive.name)
    return written
