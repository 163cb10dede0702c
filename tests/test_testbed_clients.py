"""The real clients of the testbed: pinned helm/kubectl, and the Copilot language server over LSP stdio.

The Copilot tests run the real language server against `FakeGitHub`, a small HTTP server in this file.
It is a test double of the GitHub side only (github.com cannot be reached from here): it hands out
Copilot tokens like `api.github.com/copilot_internal/v2/token` and answers completions with one canned
Server-Sent-Events stream, recording every request so the tests can assert what the editor sent.
The project's own token endpoint and completion proxy are tested against this same client elsewhere.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from pilotfleet_testbed import versions
from pilotfleet_testbed.copilot import (
    LanguageServerError,
    override_env,
    override_settings,
    sign_in_env,
)
from pilotfleet_testbed.k8s_tools import K8sTools, ensure_k8s_tools
from pilotfleet_testbed.pytest_clients import CopilotFactory

log = logging.getLogger(__name__)

pytestmark = pytest.mark.testbed

COPILOT_TOKEN = "tid=pilotfleet-test;exp=4102444800;sku=free_limited_copilot"
GITHUB_TOKEN = "gho_pilotfleet_test_token"
GITHUB_LOGIN = "octocat"
CANNED_COMPLETION = "    return a + b  # canned by FakeGitHub\n"
SOURCE = 'def add(a, b):\n    """Add two numbers."""\n\nprint(add(1, 2))\n'
# Where the token response's `endpoints.proxy` points, so a test sees which route completions took.
TOKEN_PROXY_PATH = "/token-endpoints-proxy"


# -- helm and kubectl --------------------------------------------------------------------------------


def _run(argv: list[str | Path], env_home: Path) -> subprocess.CompletedProcess[str]:
    # helm keeps config, cache and repositories under these: keep them out of the developer's home.
    env = {
        "HOME": str(env_home),
        "HELM_CONFIG_HOME": str(env_home / "helm-config"),
        "HELM_CACHE_HOME": str(env_home / "helm-cache"),
        "HELM_DATA_HOME": str(env_home / "helm-data"),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=60)


def _write_chart(root: Path) -> Path:
    chart = root / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: demo\ndescription: A chart the test writes\nversion: 0.1.0\n"
        "icon: https://example.invalid/icon.png\nkubeVersion: '>=1.30.0-0'\n"
    )
    (chart / "values.yaml").write_text("# -- Greeting stored in the ConfigMap.\ngreeting: hello\n")
    (chart / "values.schema.json").write_text(
        json.dumps(
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "required": ["greeting"],
                "properties": {"greeting": {"type": "string", "minLength": 1}},
                "additionalProperties": False,
            }
        )
    )
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-demo\n"
        "  labels:\n    app.kubernetes.io/name: demo\ndata:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    return chart


def test_helm_and_kubectl_are_the_pinned_versions(k8s_tools: K8sTools, tmp_path: Path) -> None:
    helm = _run([k8s_tools.helm, "version", "--short"], tmp_path)
    kubectl = _run([k8s_tools.kubectl, "version", "--client"], tmp_path)

    assert helm.returncode == 0, helm.stderr
    assert helm.stdout.startswith(f"v{versions.HELM}+"), helm.stdout
    assert kubectl.returncode == 0, kubectl.stderr
    assert f"Client Version: v{versions.KUBECTL}\n" in kubectl.stdout


def test_a_second_ensure_uses_the_cache(k8s_tools: K8sTools) -> None:
    folder = k8s_tools.helm.parent
    before = {path.name: path.stat() for path in folder.iterdir()}

    again = ensure_k8s_tools()

    assert again == k8s_tools
    # Nothing downloaded or extracted again: the same files, untouched.
    after = {path.name: path.stat() for path in folder.iterdir()}
    assert {n: (s.st_ino, s.st_mtime_ns) for n, s in after.items()} == {
        n: (s.st_ino, s.st_mtime_ns) for n, s in before.items()
    }


def test_helm_lints_and_renders_a_chart_offline(k8s_tools: K8sTools, tmp_path: Path) -> None:
    chart = _write_chart(tmp_path)

    lint = _run([k8s_tools.helm, "lint", "--strict", chart], tmp_path)
    rendered = _run(
        [
            k8s_tools.helm,
            "template",
            "greeter",
            chart,
            "--set",
            "greeting=hi there",
            "--kube-version",
            "1.36.3",
        ],
        tmp_path,
    )
    rejected = _run([k8s_tools.helm, "template", "greeter", chart, "--set", "greeting="], tmp_path)

    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in lint.stdout
    assert rendered.returncode == 0, rendered.stderr
    (configmap,) = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert configmap["metadata"]["name"] == "greeter-demo"
    assert configmap["data"] == {"greeting": "hi there"}
    # values.schema.json is enforced without any network.
    assert rejected.returncode != 0
    assert "greeting" in rejected.stderr


# -- the GitHub side, as a test double ---------------------------------------------------------------


class _QuietHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The language server drops its keep-alive connections when it exits: not worth a traceback.
        log.debug("fake github: connection from %s ended abruptly", client_address, exc_info=True)


@dataclass(frozen=True)
class Recorded:
    """One HTTP request the language server made (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The request body, parsed."""
        return json.loads(self.body)


class FakeGitHub:
    """GitHub's token and user endpoints plus a canned SSE completion, on a free port of 127.0.0.1."""

    def __init__(self, send_request_id: bool = True) -> None:
        """Serve; `send_request_id=False` leaves out `X-GitHub-Request-Id`, which real GitHub always sends."""
        self.send_request_id = send_request_id
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._server = _QuietHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-github", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Base URL; the language server needs `localhost` here, not an IP address."""
        return f"http://localhost:{self._server.server_port}"

    def requests_to(self, path: str) -> list[Recorded]:
        """The recorded requests whose path starts with `path`."""
        with self._lock:
            return [r for r in self.requests if r.path.startswith(path)]

    def completion_requests(self) -> list[Recorded]:
        """The recorded completion requests, wherever they were routed."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.endswith("/completions")]

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _record(self, request: Recorded) -> None:
        with self._lock:
            self.requests.append(request)

    def _token(self) -> dict[str, Any]:
        return {
            "token": COPILOT_TOKEN,
            "expires_at": int(time.time()) + 3600,
            "refresh_in": 1500,
            "sku": "free_limited_copilot",
            "tracking_id": "pilotfleet-test",
            # Everything the server would otherwise send to GitHub's hosts comes here instead.
            "endpoints": {
                "api": self.url,
                "proxy": self.url + TOKEN_PROXY_PATH,
                "telemetry": self.url + "/telemetry",
                "origin-tracker": self.url + "/origin-tracker",
            },
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("fake github: " + format, *args)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                double._record(
                    Recorded(method, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
                if method == "GET" and self.path == "/copilot_internal/v2/token":
                    self._reply(200, "application/json", json.dumps(double._token()).encode())
                elif method == "GET" and self.path == "/copilot_internal/user":
                    user = {"login": GITHUB_LOGIN, "copilot_plan": "individual", "chat_enabled": False}
                    self._reply(200, "application/json", json.dumps(user).encode())
                elif method == "POST" and self.path.endswith("/completions"):
                    self._reply(200, "text/event-stream", _sse_completion(CANNED_COMPLETION))
                else:
                    self._reply(404, "application/json", b'{"message": "Not Found"}')

            def _reply(self, status: int, content_type: str, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                if double.send_request_id:
                    self.send_header("X-GitHub-Request-Id", f"PFT0:{len(double.requests):04d}")
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _sse_completion(text: str) -> bytes:
    # Two chunks, as a streaming backend sends them, then the terminator.
    half = len(text) // 2
    chunks = []
    for index, (part, finish) in enumerate(((text[:half], None), (text[half:], "stop"))):
        choice = {"index": 0, "text": part, "finish_reason": finish, "logprobs": None}
        chunk = {
            "id": "cmpl-fake-github",
            "object": "text_completion",
            "created": 1_700_000_000 + index,
            "model": "canned",
            "choices": [choice],
        }
        chunks.append(f"data: {json.dumps(chunk)}\n\n")
    chunks.append("data: [DONE]\n\n")
    return "".join(chunks).encode()


@pytest.fixture
def fake_github() -> Iterator[FakeGitHub]:
    """A FakeGitHub that behaves like GitHub (sends X-GitHub-Request-Id)."""
    server = FakeGitHub()
    yield server
    server.close()


@pytest.fixture
def fake_github_without_request_id() -> Iterator[FakeGitHub]:
    """A FakeGitHub that leaves out X-GitHub-Request-Id, as FauxPilot's token shim does."""
    server = FakeGitHub(send_request_id=False)
    yield server
    server.close()


# -- the Copilot language server --------------------------------------------------------------------


def test_language_server_signs_in_against_github(
    copilot_factory: CopilotFactory, fake_github: FakeGitHub
) -> None:
    client = copilot_factory(sign_in_env(fake_github.url, GITHUB_TOKEN), {})

    status = client.wait_for_notification("didChangeStatus", lambda s: s.get("kind") == "Normal", timeout=30)
    signed_in = client.check_status()

    assert status == {"busy": False, "kind": "Normal"}
    # Signed in through the environment, the server names no real user.
    assert signed_in == {"status": "OK", "user": "<codespaces-user>"}
    (token_request,) = fake_github.requests_to("/copilot_internal/v2/token")
    assert token_request.headers["authorization"] == f"Bearer {GITHUB_TOKEN}"
    assert token_request.headers["user-agent"] == f"GithubCopilot/{versions.COPILOT_LANGUAGE_SERVER}"


def test_sign_in_fails_without_the_github_request_id_header(
    copilot_factory: CopilotFactory, fake_github_without_request_id: FakeGitHub
) -> None:
    client = copilot_factory(sign_in_env(fake_github_without_request_id.url, GITHUB_TOKEN), {})

    warning = client.wait_for_notification(
        "didChangeStatus", lambda s: s.get("kind") == "Warning", timeout=30
    )
    with pytest.raises(LanguageServerError) as refused:
        client.check_status()

    assert fake_github_without_request_id.requests_to("/copilot_internal/v2/token"), (
        "no token request was made"
    )
    assert "does not appear to originate from GitHub" in warning["message"]
    assert "does not appear to originate from GitHub" in str(refused.value)


@pytest.mark.parametrize(
    ("route", "invoked"),
    [("env", False), ("settings", True), ("token-endpoints", False)],
    ids=["env-automatic", "settings-invoked", "token-endpoints-automatic"],
)
def test_inline_completion_goes_to_the_routed_proxy(
    copilot_factory: CopilotFactory, fake_github: FakeGitHub, tmp_path: Path, route: str, invoked: bool
) -> None:
    proxy_url = f"{fake_github.url}/{route}-proxy"
    engine = f"pilotfleet-{route}"
    env = sign_in_env(fake_github.url, GITHUB_TOKEN)
    settings: dict[str, Any] = {}
    if route == "env":
        env |= override_env(proxy_url, engine)
        expected_path = f"/{route}-proxy/v1/engines/{engine}/completions"
    elif route == "settings":
        settings = override_settings(proxy_url, engine)
        expected_path = f"/{route}-proxy/v1/engines/{engine}/completions"
    else:
        # No override at all: the Copilot token's `endpoints.proxy` decides; the engine is the default one.
        expected_path = f"{TOKEN_PROXY_PATH}/v1/engines/"
    client = copilot_factory(env, settings)
    assert client.check_status()["status"] == "OK"
    uri = client.open_document(tmp_path / "add.py", SOURCE, "python")

    items = client.inline_completion(uri, line=2, character=0, invoked=invoked, timeout=60)

    (sent,) = fake_github.completion_requests()
    log.info(
        "completion request %s %s\nheaders: %s\nbody: %s", sent.method, sent.path, sent.headers, sent.body
    )
    assert sent.path.startswith(expected_path), sent.path
    assert sent.headers["authorization"] == f"Bearer {COPILOT_TOKEN}"
    assert sent.headers["openai-intent"] == "copilot-ghost"
    body = sent.json()
    assert body["stream"] is True
    assert body["n"] == (3 if invoked else 1)
    assert 'def add(a, b):\n    """Add two numbers."""\n' in body["prompt"]
    assert body["suffix"] == "print(add(1, 2))\n"
    assert [item["insertText"] for item in items] == [CANNED_COMPLETION.rstrip("\n")]
    assert items[0]["range"]["start"] == {"line": 2, "character": 0}
