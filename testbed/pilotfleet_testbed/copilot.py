"""The real GitHub Copilot language server, installed from npm and driven over LSP stdio like an editor.

Install: `npm install @github/copilot-language-server@<pin>` into `<cache>/npm/copilot-language-server-<v>/`.
The package's `bin` (`dist/language-server.js`) needs Node >= 22.13 to run its own JavaScript; on older
Node it re-executes the platform package's native binary
(`node_modules/@github/copilot-language-server-linux-x64/copilot-language-server`, Node 22 built in).
We run that native binary directly with `--stdio`, so the machine's Node 20 only runs npm.

Measured with 1.539.0 on this machine (tests/test_testbed_clients.py keeps these true):

- Sign-in, headless: `sign_in_env()`: `CODESPACES=true GITHUB_TOKEN GITHUB_SERVER_URL GITHUB_API_URL`
  (`localhost` URLs). `GH_COPILOT_TOKEN` + `GH_COPILOT_API_URL` alone still calls api.github.com; it
  works with `GH_COPILOT_SERVER_URL` too. The server calls `GET /copilot_internal/v2/token`
  (`Authorization: Bearer <github token>`) and `GET /copilot_internal/user`, and refuses any response,
  200 or 404, without an `X-GitHub-Request-Id` header ("does not appear to originate from GitHub").
  It also asks the API host for `/embeddings/models`; a 404 there is harmless.
- Completions go to `POST {proxy}/v1/engines/{engine}/completions`, where {proxy}/{engine} come from,
  first to last: `override_env()` (`GH_COPILOT_OVERRIDE_PROXY_URL`, `GH_COPILOT_OVERRIDE_ENGINE`; wins
  when both are set), `override_settings()` (nested `github.copilot.advanced` `debug.overrideProxyUrl` /
  `debug.overrideEngine`, sent with didChangeConfiguration and served again on `workspace/configuration`
  pulls; a flat "github.copilot" key is ignored), else the Copilot token's `endpoints.proxy` with engine
  `gpt-41-copilot`. It also sends `GET {proxy}/models`.
- Other hosts: with `endpoints.telemetry` in the token the experiment config is read from
  `GET {telemetry}/telemetry`; before sign-in it tries https://copilot-telemetry.githubusercontent.com,
  which fails at DNS here, harmlessly. Usage telemetry (otherwise POSTed to `{telemetry}/telemetry` and
  https://dc.services.visualstudio.com) comes to us as LSP notifications, because `initialize` declares
  `copilotCapabilities.redirectedTelemetry`. Without `endpoints` in the token, the defaults are
  https://copilot-proxy.githubusercontent.com and https://api.githubcopilot.com.
- Status: `didChangeStatus` (`{"busy", "kind": "Normal"|"Warning"|"Error"|"Inactive", "message"}`), plus
  `didChangeStatus/v2` and `statusNotification`. `checkStatus` answers
  `{"status": "OK", "user": "<codespaces-user>"}` (a placeholder name in this sign-in mode) and fails with
  the sign-in error otherwise. `--help` crashes in this build (Intl.Segmenter); `--version`, `--stdio` work.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pilotfleet_serve import procs
from pilotfleet_serve.cache import cache_dir, cache_lock
from pilotfleet_serve.procs import run_checked

from pilotfleet_testbed import versions

log = logging.getLogger(__name__)

PACKAGE = "@github/copilot-language-server"
_STAMP = ".complete"
# npm's optional dependency that carries the native binary, per platform.
_NATIVE_PACKAGES = {
    ("Linux", "x86_64"): "copilot-language-server-linux-x64",
    ("Linux", "aarch64"): "copilot-language-server-linux-arm64",
}

# Server -> client requests that need an answer other than `null`.
_SHOW_DOCUMENT = "window/showDocument"
_CONFIGURATION = "workspace/configuration"
# Inherited variables that would change how the server signs in or where it connects.
_INHERITED_PREFIXES = ("GH_COPILOT_", "GITHUB_", "CODESPACES", "COPILOT_")
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


class LanguageServerError(RuntimeError):
    """The language server failed, timed out or answered with an error; the message carries its log tail."""


def copilot_install_dir(version: str = versions.COPILOT_LANGUAGE_SERVER) -> Path:
    """Return the npm prefix the pinned language server is installed under (it may not exist yet)."""
    return cache_dir() / "npm" / f"copilot-language-server-{version}"


def ensure_copilot_language_server(version: str = versions.COPILOT_LANGUAGE_SERVER) -> Path:
    """Install the pinned Copilot language server from npm on first use; return its native binary.

    Raises procs.StartError when npm fails, the platform has no native binary, or the binary reports
    another version.
    """
    key = (platform.system(), platform.machine())
    if key not in _NATIVE_PACKAGES:
        raise procs.StartError(
            f"no native Copilot language server for {key}; have {sorted(_NATIVE_PACKAGES)}"
        )
    prefix = copilot_install_dir(version)
    binary = prefix / "node_modules" / "@github" / _NATIVE_PACKAGES[key] / "copilot-language-server"
    if (prefix / _STAMP).is_file() and binary.is_file():
        return binary
    with cache_lock(prefix.name):
        if (prefix / _STAMP).is_file() and binary.is_file():
            return binary
        prefix.mkdir(parents=True, exist_ok=True)
        argv = ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", f"{PACKAGE}@{version}"]
        run_checked(argv, timeout=900)
        if not binary.is_file():
            raise procs.StartError(f"npm installed {PACKAGE}@{version} but {binary} is missing")
        reported = run_checked([str(binary), "--version"], timeout=60).strip()
        if reported != version:
            raise procs.StartError(f"{binary} --version says {reported!r}, the pin is {version}")
        (prefix / _STAMP).write_text(f"{PACKAGE}@{version}\n")
    log.info("Copilot language server %s ready: %s", version, binary)
    return binary


@dataclass(frozen=True)
class Message:
    """A notification or request the server sent us."""

    method: str
    params: Any


class CopilotLanguageServer:
    """A small LSP client over the stdio of a running Copilot language server (one reader thread).

    It answers every server -> client request (configuration from the last settings sent, `null` for
    progress tokens, message requests and capability registrations), so the server never waits on us,
    and it keeps every notification for the caller to inspect or wait for.
    """

    def __init__(self, process: procs.Process, timeout: float = 30.0) -> None:
        """Wrap `process`, started with `procs.start(..., pipe_stdio=True)`; `timeout` bounds each request."""
        if process.popen.stdin is None or process.popen.stdout is None:
            raise ValueError("the language server must be started with pipe_stdio=True")
        self.process = process
        self.timeout = timeout
        self.settings: dict[str, Any] = {}
        self._stdin: IO[bytes] = process.popen.stdin
        self._stdout: IO[bytes] = process.popen.stdout
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Any]] = {}
        self._write_lock = threading.Lock()
        self._changed = threading.Condition()
        self._notifications: list[Message] = []
        self._server_requests: list[Message] = []
        self._reader = threading.Thread(target=self._read_loop, name="copilot-lsp-reader", daemon=True)
        self._reader.start()

    # -- plumbing ---------------------------------------------------------------------------------

    def request(self, method: str, params: Any, timeout: float | None = None) -> Any:
        """Send a request and return its result; raise LanguageServerError on an error or a timeout."""
        request_id = next(self._ids)
        future: Future[Any] = Future()
        self._pending[request_id] = future
        if not self._reader.is_alive():
            self._pending.pop(request_id, None)
            raise self._error(f"cannot send {method}: the server's stdout is closed")
        self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        wait = self.timeout if timeout is None else timeout
        try:
            return future.result(timeout=wait)
        except FutureTimeout:
            self._pending.pop(request_id, None)
            # Tell the server to stop working on it, as an editor would.
            with contextlib.suppress(LanguageServerError):
                self.notify("$/cancelRequest", {"id": request_id})
            raise self._error(f"no answer to {method} within {wait:.0f}s") from None

    def notify(self, method: str, params: Any) -> None:
        """Send a notification."""
        self._send({"jsonrpc": "2.0", "method": method, "params": params})

    def notifications(self, method: str | None = None) -> list[Message]:
        """Return the notifications received so far, all of them or those of one method."""
        with self._changed:
            return [m for m in self._notifications if method is None or m.method == method]

    def server_requests(self, method: str | None = None) -> list[Message]:
        """Return the requests the server sent us so far (each was answered)."""
        with self._changed:
            return [m for m in self._server_requests if method is None or m.method == method]

    def wait_for_notification(
        self, method: str, match: Callable[[Any], bool] = lambda _: True, timeout: float | None = None
    ) -> Any:
        """Wait for a notification of `method` whose params satisfy `match` (earlier ones count too)."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._changed:
            while True:
                for message in self._notifications:
                    if message.method == method and match(message.params):
                        return message.params
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    break
                self._changed.wait(timeout=min(left, 0.5))
        seen = [m.params for m in self.notifications(method)][-5:]
        raise self._error(f"no matching {method} within {wait:.0f}s; last seen: {seen}")

    def close(self) -> None:
        """Ask the server to shut down and exit; stop its process group whatever happens."""
        try:
            if self.process.alive():
                with contextlib.suppress(LanguageServerError):
                    self.request("shutdown", None, timeout=5)
                    self.notify("exit", None)
        finally:
            self.process.stop(timeout=5)
            self._reader.join(timeout=5)
            for pipe in (self._stdin, self._stdout):
                with contextlib.suppress(OSError):
                    pipe.close()

    def __enter__(self) -> CopilotLanguageServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, message: Mapping[str, Any]) -> None:
        body = json.dumps(message).encode()
        with self._write_lock:
            try:
                self._stdin.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                self._stdin.flush()
            except (BrokenPipeError, ValueError) as exc:
                raise self._error(f"cannot send {message.get('method', 'a response')}: {exc}") from exc

    def _error(self, what: str) -> LanguageServerError:
        # The server logs whole stack traces: the first lines of the last few messages say enough.
        logs = [str(m.params.get("message", ""))[:400] for m in self.notifications("window/logMessage")][-15:]
        state = "running" if self.process.alive() else f"exited with {self.process.popen.returncode}"
        return LanguageServerError(
            f"Copilot language server ({state}): {what}\n"
            f"-- last window/logMessage:\n" + "\n".join(logs) + "\n"
            f"-- stderr {self.process.log_path}:\n{procs.log_tail(self.process.log_path)}"
        )

    def _read_message(self) -> dict[str, Any] | None:
        length = None
        while True:
            line = self._stdout.readline()
            if not line:
                return None
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("ascii").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if length is None:
            raise ValueError("LSP frame without Content-Length")
        body: dict[str, Any] = json.loads(self._stdout.read(length))
        return body

    def _read_loop(self) -> None:
        try:
            while (message := self._read_message()) is not None:
                self._dispatch(message)
        except (OSError, ValueError, LanguageServerError) as exc:
            log.warning("Copilot language server stream broke: %s", exc)
        finally:
            # Whoever still waits must not wait for a dead server until its timeout.
            for request_id, future in list(self._pending.items()):
                self._pending.pop(request_id, None)
                future.set_exception(self._error("the server closed its stdout"))
            with self._changed:
                self._changed.notify_all()

    def _dispatch(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if method is None:
            future = self._pending.pop(int(message["id"]), None)
            if future is None:
                return
            if "error" in message:
                future.set_exception(self._error(f"error response: {message['error']}"))
            else:
                future.set_result(message.get("result"))
            return
        received = Message(method=method, params=message.get("params"))
        if method == "window/logMessage":
            log.debug("copilot: %s", received.params.get("message"))
        if "id" in message:
            with self._changed:
                self._server_requests.append(received)
            self._send({"jsonrpc": "2.0", "id": message["id"], "result": self._answer(received)})
        with self._changed:
            if "id" not in message:
                self._notifications.append(received)
            self._changed.notify_all()

    def _answer(self, request: Message) -> Any:
        if request.method == _CONFIGURATION:
            return [self._setting(item.get("section")) for item in request.params.get("items", [])]
        if request.method == _SHOW_DOCUMENT:
            # There is no browser here: say so rather than pretend it opened.
            return {"success": False}
        # Progress tokens, message requests (no action chosen), capability registrations: null is valid.
        return None

    def _setting(self, section: str | None) -> Any:
        value: Any = self.settings
        for part in (section or "").split(".") if section else []:
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value

    # -- the editor's side of the protocol --------------------------------------------------------

    def initialize(self, workspace: Path, editor: str = "pilotfleet-tests") -> dict[str, Any]:
        """Run the LSP handshake (`initialize`, `initialized`) for a workspace folder; return the result."""
        result: dict[str, Any] = self.request(
            "initialize",
            {
                "processId": None,
                "rootUri": workspace.as_uri(),
                "workspaceFolders": [{"uri": workspace.as_uri(), "name": workspace.name}],
                "capabilities": {"workspace": {"workspaceFolders": True, "configuration": True}},
                "initializationOptions": {
                    "editorInfo": {"name": editor, "version": "1.0.0"},
                    "editorPluginInfo": {"name": f"{editor}-copilot", "version": "1.0.0"},
                    # Telemetry comes to us as LSP notifications instead of going to GitHub's hosts.
                    "copilotCapabilities": {"redirectedTelemetry": True},
                },
            },
        )
        self.notify("initialized", {})
        return result

    def change_configuration(self, settings: dict[str, Any]) -> None:
        """Send `workspace/didChangeConfiguration`; later `workspace/configuration` pulls see the same."""
        self.settings = settings
        self.notify("workspace/didChangeConfiguration", {"settings": settings})

    def open_document(self, path: Path, text: str, language: str, version: int = 0) -> str:
        """Send `textDocument/didOpen` for `path` with `text`; return the document's URI."""
        uri = path.as_uri()
        self.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": language, "version": version, "text": text}},
        )
        return uri

    def inline_completion(
        self,
        uri: str,
        line: int,
        character: int,
        invoked: bool = False,
        version: int = 0,
        timeout: float | None = None,
    ) -> list[dict[str, Any]]:
        """Ask for ghost text at a position (triggerKind 1 when invoked, 2 automatic); return the items."""
        result = self.request(
            "textDocument/inlineCompletion",
            {
                "textDocument": {"uri": uri, "version": version},
                "position": {"line": line, "character": character},
                "context": {"triggerKind": 1 if invoked else 2},
                "formattingOptions": {"tabSize": 4, "insertSpaces": True},
            },
            timeout=timeout,
        )
        items: list[dict[str, Any]] = (result or {}).get("items", [])
        return items

    def check_status(self) -> dict[str, Any]:
        """Return the sign-in status (`checkStatus`): `{"status": "OK", "user": ...}` when signed in."""
        status: dict[str, Any] = self.request("checkStatus", {"localChecksOnly": False})
        return status


