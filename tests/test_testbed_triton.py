"""The testbed's real CPU Triton and our FT-shaped echo models, driven through tritonclient like the proxy."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from pilotfleet_serve.ft_input import FTInputError, parse_word_list
from pilotfleet_serve.procs import StartError
from pilotfleet_serve.tritonserver import TritonServer
from pilotfleet_testbed.pytest_triton import TritonServerFactory
from pilotfleet_testbed.triton import build_model_repository
from pilotfleet_testbed.triton_models.config import ECHO, EchoModel
from tritonclient.utils import InferenceServerException

log = logging.getLogger(__name__)

pytestmark = pytest.mark.testbed


def _tensor(name: str, array: np.ndarray, dtype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _stop_words(words: Sequence[Sequence[int]], width: int) -> np.ndarray:
    """One row of FT's stop_words_list: flattened ids, then end offsets, both padded to `width`."""
    ids = [t for word in words for t in word]
    offsets = np.cumsum([len(word) for word in words]).tolist()
    row = np.full((2, width), -1, dtype=np.int32)
    row[0, : len(ids)] = ids
    row[1, : len(offsets)] = offsets
    return row


def ft_inputs(
    prompts: Sequence[Sequence[int]],
    output_len: int,
    end_id: int | None = None,
    stop_words: Sequence[Sequence[Sequence[int]]] | None = None,
    log_probs: bool = False,
) -> list[grpcclient.InferInput]:
    """Build FT's request tensors for a batch of prompts, right-padded as docs/architecture.md says."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.uint32)
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt)] = prompt
    column = np.ones((len(prompts), 1), dtype=np.uint32)
    inputs = [
        _tensor("input_ids", ids, "UINT32"),
        _tensor("input_lengths", np.array([[len(p)] for p in prompts], dtype=np.uint32), "UINT32"),
        _tensor("request_output_len", column * output_len, "UINT32"),
        # Sampling knobs a real FT client sends; the echo models accept and ignore them.
        _tensor("temperature", np.full((len(prompts), 1), 0.2, dtype=np.float32), "FP32"),
        _tensor("runtime_top_p", np.ones((len(prompts), 1), dtype=np.float32), "FP32"),
    ]
    if end_id is not None:
        inputs.append(_tensor("end_id", column * end_id, "UINT32"))
    if stop_words is not None:
        n = max(1, *(sum(len(w) for w in words) for words in stop_words))
        rows = np.stack([_stop_words(words, n) for words in stop_words])
        inputs.append(_tensor("stop_words_list", rows, "INT32"))
    if log_probs:
        inputs.append(_tensor("is_return_log_probs", np.ones((len(prompts), 1), dtype=bool), "BOOL"))
    return inputs


def valid_ids(result: grpcclient.InferResult, row: int = 0) -> list[int]:
    """The valid part of one row of `output_ids` ([B, 1, L]), as `sequence_length` marks it."""
    length = int(result.as_numpy("sequence_length")[row, 0])
    return [int(t) for t in result.as_numpy("output_ids")[row, 0, :length]]


@pytest.fixture
def client(triton_server: TritonServer) -> grpcclient.InferenceServerClient:
    """A sync gRPC client of the session's server."""
    return grpcclient.InferenceServerClient(triton_server.url)


def test_unary_continues_prompt_cyclically_with_log_probs(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("ft-echo", ft_inputs([[5, 6, 7]], output_len=5, log_probs=True))

    assert result.as_numpy("output_ids").shape == (1, 1, 8)
    assert valid_ids(result) == [5, 6, 7, 5, 6, 7, 5, 6]
    assert result.as_numpy("sequence_length").tolist() == [[8]]
    # -ln(2 + (token + step) % 5) for tokens 5, 6, 7, 5, 6 at steps 0..4
    expected = [-math.log(d) for d in (2, 4, 6, 5, 2)]
    assert result.as_numpy("output_log_probs")[0, 0].tolist() == pytest.approx(expected, rel=1e-6)
    assert float(result.as_numpy("cum_log_probs")[0, 0]) == pytest.approx(sum(expected), rel=1e-6)


def test_batch_rows_are_independent(client: grpcclient.InferenceServerClient) -> None:
    prompts = [[1, 2], [3, 4, 5, 6], [9]]
    result = client.infer("ft-echo", ft_inputs(prompts, output_len=3))

    assert [valid_ids(result, b) for b in range(3)] == [
        [1, 2, 1, 2, 1],
        [3, 4, 5, 6, 3, 4, 5],
        [9, 9, 9, 9],
    ]
    assert result.as_numpy("sequence_length").tolist() == [[5], [7], [4]]


def test_end_id_stops_before_emitting_it(client: grpcclient.InferenceServerClient) -> None:
    result = client.infer("ft-echo", ft_inputs([[1, 2, 3, 4]], output_len=10, end_id=3))

    assert valid_ids(result) == [1, 2, 3, 4, 1, 2]
    # Past the valid part, FT pads with the end id.
    assert result.as_numpy("output_ids")[0, 0, 6:].tolist() == [3] * 8


def test_stop_words_list_stops_after_the_word(client: grpcclient.InferenceServerClient) -> None:
    prompts = [[10, 11, 12, 13], [10, 11, 12, 13], [7, 8]]
    stop_words = [[[12, 13], [99]], [[99]], []]
    result = client.infer("ft-echo", ft_inputs(prompts, output_len=10, stop_words=stop_words))

    # Row 0 stops once "12 13" is generated (the word stays); the others run to request_output_len.
    assert valid_ids(result, 0) == [10, 11, 12, 13, 10, 11, 12, 13]
    assert len(valid_ids(result, 1)) == 14
    assert valid_ids(result, 2) == [7, 8, *([7, 8] * 5)]


def test_invalid_request_is_a_triton_error(client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="max_seq_len") as raised:
        client.infer("ft-echo", ft_inputs([[1, 2]], output_len=5000))
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="decoupled"):
        client.infer("ft-echo-stream", ft_inputs([[1, 2]], output_len=2))


