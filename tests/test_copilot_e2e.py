"""The real Copilot language server against the proxy and the real CPU Triton: what an editor shows.

The proxy is the whole GitHub side: the language server signs in at the proxy's URL and takes every other
URL from the token the proxy issues. Each proxy here records, at its door, the requests it got and the
statuses it answered (`RecordingProxy`), so a test can compute the completion the echo model produced for
the prompt the editor really sent (the testbed's echo rule, the proxy's stop semantics) and compare it
with the ghost text the editor got.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pilotfleet_proxy.completion import suffix_stop
from pilotfleet_proxy.settings import ProxySettings
from pilotfleet_proxy.testing import ProxyServer
from pilotfleet_proxy.tokenizer import Tokenizer
from pilotfleet_serve.tritonserver import TritonServer
from pilotfleet_testbed.copilot import override_settings, sign_in_env
from pilotfleet_testbed.pytest_clients import CopilotFactory
from pilotfleet_testbed.pytest_proxy import echo_completion, echo_route_table
from pilotfleet_testbed.pytest_triton import TritonServerFactory
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

pytestmark = pytest.mark.testbed

SOURCE = 'def add(a, b):\n    """Add two numbers."""\n\nprint(add(1, 2))\n'
# The empty line between the function and the call: where the editor asks for ghost text.
CURSOR = (2, 0)
ACCESS_LOGGER = "pilotfleet_proxy.routers.copilot"


@dataclass(frozen=True)
class Exchange:
    """One request the proxy got and the status it answered."""

    method: str
    path: str
    status: int
    body: bytes

    def json(self) -> Any:
        """The request body, parsed."""
        return json.loads(self.body)


class _Recorder:
    """ASGI middleware that keeps every request's method, path, body and response status."""

    def __init__(self, app: ASGIApp, sink: list[Exchange], lock: threading.Lock) -> None:
        self.app = app
        self.sink = sink
        self.lock = lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = bytearray()

        async def receive_body() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        async def send_status(message: Message) -> None:
            # Recorded before the answer goes out: once the editor has it, the test may look.
            if message["type"] == "http.response.start":
                with self.lock:
                    self.sink.append(Exchange(scope["method"], scope["path"], message["status"], bytes(body)))
            await send(message)

        await self.app(scope, receive_body, send_status)


class RecordingProxy(ProxyServer):
    """The real proxy, recording what it was asked and what it answered."""

    def __init__(self, settings: ProxySettings) -> None:
        super().__init__(settings)
        self._lock = threading.Lock()
        self._exchanges: list[Exchange] = []
        self.app.add_middleware(_Recorder, sink=self._exchanges, lock=self._lock)

    @property
    def github_url(self) -> str:
        """The URL editors sign in at (the language server wants `localhost`, not an IP address)."""
        return f"http://localhost:{self.port}"

    def exchanges(self, path: str = "") -> list[Exchange]:
        """The recorded exchanges whose path starts with `path`."""
        with self._lock:
            return [e for e in self._exchanges if e.path.startswith(path)]

    def completions(self) -> list[Exchange]:
        """The recorded completion requests, whatever their engine."""
        return [e for e in self.exchanges() if e.method == "POST" and e.path.endswith("/completions")]


@pytest.fixture
def recording_proxies() -> Iterator[list[RecordingProxy]]:
    """Proxies started by a test (append them); all stopped at its end."""
    started: list[RecordingProxy] = []
    yield started
    for proxy in started:
        proxy.stop()


def start_proxy(
    started: list[RecordingProxy], triton: TritonServer, tokenizer: Path, tmp_path: Path, **settings: Any
) -> RecordingProxy:
    """A recording proxy on the standard echo fleet of `triton`."""
    routes = tmp_path / f"routes-{len(started)}.yaml"
    routes.write_text(echo_route_table([triton.url], tokenizer).to_yaml())
    proxy = RecordingProxy.start(routes, **settings)
    assert isinstance(proxy, RecordingProxy)
    started.append(proxy)
    return proxy


