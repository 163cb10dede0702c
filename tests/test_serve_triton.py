"""The Hugging Face backend served by a real CPU Triton: FT-shaped requests, unary and streamed."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from pilotfleet_serve.reference import hf_greedy, tiny_llama
from pilotfleet_serve.repository import HFModelConfig, write_hf_model
from pilotfleet_serve.tritonserver import TritonServer
from transformers import PreTrainedModel
from tritonclient.utils import InferenceServerException

UNARY, STREAM = "tiny", "tiny-stream"
# The running server and the model it serves (the same weights, in this process, as the reference).
Served = tuple[TritonServer, PreTrainedModel]
StreamItem = tuple[grpcclient.InferResult | None, InferenceServerException | None]
PROMPTS = ([5, 9, 33, 2, 7], [100, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
DTYPES = {
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.bool_): "BOOL",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A tiny random Llama saved as a HF directory, served by Triton as a unary model and a streaming twin."""
    root = tmp_path_factory.mktemp("serve-triton")
    model = tiny_llama()
    # No end-of-sequence id of its own: rows run to request_output_len unless the request sends end_id.
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    model.save_pretrained(root / "tiny")
    repo = root / "models"
    for name, decoupled in ((UNARY, False), (STREAM, True)):
        write_hf_model(
            repo, HFModelConfig(name, root / "tiny", decoupled=decoupled, max_seq_len=128, torch_threads=1)
        )
    server = TritonServer.start(repo, root / "triton", timeout=120.0)
    try:
        yield server, model
    finally:
        server.stop()
    assert not server.shm_regions()


def ft_inputs(prompts: list[list[int]], new_tokens: int, **extra: np.ndarray) -> list[grpcclient.InferInput]:
    """FT's input tensors for right-padded `prompts`, plus any optional ones."""
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.uint32)
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt)] = prompt
    arrays = {
        "input_ids": ids,
        "input_lengths": np.array([[len(p)] for p in prompts], dtype=np.uint32),
        "request_output_len": np.full((len(prompts), 1), new_tokens, dtype=np.uint32),
        **extra,
    }
    tensors = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), DTYPES[array.dtype])
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def generated(result: grpcclient.InferResult, prompts: list[list[int]]) -> list[list[int]]:
    """Each row's generated ids (FT: output_ids holds prompt + generation, sequence_length its end)."""
    ids, lengths = result.as_numpy("output_ids"), result.as_numpy("sequence_length")
    assert ids is not None and lengths is not None
    return [ids[b, 0, len(p) : int(lengths[b, 0])].tolist() for b, p in enumerate(prompts)]


def stream(
    server: TritonServer, requests: list[list[grpcclient.InferInput]]
) -> list[list[grpcclient.InferResult]]:
    """Send every request on one gRPC stream at once; return each one's responses in arrival order."""
    results: queue.Queue[tuple[grpcclient.InferResult | None, InferenceServerException | None]] = (
        queue.Queue()
    )
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i, inputs in enumerate(requests):
            client.async_stream_infer(STREAM, inputs, request_id=str(i), enable_empty_final_response=True)
        got: list[list[grpcclient.InferResult]] = [[] for _ in requests]
        open_requests = len(requests)
        while open_requests:
            result, error = results.get(timeout=60)
            assert error is None, error
            assert result is not None
            response = result.get_response()
            got[int(response.id)].append(result)
            if response.parameters["triton_final_response"].bool_param:
                open_requests -= 1
        return got
    finally:
        client.stop_stream()
        client.close()


def test_unary_greedy_equals_hf_generate_with_real_log_probs(
    served: Served,
) -> None:
    server, model = served
    prompts = [list(p) for p in PROMPTS]
    with grpcclient.InferenceServerClient(server.url) as client:
        result = client.infer(
            UNARY,
            ft_inputs(
                prompts,
                12,
                runtime_top_k=np.ones((3, 1), np.uint32),
                is_return_log_probs=np.ones((3, 1), np.bool_),
            ),
        )
    assert generated(result, prompts) == hf_greedy(model, prompts, 12)
    log_probs, cum = result.as_numpy("output_log_probs"), result.as_numpy("cum_log_probs")
    assert log_probs is not None and cum is not None
    assert log_probs.shape == (3, 1, 12) and (log_probs < 0).all()
    assert cum[:, 0] == pytest.approx(log_probs.sum(axis=2)[:, 0], rel=1e-5)


def test_stream_sends_one_growing_response_per_token_then_final(
    served: Served,
) -> None:
    server, model = served
    prompts = [[list(PROMPTS[0])], [list(PROMPTS[1]), list(PROMPTS[2])]]
    answers = stream(server, [ft_inputs(p, 10) for p in prompts])
    for request_prompts, responses in zip(prompts, answers, strict=True):
        expected = hf_greedy(model, request_prompts, 10)
        # One response per step, each the whole sequence so far; only the last is final.
        assert len(responses) == 10
        for step, result in enumerate(responses, start=1):
            assert generated(result, request_prompts) == [e[:step] for e in expected]
            assert result.get_response().parameters["triton_final_response"].bool_param == (step == 10)


def test_end_id_and_stop_words_end_rows_like_ft(served: Served) -> None:
    server, model = served
    prompt = list(PROMPTS[0])
    free = hf_greedy(model, [prompt], 12)[0]
    end = free[5]
    stop_word = np.array([[[free[2], free[3]], [2, -1]]], dtype=np.int32)
    with grpcclient.InferenceServerClient(server.url) as client:
        ended = client.infer(UNARY, ft_inputs([prompt], 12, end_id=np.array([[end]], np.uint32)))
        stopped = client.infer(UNARY, ft_inputs([prompt], 12, stop_words_list=stop_word))
    assert generated(ended, [prompt]) == [free[: free.index(end)]]
    first = next(i for i in range(1, 12) if free[i - 1 : i + 1] == free[2:4])
    assert generated(stopped, [prompt]) == [free[: first + 1]]


def test_seeded_sampling_repeats_and_bad_inputs_are_errors(
    served: Served,
) -> None:
    server, _model = served
    prompt = list(PROMPTS[1])
    sampling: dict[str, np.ndarray] = {
        "runtime_top_k": np.array([[0]], np.uint32),
        "random_seed": np.array([[1234]], np.uint64),
    }
    with grpcclient.InferenceServerClient(server.url) as client:
        first = generated(client.infer(UNARY, ft_inputs([prompt], 16, **sampling)), [prompt])
        again = generated(client.infer(UNARY, ft_inputs([prompt], 16, **sampling)), [prompt])
        with pytest.raises(InferenceServerException, match="max_seq_len"):
            client.infer(UNARY, ft_inputs([prompt], 500))
    assert first == again
