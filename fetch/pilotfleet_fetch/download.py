"""Streaming download of one file: resumable with HTTP Range, concurrent ranges, sha256 computed on the fly.

On disk, next to the target, a download in progress is three files:
- `<name>.part`: the data, written in place (`pwrite`) by one thread per range;
- `<name>.progress`: one 8-byte counter per range, written right after each data write, so after a kill
  (SIGKILL included: both writes are already in the page cache) a restart knows exactly what is on disk;
- `<name>.plan.json`: size, the server's ETag/Last-Modified and the ranges; a changed file on the server
  throws the partial data away.
A hasher thread follows the contiguous prefix of written data and hashes it while the download runs (after a
restart it first reads back what is already on disk).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import random
import re
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from pilotfleet_fetch.errors import ChecksumMismatch, DiskFull, FetchError, Stalled, Unreachable
from pilotfleet_fetch.progress import Progress
from pilotfleet_fetch.sources import RemoteFile, error_for_status

log = logging.getLogger(__name__)

MiB = 1 << 20
_MAX_REDIRECTS = 5
# An attempt that delivered this much before failing resets the retry count.
_REAL_PROGRESS = 1 * MiB
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class DownloadSettings:
    """Tuning of the download engine; the CLI exposes the first three."""

    concurrency: int = 4
    stall_timeout: float = 60.0
    retries: int = 8
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    parallel_threshold: int = 64 * MiB
    """Files at least this large are split into concurrent ranges (when the server supports ranges)."""
    min_part_size: int = 16 * MiB
    chunk_size: int = 1 * MiB
    """Most bytes per read."""


@dataclass(frozen=True)
class Downloaded:
    """A finished download."""

    path: Path
    size: int
    sha256: str
    transferred: int
    """Bytes received over the network by this run (a resume fetches only what was missing)."""


class _Retry(Exception):
    """A transient server answer (429, 5xx): worth another attempt."""


def _ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def open_url(
    file: RemoteFile, headers: dict[str, str], timeout: float
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """GET `file.url` with auth plus `headers`, following redirects; return the open connection and response.

    Permanent failures raise FetchError subclasses; transient ones raise OSError/HTTPException/_Retry.
    """
    url = file.url
    origin = urlsplit(url).netloc
    for _ in range(_MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        host = parts.hostname or ""
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, parts.port, timeout=timeout, context=_ssl_context())
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
        send = dict(headers)
        if parts.netloc == origin or not file.same_host_auth_only:
            send.update(file.auth("GET", url))
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            conn.request("GET", target, headers=send)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise
        if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
            url = urljoin(url, resp.getheader("Location", ""))
            conn.close()
            continue
        err = error_for_status(resp.status, file.url)
        if err is not None:
            conn.close()
            raise err
        if resp.status >= 400:
            conn.close()
            raise _Retry(f"HTTP {resp.status}")
        return conn, resp
    raise FetchError(f"{file.url}: more than {_MAX_REDIRECTS} redirects")


@dataclass(frozen=True)
class _Probe:
    size: int
    ranges: bool
    identity: str | None


def _probe(file: RemoteFile, settings: DownloadSettings) -> _Probe:
    """Ask for the first byte: learns the size, whether Range works, and the file's identity."""

    def attempt() -> _Probe:
        conn, resp = open_url(file, {"Range": "bytes=0-0"}, settings.stall_timeout)
        try:
            identity = resp.getheader("ETag") or resp.getheader("Last-Modified")
            if resp.status == 206:
                match = _CONTENT_RANGE.match(resp.getheader("Content-Range", ""))
                if match and match.group(3) != "*":
                    return _Probe(int(match.group(3)), True, identity)
            length = resp.getheader("Content-Length")
            if resp.status == 200 and length is not None:
                return _Probe(int(length), False, identity)
            raise FetchError(f"{file.url}: the server tells neither Content-Range nor Content-Length")
        finally:
            conn.close()

    return _with_retries(attempt, settings, file.url, lambda: False)


