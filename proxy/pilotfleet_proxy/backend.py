"""Triton over gRPC (`tritonclient.grpc.aio`): unary and decoupled streaming generation, balancing, health.

Each Triton endpoint (host:port) has one client and one count of requests in flight, shared by every
model served there; a model's request goes to its endpoint with the fewest requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from pilotfleet_proxy.errors import ProxyError, bad_request
from pilotfleet_proxy.settings import ProxySettings

log = logging.getLogger(__name__)

TOKENIZER_OUTPUT = "tokenizer_json"
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Sampling:
    """The generation parameters of one request, as FT's inputs take them."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    seed: int | None = None
    end_id: int | None = None
    want_logprobs: bool = False


@dataclass(frozen=True)
class RowOutput:
    """What the model generated so far for one row (without the prompt)."""

    ids: list[int]
    logprobs: list[float] | None


@dataclass(frozen=True)
class Step:
    """One backend response: every row's generation so far, and whether it is the last one."""

    rows: list[RowOutput]
    final: bool


@dataclass(frozen=True)
class ModelInfo:
    """What the proxy needs to know about a Triton model: its batch limit and the inputs it declares."""

    max_batch_size: int
    inputs: frozenset[str]


class Endpoint:
    """One Triton gRPC endpoint: its client, requests in flight, and when it last refused connections."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = grpcaio.InferenceServerClient(url)
        self.outstanding = 0
        self.down_until = 0.0
        self.retired = False

    async def close(self) -> None:
        """Close the client's channel."""
        await self.client.close()


class EndpointRegistry:
    """The endpoints of the current route table, keyed by URL, reused across route table reloads."""

    def __init__(self) -> None:
        self._endpoints: dict[str, Endpoint] = {}

    def get(self, url: str) -> Endpoint:
        """The endpoint for `url`, created on first use."""
        endpoint = self._endpoints.get(url)
        if endpoint is None:
            endpoint = self._endpoints[url] = Endpoint(url)
        return endpoint

    async def keep_only(self, urls: Iterable[str]) -> None:
        """Forget endpoints no route uses any more; close them once their requests are done."""
        wanted = set(urls)
        for url in [u for u in self._endpoints if u not in wanted]:
            endpoint = self._endpoints.pop(url)
            endpoint.retired = True
            if endpoint.outstanding == 0:
                await endpoint.close()

    def all(self) -> list[Endpoint]:
        """Every endpoint in use."""
        return list(self._endpoints.values())

    async def close(self) -> None:
        """Close every client."""
        for endpoint in self._endpoints.values():
            await endpoint.close()
        self._endpoints.clear()


def map_triton_error(exc: InferenceServerException, url: str) -> ProxyError:
    """Turn a Triton/gRPC failure into the HTTP error the client should see."""
    status = str(exc.status() or "")
    message = exc.message() or str(exc)
    if status.endswith("DEADLINE_EXCEEDED"):
        return ProxyError(504, "the model did not answer in time", code="backend_timeout")
    if status.endswith("RESOURCE_EXHAUSTED"):
        return ProxyError(429, "the model is overloaded, retry later", code="backend_overloaded")
    if status.endswith("INVALID_ARGUMENT"):
        return ProxyError(400, f"the model refused the request: {message}", code="backend_rejected")
    if status.endswith(("UNAVAILABLE", "NOT_FOUND", "CANCELLED")):
        return ProxyError(503, "the model's backend is unavailable", code="backend_unavailable")
    log.warning("Triton %s failed: %s %s", url, status, message)
    return ProxyError(502, f"the model failed: {message}", code="backend_error")


def _connect_failure(exc: InferenceServerException) -> bool:
    """True when the request never reached a model (nothing ran): safe to retry elsewhere."""
    return str(exc.status() or "").endswith("UNAVAILABLE")