def expected_completion(tok: Tokenizer, sent: dict[str, Any]) -> str:
    """What the proxy answers to the completion request `sent`: the echo model's text up to a stop string.

    The stop strings are the request's plus, the echo routes having no FIM template, the suffix's first
    line (the proxy's own rule).
    """
    text = echo_completion(tok, tok.encode(sent["prompt"]), sent["max_tokens"])
    stops = [*sent["stop"], *filter(None, [suffix_stop(sent.get("suffix"))])]
    return text[: min((i for stop in stops if (i := text.find(stop)) >= 0), default=len(text))]


def wait_for_model_list(proxy: RecordingProxy, timeout: float = 30.0) -> None:
    """Wait until the language server has read the proxy's model list.

    With no engine configured it picks its engine from that list; asked for a completion before the list
    arrives, it falls back to GitHub's default engine, which the proxy rightly answers with 404.
    """
    deadline = time.monotonic() + timeout
    while not any(e.method == "GET" and e.status == 200 for e in proxy.exchanges("/models")):
        assert time.monotonic() < deadline, f"the language server never read {proxy.url}/models"
        time.sleep(0.05)


def ask_for_ghost_text(
    copilot_factory: CopilotFactory,
    tmp_path: Path,
    env: dict[str, str],
    settings: dict[str, Any],
    invoked: bool,
    proxy: RecordingProxy | None = None,
) -> list[dict[str, Any]]:
    """Start a signed-in language server, open SOURCE and ask for ghost text at CURSOR.

    With `proxy`, the editor has no engine configured: wait until it has read that proxy's model list.
    """
    client = copilot_factory(env, settings)
    assert client.check_status()["status"] == "OK"
    if proxy is not None:
        wait_for_model_list(proxy)
    uri = client.open_document(tmp_path / "add.py", SOURCE, "python")
    return client.inline_completion(uri, *CURSOR, invoked=invoked, timeout=60)


TRIGGERS = pytest.mark.parametrize("invoked", [False, True], ids=["automatic", "invoked"])


@TRIGGERS
def test_signed_in_editor_needs_no_other_setting(
    copilot_factory: CopilotFactory,
    recording_proxies: list[RecordingProxy],
    triton_server: TritonServer,
    gpt2_tokenizer: Path,
    gpt2: Tokenizer,
    tmp_path: Path,
    invoked: bool,
) -> None:
    proxy = start_proxy(recording_proxies, triton_server, gpt2_tokenizer, tmp_path)
    default_model = echo_route_table([triton_server.url], gpt2_tokenizer).models[0].name

    items = ask_for_ghost_text(copilot_factory, tmp_path, sign_in_env(proxy.github_url), {}, invoked, proxy)

    # The whole sign-in happened at the proxy, and succeeded.
    for path in ("/copilot_internal/v2/token", "/copilot_internal/user", "/models"):
        answered = proxy.exchanges(path)
        assert answered and {e.status for e in answered} == {200}, (path, answered)
    # With no engine configured, the editor picked the first model of the proxy's model list.
    (sent,) = proxy.completions()
    assert (sent.path, sent.status) == (f"/v1/engines/{default_model}/completions", 200)
    body = sent.json()
    assert body["n"] == (3 if invoked else 1)
    assert body["stream"] is True
    expected = expected_completion(gpt2, body)
    assert expected, "the echo model's completion should not be empty for this document"
    # n=3 gives three equal choices here (the echo model is deterministic): the editor shows one.
    assert [item["insertText"] for item in items] == [expected]
    assert items[0]["range"]["start"] == {"line": CURSOR[0], "character": CURSOR[1]}


@TRIGGERS
def test_editor_settings_route_to_a_model_alias(
    copilot_factory: CopilotFactory,
    recording_proxies: list[RecordingProxy],
    triton_server: TritonServer,
    gpt2_tokenizer: Path,
    gpt2: Tokenizer,
    tmp_path: Path,
    invoked: bool,
) -> None:
    proxy = start_proxy(recording_proxies, triton_server, gpt2_tokenizer, tmp_path)
    alias = "copilot-codex"
    assert alias in echo_route_table([triton_server.url], gpt2_tokenizer).models[0].aliases

    items = ask_for_ghost_text(
        copilot_factory,
        tmp_path,
        sign_in_env(proxy.github_url),
        override_settings(proxy.github_url, alias),
        invoked,
    )

    (sent,) = proxy.completions()
    assert (sent.path, sent.status) == (f"/v1/engines/{alias}/completions", 200)
    assert sent.json()["n"] == (3 if invoked else 1)
    assert [item["insertText"] for item in items] == [expected_completion(gpt2, sent.json())]