def _with_retries(
    attempt: Callable[[], Any], settings: DownloadSettings, what: str, progressed: Callable[[], bool]
) -> Any:
    """Call `attempt` until it returns; back off after transient errors, give up after `retries` in a row.

    An attempt that moved the download forward (`progressed()`) resets the count: a flaky connection that
    keeps delivering is not a failure.
    """
    failures = 0
    while True:
        try:
            return attempt()
        except (OSError, http.client.HTTPException, _Retry) as exc:
            failures = 1 if progressed() else failures + 1
            if failures > settings.retries:
                if isinstance(exc, TimeoutError):
                    raise Stalled(
                        f"{what}: no data for {settings.stall_timeout:g}s, {failures} times in a row"
                    ) from exc
                raise Unreachable(f"{what}: {exc!r}, {failures} times in a row") from exc
            delay = min(settings.backoff_max, settings.backoff_initial * 2 ** (failures - 1))
            delay *= random.uniform(0.5, 1.0)
            log.warning("%s: %r; retry %d/%d in %.1fs", what, exc, failures, settings.retries, delay)
            time.sleep(delay)


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    while data:
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left on the volume while writing ({exc})") from exc
            raise FetchError(f"cannot write the download: {exc}") from exc
        data, offset = data[n:], offset + n


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def ensure_space(directory: Path, needed: int, what: str) -> None:
    """Fail early with DiskFull when the volume cannot hold `needed` more bytes."""
    free = free_bytes(directory)
    if needed > free:
        raise DiskFull(f"{what} needs {needed} more bytes but the volume has {free} free")


class _Hashes:
    """sha256 of the bytes, plus git's blob sha1 when that is what the source lists."""

    def __init__(self, git_size: int | None) -> None:
        self.sha256 = hashlib.sha256()
        self.git_sha1 = None
        if git_size is not None:
            self.git_sha1 = hashlib.sha1(usedforsecurity=False)
            self.git_sha1.update(f"blob {git_size}\0".encode())

    def update(self, data: memoryview) -> None:
        self.sha256.update(data)
        if self.git_sha1 is not None:
            self.git_sha1.update(data)


