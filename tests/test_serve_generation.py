"""The Hugging Face backend's decode loop and FT tensor mapping, on CPU with tiny random models."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from pilotfleet_serve.ft import pack_outputs, rows_from_inputs
from pilotfleet_serve.ft_input import FTInputError, parse_word_list
from pilotfleet_serve.generation import (
    BatchDecoder,
    Finish,
    Job,
    Row,
    RowSpec,
    Sampling,
    Scheduler,
    generate,
)
from pilotfleet_serve.reference import hf_greedy, tiny_codegen, tiny_llama
from transformers import PreTrainedModel

PROMPTS = ([5, 9, 33, 2, 7], [100, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])


@pytest.fixture(scope="module", params=[tiny_llama, tiny_codegen], ids=["llama", "codegen"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """Each tiny architecture in turn."""
    return request.param()


def test_greedy_equals_hf_generate_one_row_at_a_time(model: PreTrainedModel) -> None:
    for prompt in PROMPTS:
        rows = generate(model, [RowSpec(tuple(prompt), 24)])
        assert rows[0].tokens == hf_greedy(model, [list(prompt)], 24)[0]
        assert rows[0].finish is Finish.LENGTH


def test_greedy_batch_equals_hf_generate_batch(model: PreTrainedModel) -> None:
    rows = generate(model, [RowSpec(tuple(p), 20) for p in PROMPTS])
    assert [r.tokens for r in rows] == hf_greedy(model, [list(p) for p in PROMPTS], 20)


def test_rows_joining_a_running_batch_generate_what_they_would_alone(model: PreTrainedModel) -> None:
    alone = [generate(model, [RowSpec(tuple(p), 16)])[0].tokens for p in PROMPTS]
    rows = [Row(RowSpec(tuple(p), 16), model.device) for p in PROMPTS]
    decoder = BatchDecoder(model, max_rows=4)
    with torch.inference_mode():
        decoder.admit(rows[:1])
        for _ in range(5):
            decoder.step()
        decoder.admit(rows[1:2])
        for _ in range(3):
            decoder.step()
        decoder.admit(rows[2:])
        assert len(decoder.rows) == 3
        while decoder.rows:
            decoder.step()
    assert [r.tokens for r in rows] == alone


def test_end_id_ends_a_row_and_is_left_out() -> None:
    model = tiny_llama()
    free = generate(model, [RowSpec(tuple(PROMPTS[0]), 12)])[0].tokens
    end = free[4]
    row = generate(model, [RowSpec(tuple(PROMPTS[0]), 12, end_id=end)])[0]
    assert row.tokens == free[: free.index(end)]
    assert row.finish is Finish.END


def test_stop_word_ends_a_row_and_stays_in_it() -> None:
    model = tiny_llama()
    free = generate(model, [RowSpec(tuple(PROMPTS[1]), 12)])[0].tokens
    word = tuple(free[5:7])
    row = generate(model, [RowSpec(tuple(PROMPTS[1]), 12, stop_words=((999,), word))])[0]
    first = next(i for i in range(1, len(free)) if tuple(free[i - 1 : i + 1]) == word)
    assert row.tokens == free[: first + 1]
    assert row.finish is Finish.STOP_WORD


def test_bad_words_are_never_generated() -> None:
    model = tiny_llama()
    free = generate(model, [RowSpec(tuple(PROMPTS[0]), 12)])[0].tokens
    banned = tuple(sorted(set(free)))[:3]
    row = generate(model, [RowSpec(tuple(PROMPTS[0]), 12, bad_words=tuple((t,) for t in banned))])[0]
    assert len(row.tokens) == 12
    assert not set(row.tokens) & set(banned)


def test_zero_new_tokens_is_just_the_prompt() -> None:
    row = generate(tiny_llama(), [RowSpec((1, 2, 3), 0)])[0]
    assert row.tokens == [] and row.finish is Finish.LENGTH


def test_log_probs_are_the_models_own() -> None:
    model = tiny_llama()
    prompt = PROMPTS[2]
    row = generate(model, [RowSpec(tuple(prompt), 8)])[0]
    out = model.generate(  # type: ignore[operator]
        torch.tensor([prompt]),
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected = [
        float(torch.log_softmax(step[0].float(), -1)[t])
        for step, t in zip(out.logits, row.tokens, strict=True)
    ]
    assert row.log_probs == pytest.approx(expected, abs=1e-4)
    assert all(p <= 0 for p in row.log_probs)


def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    model = tiny_llama()
    prompt = tuple(PROMPTS[0])

    def sample(seed: int, **kw: float) -> list[int]:
        sampling = Sampling(temperature=1.5, seed=seed, **kw)  # type: ignore[arg-type]
        return generate(model, [RowSpec(prompt, 16, sampling=sampling)])[0].tokens

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7, top_k=1) == generate(model, [RowSpec(prompt, 16)])[0].tokens
    # top_p small enough keeps only the most likely token: greedy again.
    assert sample(3, top_p=1e-6) == generate(model, [RowSpec(prompt, 16)])[0].tokens
    # A batch mixing sampled and greedy rows gives each row what it gives alone.
    mixed = generate(
        model, [RowSpec(prompt, 16, sampling=Sampling(temperature=1.5, seed=7)), RowSpec(prompt, 16)]
    )
    assert [r.tokens for r in mixed] == [sample(7), generate(model, [RowSpec(prompt, 16)])[0].tokens]


def test_repetition_penalty_changes_greedy_choices() -> None:
    model = tiny_llama()
    plain = generate(model, [RowSpec(tuple(PROMPTS[1]), 24)])[0].tokens
    penalized = generate(model, [RowSpec(tuple(PROMPTS[1]), 24, sampling=Sampling(repetition_penalty=50.0))])[
        0
    ]
    assert penalized.tokens != plain
    # With such a penalty a token already seen never wins while unseen ones remain.
    seen = set(PROMPTS[1])
    for token in penalized.tokens:
        assert token not in seen
        seen.add(token)


def test_scheduler_streams_batches_and_cancels() -> None:
    model = tiny_llama()
    decoder = BatchDecoder(model, max_rows=8)
    scheduler = Scheduler(decoder)
    scheduler.start()
    updates: dict[str, list[tuple[list[int], bool]]] = {"a": [], "b": [], "c": []}
    done = {name: threading.Event() for name in updates}
    cancel_c = threading.Event()

    def job(name: str, prompt: list[int], n: int, cancelled: threading.Event | None = None) -> Job:
        def progress(j: Job, final: bool) -> None:
            updates[name].append((list(j.rows[0].tokens), final))
            if len(j.rows[0].tokens) == 3 and cancelled is not None:
                cancelled.set()
            if final:
                done[name].set()

        def error(_j: Job, message: str) -> None:
            raise AssertionError(message)

        rows = [Row(RowSpec(tuple(prompt), n), model.device)]
        return Job(rows, progress, error, is_cancelled=(cancelled.is_set if cancelled else lambda: False))

    try:
        scheduler.submit(job("a", PROMPTS[0], 10))
        scheduler.submit(job("b", PROMPTS[1], 6))
        scheduler.submit(job("c", PROMPTS[2], 50, cancel_c))
        for event in done.values():
            assert event.wait(30)
    finally:
        scheduler.close()
    for name, prompt, n in (("a", PROMPTS[0], 10), ("b", PROMPTS[1], 6)):
        seen = updates[name]
        # One update per token, each extending the last, the final one flagged.
        assert [len(tokens) for tokens, _ in seen] == list(range(1, n + 1))
        assert [final for _, final in seen] == [False] * (n - 1) + [True]
        assert seen[-1][0] == generate(model, [RowSpec(tuple(prompt), n)])[0].tokens
    assert updates["c"][-1][1] is True
    assert len(updates["c"][-1][0]) < 50


def test_ft_inputs_become_rows() -> None:
    ids = np.array([[10, 11, 12, 0], [20, 21, 22, 23]], dtype=np.uint32)
    stop = np.array([[[5, 6, 7], [2, 3, -1]], [[9, 0, 0], [1, -1, -1]]], dtype=np.int32)
    tensors: dict[str, np.ndarray] = {
        "input_ids": ids,
        "input_lengths": np.array([[3], [4]], dtype=np.uint32),
        "request_output_len": np.array([[8], [4]], dtype=np.uint32),
        "stop_words_list": stop,
        "temperature": np.array([[0.5], [0.5]], dtype=np.float32),
        "runtime_top_p": np.array([[0.9], [0.0]], dtype=np.float32),
        "random_seed": np.array([[42], [43]], dtype=np.uint64),
    }
    specs = rows_from_inputs(lambda name: tensors.get(name), max_seq_len=64, default_end_id=2)
    assert specs[0].prompt == (10, 11, 12) and specs[1].prompt == (20, 21, 22, 23)
    assert specs[0].stop_words == ((5, 6), (7,)) and specs[1].stop_words == ((9,),)
    assert specs[0].end_id == 2 and specs[0].max_new_tokens == 8
    assert (specs[0].sampling.temperature, specs[0].sampling.top_k, specs[0].sampling.seed) == (0.5, 0, 42)
    assert specs[0].sampling.top_p == pytest.approx(0.9)
    # FT: no top-k and no top-p means top-k 1, greedy.
    assert specs[1].sampling.greedy


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input_lengths": np.array([[9]], dtype=np.uint32)}, "input_lengths"),
        ({"request_output_len": np.array([[100]], dtype=np.uint32)}, "max_seq_len"),
        ({"beam_width": np.array([[4]], dtype=np.uint32)}, "beam"),
        ({"stop_words_list": np.array([[[1, 2], [5, -1]]], dtype=np.int32)}, "offset"),
    ],
)
def test_bad_ft_inputs_are_refused(change: dict[str, np.ndarray], message: str) -> None:
    tensors = {
        "input_ids": np.array([[1, 2, 3]], dtype=np.uint32),
        "input_lengths": np.array([[3]], dtype=np.uint32),
        "request_output_len": np.array([[8]], dtype=np.uint32),
        **change,
    }
    with pytest.raises(FTInputError, match=message):
        rows_from_inputs(lambda name: tensors.get(name), max_seq_len=64, default_end_id=None)


def test_ft_outputs_pack_prompt_generation_and_log_probs() -> None:
    a = Row(RowSpec((1, 2), 5, end_id=0), torch.device("cpu"))
    b = Row(RowSpec((3,), 5), torch.device("cpu"))
    for token, log_prob in ((7, -0.5), (8, -1.0), (9, -0.25)):
        a.accept(token, log_prob)
    b.accept(4, -2.0)
    out = pack_outputs([a, b], width=2, log_probs=True)
    assert out["output_ids"].shape == (2, 1, 5)
    assert out["output_ids"][0, 0].tolist() == [1, 2, 7, 8, 9]
    assert out["output_ids"][1, 0, :2].tolist() == [3, 4]
    assert out["sequence_length"].tolist() == [[5], [2]]
    assert out["output_log_probs"][0, 0].tolist() == [-0.5, -1.0, -0.25]
    assert out["cum_log_probs"].tolist() == [[-1.75], [-2.0]]
    assert "output_log_probs" not in pack_outputs([a], width=2, log_probs=False)
    assert parse_word_list(np.array([[4, 5, 6], [1, 3, -1]], dtype=np.int32)) == ((4,), (5, 6))