def test_unknown_engine_gets_no_completion_and_a_404(
    copilot_factory: CopilotFactory,
    recording_proxies: list[RecordingProxy],
    triton_server: TritonServer,
    gpt2_tokenizer: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=ACCESS_LOGGER)
    proxy = start_proxy(recording_proxies, triton_server, gpt2_tokenizer, tmp_path)
    engine = "no-such-model"
    client = copilot_factory(sign_in_env(proxy.github_url), override_settings(proxy.github_url, engine))
    assert client.check_status()["status"] == "OK"
    uri = client.open_document(tmp_path / "add.py", SOURCE, "python")

    items = client.inline_completion(uri, *CURSOR, invoked=True, timeout=60)

    assert items == []
    path = f"/v1/engines/{engine}/completions"
    assert [(e.path, e.status) for e in proxy.completions()] == [(path, 404)]
    # The proxy's access log names the request with the id the editor was given.
    assert re.search(rf"POST {path} -> 404 \(X-GitHub-Request-Id [0-9A-F]{{32}}\)", caplog.text), caplog.text
    warning = client.wait_for_notification("didChangeStatus", lambda s: "404" in s.get("message", ""))
    assert engine in warning["message"]


def test_triton_down_is_a_503_not_an_empty_completion(
    copilot_factory: CopilotFactory,
    recording_proxies: list[RecordingProxy],
    triton_server_factory: TritonServerFactory,
    gpt2_tokenizer: Path,
    tmp_path: Path,
) -> None:
    triton = triton_server_factory()
    proxy = start_proxy(recording_proxies, triton, gpt2_tokenizer, tmp_path, endpoint_cooldown_s=0.0)
    client = copilot_factory(sign_in_env(proxy.github_url), {})
    assert client.check_status()["status"] == "OK"
    wait_for_model_list(proxy)
    uri = client.open_document(tmp_path / "add.py", SOURCE, "python")
    triton.kill()

    items = client.inline_completion(uri, *CURSOR, invoked=True, timeout=60)

    assert items == []
    statuses = [e.status for e in proxy.completions()]
    assert statuses and set(statuses) == {503}, statuses
    metrics = httpx.get(f"{proxy.url}/metrics", timeout=10).text
    assert re.search(
        r'pilotfleet_proxy_requests_total\{model="echo",status="503",stream="true"\} [1-9]', metrics
    )
    warning = client.wait_for_notification("didChangeStatus", lambda s: "503" in s.get("message", ""))
    assert warning["kind"] == "Warning"


def test_shared_token_signs_editors_in_and_keeps_others_out(
    copilot_factory: CopilotFactory,
    recording_proxies: list[RecordingProxy],
    triton_server: TritonServer,
    gpt2_tokenizer: Path,
    gpt2: Tokenizer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=ACCESS_LOGGER)
    secret = "team-secret-token"
    proxy = start_proxy(recording_proxies, triton_server, gpt2_tokenizer, tmp_path, auth_token=secret)

    outsider = copilot_factory(sign_in_env(proxy.github_url, github_token="gho_someone_else"), {})
    refused = outsider.wait_for_notification("didChangeStatus", lambda s: s.get("kind") == "Error")
    items = ask_for_ghost_text(
        copilot_factory, tmp_path, sign_in_env(proxy.github_url, github_token=secret), {}, invoked=False
    )

    assert outsider.check_status()["status"] == "NotSignedIn"
    assert "sign in" in refused["message"].lower()
    # The editor's log names the X-GitHub-Request-Id of the refusal; the proxy's access log has it too.
    logged = [
        found.group(1)
        for message in outsider.notifications("window/logMessage")
        if (found := re.search(r"401 status.*request_id=([0-9A-F]{32})", message.params["message"]))
    ]
    assert logged
    for request_id in logged:
        assert f"GET /copilot_internal/v2/token -> 401 (X-GitHub-Request-Id {request_id})" in caplog.text
    (sent,) = proxy.completions()
    assert sent.status == 200
    assert [item["insertText"] for item in items] == [expected_completion(gpt2, sent.json())]


