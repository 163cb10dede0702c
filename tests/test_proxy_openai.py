"""The official `openai` Python SDK against the proxy and the real Triton: what OpenAI-style editors see."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from pilotfleet_proxy.testing import ProxyServer
from pilotfleet_proxy.tokenizer import Tokenizer
from pilotfleet_testbed.pytest_proxy import echo_completion, fim_prompt_ids

pytestmark = pytest.mark.testbed

PREFIX = "def fibonacci(n):\n    "
SUFFIX = "\n\nprint(fibonacci(10))\n"


@pytest.fixture
def client(proxy_server: ProxyServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{proxy_server.url}/v1", api_key="not-needed", max_retries=0) as sdk:
        yield sdk


def test_sdk_completion(client: openai.OpenAI, gpt2: Tokenizer) -> None:
    completion = client.completions.create(model="echo", prompt=PREFIX, max_tokens=12, temperature=0)
    assert completion.object == "text_completion"
    assert completion.model == "echo"
    assert completion.choices[0].text == echo_completion(gpt2, gpt2.encode(PREFIX), 12)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 12


def test_sdk_streamed_completion_with_suffix(client: openai.OpenAI, gpt2: Tokenizer) -> None:
    stream = client.completions.create(
        model="echo-fim", prompt=PREFIX, suffix=SUFFIX, max_tokens=20, temperature=0.2, stream=True
    )
    chunks = list(stream)
    assert len(chunks) > 1
    assert len({chunk.id for chunk in chunks}) == 1
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == echo_completion(gpt2, fim_prompt_ids(gpt2, PREFIX, SUFFIX), 20)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sdk_unary_completion_with_suffix_and_stop(client: openai.OpenAI, gpt2: Tokenizer) -> None:
    completion = client.completions.create(
        model="echo-fim", prompt=PREFIX, suffix=SUFFIX, max_tokens=40, stop=["fibonacci(10"]
    )
    full = echo_completion(gpt2, fim_prompt_ids(gpt2, PREFIX, SUFFIX), 40)
    assert completion.choices[0].text == full[: full.index("fibonacci(10")]
    assert completion.choices[0].finish_reason == "stop"


def test_sdk_sees_real_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-model", prompt="x")
    assert missing.value.status_code == 404
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.completions.create(model="echo", prompt="x", logit_bias={"50256": -100})
    assert "logit_bias" in str(unsupported.value)


def test_sdk_lists_models(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["echo", "echo-fim", "echo-slow"]
