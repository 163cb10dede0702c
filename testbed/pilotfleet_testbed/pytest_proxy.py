"""pytest fixtures: the real proxy (uvicorn on a free port) in front of the real CPU Triton's echo models.

Plugin `pilotfleet_testbed.pytest_proxy`; needs `pilotfleet_testbed.pytest_triton` too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pilotfleet_proxy.routes import FimTemplate, ModelRoute, RouteTable
from pilotfleet_proxy.testing import ProxyServer
from pilotfleet_proxy.tokenizer import Tokenizer
from pilotfleet_serve.tritonserver import TritonServer

from pilotfleet_testbed.tokenizers import END_OF_TEXT_ID, gpt2_tokenizer_json
from pilotfleet_testbed.triton_models.echo_rule import EchoRow, generate

ProxyServerFactory = Callable[..., ProxyServer]
# StarCoder's spelling; with the GPT-2 test tokenizer they are plain text, which makes them visible
# in what the echo model sends back.
TEST_FIM = FimTemplate(prefix="<fim_prefix>", suffix="<fim_suffix>", middle="<fim_middle>")


def echo_route(name: str, triton_urls: list[str], tokenizer: Path | str, **fields: object) -> ModelRoute:
    """A route to the echo models (`ft-echo`, `ft-echo-stream`), GPT-2 tokenizer; `fields` override."""
    values: dict[str, object] = {
        "name": name,
        "triton_model": "ft-echo",
        "streaming_model": "ft-echo-stream",
        "endpoints": tuple(triton_urls),
        "tokenizer": str(tokenizer),
        "context_length": 2048,
        "default_max_tokens": 16,
        "max_tokens_limit": 1024,
        "end_id": END_OF_TEXT_ID,
    }
    values.update(fields)
    return ModelRoute.model_validate(values)


def echo_route_table(triton_urls: list[str], tokenizer: Path) -> RouteTable:
    """The standard test fleet: `echo` (alias `copilot-codex`), `echo-fim` (FIM template), `echo-slow`."""
    return RouteTable(
        models=(
            echo_route("echo", triton_urls, tokenizer, aliases=("copilot-codex", "codegen")),
            echo_route("echo-fim", triton_urls, tokenizer, fim=TEST_FIM),
            echo_route("echo-slow", triton_urls, tokenizer, streaming_model="ft-echo-stream-slow"),
        )
    )


def echo_completion(tokenizer: Tokenizer, prompt_ids: list[int], max_tokens: int) -> str:
    """The text the echo models generate for `prompt_ids` (the testbed's own rule, decoded)."""
    row = EchoRow(prompt=tuple(prompt_ids), output_len=max_tokens, end_id=END_OF_TEXT_ID)
    return tokenizer.decode(generate(row))


def fim_prompt_ids(tokenizer: Tokenizer, prefix: str, suffix: str) -> list[int]:
    """The ids the proxy sends for TEST_FIM: each marker and each part tokenized on its own, psm order."""
    parts = (TEST_FIM.prefix, prefix, TEST_FIM.suffix, suffix, TEST_FIM.middle)
    return [token for part in parts for token in tokenizer.encode(part)]


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Path:
    """A GPT-2 tokenizer.json (ids equal to tiktoken's r50k_base), built once and cached."""
    return gpt2_tokenizer_json()


@pytest.fixture(scope="session")
def gpt2(gpt2_tokenizer: Path) -> Tokenizer:
    """The GPT-2 tokenizer as the proxy loads it."""
    return Tokenizer.from_json(gpt2_tokenizer.read_text(), str(gpt2_tokenizer))


@pytest.fixture(scope="session")
def proxy_routes_file(
    triton_server: TritonServer, gpt2_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A route table file for the standard test fleet on the session's Triton."""
    path = tmp_path_factory.mktemp("proxy-routes") / "routes.yaml"
    path.write_text(echo_route_table([triton_server.url], gpt2_tokenizer).to_yaml())
    return path


@pytest.fixture(scope="session")
def proxy_server(proxy_routes_file: Path) -> Iterator[ProxyServer]:
    """One proxy for the session on the standard test fleet; tests must not change its route table."""
    server = ProxyServer.start(proxy_routes_file)
    yield server
    server.stop()


@pytest.fixture
def proxy_client(proxy_server: ProxyServer) -> Iterator[httpx.Client]:
    """An HTTP client for the session proxy."""
    with httpx.Client(base_url=proxy_server.url, timeout=30.0) as client:
        yield client


@pytest.fixture
def proxy_server_factory() -> Iterator[ProxyServerFactory]:
    """Start private proxies (own route table file, own settings); all stopped after the test.

    Call it as `factory(routes_file, **ProxySettings fields)`.
    """
    started: list[ProxyServer] = []

    def start(routes_file: Path, **settings: Any) -> ProxyServer:
        server = ProxyServer.start(routes_file, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