def _tensor(name: str, array: npt.NDArray[np.generic], datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def build_inputs(
    rows: Sequence[Sequence[int]], sampling: Sampling, info: ModelInfo
) -> list[grpcclient.InferInput]:
    """FT's input tensors for `rows` (right-padded prompts), with every optional input the model declares."""
    batch = len(rows)
    width = max(1, max(len(r) for r in rows))
    pad = sampling.end_id or 0
    ids = np.full((batch, width), pad, dtype=np.uint32)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
    column = np.ones((batch, 1), dtype=np.uint32)
    inputs = [
        _tensor("input_ids", ids, "UINT32"),
        _tensor("input_lengths", np.array([[len(r)] for r in rows], dtype=np.uint32), "UINT32"),
        _tensor("request_output_len", column * sampling.max_tokens, "UINT32"),
    ]
    greedy = sampling.temperature == 0
    optional: list[tuple[str, npt.NDArray[np.generic], str]] = []
    # Defaults (temperature 1, top-p 1, no top-k) are left to the model: fewer tensors, less latency.
    if greedy:
        # Greedy is top-k 1 for FT; a model without top-k gets a temperature so low that sampling is
        # argmax. Temperature 0 itself would divide the logits by zero.
        optional.append(("runtime_top_k", column, "UINT32"))
        optional.append(("temperature", np.full((batch, 1), GREEDY_TEMPERATURE, np.float32), "FP32"))
    elif sampling.temperature != 1.0:
        optional.append(("temperature", np.full((batch, 1), sampling.temperature, np.float32), "FP32"))
    if sampling.top_p != 1.0:
        optional.append(("runtime_top_p", np.full((batch, 1), sampling.top_p, np.float32), "FP32"))
    if sampling.end_id is not None:
        optional.append(("end_id", column * sampling.end_id, "UINT32"))
    if sampling.presence_penalty:
        optional.append(
            ("presence_penalty", np.full((batch, 1), sampling.presence_penalty, np.float32), "FP32")
        )
    if sampling.seed is not None:
        optional.append(("random_seed", np.full((batch, 1), sampling.seed, np.uint64), "UINT64"))
    if sampling.want_logprobs:
        optional.append(("is_return_log_probs", np.ones((batch, 1), dtype=np.bool_), "BOOL"))
    for name, array, datatype in optional:
        if name in info.inputs:
            inputs.append(_tensor(name, array, datatype))
    return inputs


def check_supported(sampling: Sampling, info: ModelInfo, model: str) -> None:
    """Refuse parameters the model has no input for, naming the parameter (never ignore them silently)."""
    can_sample = "temperature" in info.inputs or (
        sampling.temperature == 0 and "runtime_top_k" in info.inputs
    )
    supported = {
        "presence_penalty": sampling.presence_penalty == 0 or "presence_penalty" in info.inputs,
        "seed": sampling.seed is None or "random_seed" in info.inputs,
        "logprobs": not sampling.want_logprobs or "is_return_log_probs" in info.inputs,
        "temperature": sampling.temperature == 1.0 or can_sample,
        "top_p": sampling.top_p == 1.0 or "runtime_top_p" in info.inputs,
    }
    for param, ok in supported.items():
        if not ok:
            raise bad_request(f"{param} is not supported by model {model}", param=param)


def read_rows(
    result: grpcclient.InferResult, prompt_lengths: Sequence[int], want_logprobs: bool
) -> list[RowOutput]:
    """Each row's generated ids (FT: `output_ids` holds prompt + generation, `sequence_length` its end)."""
    output_ids = result.as_numpy("output_ids")
    lengths = result.as_numpy("sequence_length")
    logprobs = result.as_numpy("output_log_probs") if want_logprobs else None
    if output_ids is None or lengths is None:
        raise ProxyError(
            502, "the model's response lacks output_ids or sequence_length", code="backend_error"
        )
    rows = []
    for b, prompt_length in enumerate(prompt_lengths):
        end = int(lengths[b].reshape(-1)[0])
        generated = output_ids[b, 0, prompt_length:end].tolist()
        row_logprobs = logprobs[b, 0, : len(generated)].tolist() if logprobs is not None else None
        rows.append(RowOutput(ids=generated, logprobs=row_logprobs))
    return rows


def _final(result: grpcclient.InferResult) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


async def end_stream(responses: Any, timeout: float) -> None:
    """Wait for Triton to end a decoupled stream whose final response has come (our side already closed).

    Cancelling the call instead, in the moment between the final response and the end of the call, leaves
    the request's state behind in Triton (2.51): its model can never unload, so a graceful stop or an
    unload waits out Triton's whole exit timeout. Cancel only if the stream does not end.
    """
    try:
        async with asyncio.timeout(timeout):
            async for _ in responses:
                pass  # the final response was the last: nothing comes before the end
    except (TimeoutError, grpc.RpcError):
        responses.cancel()
    except asyncio.CancelledError:
        responses.cancel()
        raise


class ModelBackend:
    """One route's Triton models on its endpoints: generation with balancing, failover and cancellation."""

    def __init__(
        self,
        name: str,
        triton_model: str,
        streaming_model: str | None,
        endpoints: Sequence[Endpoint],
        settings: ProxySettings,
    ) -> None:
        self.name = name
        self.triton_model = triton_model
        self.streaming_model = streaming_model
        self.endpoints = list(endpoints)
        self.settings = settings
        self._info: dict[str, ModelInfo] = {}

    # ---- endpoint choice -------------------------------------------------------------------------

    def _pick(self, exclude: set[str]) -> Endpoint:
        candidates = [e for e in self.endpoints if e.url not in exclude and not e.retired]
        if not candidates:
            raise ProxyError(
                503,
                f"model {self.name} has no reachable backend",
                code="backend_unavailable",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        now = time.monotonic()
        healthy = [e for e in candidates if e.down_until <= now] or candidates
        best = min(healthy, key=lambda e: e.outstanding)
        if best.outstanding >= self.settings.max_outstanding_per_endpoint:
            raise ProxyError(
                429,
                f"model {self.name} is at capacity, retry later",
                code="overloaded",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        return best

    @contextlib.contextmanager
    def _lease(self, endpoint: Endpoint) -> Iterator[Endpoint]:
        endpoint.outstanding += 1
        try:
            yield endpoint
        finally:
            endpoint.outstanding -= 1
            if endpoint.retired and endpoint.outstanding == 0:
                # The route table dropped this endpoint while we used it.
                asyncio.get_running_loop().create_task(endpoint.close())

    def _mark_down(self, endpoint: Endpoint) -> None:
        endpoint.down_until = time.monotonic() + self.settings.endpoint_cooldown_s

    def _unavailable(self, exc: InferenceServerException, endpoint: Endpoint) -> ProxyError:
        error = map_triton_error(exc, endpoint.url)
        if error.status == 503:
            error.headers.setdefault("Retry-After", str(self.settings.retry_after_s))
        return error

    # ---- model facts -----------------------------------------------------------------------------

    async def model_info(self, model: str) -> ModelInfo:
        """The model's batch limit and inputs, asked from an endpoint once and remembered."""
        info = self._info.get(model)
        if info is not None:
            return info
        tried: set[str] = set()
        while True:
            endpoint = self._pick(tried)
            tried.add(endpoint.url)
            try:
                response = await endpoint.client.get_model_config(
                    model, as_json=True, client_timeout=self.settings.request_timeout_s
                )
            except InferenceServerException as exc:
                if _connect_failure(exc) and len(tried) < len(self.endpoints):
                    self._mark_down(endpoint)
                    continue
                raise self._unavailable(exc, endpoint) from exc
            config = response["config"]
            info = ModelInfo(
                max_batch_size=int(config.get("max_batch_size", 0)),
                inputs=frozenset(str(i["name"]) for i in config.get("input", [])),
            )
            self._info[model] = info
            return info

    async def _generation_info(self, model: str, sampling: Sampling) -> ModelInfo:
        info = await self.model_info(model)
        if info.max_batch_size < 1:
            # FT's tensors carry a batch dimension (docs/architecture.md); without one they cannot fit.
            raise ProxyError(
                502, f"Triton model {model} declares max_batch_size 0; it must batch", code="backend_config"
            )
        check_supported(sampling, info, self.name)
        return info

    async def fetch_tokenizer(self, model: str) -> bytes:
        """The tokenizer.json bytes that Triton model `model` serves (output `tokenizer_json`)."""
        endpoint = self._pick(set())
        try:
            result = await endpoint.client.infer(model, [], client_timeout=self.settings.request_timeout_s)
        except InferenceServerException as exc:
            raise self._unavailable(exc, endpoint) from exc
        data = result.as_numpy(TOKENIZER_OUTPUT)
        if data is None or data.size < 1:
            raise ProxyError(
                502, f"Triton model {model} returned no {TOKENIZER_OUTPUT}", code="backend_error"
            )
        value = data.reshape(-1)[0]
        return value if isinstance(value, bytes) else str(value).encode()

    async def ready(self) -> bool:
        """True when at least one endpoint says the model (and its streaming twin) is ready."""
        models = [m for m in (self.triton_model, self.streaming_model) if m]
        for endpoint in self.endpoints:
            try:
                checks = [
                    endpoint.client.is_model_ready(
                        m, client_timeout=min(2.0, self.settings.request_timeout_s)
                    )
                    for m in models
                ]
                if all(await asyncio.gather(*checks)):
                    return True
            except InferenceServerException:
                continue
        return False

    # ---- generation ------------------------------------------------------------------------------

    def _batches(self, rows: Sequence[Sequence[int]], info: ModelInfo) -> list[list[Sequence[int]]]:
        size = info.max_batch_size
        return [list(rows[i : i + size]) for i in range(0, len(rows), size)]

    async def generate(
        self, rows: Sequence[Sequence[int]], sampling: Sampling, request_id: str
    ) -> list[RowOutput]:
        """Run the unary model on all rows (n choices share one call, up to the model's batch limit)."""
        info = await self._generation_info(self.triton_model, sampling)
        batches = self._batches(rows, info)
        results = await asyncio.gather(
            *(
                self._generate_batch(batch, sampling, info, f"{request_id}-{i}")
                for i, batch in enumerate(batches)
            )
        )
        return [row for batch in results for row in batch]

    async def _generate_batch(
        self, rows: Sequence[Sequence[int]], sampling: Sampling, info: ModelInfo, request_id: str
    ) -> list[RowOutput]:
        inputs = build_inputs(rows, sampling, info)
        tried: set[str] = set()
        while True:
            endpoint = self._pick(tried)
            tried.add(endpoint.url)
            with self._lease(endpoint):
                try:
                    result = await endpoint.client.infer(
                        self.triton_model,
                        inputs,
                        request_id=request_id,
                        client_timeout=self.settings.request_timeout_s,
                    )
                except InferenceServerException as exc:
                    if _connect_failure(exc):
                        self._mark_down(endpoint)
                        if len(tried) < len(self.endpoints):
                            continue
                    raise self._unavailable(exc, endpoint) from exc
            return read_rows(result, [len(r) for r in rows], sampling.want_logprobs)

    async def stream(
        self, rows: Sequence[Sequence[int]], sampling: Sampling, request_id: str
    ) -> AsyncGenerator[Step, None]:
        """Stream the rows' generation step by step; closing the iterator cancels the Triton request.

        Uses the decoupled twin when the route has one; otherwise the unary model's single answer is
        one final step. Rows beyond the model's batch limit run as parallel streams, merged.
        """
        model = self.streaming_model or self.triton_model
        info = await self._generation_info(model, sampling)
        batches = self._batches(rows, info)
        if not self.streaming_model:
            yield Step(rows=await self.generate(rows, sampling, request_id), final=True)
            return
        if len(batches) == 1:
            async for step in self._stream_batch(batches[0], sampling, info, request_id):
                yield step
            return
        async for step in self._merge(batches, sampling, info, request_id):
            yield step

    async def _merge(
        self, batches: list[list[Sequence[int]]], sampling: Sampling, info: ModelInfo, request_id: str
    ) -> AsyncGenerator[Step, None]:
        latest: list[list[RowOutput] | None] = [None] * len(batches)
        done = [False] * len(batches)
        queue: asyncio.Queue[tuple[int, Step] | BaseException] = asyncio.Queue()

        async def pump(index: int, batch: list[Sequence[int]]) -> None:
            try:
                async for step in self._stream_batch(batch, sampling, info, f"{request_id}-{index}"):
                    await queue.put((index, step))
            except BaseException as exc:
                await queue.put(exc)
                raise

        tasks = [asyncio.create_task(pump(i, b)) for i, b in enumerate(batches)]
        try:
            while not all(done):
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                index, step = item
                latest[index] = step.rows
                done[index] = step.final
                rows = [
                    row
                    for i, batch in enumerate(batches)
                    for row in (latest[i] or [RowOutput([], None)] * len(batch))
                ]
                yield Step(rows=rows, final=all(done))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream_batch(
        self, rows: Sequence[Sequence[int]], sampling: Sampling, info: ModelInfo, request_id: str
    ) -> AsyncGenerator[Step, None]:
        assert self.streaming_model is not None
        request: dict[str, object] = {
            "model_name": self.streaming_model,
            "inputs": build_inputs(rows, sampling, info),
            "request_id": request_id,
        }
        prompt_lengths = [len(r) for r in rows]
        tried: set[str] = set()
        while True:
            endpoint = self._pick(tried)
            tried.add(endpoint.url)
            started = False
            try:
                steps = self._stream_from(endpoint, request, prompt_lengths, sampling.want_logprobs)
                async with contextlib.aclosing(steps):
                    async for step in steps:
                        started = True
                        yield step
                return
            except InferenceServerException as exc:
                # Before the first token nothing was sent to the client: another endpoint may serve it.
                if _connect_failure(exc) and not started:
                    self._mark_down(endpoint)
                    if len(tried) < len(self.endpoints):
                        continue
                raise self._unavailable(exc, endpoint) from exc

    async def _stream_from(
        self, endpoint: Endpoint, request: dict[str, object], prompt_lengths: list[int], want_logprobs: bool
    ) -> AsyncGenerator[Step, None]:
        finished = asyncio.Event()

        async def requests() -> AsyncIterator[dict[str, object]]:
            yield request
            # Keep our side of the stream open until the final response: closing it early ends the
            # call before Triton has answered.
            await finished.wait()

        with self._lease(endpoint):
            responses = endpoint.client.stream_infer(requests())
            answered = False
            try:
                while True:
                    try:
                        # asyncio.timeout, unlike wait_for, adds no task per streamed step.
                        async with asyncio.timeout(self.settings.request_timeout_s):
                            result, error = await anext(responses)
                    except TimeoutError as exc:
                        raise ProxyError(
                            504, "the model did not answer in time", code="backend_timeout"
                        ) from exc
                    except StopAsyncIteration:
                        raise ProxyError(
                            502, "the model ended the stream without a final response", code="backend_error"
                        ) from None
                    except grpc.RpcError as exc:
                        raise InferenceServerException(
                            msg=str(exc.details()), status=str(exc.code())
                        ) from exc
                    if error is not None:
                        raise error
                    final = answered = _final(result)
                    yield Step(rows=read_rows(result, prompt_lengths, want_logprobs), final=final)
                    if final:
                        return
            finally:
                finished.set()
                if answered:
                    await end_stream(responses, self.settings.request_timeout_s)
                else:
                    # Cancelling the call is what tells Triton to stop generating (the model sees
                    # request.is_cancelled()).
                    responses.cancel()
