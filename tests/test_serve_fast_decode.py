"""The static-cache decoder (issue #7) on CPU: same tokens as plain `generate()`, slots joined, left, reused.

On a GPU the same decoder replays its steps as CUDA graphs; `benchmarks/gpu_backend.py` checks the
greedy equality there. Here it runs the identical steps eagerly, which is what `pilotfleet serve` and
the testbed use.
"""

from __future__ import annotations

import threading

import pytest
import torch
from pilotfleet_serve.generation import BatchDecoder, Finish, Job, Row, RowSpec, Sampling, Scheduler, generate
from pilotfleet_serve.reference import TINY_DECODER_SIZES, hf_greedy, tiny_codegen, tiny_llama
from pilotfleet_serve.static_decode import MIN_WINDOW, StaticBatchDecoder, bucket, make_decoder
from transformers import MistralConfig, MistralForCausalLM, PreTrainedModel

PROMPTS = ([5, 9, 33, 2, 7], [100, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], list(range(40, 110)))


@pytest.fixture(scope="module", params=[tiny_llama, tiny_codegen], ids=["llama", "codegen"])
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    """Each tiny architecture in turn."""
    return request.param()


def fast(model: PreTrainedModel, specs: list[RowSpec], max_rows: int = 4) -> list[Row]:
    """Generate through a fresh static decoder."""
    return generate(model, specs, decoder=StaticBatchDecoder(model, max_rows=max_rows))


def test_greedy_equals_hf_generate_one_row_at_a_time(model: PreTrainedModel) -> None:
    for prompt in PROMPTS:
        # 70 + 40 tokens cross the first window and make the cache grow mid-row.
        row = fast(model, [RowSpec(tuple(prompt), 40)])[0]
        assert row.tokens == hf_greedy(model, [prompt], 40)[0]
        assert row.finish is Finish.LENGTH


def test_greedy_batch_of_mixed_lengths_equals_hf_generate(model: PreTrainedModel) -> None:
    rows = fast(model, [RowSpec(tuple(p), 24) for p in PROMPTS])
    assert [r.tokens for r in rows] == hf_greedy(model, [list(p) for p in PROMPTS], 24)


def test_rows_join_leave_and_reuse_slots(model: PreTrainedModel) -> None:
    lengths = (30, 6, 12, 20, 9)
    specs = [RowSpec(tuple(PROMPTS[i % len(PROMPTS)]), n) for i, n in enumerate(lengths)]
    alone = [generate(model, [spec])[0].tokens for spec in specs]
    rows = [Row(spec, model.device) for spec in specs]
    decoder = StaticBatchDecoder(model, max_rows=2)
    with torch.inference_mode():
        decoder.admit(rows[:2])
        # Row 1 (6 tokens) ends first and frees slot 1, which row 2 takes while row 0 runs on.
        while not rows[1].done:
            decoder.step()
        assert decoder.free_rows() == 1
        decoder.admit(rows[2:3])
        # Row 0 (30 tokens) outlasts row 2 (12): slot 1 frees again and row 3 takes it.
        while not rows[2].done:
            decoder.step()
        decoder.admit(rows[3:4])
        # Row 0 ends while row 3 runs in slot 1: slot 0 is a hole, then row 4 fills it.
        while not rows[0].done:
            decoder.step()
        assert decoder.free_rows() == 1
        decoder.admit(rows[4:])
        while decoder.rows:
            decoder.step()
    assert [r.tokens for r in rows] == alone
    assert decoder.free_rows() == 2


def test_log_probs_match_the_dynamic_decoder(model: PreTrainedModel) -> None:
    spec = RowSpec(tuple(PROMPTS[2]), 16)
    ours = fast(model, [spec])[0]
    reference = generate(model, [spec])[0]
    assert ours.tokens == reference.tokens
    assert ours.log_probs == pytest.approx(reference.log_probs, abs=1e-4)