class _Transfer:
    """One file's download in progress: the ranges, their counters, the hasher that follows them."""

    def __init__(
        self,
        file: RemoteFile,
        data_path: Path,
        counters_path: Path,
        ranges: list[tuple[int, int]],
        use_range: bool,
        settings: DownloadSettings,
        progress: Progress,
    ) -> None:
        self.file = file
        self.ranges = ranges
        self.use_range = use_range
        self.settings = settings
        self.progress = progress
        self.size = ranges[-1][1] if ranges else 0
        self.fd = os.open(data_path, os.O_RDWR | os.O_CREAT, 0o644)
        self.counters_fd = os.open(counters_path, os.O_RDWR | os.O_CREAT, 0o644)
        raw = os.pread(self.counters_fd, 8 * len(ranges), 0)
        if len(raw) == 8 * len(ranges):
            done = list(struct.unpack(f"<{len(ranges)}Q", raw))
        else:
            done = [0] * len(ranges)
        self.done = [min(d, end - start) for d, (start, end) in zip(done, ranges, strict=True)]
        if os.fstat(self.fd).st_size != self.size:
            os.ftruncate(self.fd, self.size)
        self.transferred = 0
        self.cond = threading.Condition()
        self.failed = threading.Event()
        self.generation = 0
        git_size = self.size if file.expected and file.expected.algorithm == "git-sha1" else None
        self._git_size = git_size
        self.hashes = _Hashes(git_size)
        self._hasher = threading.Thread(target=self._hash_loop, name=f"hash {file.path}", daemon=True)

    @property
    def on_disk(self) -> int:
        return sum(self.done)

    def close(self) -> None:
        self.failed.set()
        with self.cond:
            self.cond.notify_all()
        if self._hasher.is_alive():
            self._hasher.join()
        os.close(self.fd)
        os.close(self.counters_fd)

    def run(self) -> str:
        """Fetch every range, wait for the hasher, return the sha256 hex digest."""
        self._hasher.start()
        pending = [i for i, (start, end) in enumerate(self.ranges) if self.done[i] < end - start]
        if len(pending) <= 1:
            for i in pending:
                self._fetch_range(i)
        else:
            with ThreadPoolExecutor(len(pending), thread_name_prefix="range") as pool:
                futures = [pool.submit(self._fetch_range, i) for i in pending]
                errors = []
                for fut in futures:
                    try:
                        fut.result()
                    except BaseException as exc:
                        self.failed.set()
                        errors.append(exc)
                if errors:
                    raise errors[0]
        self._hasher.join()
        return self.hashes.sha256.hexdigest()

    def _set_done(self, i: int, value: int) -> None:
        self.done[i] = value
        os.pwrite(self.counters_fd, struct.pack("<Q", value), 8 * i)
        with self.cond:
            self.cond.notify_all()

    def _fetch_range(self, i: int) -> None:
        start, end = self.ranges[i]
        before = [self.done[i]]

        def progressed() -> bool:
            # A trickle (a few bytes, then a stall) must not reset the count forever.
            moved = self.done[i] - before[0] >= _REAL_PROGRESS
            before[0] = self.done[i]
            return moved

        _with_retries(lambda: self._stream_range(i, start, end), self.settings, self.file.url, progressed)

    def _stream_range(self, i: int, start: int, end: int) -> None:
        if self.failed.is_set():
            raise FetchError("another range failed")
        offset = start + self.done[i]
        headers = {"Range": f"bytes={offset}-{end - 1}"} if self.use_range else {}
        conn, resp = open_url(self.file, headers, self.settings.stall_timeout)
        try:
            if resp.status == 200 and offset > 0:
                if len(self.ranges) > 1:
                    raise _Retry("the server ignored the Range header")
                # No Range support: everything on disk is useless, start over (and hash anew).
                log.warning("%s: server ignores Range; starting over", self.file.url)
                self.progress.rewind(self.done[i])
                self._restart_hash()
                self._set_done(i, 0)
                offset = start
            done = offset - start
            length = end - start
            while done < length:
                if self.failed.is_set():
                    raise FetchError("another range failed")
                # read1: whatever one recv brings, written at once, so a kill loses almost nothing.
                data = resp.read1(min(self.settings.chunk_size, length - done))
                if not data:
                    raise http.client.IncompleteRead(b"", length - done)
                _write_at(self.fd, memoryview(data), start + done)
                done += len(data)
                self._set_done(i, done)
                self.transferred += len(data)
                self.progress.advance(len(data))
        finally:
            conn.close()

    def _restart_hash(self) -> None:
        with self.cond:
            self.generation += 1
            self.cond.notify_all()

    def _hash_loop(self) -> None:
        buf = bytearray(4 * MiB)
        view = memoryview(buf)
        generation = -1
        part, hashed = 0, 0
        while True:
            with self.cond:
                if self.generation != generation:
                    generation = self.generation
                    self.hashes = _Hashes(self._git_size)
                    part, hashed = 0, 0
                if part >= len(self.ranges):
                    return
                while (
                    not self.failed.is_set() and self.generation == generation and self.done[part] <= hashed
                ):
                    self.cond.wait(1.0)
                if self.failed.is_set():
                    return
                if self.generation != generation:
                    continue
                available = self.done[part] - hashed
            start = self.ranges[part][0]
            n = os.preadv(self.fd, [view[: min(len(buf), available)]], start + hashed)
            self.hashes.update(view[:n])
            hashed += n
            if hashed == self.ranges[part][1] - start:
                part, hashed = part + 1, 0


