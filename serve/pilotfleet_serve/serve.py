"""`pilotfleet serve`: a complete fleet on one machine, no Kubernetes.

Triton (CPU here, a GPU where torch sees one) serves the model through our Hugging Face backend, twice:
a unary model and its streaming twin, as the route table expects. The proxy reads a route table written
here (the tokenizer comes from the model's own files) and is what editors and OpenAI clients talk to.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from pilotfleet_proxy.routes import ModelRoute, RouteTable

from pilotfleet_serve import smollm2
from pilotfleet_serve.repository import HFModelConfig, write_hf_model
from pilotfleet_serve.tritonserver import TritonServer

log = logging.getLogger(__name__)

# What Copilot sends to stop a completion at the next top-level statement (GUIDE.md section 1).
COPILOT_STOPS = ("\ndef ", "\nclass ", "\nif ", "\n\n#")


@dataclass(frozen=True)
class BuiltinModel:
    """A model `pilotfleet serve --model` knows: the name clients use and how to get its files."""

    route_name: str
    aliases: tuple[str, ...]
    prepare: Callable[[], Path]
    end_id: int
    context_length: int


BUILTIN_MODELS = {
    "smollm2": BuiltinModel(
        route_name=smollm2.MODEL_NAME,
        aliases=("smollm2",),
        prepare=smollm2.ensure_smollm2,
        # <|im_end|>, the end-of-sequence token of the GGUF's tokenizer.
        end_id=2,
        # The model knows 8192 positions; 2048 keeps a CPU's KV cache and latency modest.
        context_length=2048,
    ),
}


def cuda_available() -> bool:
    """True when torch sees a CUDA device (then Triton runs the model on the GPU)."""
    import torch

    return bool(torch.cuda.is_available())


def build_repository(
    repo: Path, name: str, model_dir: Path, context_length: int, gpu: bool
) -> tuple[str, str]:
    """Write the unary model and its streaming twin into `repo`; return their Triton names."""
    streaming = f"{name}-stream"
    for triton_name, decoupled in ((name, False), (streaming, True)):
        write_hf_model(
            repo,
            HFModelConfig(
                name=triton_name,
                model_dir=model_dir,
                decoupled=decoupled,
                max_seq_len=context_length,
                gpu=gpu,
            ),
        )
    return name, streaming


def route_table(
    model: BuiltinModel, model_dir: Path, endpoint: str, unary: str, streaming: str
) -> RouteTable:
    """The one-model route table `pilotfleet serve` hands the proxy."""
    return RouteTable(
        models=(
            ModelRoute(
                name=model.route_name,
                aliases=model.aliases,
                triton_model=unary,
                streaming_model=streaming,
                endpoints=(endpoint,),
                tokenizer=str(model_dir / "tokenizer.json"),
                context_length=model.context_length,
                default_max_tokens=64,
                max_tokens_limit=model.context_length // 2,
                end_id=model.end_id,
            ),
        )
    )


@dataclass
class LocalFleet:
    """A running Triton with the model loaded, and the route table that points at it."""

    model: BuiltinModel
    triton: TritonServer
    routes_file: Path
    timings: dict[str, float]


@contextlib.contextmanager
def local_fleet(model_key: str, workdir: Path) -> Iterator[LocalFleet]:
    """Prepare the model, start Triton on it and write the route table; stop Triton when the block ends."""
    model = BUILTIN_MODELS[model_key]
    timings: dict[str, float] = {}
    began = time.monotonic()
    model_dir = model.prepare()
    timings["model files"] = time.monotonic() - began
    gpu = cuda_available()
    unary, streaming = build_repository(
        workdir / "models", model.route_name, model_dir, model.context_length, gpu
    )
    began = time.monotonic()
    # Loading the weights happens inside Triton's start (each model instance loads its own copy).
    triton = TritonServer.start(workdir / "models", workdir / "triton", timeout=300.0)
    timings["triton start"] = time.monotonic() - began
    try:
        routes_file = workdir / "routes.yaml"
        table = route_table(model, model_dir, triton.url, unary, streaming)
        routes_file.write_text(table.to_yaml())
        log.info("Triton on %s serves %s (%s) on %s", triton.url, unary, streaming, "GPU" if gpu else "CPU")
        yield LocalFleet(model=model, triton=triton, routes_file=routes_file, timings=timings)
    finally:
        triton.stop()


def settings_block(proxy_url: str, engine: str) -> str:
    """The text that tells a user how to point Copilot and OpenAI clients at this proxy."""
    vscode = {
        "github.copilot.advanced": {"debug.overrideProxyUrl": proxy_url, "debug.overrideEngine": engine}
    }
    localhost = proxy_url.replace("127.0.0.1", "localhost")
    return textwrap.dedent(
        f"""\
        pilotfleet serve: {engine} at {proxy_url}

        VS Code (settings.json):
        {textwrap.indent(json.dumps(vscode, indent=2), " " * 8).lstrip()}

        Copilot language server (copilot.vim, copilot.lua, ...), environment: signing in at this proxy
        instead of GitHub is all it needs (it then completes here, with the first model of /models):
          CODESPACES=true GITHUB_TOKEN=local GITHUB_SERVER_URL={localhost} GITHUB_API_URL={localhost}
          # optional, to pick the model (a name or alias) yourself:
          GH_COPILOT_OVERRIDE_PROXY_URL={proxy_url}
          GH_COPILOT_OVERRIDE_ENGINE={engine}

        OpenAI Python client:
          from openai import OpenAI
          client = OpenAI(base_url="{proxy_url}/v1", api_key="unused")
          completion = client.completions.create(model="{engine}", prompt="def fibonacci(n):", max_tokens=64)
          print(completion.choices[0].text)
        """
    )


def complete(proxy_url: str, engine: str, prompt: str, max_tokens: int = 64, timeout: float = 120.0) -> str:
    """Ask the proxy for one greedy completion of `prompt`, with Copilot's stop strings; return its text."""
    response = httpx.post(
        f"{proxy_url}/v1/completions",
        json={
            "model": engine,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stop": list(COPILOT_STOPS),
        },
        timeout=timeout,
    )
    response.raise_for_status()
    return str(response.json()["choices"][0]["text"])


