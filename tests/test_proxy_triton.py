"""The proxy app over HTTP against the real CPU Triton and its FT-shaped echo models.

What the echo models generate is predictable (`echo_rule`: token i = prompt[i % len]), so every expected
completion below is computed from the prompt's tokens with the testbed's own rule, not written down.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pilotfleet_proxy.routers.completions import TRIMMED_HEADER
from pilotfleet_proxy.routes import RouteTable
from pilotfleet_proxy.testing import ProxyServer
from pilotfleet_proxy.tokenizer import Tokenizer
from pilotfleet_serve import procs
from pilotfleet_serve.tritonserver import TritonServer
from pilotfleet_testbed.polling import wait_for
from pilotfleet_testbed.pytest_proxy import (
    ProxyServerFactory,
    echo_completion,
    echo_route,
    echo_route_table,
    fim_prompt_ids,
)
from pilotfleet_testbed.pytest_triton import TritonServerFactory
from pilotfleet_testbed.tokenizers import END_OF_TEXT_ID
from pilotfleet_testbed.triton import build_model_repository
from pilotfleet_testbed.triton_models.config import EchoModel
from pilotfleet_testbed.triton_models.echo_rule import EchoRow, generate, log_prob

pytestmark = pytest.mark.testbed

PROMPT = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def tok(gpt2: Tokenizer) -> Tokenizer:
    return gpt2


def echo_ids(prompt_ids: list[int], max_tokens: int) -> list[int]:
    """What the echo models generate for these prompt ids."""
    return generate(EchoRow(prompt=tuple(prompt_ids), output_len=max_tokens, end_id=END_OF_TEXT_ID))


def echo_text(tok: Tokenizer, prompt: str, max_tokens: int) -> str:
    return echo_completion(tok, tok.encode(prompt), max_tokens)


def sse(response: httpx.Response) -> Iterator[dict[str, Any] | str]:
    """Parse a Server-Sent Events body: each `data:` payload as JSON, or the literal `[DONE]`."""
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line.removeprefix("data: ")
        yield payload if payload == "[DONE]" else json.loads(payload)


def stream_choices(events: list[dict[str, Any] | str]) -> dict[int, tuple[str, str | None]]:
    """Each choice's concatenated text and final finish_reason, checking the stream's shape on the way."""
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    assert len({c["id"] for c in chunks}) == 1, "every chunk of one completion carries the same id"
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    for chunk in chunks:
        assert chunk["object"] == "text_completion"
        for choice in chunk["choices"]:
            assert reasons.get(choice["index"]) is None, "no text after a choice's finish_reason"
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            reasons[choice["index"]] = choice["finish_reason"]
    return {i: (texts[i], reasons[i]) for i in texts}


def triton_stats(server: TritonServer, model: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{server.http_url}/v2/models/{model}/stats") as response:
        stats = json.load(response)["model_stats"][0]
    return {
        "requests": int(stats["inference_stats"]["success"]["count"]),
        "inferences": int(stats["inference_count"]),
    }


def post(client: httpx.Client, body: dict[str, Any], path: str = "/v1/completions") -> httpx.Response:
    return client.post(path, json=body)


# ---- unary -------------------------------------------------------------------------------------


def test_unary_completion(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    response = post(proxy_client, {"model": "echo", "prompt": PROMPT, "max_tokens": 12})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "echo"
    assert [c["index"] for c in body["choices"]] == [0]
    assert body["choices"][0]["text"] == echo_text(tok, PROMPT, 12)
    assert body["choices"][0]["finish_reason"] == "length"
    prompt_tokens = len(tok.encode(PROMPT))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
    }


def test_default_max_tokens_and_echo(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    body = post(proxy_client, {"model": "codegen", "prompt": PROMPT, "echo": True}).json()
    assert body["model"] == "echo"  # an alias answers as the model's name
    assert body["choices"][0]["text"] == PROMPT + echo_text(tok, PROMPT, 16)
    assert body["usage"]["completion_tokens"] == 16


def test_stop_string_split_across_tokens_unary_n3(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    prompt = "hello world, "
    assert [tok.decode([t]) for t in tok.encode(prompt)][:2] == ["hello", " world"]
    body = post(
        proxy_client, {"model": "echo", "prompt": prompt, "max_tokens": 10, "n": 3, "stop": "o w"}
    ).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (i, "hell", "stop") for i in range(3)
    ]
    assert body["usage"]["completion_tokens"] == 3 * 2  # "hello", " world": the stop string ends there


def test_n_choices_are_one_batched_triton_request(
    proxy_client: httpx.Client, triton_server: TritonServer, tok: Tokenizer
) -> None:
    before = triton_stats(triton_server, "ft-echo")
    body = post(proxy_client, {"model": "echo", "prompt": PROMPT, "max_tokens": 5, "n": 4}).json()
    after = triton_stats(triton_server, "ft-echo")
    assert len(body["choices"]) == 4
    assert {c["text"] for c in body["choices"]} == {echo_text(tok, PROMPT, 5)}
    assert after["requests"] - before["requests"] == 1
    assert after["inferences"] - before["inferences"] == 4


def test_more_choices_than_the_model_batches(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    """The echo models take 8 rows per request: 12 choices become two parallel requests, merged in order."""
    expected = echo_text(tok, PROMPT, 6)
    body = post(proxy_client, {"model": "echo", "prompt": PROMPT, "max_tokens": 6, "n": 12}).json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(i, expected) for i in range(12)]
    stream = {"model": "echo", "prompt": PROMPT, "max_tokens": 6, "n": 12, "stream": True}
    with proxy_client.stream("POST", "/v1/completions", json=stream) as response:
        events = list(sse(response))
    assert stream_choices(events) == {i: (expected, "length") for i in range(12)}


def test_several_prompts_and_token_prompts(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    body = post(
        proxy_client, {"model": "echo", "prompt": ["alpha beta", "gamma"], "n": 2, "max_tokens": 3}
    ).json()
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert texts == [echo_text(tok, "alpha beta", 3)] * 2 + [echo_text(tok, "gamma", 3)] * 2
    ids = tok.encode("x = 42")
    body = post(proxy_client, {"model": "echo", "prompt": ids, "max_tokens": 4}).json()
    assert body["choices"][0]["text"] == tok.decode(echo_ids(ids, 4))


def test_logprobs_are_the_models_own(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    body = post(proxy_client, {"model": "echo", "prompt": PROMPT, "max_tokens": 6, "logprobs": 0}).json()
    logprobs = body["choices"][0]["logprobs"]
    generated = echo_ids(tok.encode(PROMPT), 6)
    assert logprobs["tokens"] == [tok.decode([t]) for t in generated]
    assert logprobs["token_logprobs"] == pytest.approx([log_prob(t, i) for i, t in enumerate(generated)])
    assert logprobs["top_logprobs"] is None
    text = body["choices"][0]["text"]
    assert [
        text[o : o + len(t)] for o, t in zip(logprobs["text_offset"], logprobs["tokens"], strict=True)
    ] == (logprobs["tokens"])


def test_fim_template_builds_the_models_prompt(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    prefix, suffix = "def add(a, b):\n", "\nprint(add(1, 2))\n"
    body = post(
        proxy_client, {"model": "echo-fim", "prompt": prefix, "suffix": suffix, "max_tokens": 40}
    ).json()
    fim_ids = fim_prompt_ids(tok, prefix, suffix)
    assert body["choices"][0]["text"] == echo_completion(tok, fim_ids, 40)
    assert body["usage"]["prompt_tokens"] == len(fim_ids)


def test_suffix_without_fim_trims_the_completion(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    prompt = "total = compute(items)\nprint(total)\n"
    body = post(
        proxy_client, {"model": "echo", "prompt": prompt, "suffix": "print(total)\n", "max_tokens": 30}
    ).json()
    # The echo model repeats the prompt; the completion ends where the suffix's first line would start.
    assert body["choices"][0]["text"] == "total = compute(items)\n"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_context_overflow_trims_the_prompt_from_the_left(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    prompt = "".join(f"line_{i} = {i}\n" for i in range(600))
    ids = tok.encode(prompt)
    assert len(ids) > 2048
    response = post(proxy_client, {"model": "echo", "prompt": prompt, "max_tokens": 48})
    assert response.status_code == 200, response.text
    kept = ids[-(2048 - 48) :]
    assert response.headers[TRIMMED_HEADER] == str(len(ids) - len(kept))
    body = response.json()
    assert body["usage"]["prompt_tokens"] == 2048 - 48
    assert body["choices"][0]["text"] == tok.decode(echo_ids(kept, 48))


def test_max_tokens_zero_echoes_the_prompt(proxy_client: httpx.Client) -> None:
    body = post(proxy_client, {"model": "echo", "prompt": "abc", "max_tokens": 0, "echo": True}).json()
    assert [(c["text"], c["finish_reason"]) for c in body["choices"]] == [("abc", "length")]


# ---- streaming ---------------------------------------------------------------------------------


def test_streaming_copilot_route(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 10, "stream": True, "n": 2, "temperature": 0.2, "top_p": 1}
    with proxy_client.stream("POST", "/v1/engines/copilot-codex/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse(response))
    assert stream_choices(events) == {i: (echo_text(tok, PROMPT, 10), "length") for i in range(2)}
    # True streaming: the text arrives in many chunks, not one at the end.
    assert len(events) > 10


def test_streaming_stop_string_across_tokens(proxy_client: httpx.Client) -> None:
    body = {
        "model": "echo",
        "prompt": "hello world, ",
        "max_tokens": 10,
        "stream": True,
        "stop": ["o w", "zz"],
    }
    with proxy_client.stream("POST", "/v1/completions", json=body) as response:
        events = list(sse(response))
    assert stream_choices(events) == {0: ("hell", "stop")}
    sent = "".join(c["text"] for e in events if isinstance(e, dict) for c in e["choices"])
    assert "o" not in sent[4:], "text of a stop string was sent before the stop was certain"


def test_stream_include_usage_and_echo(proxy_client: httpx.Client, tok: Tokenizer) -> None:
    body = {
        "model": "echo",
        "prompt": "ab cd",
        "max_tokens": 4,
        "stream": True,
        "echo": True,
        "stream_options": {"include_usage": True},
    }
    with proxy_client.stream("POST", "/v1/completions", json=body) as response:
        events = list(sse(response))
    usage_chunk = events[-2]
    assert isinstance(usage_chunk, dict) and usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert stream_choices([*events[:-2], "[DONE]"]) == {0: ("ab cd" + echo_text(tok, "ab cd", 4), "length")}


def test_first_token_arrives_before_the_generation_ends(
    proxy_client: httpx.Client, triton_server: TritonServer
) -> None:
    """Real streaming: text reaches the client, chunk by chunk, while the model is still generating.

    The client leaves after a few text chunks; the model logs how many tokens it had made by then, which
    is fewer than asked for only if those chunks came before the generation ended.
    """
    body = {"model": "echo-slow", "prompt": PROMPT, "max_tokens": 40, "stream": True}
    texts = []
    with proxy_client.stream("POST", "/v1/completions", json=body) as response:
        for event in sse(response):
            if isinstance(event, dict) and event["choices"] and event["choices"][0]["text"]:
                texts.append(event)
                if len(texts) == 5:
                    break
    assert len(texts) == 5
    made = wait_for_cancel_log(triton_server, texts[0]["id"])
    assert 5 <= made < 40, f"the model had made {made} of 40 tokens when the client had 5 chunks"


def test_client_disconnect_cancels_the_triton_stream(
    proxy_server: ProxyServer, triton_server: TritonServer
) -> None:
    body = {"model": "echo-slow", "prompt": PROMPT, "max_tokens": 500, "stream": True}
    with (
        httpx.Client(base_url=proxy_server.url, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        first = next(e for e in sse(response) if isinstance(e, dict))
    # The model logs the request id we gave Triton (the completion id) and how far it got.
    assert wait_for_cancel_log(triton_server, first["id"]) < 50, "generation ran on after the client left"
    metrics = httpx.get(f"{proxy_server.url}/metrics").text
    assert re.search(r'pilotfleet_proxy_cancelled_requests_total\{model="echo-slow"\} [1-9]', metrics)
    assert re.search(r"pilotfleet_proxy_backend_outstanding_requests\{[^}]*\} 0\.0", metrics)


def test_stop_string_ends_the_triton_stream(proxy_client: httpx.Client, triton_server: TritonServer) -> None:
    """Once every choice hit a stop string the model is told to stop, not left to run to max_tokens."""
    body = {"model": "echo-slow", "prompt": "hello world, ", "max_tokens": 500, "stream": True, "stop": "o w"}
    with proxy_client.stream("POST", "/v1/completions", json=body) as response:
        events = list(sse(response))
    assert stream_choices(events) == {0: ("hell", "stop")}
    completion_id = next(e for e in events if isinstance(e, dict))["id"]
    assert wait_for_cancel_log(triton_server, completion_id) < 10


def wait_for_cancel_log(triton: TritonServer, request_id: str, timeout: float = 5.0) -> int:
    """How many tokens the echo model had sent when it logged `request_id` as cancelled."""
    pattern = re.compile(rf"request '{request_id}' cancelled after (\d+) of \d+ tokens")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(triton.log_path.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        time.sleep(0.02)
    raise AssertionError(f"Triton never logged request {request_id} as cancelled")


async def test_finished_streams_leave_the_model_free_to_unload(
    triton_server_factory: TritonServerFactory,
    proxy_server_factory: ProxyServerFactory,
    gpt2_tokenizer: Path,
    tmp_path: Path,
) -> None:
    """Streams the proxy has read to their final response are ended cleanly, so Triton can unload the model.

    Cancelling a stream just after its final response leaves its state behind in Triton, now and then:
    the model then stays UNLOADING for good, and a graceful stop of Triton waits out its whole exit
    timeout. 400 streams, 32 at a time, made that happen every time we tried; this test runs 800.
    """
    triton = triton_server_factory()
    routes = tmp_path / "routes.yaml"
    _write_routes(routes, echo_route_table([triton.url], gpt2_tokenizer))
    proxy = proxy_server_factory(routes)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as client:

        async def stream() -> str | None:
            # One token: the only response is the final one, so every stream ends right after it.
            body = {"model": "echo", "prompt": PROMPT, "max_tokens": 1, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as response:
                await response.aread()
            return stream_choices(list(sse(response)))[0][1]

        for _ in range(25):
            reasons = await asyncio.gather(*(stream() for _ in range(32)))
            assert set(reasons) == {"length"}

    unload = urllib.request.Request(f"{triton.http_url}/v2/repository/models/ft-echo-stream/unload", b"{}")
    urllib.request.urlopen(unload).close()

    def state() -> str:
        index = urllib.request.Request(f"{triton.http_url}/v2/repository/index", b"{}")
        with urllib.request.urlopen(index) as response:
            models = {m["name"]: m for m in json.load(response)}
        return str(models["ft-echo-stream"].get("state"))

    wait_for(lambda: state() == "UNAVAILABLE", "ft-echo-stream to unload", timeout=20)


def test_client_disconnect_cancels_a_unary_request(
    triton_server_factory: TritonServerFactory,
    proxy_server_factory: ProxyServerFactory,
    gpt2_tokenizer: Path,
    tmp_path: Path,
) -> None:
    """A unary call is cancelled too: the proxy drops the gRPC call at once instead of waiting 4 s.

    The Python model itself runs on (a unary model cannot see the cancellation): Triton counts the request
    only when the model is done, and the proxy has given it up before that.
    """
    repo = build_model_repository(
        tmp_path / "models", models=[EchoModel("ft-echo-slow", token_delay_ms=20.0)]
    )
    triton = triton_server_factory(model_repo=repo)
    routes = tmp_path / "routes.yaml"
    route = echo_route(
        "slow-unary", [triton.url], gpt2_tokenizer, triton_model="ft-echo-slow", streaming_model=None
    )
    _write_routes(routes, RouteTable(models=(route,)))
    proxy = proxy_server_factory(routes)
    body = {"model": "slow-unary", "prompt": PROMPT, "max_tokens": 200}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=0.5)
    cancelled = r'pilotfleet_proxy_cancelled_requests_total\{model="slow-unary"\} 1\.0'
    metrics = ""
    model_done = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{proxy.url}/metrics").text
        model_done = triton_stats(triton, "ft-echo-slow")["requests"]
        if re.search(cancelled, metrics) or model_done:
            break
        time.sleep(0.05)
    assert re.search(cancelled, metrics), metrics
    assert re.search(r"pilotfleet_proxy_backend_outstanding_requests\{[^}]*\} 0\.0", metrics)
    assert model_done == 0, "the proxy waited for the whole generation"
    # The count that proved it: it moves once the model is done with the request nobody waits for.
    wait_for(lambda: triton_stats(triton, "ft-echo-slow")["requests"] == 1, "the model to finish", 10)


def test_cli_serves_a_completion(proxy_routes_file: Path, tmp_path: Path, tok: Tokenizer) -> None:
    """`pilotfleet proxy --routes --host --port` as its own process (through the subcommand's register())."""
    port = procs.free_port()
    script = (
        "import argparse, sys; from pilotfleet_proxy.cli import register; "
        "parser = argparse.ArgumentParser(); register(parser.add_subparsers()); "
        "args = parser.parse_args(sys.argv[1:]); sys.exit(args.func(args))"
    )
    argv = [sys.executable, "-c", script, "proxy", "--routes", str(proxy_routes_file)]
    process = procs.start("proxy-cli", [*argv, "--host", "127.0.0.1", "--port", str(port)], tmp_path)
    try:
        process.wait_until(lambda: procs.port_open(port), 30, "listening")
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "echo", "prompt": PROMPT, "max_tokens": 7},
        )
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == echo_text(tok, PROMPT, 7)
    finally:
        process.stop()