def test_stop_words_list_is_checked_like_ft() -> None:
    assert parse_word_list(_stop_words([[1, 2], [3]], 4)) == ((1, 2), (3,))
    with pytest.raises(FTInputError, match="offset 5"):
        parse_word_list(np.array([[1, 2], [5, -1]], dtype=np.int32))
    with pytest.raises(FTInputError, match=r"\[2, N\]"):
        parse_word_list(np.zeros((3, 2), dtype=np.int32))


def test_sync_stream_one_response_per_token_then_final(triton_server: TritonServer) -> None:
    client = grpcclient.InferenceServerClient(triton_server.url)
    received: list[tuple[list[int], bool]] = []
    errors: list[InferenceServerException] = []
    finished = threading.Event()

    def on_response(result: grpcclient.InferResult | None, error: InferenceServerException | None) -> None:
        if error is not None:
            errors.append(error)
            finished.set()
            return
        assert result is not None
        final = result.get_response().parameters["triton_final_response"].bool_param
        if result.as_numpy("output_ids") is not None:
            received.append((valid_ids(result), final))
        if final:
            finished.set()

    client.start_stream(callback=on_response)
    try:
        client.async_stream_infer(
            "ft-echo-stream",
            ft_inputs([[4, 5, 6]], output_len=5, end_id=6),
            enable_empty_final_response=True,
        )
        assert finished.wait(10), "no final response within 10 s"
    finally:
        client.stop_stream()

    assert not errors
    # end_id 6 stops the cycle 4 5 6 after two tokens: two responses, each the whole sequence so far.
    assert received == [([4, 5, 6, 4], False), ([4, 5, 6, 4, 5], True)]


async def _stream(
    client: aioclient.InferenceServerClient, model: str, inputs: list[grpcclient.InferInput], request_id: str
) -> Any:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": model, "inputs": inputs, "request_id": request_id}

    return client.stream_infer(requests())


async def _collect(
    client: aioclient.InferenceServerClient, model: str, prompt: list[int], count: int
) -> list[tuple[float, list[int]]]:
    """Read one stream of `count` tokens to its end, each response with its arrival time.

    With one request and its iterator exhausted, Triton ends the gRPC stream after the final response,
    so the loop ends by itself (the aio client cannot ask for Triton's final-response flag).
    """
    responses = await _stream(client, model, ft_inputs([prompt], output_len=count), uuid.uuid4().hex)
    seen: list[tuple[float, list[int]]] = []
    async for result, error in responses:
        assert error is None, error
        seen.append((time.monotonic(), valid_ids(result)))
    return seen


async def test_aio_stream_yields_growing_sequence_in_order(triton_server: TritonServer) -> None:
    async with aioclient.InferenceServerClient(triton_server.url) as client:
        seen = await _collect(client, "ft-echo-stream", [8, 9], count=4)

    assert [ids for _, ids in seen] == [[8, 9, 8], [8, 9, 8, 9], [8, 9, 8, 9, 8], [8, 9, 8, 9, 8, 9]]


async def test_concurrent_streams_interleave(triton_server: TritonServer) -> None:
    tokens = 15  # 20 ms each on ft-echo-stream-slow: 0.3 s per stream when served alone
    async with aioclient.InferenceServerClient(triton_server.url) as client:
        first, second = await asyncio.gather(
            _collect(client, "ft-echo-stream-slow", [1, 2, 3], tokens),
            _collect(client, "ft-echo-stream-slow", [7], tokens),
        )

    assert [ids for _, ids in first][-1] == [1, 2, 3, *([1, 2, 3] * 5)]
    assert [ids for _, ids in second][-1] == [7] * 16
    # Served one after another, one stream would finish before the other's first token.
    assert second[0][0] < first[-1][0] and first[0][0] < second[-1][0]