def _emit(text: str) -> None:
    """Write user-facing output (the settings block, the completion) to stdout."""
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def run_once(model_key: str, prompt: str, max_tokens: int = 64) -> int:
    """Start the fleet, print one completion of `prompt` through the proxy with timings, stop everything."""
    from pilotfleet_proxy.testing import ProxyServer

    with (
        tempfile.TemporaryDirectory(prefix="pilotfleet-serve-") as tmp,
        local_fleet(model_key, Path(tmp)) as fleet,
    ):
        with ProxyServer.start(fleet.routes_file) as proxy:
            began = time.monotonic()
            text = complete(proxy.url, fleet.model.route_name, prompt, max_tokens)
            fleet.timings["completion"] = time.monotonic() - began
        timing = ", ".join(f"{what} {seconds:.1f}s" for what, seconds in fleet.timings.items())
        _emit(f"{prompt}{text}\n\n[{fleet.model.route_name} via the proxy; {timing}]")
    return 0


def run_forever(model_key: str, host: str, port: int) -> int:
    """Start the fleet and the proxy on host:port, print the client settings, serve until Ctrl-C."""
    import uvicorn
    from pilotfleet_proxy.app import create_app
    from pilotfleet_proxy.settings import ProxySettings

    with (
        tempfile.TemporaryDirectory(prefix="pilotfleet-serve-") as tmp,
        local_fleet(model_key, Path(tmp)) as fleet,
    ):
        overrides: dict[str, Any] = {"routes_file": fleet.routes_file, "host": host, "port": port}
        settings = ProxySettings(**overrides)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        _emit(settings_block(f"http://{shown}:{port}", fleet.model.route_name))
        # uvicorn handles Ctrl-C itself and returns; leaving the blocks stops Triton and removes its files.
        uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
    return 0
