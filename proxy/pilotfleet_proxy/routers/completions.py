"""POST /v1/completions (OpenAI) and /v1/engines/{engine}/completions (Copilot): unary and true streaming."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from pilotfleet_proxy.backend import RowOutput, Sampling, Step
from pilotfleet_proxy.completion import ChoiceText, PromptPlan, plan_prompt, suffix_stop
from pilotfleet_proxy.errors import ProxyError, bad_request, from_validation_error
from pilotfleet_proxy.fleet import ServedModel
from pilotfleet_proxy.protocol import CompletionChoice, CompletionRequest, CompletionResponse, Usage
from pilotfleet_proxy.state import ProxyState, get_state
from pilotfleet_proxy.tokenizer import Tokenizer

log = logging.getLogger(__name__)

router = APIRouter(tags=["completions"])
T = TypeVar("T")
TRIMMED_HEADER = "X-Pilotfleet-Prompt-Trimmed-Tokens"
_SSE_DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes with 413 before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProxyError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ProxyError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    return bytes(body)


async def _wait_for_disconnect(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect (or nothing, until cancelled).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and so its Triton request) the moment the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the cancellation finish (the Triton call is cancelled in its cleanup) before going on.
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientGone()
    return task.result()


@dataclass
class Job:
    """A validated completion request resolved against its model: what to send and how to answer."""

    id: str
    created: int
    request: CompletionRequest
    served: ServedModel
    tokenizer: Tokenizer
    plans: list[PromptPlan]
    echoes: list[str]
    max_tokens: int
    stops: list[str]

    @property
    def model(self) -> str:
        """The model's name as responses report it."""
        return self.served.route.name

    def rows(self) -> list[list[int]]:
        """One row per choice: every prompt n times (choice index = prompt index * n + j)."""
        return [plan.ids for plan in self.plans for _ in range(self.request.n)]

    def sampling(self) -> Sampling:
        """The request's generation parameters."""
        req = self.request
        return Sampling(
            max_tokens=self.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            presence_penalty=req.presence_penalty,
            seed=req.seed,
            end_id=self.served.route.end_id,
            want_logprobs=req.logprobs is not None,
        )

    def choices(self) -> list[ChoiceText]:
        """Fresh text assemblers, one per choice."""
        return [
            ChoiceText(
                self.tokenizer,
                self.stops,
                self.max_tokens,
                end_id=self.served.route.end_id,
                want_logprobs=self.request.logprobs is not None,
            )
            for _ in range(len(self.plans) * self.request.n)
        ]

    def echo(self, index: int) -> str:
        """The prompt text to put before choice `index` when the client asked for echo."""
        return self.echoes[index // self.request.n] if self.request.echo else ""

    def usage(self, choices: list[ChoiceText]) -> Usage:
        """Token counts: each prompt once, every choice's completion."""
        prompt = sum(len(plan.ids) for plan in self.plans)
        completion = sum(choice.accepted for choice in choices)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def headers(self) -> dict[str, str]:
        """Response headers: the trimmed-token report when the prompt did not fit."""
        trimmed = sum(plan.trimmed_tokens for plan in self.plans)
        return {TRIMMED_HEADER: str(trimmed)} if trimmed else {}


async def prepare(req: CompletionRequest, served: ServedModel) -> Job:
    """Tokenize and fit the prompts, and settle max_tokens and the stop strings."""
    route = served.route
    max_tokens = route.default_max_tokens if req.max_tokens is None else req.max_tokens
    if max_tokens > route.max_tokens_limit:
        raise bad_request(
            f"max_tokens ({max_tokens}) exceeds model {route.name}'s limit of {route.max_tokens_limit}",
            param="max_tokens",
        )
    tokenizer = await served.tokenizer()
    plans = []
    echoes = []
    for prompt in req.prompts():
        plan = plan_prompt(tokenizer, prompt, req.suffix, route.fim, route.context_length, max(max_tokens, 1))
        if not plan.ids:
            if route.end_id is None:
                raise bad_request("prompt is empty", param="prompt")
            # An empty prompt means "start of a document", which FT-style models spell as their end id.
            plan = PromptPlan(ids=[route.end_id], trimmed_tokens=0)
        plans.append(plan)
        echoes.append(prompt if isinstance(prompt, str) else tokenizer.decode(prompt))
    stops = req.stop_strings()
    if route.fim is None and (line := suffix_stop(req.suffix)):
        stops.append(line)
    if len(plans) * req.n > 128:
        raise bad_request("too many choices: prompts x n must not exceed 128", param="n")
    return Job(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        request=req,
        served=served,
        tokenizer=tokenizer,
        plans=plans,
        echoes=echoes,
        max_tokens=max_tokens,
        stops=stops,
    )


def _choice(job: Job, index: int, choice: ChoiceText, text: str, final: bool) -> CompletionChoice:
    return CompletionChoice(
        index=index,
        text=text,
        finish_reason=choice.finish_reason if final else None,
        logprobs=choice.take_logprobs(offset=len(job.echo(index))),
    )


def _apply(choices: list[ChoiceText], rows: list[RowOutput], final: bool) -> None:
    for choice, row in zip(choices, rows, strict=True):
        choice.update(row.ids, row.logprobs)
        if final:
            choice.finish(generation_complete=True)


def _nothing_generated(job: Job) -> Step:
    return Step(rows=[RowOutput([], None) for _ in job.rows()], final=True)


async def _no_more_steps() -> AsyncGenerator[Step, None]:
    nothing: tuple[Step, ...] = ()
    for step in nothing:
        yield step


async def _unary(request: Request, state: ProxyState, job: Job) -> Response:
    choices = job.choices()
    if job.max_tokens > 0:
        rows = await unless_disconnected(
            request, job.served.backend.generate(job.rows(), job.sampling(), job.id)
        )
    else:
        rows = _nothing_generated(job).rows
    _apply(choices, rows, final=True)
    usage = job.usage(choices)
    state.metrics.completion_tokens.labels(job.model).inc(usage.completion_tokens)
    body = CompletionResponse(
        id=job.id,
        created=job.created,
        model=job.model,
        choices=[
            _choice(job, i, choice, job.echo(i) + choice.take(), final=True)
            for i, choice in enumerate(choices)
        ],
        usage=usage,
    )
    return Response(body.model_dump_json(), media_type="application/json", headers=job.headers())


def _event(job: Job, choices: list[CompletionChoice] | None = None, usage: Usage | None = None) -> bytes:
    chunk = CompletionResponse(id=job.id, created=job.created, model=job.model, choices=choices or [])
    if usage is None:
        return b"data: " + chunk.model_dump_json(exclude={"usage"}).encode() + b"\n\n"
    chunk.usage = usage
    return b"data: " + chunk.model_dump_json().encode() + b"\n\n"


async def _stream(request: Request, state: ProxyState, job: Job, started: float) -> Response:
    if job.max_tokens == 0:
        return _sse(_events(state, job, _nothing_generated(job), _no_more_steps(), started), job)
    steps = job.served.backend.stream(job.rows(), job.sampling(), job.id)
    try:
        # Wait for the first token before answering, so a failure is still an HTTP error status
        # (editors show an error chunk inside a 200 stream as "no completions").
        first = await unless_disconnected(request, anext(steps))
    except BaseException:
        await steps.aclose()
        raise
    return _sse(_events(state, job, first, steps, started), job)


def _sse(events: AsyncIterator[bytes], job: Job) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **job.headers()},
    )


