"""Proxy overhead: latency and throughput through the proxy vs calling Triton directly, same request.

Starts a CPU Triton with the echo models and the proxy (its own process, as deployed), then drives both
with asyncio clients at concurrency 1, 8 and 64: FT's tensors over `tritonclient.grpc.aio` for Triton,
the OpenAI completion JSON over HTTP for the proxy (aiohttp:
httpx saturates first). Each request is a 66-token prompt and 16 new tokens
(the shape FauxPilot's proxy was measured with). Streaming time-to-first-byte is measured the same way
against the decoupled model. Prints a Markdown table.

    .venv/bin/python benchmarks/proxy.py [--requests 2000] [--seconds-per-run 10]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from pilotfleet_proxy.backend import end_stream
from pilotfleet_proxy.tokenizer import Tokenizer
from pilotfleet_serve import procs
from pilotfleet_serve.tritonserver import TritonServer
from pilotfleet_testbed.pytest_proxy import echo_route_table
from pilotfleet_testbed.tokenizers import gpt2_tokenizer_json
from pilotfleet_testbed.triton import build_model_repository

log = logging.getLogger("benchmarks.proxy")

PROMPT_TOKENS = 66
NEW_TOKENS = 16
CONCURRENCY = (1, 8, 64)


@dataclass
class Result:
    """Latencies of one run and its wall time."""

    latencies: list[float]
    wall: float

    def row(self, name: str, concurrency: int) -> str:
        """One Markdown table row."""
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) * 1000
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
        rate = len(ordered) / self.wall
        return f"| {name} | {concurrency} | {p50:.2f} | {p99:.2f} | {rate:,.0f} |"


async def drive(
    call: Callable[[], Awaitable[object]], concurrency: int, requests: int, budget: float
) -> Result:
    """Run `call` `requests` times (or until `budget` seconds pass) with `concurrency` in flight."""
    for _ in range(min(50, requests)):
        await call()
    latencies: list[float] = []
    issued = 0
    deadline = time.perf_counter() + budget

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.perf_counter() < deadline:
            issued += 1
            began = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - began)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Result(latencies, time.perf_counter() - started)


def ft_inputs(ids: list[int]) -> list[grpcclient.InferInput]:
    """FT's three required tensors for one prompt."""
    arrays = {
        "input_ids": np.array([ids], dtype=np.uint32),
        "input_lengths": np.array([[len(ids)]], dtype=np.uint32),
        "request_output_len": np.array([[NEW_TOKENS]], dtype=np.uint32),
    }
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "UINT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


async def direct_stream_first(client: grpcaio.InferenceServerClient, ids: list[int]) -> float:
    """Seconds until the decoupled model's first response arrives; the rest of the stream is drained."""
    done = asyncio.Event()

    async def requests() -> AsyncIterator[dict[str, object]]:
        yield {"model_name": "ft-echo-stream", "inputs": ft_inputs(ids)}
        await done.wait()

    began = time.perf_counter()
    first = 0.0
    responses = client.stream_infer(requests())
    async for result, error in responses:
        if error is not None:
            raise error
        first = first or time.perf_counter() - began
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    done.set()
    await end_stream(responses, timeout=30.0)
    return first


async def proxy_stream_first(client: aiohttp.ClientSession, body: dict[str, object]) -> float:
    """Seconds until the first byte of the proxy's event stream; the rest is drained."""
    began = time.perf_counter()
    first = 0.0
    async with client.post("/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for _chunk in response.content.iter_any():
            first = first or time.perf_counter() - began
    return first


async def benchmark(
    triton_url: str, proxy_url: str, tokenizer: Tokenizer, requests: int, budget: float
) -> list[str]:
    """Run every measurement; return the table's lines."""
    words = " ".join(f"value_{i}" for i in range(200))
    ids = tokenizer.encode(words)[:PROMPT_TOKENS]
    prompt = tokenizer.decode(ids)
    assert len(tokenizer.encode(prompt)) == PROMPT_TOKENS
    body: dict[str, object] = {"model": "echo", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    lines = [
        "| path | concurrency | p50 ms | p99 ms | req/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    async with (
        grpcaio.InferenceServerClient(triton_url) as triton,
        aiohttp.ClientSession(proxy_url, connector=aiohttp.TCPConnector(limit=128)) as http,
    ):
        inputs = ft_inputs(ids)

        async def direct() -> None:
            await triton.infer("ft-echo", inputs)

        async def proxied() -> None:
            async with http.post("/v1/completions", json=body) as response:
                response.raise_for_status()
                await response.read()

        for concurrency in CONCURRENCY:
            for name, call in (("Triton direct (gRPC)", direct), ("through the proxy (HTTP)", proxied)):
                result = await drive(call, concurrency, requests, budget)
                lines.append(result.row(name, concurrency))
                log.info("%s", lines[-1])
        ttfb = []
        for name, first in (
            ("Triton direct, streaming first response", lambda: direct_stream_first(triton, ids)),
            ("through the proxy, streaming first byte", lambda: proxy_stream_first(http, body)),
        ):
            times = [await first() for _ in range(min(requests, 300))]
            p50 = statistics.median(times) * 1000
            p99 = sorted(times)[int(len(times) * 0.99) - 1] * 1000
            ttfb.append(f"| {name} | 1 | {p50:.2f} | {p99:.2f} | |")
        lines += ttfb
    return lines


def main(argv: list[str] | None = None) -> int:
    """Start Triton and the proxy, measure, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per run (default 2000)")
    parser.add_argument("--seconds-per-run", type=float, default=10.0, help="time cap per run (default 10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokenizer_path = gpt2_tokenizer_json()
    tokenizer = Tokenizer.from_json(tokenizer_path.read_text(), str(tokenizer_path))
    with tempfile.TemporaryDirectory(prefix="pilotfleet-bench-") as tmp:
        work = Path(tmp)
        with TritonServer.start(build_model_repository(work / "models"), work / "triton") as triton:
            routes = work / "routes.yaml"
            routes.write_text(echo_route_table([triton.url], tokenizer_path).to_yaml())
            port = procs.free_port()
            env = {"PILOTFLEET_PROXY_ROUTES_FILE": str(routes)}
            argv_proxy = [
                sys.executable, "-m", "uvicorn", "--factory", "pilotfleet_proxy.app:app_from_env",
                "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
            ]  # fmt: skip
            proxy = procs.start("proxy", argv_proxy, work, env=env)
            try:
                proxy.wait_until(lambda: procs.port_open(port), 30, "listening")
                lines = asyncio.run(
                    benchmark(
                        triton.url, f"http://127.0.0.1:{port}", tokenizer, args.requests, args.seconds_per_run
                    )
                )
            finally:
                proxy.stop()
    cpu = platform.processor() or platform.machine()
    print(f"\n{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
          f"{PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, CPU Triton echo model\n")  # fmt: skip
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