def _split(size: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, size) into `parts` ranges aligned to 1 MiB."""
    if size == 0:
        return []
    step = -(-size // parts)
    step = -(-step // MiB) * MiB
    return [(s, min(s + step, size)) for s in range(0, size, step)]


def hash_file(path: Path, git_size: int | None = None) -> tuple[str, str | None]:
    """Return (sha256, git blob sha1 or None) of a file on disk."""
    hashes = _Hashes(git_size)
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            hashes.update(view[:n])
    return hashes.sha256.hexdigest(), hashes.git_sha1.hexdigest() if hashes.git_sha1 else None


def _check_digest(file: RemoteFile, sha256: str, git_sha1: str | None) -> bool:
    if file.expected is None:
        return True
    actual = sha256 if file.expected.algorithm == "sha256" else git_sha1
    return actual == file.expected.hexdigest


def download(file: RemoteFile, target: Path, settings: DownloadSettings, progress: Progress) -> Downloaded:
    """Download `file` to `target`, resuming a partial download left there by an earlier run.

    Raises ChecksumMismatch (and deletes the data) when the bytes do not match `file.expected`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    data_path = target.with_name(target.name + ".part")
    counters_path = target.with_name(target.name + ".progress")
    plan_path = target.with_name(target.name + ".plan.json")
    git_size = file.size if file.expected and file.expected.algorithm == "git-sha1" else None

    if target.exists() and not data_path.exists():
        # Finished by an earlier run that died later (extracting, verifying): check it, don't fetch it.
        size = target.stat().st_size
        sha256, git_sha1 = hash_file(target, size if git_size is not None else None)
        if _check_digest(file, sha256, git_sha1):
            if file.size is None:
                progress.learn_total(size)
            progress.skip(size)
            log.info("%s: already downloaded", file.path)
            return Downloaded(target, size, sha256, 0)
        target.unlink()

    probe = None
    if file.size is None or file.size >= settings.parallel_threshold:
        probe = _probe(file, settings)
    size = probe.size if probe else int(file.size or 0)
    use_range = probe.ranges if probe else True
    identity = probe.identity if probe else None
    if file.size is None:
        progress.learn_total(size)

    plan: dict[str, Any] | None = None
    with contextlib.suppress(OSError, ValueError):
        plan = json.loads(plan_path.read_text())
    if not plan or plan.get("size") != size or plan.get("identity") != identity or not data_path.exists():
        for stale in (data_path, counters_path):
            stale.unlink(missing_ok=True)
        parts = 1
        if use_range and size >= settings.parallel_threshold:
            parts = max(1, min(settings.concurrency, size // settings.min_part_size))
        plan = {"url": file.url, "size": size, "identity": identity, "ranges": _split(size, parts)}
        plan_path.write_text(json.dumps(plan))
    ranges = [(int(s), int(e)) for s, e in plan["ranges"]]

    transfer = _Transfer(file, data_path, counters_path, ranges, use_range, settings, progress)
    try:
        already = transfer.on_disk
        if already:
            log.info("%s: resuming, %d of %d bytes already on disk", file.path, already, size)
        progress.skip(already)
        ensure_space(target.parent, size - already, file.path)
        sha256 = transfer.run()
        git_sha1 = transfer.hashes.git_sha1.hexdigest() if transfer.hashes.git_sha1 else None
    finally:
        transfer.close()
    if not _check_digest(file, sha256, git_sha1):
        for path in (data_path, counters_path, plan_path):
            path.unlink(missing_ok=True)
        assert file.expected is not None
        raise ChecksumMismatch(
            f"{file.path}: expected {file.expected.algorithm} {file.expected.hexdigest}, got "
            f"{sha256 if file.expected.algorithm == 'sha256' else git_sha1}"
        )
    os.replace(data_path, target)
    counters_path.unlink(missing_ok=True)
    plan_path.unlink(missing_ok=True)
    return Downloaded(target, size, sha256, transfer.transferred)