def test_stop_conditions_and_bad_words_hold() -> None:
    model = tiny_llama()
    free = fast(model, [RowSpec(tuple(PROMPTS[0]), 16)])[0].tokens
    ended = fast(model, [RowSpec(tuple(PROMPTS[0]), 16, end_id=free[6])])[0]
    assert ended.tokens == free[: free.index(free[6])] and ended.finish is Finish.END
    word = tuple(free[3:5])
    stopped = fast(model, [RowSpec(tuple(PROMPTS[0]), 16, stop_words=(word,))])[0]
    assert stopped.finish is Finish.STOP_WORD and tuple(stopped.tokens[-2:]) == word
    banned = tuple(sorted(set(free)))[:3]
    clean = fast(model, [RowSpec(tuple(PROMPTS[0]), 16, bad_words=tuple((t,) for t in banned))])[0]
    assert len(clean.tokens) == 16 and not set(clean.tokens) & set(banned)


def test_sampled_rows_are_seeded_and_batch_independent() -> None:
    model = tiny_llama()
    prompt = tuple(PROMPTS[1])
    sampled = RowSpec(prompt, 20, sampling=Sampling(temperature=1.2, top_p=0.9, seed=11))
    alone = fast(model, [sampled])[0].tokens
    assert fast(model, [sampled])[0].tokens == alone
    other = fast(model, [RowSpec(prompt, 20, sampling=Sampling(temperature=1.2, top_p=0.9, seed=12))])[0]
    assert other.tokens != alone
    mixed = fast(model, [RowSpec(tuple(PROMPTS[2]), 20), sampled, RowSpec(prompt, 20)])
    assert mixed[1].tokens == alone
    assert mixed[2].tokens == hf_greedy(model, [list(prompt)], 20)[0]


def test_rows_that_cannot_fit_are_refused() -> None:
    model = tiny_llama()
    decoder = StaticBatchDecoder(model, max_rows=2, max_len=32)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.admit([Row(RowSpec(tuple(range(1, 30)), 5), model.device)])
    with pytest.raises(ValueError, match="do not fit"):
        decoder.admit([Row(RowSpec((1, 2), 4), model.device) for _ in range(3)])
    # Exactly full: prompt + new tokens - 1 cache columns.
    row = Row(RowSpec(tuple(range(1, 29)), 5), model.device)
    with torch.inference_mode():
        decoder.admit([row])
        while decoder.rows:
            decoder.step()
    assert len(row.tokens) == 5


def test_scheduler_streams_through_the_static_decoder() -> None:
    model = tiny_codegen()
    # Two slots for three jobs: the third waits for a slot to free, then joins the running batch.
    scheduler = Scheduler(StaticBatchDecoder(model, max_rows=2))
    scheduler.start()
    lengths = {"a": 12, "b": 5, "c": 8}
    seen: dict[str, list[list[int]]] = {name: [] for name in lengths}
    done = {name: threading.Event() for name in lengths}

    def job(name: str, prompt: list[int]) -> Job:
        def progress(j: Job, final: bool) -> None:
            seen[name].append(list(j.rows[0].tokens))
            if final:
                done[name].set()

        def error(_j: Job, message: str) -> None:
            raise AssertionError(message)

        return Job([Row(RowSpec(tuple(prompt), lengths[name]), model.device)], progress, error)

    try:
        for name, prompt in zip(lengths, PROMPTS, strict=False):
            scheduler.submit(job(name, prompt))
        for event in done.values():
            assert event.wait(30)
    finally:
        scheduler.close()
    for name, prompt in zip(lengths, PROMPTS, strict=False):
        assert [len(tokens) for tokens in seen[name]] == list(range(1, lengths[name] + 1))
        assert seen[name][-1] == hf_greedy(model, [prompt], lengths[name])[0]


def test_make_decoder_falls_back_for_sliding_window_models() -> None:
    assert isinstance(make_decoder(tiny_llama(), max_rows=4, max_len=128), StaticBatchDecoder)
    config = MistralConfig(**TINY_DECODER_SIZES, sliding_window=16)
    assert isinstance(make_decoder(MistralForCausalLM(config).eval(), max_rows=4), BatchDecoder)


def test_buckets_are_powers_of_two_within_limits() -> None:
    assert [bucket(n, 16) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 16]
    assert [bucket(n, 6) for n in (3, 5, 6)] == [4, 6, 6]
    assert bucket(1, 2048, MIN_WINDOW) == MIN_WINDOW and bucket(300, 2048, MIN_WINDOW) == 512
    assert bucket(3000, 2048, MIN_WINDOW) == 2048