async def _events(
    state: ProxyState, job: Job, first: Step, steps: AsyncGenerator[Step, None], started: float
) -> AsyncIterator[bytes]:
    choices = job.choices()
    reported = [False] * len(choices)
    metrics = state.metrics
    completed = False
    first_text = True
    try:
        if job.request.echo:
            yield b"".join(
                _event(job, [CompletionChoice(index=i, text=job.echo(i))]) for i in range(len(choices))
            )
        step: Step | None = first
        while step is not None:
            _apply(choices, step.rows, step.final)
            events = []
            for i, choice in enumerate(choices):
                text = choice.take()
                if text or (choice.finished and not reported[i]):
                    reported[i] = choice.finished
                    events.append(_event(job, [_choice(job, i, choice, text, final=choice.finished)]))
            if events:
                if first_text:
                    metrics.first_token.labels(job.model).observe(time.perf_counter() - started)
                    first_text = False
                yield b"".join(events)
            # Every choice may end on a stop string before the model is done: stop it there.
            if step.final or all(reported):
                break
            step = await anext(steps, None)
        if job.request.stream_options and job.request.stream_options.include_usage:
            yield _event(job, usage=job.usage(choices))
        yield _SSE_DONE
        completed = True
        metrics.requests.labels(job.model, "true", "200").inc()
    except ProxyError as exc:
        # Headers are sent: the error can only travel as a data frame, then the end of the stream.
        log.warning("stream %s failed after it started: %s", job.id, exc.message)
        metrics.requests.labels(job.model, "true", str(exc.status)).inc()
        yield b"data: " + exc.body().model_dump_json().encode() + b"\n\n" + _SSE_DONE
        completed = True
    finally:
        await steps.aclose()
        if not completed:
            metrics.cancelled.labels(job.model).inc()
            log.info("stream %s cancelled: the client went away", job.id)
        metrics.completion_tokens.labels(job.model).inc(sum(c.accepted for c in choices))
        metrics.latency.labels(job.model, "true").observe(time.perf_counter() - started)


async def complete(request: Request, engine: str | None) -> Response:
    """Serve one completion request, unary or streamed, for the model named by `engine` or `model`."""
    started = time.perf_counter()
    state = get_state(request)
    state.auth.check_request(request.headers.get("authorization"))
    body = await read_body(request, state.settings.max_request_bytes)
    try:
        req = CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc
    req.check_supported()
    name = engine or req.model
    if not name:
        raise bad_request("model is required", param="model")
    served = state.fleet.resolve(name)
    model = served.route.name
    stream = "true" if req.stream else "false"
    try:
        job = await prepare(req, served)
        state.metrics.prompt_tokens.labels(model).inc(sum(len(p.ids) for p in job.plans))
        trimmed = sum(p.trimmed_tokens for p in job.plans)
        if trimmed:
            state.metrics.trimmed_tokens.labels(model).inc(trimmed)
            log.info("%s: trimmed %d prompt tokens to fit model %s", job.id, trimmed, model)
        if req.stream:
            return await _stream(request, state, job, started)
        response = await _unary(request, state, job)
    except ProxyError as exc:
        state.metrics.requests.labels(model, stream, str(exc.status)).inc()
        raise
    except ClientGone:
        state.metrics.cancelled.labels(model).inc()
        log.info("request for %s cancelled: the client went away", model)
        # Nobody reads this answer; 499 is what proxies log for "client closed request".
        return Response(status_code=499)
    state.metrics.requests.labels(model, stream, "200").inc()
    state.metrics.latency.labels(model, stream).observe(time.perf_counter() - started)
    return response


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """OpenAI completions: the model comes from the body's `model`."""
    return await complete(request, engine=None)


@router.post("/v1/engines/{engine}/completions")
async def engine_completions(engine: str, request: Request) -> Response:
    """Copilot completions: the engine in the path names the model (or one of its aliases)."""
    return await complete(request, engine=engine)