TOKENIZER_MODEL_PY = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        with open(args["model_repository"] + "/tokenizer.json", "rb") as handle:
            self.payload = np.array([handle.read()], dtype=np.object_)

    def execute(self, requests):
        answer = pb_utils.InferenceResponse([pb_utils.Tensor("tokenizer_json", self.payload)])
        return [answer for _ in requests]
"""

TOKENIZER_CONFIG = """name: "tokenizer"
backend: "python"
max_batch_size: 0
input [ { name: "request" data_type: TYPE_BOOL dims: [ 1 ] optional: true } ]
output [ { name: "tokenizer_json" data_type: TYPE_STRING dims: [ 1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def test_tokenizer_served_by_triton(
    triton_server_factory: TritonServerFactory,
    proxy_server_factory: ProxyServerFactory,
    gpt2_tokenizer: Path,
    tmp_path: Path,
    tok: Tokenizer,
) -> None:
    """`tokenizer: triton://<model>`: the proxy mounts nothing, the model's Triton serves its tokenizer."""
    model = tmp_path / "extra" / "tokenizer"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(TOKENIZER_CONFIG)
    (model / "1" / "model.py").write_text(TOKENIZER_MODEL_PY)
    (model / "tokenizer.json").write_text(gpt2_tokenizer.read_text())
    triton = triton_server_factory(model_repo=build_model_repository(tmp_path / "models", extra=[model]))
    routes = tmp_path / "routes.yaml"
    route = echo_route("echo", [triton.url], "triton://tokenizer")
    _write_routes(routes, RouteTable(models=(route,)))
    proxy = proxy_server_factory(routes)
    response = httpx.post(
        f"{proxy.url}/v1/completions", json={"model": "echo", "prompt": PROMPT, "max_tokens": 9}
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == echo_text(tok, PROMPT, 9)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"prompt": "x"}, 400, "model"),
        ({"model": "echo", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "echo", "prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"model": "echo", "prompt": "x", "frequency_penalty": 0.3}, 400, "frequency_penalty"),
        ({"model": "echo", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "echo", "prompt": "x", "n": 99}, 400, "n"),
        ({"model": "echo", "prompt": "x", "stop": ""}, 400, "stop"),
    ],
)
def test_bad_requests_get_openai_errors(
    proxy_client: httpx.Client, body: dict[str, Any], status: int, param: str
) -> None:
    for stream in (False, True):
        response = post(proxy_client, {**body, "stream": stream})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["param"] == param or (error["param"] or "").startswith(param), error
        assert error["message"] and error["type"]


def test_unknown_engine_is_404_and_malformed_json_is_400(proxy_client: httpx.Client) -> None:
    response = post(proxy_client, {"prompt": "x"}, path="/v1/engines/nope/completions")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = proxy_client.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "error" in response.json()


def test_oversized_body_is_413(proxy_client: httpx.Client) -> None:
    response = post(proxy_client, {"model": "echo", "prompt": "x" * 2_000_000})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def _write_routes(path: Path, table: RouteTable) -> None:
    path.write_text(table.to_yaml())


def test_model_errors_are_http_errors_not_empty_choices(
    triton_server: TritonServer,
    proxy_server_factory: ProxyServerFactory,
    gpt2_tokenizer: Path,
    tmp_path: Path,
) -> None:
    """A route that promises more context than the model has: Triton refuses, the client sees why."""
    routes = tmp_path / "routes.yaml"
    route = echo_route("too-long", [triton_server.url], gpt2_tokenizer, context_length=8192)
    _write_routes(routes, RouteTable(models=(route,)))
    proxy = proxy_server_factory(routes)
    prompt = "".join(f"line_{i} = {i}\n" for i in range(600))
    for stream in (False, True):
        body = {"model": "too-long", "prompt": prompt, "max_tokens": 64, "stream": stream}
        response = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=30)
        assert response.status_code in (400, 502), response.text
        assert "max_seq_len" in response.json()["error"]["message"]


def test_backend_down_is_503_and_recovers_after_restart(
    triton_server_factory: TritonServerFactory,
    proxy_server_factory: ProxyServerFactory,
    gpt2_tokenizer: Path,
    tmp_path: Path,
    tok: Tokenizer,
) -> None:
    triton = triton_server_factory()
    routes = tmp_path / "routes.yaml"
    _write_routes(routes, echo_route_table([triton.url], gpt2_tokenizer))
    proxy = proxy_server_factory(routes, endpoint_cooldown_s=0.0)
    body = {"model": "echo", "prompt": "abc", "max_tokens": 3}
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert post(client, body).status_code == 200
        triton.kill()
        for stream in (False, True):
            response = post(client, {**body, "stream": stream})
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == "backend_unavailable"
        assert client.get("/readyz").status_code == 503
        triton.launch()
        deadline = time.monotonic() + 20
        while (response := post(client, body)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert response.status_code == 200
        assert response.json()["choices"][0]["text"] == echo_text(tok, "abc", 3)
        assert client.get("/readyz").status_code == 200


def test_slow_backend_is_504(
    triton_server: TritonServer, proxy_server_factory: ProxyServerFactory, proxy_routes_file: Path
) -> None:
    proxy = proxy_server_factory(proxy_routes_file, request_timeout_s=0.005)
    body = {"model": "echo-slow", "prompt": PROMPT, "max_tokens": 5, "stream": True}
    response = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "timeout_error"


def test_over_capacity_is_429(
    proxy_server_factory: ProxyServerFactory, proxy_routes_file: Path, tok: Tokenizer
) -> None:
    proxy = proxy_server_factory(proxy_routes_file, max_outstanding_per_endpoint=1)
    slow = {"model": "echo-slow", "prompt": PROMPT, "max_tokens": 100, "stream": True}
    with (
        httpx.Client(base_url=proxy.url, timeout=30) as client,
        client.stream("POST", "/v1/completions", json=slow) as held,
    ):
        assert held.status_code == 200
        response = post(client, {"model": "echo", "prompt": "x", "max_tokens": 2})
        assert response.status_code == 429
        assert response.headers["retry-after"]


# ---- several endpoints, several models, hot reload ----------------------------------------------


def test_two_endpoints_share_the_load_and_fail_over(
    triton_server_factory: TritonServerFactory,
    proxy_server_factory: ProxyServerFactory,
    gpt2_tokenizer: Path,
    tmp_path: Path,
    tok: Tokenizer,
) -> None:
    first, second = triton_server_factory(), triton_server_factory()
    routes = tmp_path / "routes.yaml"
    _write_routes(routes, echo_route_table([first.url, second.url], gpt2_tokenizer))
    proxy = proxy_server_factory(routes)
    slow = {"model": "echo-slow", "prompt": PROMPT, "max_tokens": 15, "stream": True}
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        streams = [client.stream("POST", "/v1/completions", json=slow) for _ in range(4)]
        # Four streams in flight at once: least outstanding puts two on each endpoint.
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            spread = [triton_stats(t, "ft-echo-stream-slow")["requests"] for t in (first, second)]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        for _ in range(50):  # requests count in Triton's stats once they complete
            spread = [triton_stats(t, "ft-echo-stream-slow")["requests"] for t in (first, second)]
            if sum(spread) == 4:
                break
            time.sleep(0.1)
        assert spread == [2, 2]
        first.kill()
        for _ in range(4):
            response = post(client, {"model": "echo", "prompt": "abc", "max_tokens": 3})
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == echo_text(tok, "abc", 3)


def test_route_table_hot_reload(
    triton_server: TritonServer,
    proxy_server_factory: ProxyServerFactory,
    gpt2_tokenizer: Path,
    tmp_path: Path,
) -> None:
    routes = tmp_path / "routes.yaml"
    _write_routes(routes, RouteTable(models=(echo_route("first", [triton_server.url], gpt2_tokenizer),)))
    proxy = proxy_server_factory(routes, routes_poll_s=0.05)
    body = {"prompt": "abc", "max_tokens": 2}
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        assert post(client, {**body, "model": "first"}).status_code == 200
        assert post(client, {**body, "model": "second"}).status_code == 404
        new = RouteTable(
            models=(echo_route("second", [triton_server.url], gpt2_tokenizer, aliases=("two",)),)
        )
        replacement = tmp_path / "routes.yaml.new"
        _write_routes(replacement, new)
        replacement.replace(routes)
        deadline = time.monotonic() + 5
        while post(client, {**body, "model": "two"}).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert post(client, {**body, "model": "two"}).status_code == 200
        assert post(client, {**body, "model": "first"}).status_code == 404
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["second"]
        # A broken file keeps the last good table.
        routes.write_text("models: [{name: 12}]")
        time.sleep(0.3)
        assert post(client, {**body, "model": "second"}).status_code == 200
        metrics = client.get("/metrics").text
        assert 'pilotfleet_proxy_route_table_reloads_total{result="invalid"} 1.0' in metrics


# ---- models, health, metrics, token exchange ---------------------------------------------------


def test_models_health_and_metrics(proxy_client: httpx.Client) -> None:
    for path in ("/v1/models", "/models"):
        data = proxy_client.get(path).json()["data"]
        assert [m["id"] for m in data] == ["echo", "echo-fim", "echo-slow"]
        assert data[0]["aliases"] == ["copilot-codex", "codegen"]
    assert proxy_client.get("/healthz").json() == {"status": "ok"}
    ready = proxy_client.get("/readyz")
    assert ready.status_code == 200 and all(ready.json()["models"].values())
    before = proxy_client.get("/metrics").text
    post(proxy_client, {"model": "echo", "prompt": "abc", "max_tokens": 2})
    after = proxy_client.get("/metrics").text

    def count(text: str) -> float:
        found = re.search(
            r'pilotfleet_proxy_requests_total\{model="echo",status="200",stream="false"\} (\S+)', text
        )
        return float(found.group(1)) if found else 0.0

    assert count(after) == count(before) + 1


def test_readyz_without_models_is_503(proxy_server_factory: ProxyServerFactory, tmp_path: Path) -> None:
    proxy = proxy_server_factory(tmp_path / "missing.yaml")
    response = httpx.get(f"{proxy.url}/readyz")
    assert response.status_code == 503
    assert response.json()["routes_loaded"] is True and response.json()["models"] == {}


def test_copilot_token_exchange_open_proxy(proxy_client: httpx.Client) -> None:
    response = proxy_client.get("/copilot_internal/v2/token", headers={"Authorization": "token anything"})
    assert response.status_code == 200
    assert response.headers["x-github-request-id"]
    body = response.json()
    assert set(body) >= {"token", "expires_at", "refresh_in"}
    assert body["expires_at"] > time.time() and 0 < body["refresh_in"] < body["expires_at"] - time.time()


def test_shared_token_protects_the_proxy(
    proxy_server_factory: ProxyServerFactory, proxy_routes_file: Path
) -> None:
    proxy = proxy_server_factory(proxy_routes_file, auth_token="team-secret")
    body = {"prompt": "abc", "max_tokens": 2}
    with httpx.Client(base_url=proxy.url, timeout=30) as client:
        denied = client.post("/v1/engines/echo/completions", json=body)
        assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
        assert (
            client.get("/copilot_internal/v2/token", headers={"Authorization": "token wrong"}).status_code
            == 401
        )
        exchange = client.get("/copilot_internal/v2/token", headers={"Authorization": "token team-secret"})
        assert exchange.status_code == 200 and exchange.headers["x-github-request-id"]
        token = exchange.json()["token"]
        allowed = client.post(
            "/v1/engines/echo/completions", json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert allowed.status_code == 200, allowed.text