def sign_in_env(github_url: str, github_token: str = "gho_pilotfleet_test") -> dict[str, str]:
    """Environment that signs the server in headless against `github_url` (use `localhost`, not an IP).

    The server swaps `github_token` for a Copilot token at `{github_url}/copilot_internal/v2/token`.
    """
    return {
        "CODESPACES": "true",
        "GITHUB_TOKEN": github_token,
        "GITHUB_SERVER_URL": github_url,
        "GITHUB_API_URL": github_url,
    }


def override_env(proxy_url: str, engine: str) -> dict[str, str]:
    """Environment that sends completions to `{proxy_url}/v1/engines/{engine}/completions`."""
    return {"GH_COPILOT_OVERRIDE_PROXY_URL": proxy_url, "GH_COPILOT_OVERRIDE_ENGINE": engine}


def override_settings(proxy_url: str, engine: str) -> dict[str, Any]:
    """`workspace/didChangeConfiguration` settings with the same effect as `override_env`."""
    advanced = {"debug.overrideProxyUrl": proxy_url, "debug.overrideEngine": engine}
    # Nested as an editor sends it; a flat "github.copilot" key is ignored by 1.539.0.
    return {"github": {"copilot": {"advanced": advanced}}}


def _isolated_env(home: Path, tmp: Path, env: Mapping[str, str]) -> dict[str, str]:
    # The developer's own sign-in, proxy or overrides must not leak into a test: blank them unless given.
    inherited = [
        name
        for name in os.environ
        if name.startswith(_INHERITED_PREFIXES) or name.lower() in _PROXY_VARIABLES
    ]
    isolated = dict.fromkeys(inherited, "")
    # The server keeps sign-in state and caches under HOME and the XDG folders.
    isolated.update(
        {
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_STATE_HOME": str(home / ".local" / "state"),
            # It leaves github-copilot-* folders in the temp dir: keep them inside the state folder.
            "TMPDIR": str(tmp),
        }
    )
    isolated.update(env)
    return isolated


@contextlib.contextmanager
def copilot_language_server(
    binary: Path, state_dir: Path, env: Mapping[str, str], timeout: float = 30.0
) -> Iterator[CopilotLanguageServer]:
    """Start the server binary with `--stdio`, stop it when the block ends.

    `state_dir` holds its HOME (sign-in state, caches) and `logs/copilot-language-server.log` (stderr);
    `env` adds to an environment from which the caller's GitHub/Copilot/proxy variables are blanked.
    """
    home = state_dir / "home"
    tmp = state_dir / "tmp"
    for folder in (home, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    process = procs.start(
        "copilot-language-server",
        [binary, "--stdio"],
        state_dir / "logs",
        env=_isolated_env(home, tmp, env),
        cwd=home,
        pipe_stdio=True,
    )
    client = CopilotLanguageServer(process, timeout=timeout)
    try:
        yield client
    finally:
        client.close()
