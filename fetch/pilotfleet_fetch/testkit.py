"""A real HTTP server on 127.0.0.1 for the fetch tests and benchmark, with fault injection.

It stands in for the hosts a fetch job talks to in production: a static HTTPS weights host (FauxPilot's
`.tar.zst` downloads, a CDN) and the Hugging Face Hub's API (`/api/models/.../revision`, `.../tree`,
`/<repo>/resolve/<commit>/<path>`, with LFS files redirected to a CDN on another host name). It speaks
real HTTP/1.1 with Range, ETag and `sendfile(2)`; the knobs make it misbehave the way real servers do:
drop a connection after N bytes, stall, answer 404/401/500, ignore Range, throttle each connection.
It counts the body bytes it sends per path, which is how the tests measure what a resume fetched again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_CHUNK = 64 * 1024


@dataclass
class Faults:
    """What the server does wrong; change fields while it runs (tests do, between fetches)."""

    drop_after: int | None = None
    """Close the connection after sending this many body bytes..."""
    drop_count: int = 0
    """...in this many responses."""
    stall_after: int | None = None
    """Stop sending (keep the connection open) after this many body bytes..."""
    stall_count: int = 0
    """...in this many responses (a negative count: every response)."""
    status: dict[str, int] = field(default_factory=dict)
    """Path -> HTTP status to answer instead of the file."""
    token: str | None = None
    """Require `Authorization: Bearer <token>` (except on the CDN paths)."""
    ranges: bool = True
    """Honour Range requests."""
    rate: float | None = None
    """Bytes per second per connection."""


@dataclass
class _HfRepo:
    commit: str
    branches: dict[str, str]
    files: dict[str, Path]


class _Handler(BaseHTTPRequestHandler):
    server: WeightsServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("testserver: " + format, *args)

    def _plain(self, status: int, body: bytes = b"", content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        with srv.lock:
            srv.requests.append((path, self.headers.get("Range")))
            status = srv.faults.status.get(path)
            token = srv.faults.token
        if status:
            self._plain(status, f"status {status}\n".encode())
            return
        if token and not path.startswith("/cdn/") and self.headers.get("Authorization") != f"Bearer {token}":
            self._plain(401, b"unauthorized\n")
            return
        if path.startswith("/api/models/"):
            self._hf_api(path, parts.query)
            return
        target = srv.resolve_path(path)
        if isinstance(target, str):
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if target is None:
            self._plain(404, b"not found\n")
            return
        self._send_file(path, target)

    def _hf_api(self, path: str, query: str) -> None:
        match = re.match(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)$", path)
        repo = self.server.hf_repos.get(match.group(1)) if match else None
        if not match or repo is None:
            self._plain(404, b'{"error": "Repository not found"}', "application/json")
            return
        rev = unquote(match.group(3))
        commit = repo.branches.get(rev, rev)
        if commit != repo.commit:
            self._plain(404, b'{"error": "Invalid rev id"}', "application/json")
            return
        if match.group(2) == "revision":
            body: Any = {"id": match.group(1), "sha": commit}
        else:
            body = [_tree_entry(name, file) for name, file in sorted(repo.files.items())]
        self._plain(200, json.dumps(body).encode(), "application/json")

    def _send_file(self, path: str, file: Path) -> None:
        srv = self.server
        size = file.stat().st_size
        start, end = 0, size - 1
        header = self.headers.get("Range")
        with srv.lock:
            use_ranges, rate = srv.faults.ranges, srv.faults.rate
        partial = False
        if header and use_ranges:
            m = _RANGE.match(header.strip())
            if not m or int(m.group(1)) >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
            partial = True
        length = end - start + 1
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", srv.etag(file))
        if use_ranges:
            self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        self.wfile.flush()
        limit, stall = length, False
        with srv.lock:
            # A fault applies (and is used up) only to responses long enough to show it.
            faults = srv.faults
            if faults.drop_count > 0 and faults.drop_after is not None and faults.drop_after < length:
                faults.drop_count -= 1
                limit = faults.drop_after
            elif faults.stall_count != 0 and faults.stall_after is not None and faults.stall_after < length:
                faults.stall_count -= 1 if faults.stall_count > 0 else 0
                limit, stall = faults.stall_after, True
        try:
            self._stream(path, file, start, limit, rate)
            if stall:
                srv.stopping.wait(3600)
            if limit < length:
                # Dropped (or woken from a stall): cut the connection mid-body, as a flaky network does.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def _stream(self, path: str, file: Path, start: int, count: int, rate: float | None) -> None:
        srv = self.server
        sock = self.connection
        with file.open("rb") as fh:
            offset, left = start, count
            began = time.monotonic()
            sent_total = 0
            while left > 0:
                step = left if rate is None else min(left, _CHUNK)
                sent = sock.sendfile(fh, offset, step)
                if not sent:
                    break
                offset += sent
                left -= sent
                sent_total += sent
                with srv.lock:
                    srv.bytes_sent[path] += sent
                if rate is not None:
                    ahead = sent_total / rate - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)


def _tree_entry(name: str, file: Path) -> dict[str, Any]:
    data = file.read_bytes()
    entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data)}
    git = hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()
    entry["oid"] = git
    if name.endswith((".safetensors", ".bin")):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


class WeightsServer(ThreadingHTTPServer):
    """The server; use as a context manager. `url(name)` is where a published file is served."""

    daemon_threads = True
    block_on_close = False

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.faults = Faults()
        self.files: dict[str, Path] = {}
        self.hf_repos: dict[str, _HfRepo] = {}
        self.bytes_sent: Counter[str] = Counter()
        self.requests: list[tuple[str, str | None]] = []
        self.stopping = threading.Event()
        self._etags: dict[Path, str] = {}
        self._thread = threading.Thread(target=self.serve_forever, name="weights-server", daemon=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-response are what the fault tests are about: not worth a traceback.
        log.debug("testserver: client %s went away", client_address, exc_info=True)

    @property
    def port(self) -> int:
        """The port it listens on (picked by the kernel)."""
        return int(self.server_address[1])

    def __enter__(self) -> WeightsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
        self._thread.join()

    def url(self, name: str, host: str = "127.0.0.1") -> str:
        """The URL of a file published under `name`."""
        return f"http://{host}:{self.port}/files/{name}"

    def publish(self, name: str, path: Path) -> str:
        """Serve `path` at `/files/<name>`; return its URL."""
        with self.lock:
            self.files[f"/files/{name}"] = path
            self._etags.pop(path, None)
        return self.url(name)

    def add_hf_repo(self, repo: str, commit: str, files: dict[str, Path], branch: str = "main") -> None:
        """Serve a Hugging Face repository at one commit (`branch` points at it)."""
        self.hf_repos[repo] = _HfRepo(commit, {branch: commit}, dict(files))

    @property
    def hf_endpoint(self) -> str:
        """The value for HF_ENDPOINT."""
        return f"http://127.0.0.1:{self.port}"

    def etag(self, path: Path) -> str:
        """A strong ETag: changes when the file's content changes."""
        st = path.stat()
        return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'

    def sent(self, name: str) -> int:
        """Body bytes sent so far for `/files/<name>`."""
        with self.lock:
            return self.bytes_sent[f"/files/{name}"]

    def resolve_path(self, path: str) -> Path | str | None:
        """The file for a request path, a redirect target (str), or None."""
        if path in self.files:
            return self.files[path]
        m = re.match(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m and m.group(1) in self.hf_repos:
            repo = self.hf_repos[m.group(1)]
            file = repo.files.get(m.group(3)) if m.group(2) == repo.commit else None
            if file is not None and file.name.endswith((".safetensors", ".bin")):
                # LFS files live on a CDN under another host name: the client must not send its token there.
                cdn = f"/cdn/{m.group(1)}/{m.group(3)}"
                self.files[cdn] = file
                return f"http://localhost:{self.port}{cdn}"
            return file
        return None


def make_ft_checkpoint(
    root: Path, tp: int, layers: int = 2, hidden: int = 64, inter: int = 256, vocab: int = 128
) -> Path:
    """Write a small FT GPT-J checkpoint (`<root>/<tp>-gpu/`: config.ini + every shard, random fp32)."""
    from pilotfleet_fetch.verify import FtConfig, ft_shard_sizes

    directory = root / f"{tp}-gpu"
    directory.mkdir(parents=True, exist_ok=True)
    head_num = 4
    config = FtConfig(
        head_num=head_num,
        size_per_head=hidden // head_num,
        inter_size=inter,
        num_layer=layers,
        rotary_embedding=16,
        vocab_size=vocab,
        start_id=50256,
        end_id=50256,
        weight_data_type="fp32",
        model_name="codegen-test",
    )
    (directory / "config.ini").write_text(
        "[gptj]\n"
        f"model_name = {config.model_name}\nhead_num = {config.head_num}\n"
        f"size_per_head = {config.size_per_head}\ninter_size = {config.inter_size}\n"
        f"num_layer = {config.num_layer}\nrotary_embedding = {config.rotary_embedding}\n"
        f"vocab_size = {config.vocab_size}\nstart_id = 50256\nend_id = 50256\n"
        f"weight_data_type = fp32\ntensor_para_size = {tp}\n"
    )
    rng = random.Random(tp * 1000 + layers)
    for name, size in ft_shard_sizes(config, tp).items():
        (directory / name).write_bytes(rng.randbytes(size))
    return directory


def make_archive(src: Path, out: Path, arcname: str) -> Path:
    """Pack `src` as `arcname/` into a .tar.zst, .tar.gz or .tar, chosen by `out`'s suffix."""
    import tarfile

    import zstandard

    if out.name.endswith(".tar.zst"):
        with (
            out.open("wb") as raw,
            zstandard.ZstdCompressor(level=1).stream_writer(raw) as zw,
            tarfile.open(fileobj=zw, mode="w|") as tar,
        ):
            tar.add(src, arcname=arcname)
    else:
        with tarfile.open(out, "w:gz" if out.name.endswith(".tar.gz") else "w") as tar:
            tar.add(src, arcname=arcname)
    return out


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