async def test_cancelled_stream_stops_the_model(triton_server: TritonServer) -> None:
    request_id = f"cancel-{uuid.uuid4().hex}"
    total = 500  # 10 s of tokens at 20 ms each
    async with aioclient.InferenceServerClient(triton_server.url) as client:
        responses = await _stream(client, "ft-echo-stream-slow", ft_inputs([[3, 1]], total), request_id)
        received = 0
        async for _, error in responses:
            assert error is None, error
            received += 1
            if received == 3:
                break
        responses.cancel()

    # The model itself logs where it stopped; a model that ignored the cancellation would say nothing
    # until it had generated all 500 tokens.
    deadline = time.monotonic() + 3.0
    line = ""
    while time.monotonic() < deadline and not line:
        lines = [ln for ln in triton_server.log_path.read_text().splitlines() if request_id in ln]
        line = lines[0] if lines else ""
        await asyncio.sleep(0.05)
    assert "cancelled after" in line, f"model did not report the cancellation of {request_id}"
    stopped_at = int(line.split("cancelled after ")[1].split(" ")[0])
    assert 3 <= stopped_at < 3 + 50, line


def test_killed_server_fails_clients_then_restarts_on_same_ports(
    triton_server_factory: TritonServerFactory,
) -> None:
    server = triton_server_factory()
    client = grpcclient.InferenceServerClient(server.url)
    assert valid_ids(client.infer("ft-echo", ft_inputs([[2]], 2))) == [2, 2, 2]
    ports = server.ports

    server.kill()

    with pytest.raises(InferenceServerException):
        client.infer("ft-echo", ft_inputs([[2]], 2))
    assert server.group_pids() == []
    assert server.shm_regions() == []

    server.restart()

    assert server.ports == ports
    # gRPC refuses calls to that address (from any channel of this process: subchannels are shared)
    # until its reconnect backoff, about 1 s, has passed; then the same client works again.
    began = time.monotonic()
    while True:
        try:
            assert valid_ids(client.infer("ft-echo", ft_inputs([[2]], 2))) == [2, 2, 2]
            break
        except InferenceServerException:
            if time.monotonic() - began > 10:
                raise
            time.sleep(0.1)
    log.warning("client reconnected %.2fs after the restart", time.monotonic() - began)


def test_stop_leaves_no_process_or_shm_region(triton_server_factory: TritonServerFactory) -> None:
    server = triton_server_factory()
    stubs = [pid for pid in server.group_pids() if pid != server.pid]
    regions = server.shm_regions()
    assert len(stubs) == 3, "one backend stub per echo model instance"
    assert regions, "the Python backend keeps its shared memory under our prefix"

    server.stop()

    assert not server.alive()
    assert server.group_pids() == []
    assert not [r for r in regions if r.exists()]
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


def test_extra_model_dirs_and_custom_echo_models(
    tmp_path: Path, triton_server_factory: TritonServerFactory
) -> None:
    slow_unary = EchoModel("slow-echo", token_delay_ms=50)
    source = build_model_repository(tmp_path / "theirs", models=[ECHO])
    repo = build_model_repository(tmp_path / "repo", models=[slow_unary], extra=[source / "ft-echo"])
    server = triton_server_factory(repo)
    client = grpcclient.InferenceServerClient(server.url)

    began = time.monotonic()
    assert valid_ids(client.infer("slow-echo", ft_inputs([[1]], 4))) == [1] * 5
    assert time.monotonic() - began >= 0.2
    assert valid_ids(client.infer("ft-echo", ft_inputs([[1]], 4))) == [1] * 5
    with pytest.raises(ValueError, match="already"):
        build_model_repository(tmp_path / "repo", models=[], extra=[source / "ft-echo"])


def test_model_that_fails_to_load_fails_the_start_with_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n')
    (broken / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        "        raise RuntimeError('no weights here')\n"
    )
    repo = build_model_repository(tmp_path / "repo", models=[ECHO], extra=[broken])

    with pytest.raises(StartError) as raised:
        TritonServer.start(repo, tmp_path / "work")
    first_lines = str(raised.value).splitlines()[:5]
    assert any("broken" in ln and "no weights here" in ln for ln in first_lines), first_lines
    assert "tritonserver exited" in str(raised.value)


def test_restart_serves_again_on_the_same_ports(triton_server_factory: TritonServerFactory) -> None:
    """A restarted server answers on the same address, and every one of many requests is right."""
    server = triton_server_factory()
    ports = server.ports
    server.restart()
    assert server.ports == ports
    client = grpcclient.InferenceServerClient(server.url)
    prompt = list(range(66))
    inputs = ft_inputs([prompt], output_len=16)
    for _ in range(200):
        output = client.infer("ft-echo", inputs).as_numpy("output_ids")
        assert output is not None
        assert output[0, 0].tolist() == prompt + prompt[:16]
    client.close()