# -- the GitHub side over plain HTTP ------------------------------------------------------------------


def test_every_response_carries_a_github_request_id(
    recording_proxies: list[RecordingProxy],
    triton_server: TritonServer,
    gpt2_tokenizer: Path,
    tmp_path: Path,
) -> None:
    proxy = start_proxy(recording_proxies, triton_server, gpt2_tokenizer, tmp_path, auth_token="s3cret")
    bearer = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        responses = [
            client.get("/copilot_internal/v2/token", headers=bearer),
            client.get("/copilot_internal/v2/token"),
            client.get("/embeddings/models"),
            client.get("/healthz"),
            client.post("/v1/engines/echo/completions", json={"prompt": "x", "max_tokens": 1}),
            client.post("/v1/engines/echo/completions", content=b"{", headers=bearer),
            client.post("/v1/engines/nope/completions", json={"prompt": "x"}, headers=bearer),
        ]
        with client.stream(
            "POST", "/v1/engines/echo/completions", json={"prompt": "x", "stream": True}, headers=bearer
        ) as stream:
            stream.read()
            responses.append(stream)

    assert [r.status_code for r in responses] == [200, 401, 404, 200, 401, 400, 404, 200]
    ids = [r.headers.get("x-github-request-id") for r in responses]
    assert all(ids) and len(set(ids)) == len(ids), ids


def test_token_endpoints_point_at_the_proxy(
    recording_proxies: list[RecordingProxy],
    triton_server: TritonServer,
    gpt2_tokenizer: Path,
    tmp_path: Path,
) -> None:
    derived = start_proxy(recording_proxies, triton_server, gpt2_tokenizer, tmp_path)
    public = "https://copilot.example.com/fleet"
    configured = start_proxy(
        recording_proxies, triton_server, gpt2_tokenizer, tmp_path, public_url=public + "/"
    )

    as_seen = httpx.get(f"{derived.url}/copilot_internal/v2/token", headers={"Host": "editor-facing:8443"})
    behind_ingress = httpx.get(f"{configured.url}/copilot_internal/v2/token")
    user = httpx.get(f"{configured.url}/copilot_internal/user")

    keys = {"api", "proxy", "telemetry", "origin-tracker"}
    assert as_seen.json()["endpoints"] == dict.fromkeys(keys, "http://editor-facing:8443")
    assert behind_ingress.json()["endpoints"] == dict.fromkeys(keys, public)
    assert user.status_code == 200 and user.json()["endpoints"] == dict.fromkeys(keys, public)


def test_telemetry_is_answered_and_kept_local(
    recording_proxies: list[RecordingProxy],
    triton_server: TritonServer,
    gpt2_tokenizer: Path,
    tmp_path: Path,
) -> None:
    proxy = start_proxy(recording_proxies, triton_server, gpt2_tokenizer, tmp_path)

    config = httpx.get(f"{proxy.url}/telemetry")
    events = httpx.post(f"{proxy.url}/telemetry", content=b'[{"name": "ghostText.shown"}]')

    assert config.status_code == 200
    # No experiments: the editor keeps its defaults.
    assert config.json()["Configs"] == [{"Id": "vscode", "Parameters": {}}]
    assert events.status_code == 204


def test_model_list_is_a_copilot_completion_model_list(
    recording_proxies: list[RecordingProxy],
    triton_server: TritonServer,
    gpt2_tokenizer: Path,
    tmp_path: Path,
) -> None:
    proxy = start_proxy(recording_proxies, triton_server, gpt2_tokenizer, tmp_path)
    table = echo_route_table([triton_server.url], gpt2_tokenizer)

    models = httpx.get(f"{proxy.url}/models").json()["data"]

    assert [m["id"] for m in models] == [route.name for route in table.models]
    for card in models:
        assert card["name"] == card["id"] and card["model_picker_enabled"] is True
        assert card["capabilities"]["type"] == "completion"
        assert card["capabilities"]["tokenizer"] in ("cl100k_base", "o200k_base")
