"""`pilotfleet serve` end to end: SmolLM2-135M in a real Triton behind the real proxy, as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from openai import OpenAI
from pilotfleet_serve import procs, smollm2
from pilotfleet_serve.serve import COPILOT_STOPS
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "def fibonacci(n):"
# The `serve` subcommand as `pilotfleet` registers it (the lead wires `register` into the CLI's main).
CLI = (
    "import argparse, logging, sys\n"
    "from pilotfleet_serve.cli import register\n"
    "logging.basicConfig(level=logging.INFO)\n"
    "parser = argparse.ArgumentParser(prog='pilotfleet')\n"
    "register(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args()\n"
    "sys.exit(args.func(args))\n"
)


@pytest.fixture(scope="module")
def expected_completion() -> str:
    """What plain `generate()` gives for PROMPT on the same weights, cut at Copilot's stop strings."""
    folder = smollm2.ensure_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=2, pad_token_id=2)
    text = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    cut = min((i for i in (text.find(s) for s in COPILOT_STOPS) if i >= 0), default=len(text))
    return text[:cut]


def serve_argv(*args: str) -> list[str]:
    """The command line of `pilotfleet serve ARGS` in this virtual environment."""
    return [sys.executable, "-c", CLI, "serve", *args]


def test_serve_once_prints_the_models_completion(expected_completion: str) -> None:
    done = subprocess.run(
        serve_argv("--once", PROMPT), capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed, _, footer = done.stdout.partition("\n\n[smollm2-135m via the proxy; ")
    assert printed == PROMPT + expected_completion
    assert "fibonacci" in expected_completion or "return" in expected_completion
    assert "triton start" in footer and "completion" in footer


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    """`pilotfleet serve --port P` running in the background (its output in a file); SIGINT-ed at the end."""
    port = procs.free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            serve_argv("--port", str(port)),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        while not procs.port_open(port):
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "serve did not listen within 300s"
            time.sleep(0.2)
        yield process, port, log_path
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_serve_answers_openai_clients_then_cleans_up_on_ctrl_c(
    serving: tuple[subprocess.Popen[str], int, Path], expected_completion: str
) -> None:
    process, port, log_path = serving
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300)
    model = smollm2.MODEL_NAME
    stops = list(COPILOT_STOPS)
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=64, temperature=0, stop=stops)
    assert whole.choices[0].text == expected_completion
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(
            model=model, prompt=PROMPT, max_tokens=64, temperature=0, stop=stops, stream=True
        )
        if chunk.choices
    ]
    assert "".join(pieces) == expected_completion
    assert len([p for p in pieces if p]) > 3, "the completion did not arrive token by token"
    # The settings block tells editors where to go.
    output = log_path.read_text()
    assert f'"debug.overrideProxyUrl": "http://127.0.0.1:{port}"' in output
    assert f"GH_COPILOT_OVERRIDE_ENGINE={model}" in output
    triton_grpc = re.search(r"Triton on 127\.0\.0\.1:(\d+) serves", output)
    assert triton_grpc, output[-3000:]

    os.killpg(process.pid, signal.SIGINT)
    assert process.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    assert not procs.port_open(port)
    assert not procs.port_open(int(triton_grpc.group(1)))
    workdirs = re.findall(r"(/\S*pilotfleet-serve-[^/\s]+)/routes\.yaml", log_path.read_text())
    assert workdirs and not any(Path(w).exists() for w in workdirs)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
