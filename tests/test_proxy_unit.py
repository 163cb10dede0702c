"""Unit tests of the proxy's pure parts: tokenizer, prompt planning, stop strings, route table, auth."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import tiktoken
from pilotfleet_proxy.auth import TokenAuthority
from pilotfleet_proxy.completion import ChoiceText, plan_prompt, suffix_stop
from pilotfleet_proxy.errors import ProxyError
from pilotfleet_proxy.protocol import CompletionRequest
from pilotfleet_proxy.routes import FimTemplate, ModelRoute, RouteTable, RouteWatcher
from pilotfleet_proxy.tokenizer import Detokenizer, Tokenizer
from pilotfleet_testbed.tokenizers import END_OF_TEXT, END_OF_TEXT_ID, GPT2_PATTERN, gpt2_ranks_file
from pydantic import ValidationError

SAMPLES = [
    "def add(a, b):\n    return a + b\n",
    "héllo wörld — naïve café, 日本語のテキスト 🎉🚀\n\t\t  trailing   ",
    "x = {'k': [1, 2.5e-3, None]}  # it's they're we've I'm you'll he'd\r\n",
    f"first document{END_OF_TEXT}second document",
    "    \n\n\n        indented\u00a0non-breaking\u200bzero-width",
]


@pytest.fixture(scope="module")
def tok(gpt2: Tokenizer) -> Tokenizer:
    return gpt2


@pytest.fixture(scope="module")
def tiktoken_gpt2() -> tiktoken.Encoding:
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(gpt2_ranks_file()))
    return tiktoken.Encoding(
        "gpt2-test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={END_OF_TEXT: END_OF_TEXT_ID}
    )


# ---- tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_converted_tokenizer_matches_tiktoken(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding, text: str
) -> None:
    expected = tiktoken_gpt2.encode(text, allowed_special="all")
    assert tok.encode(text) == expected
    assert tok.inner.decode(expected, skip_special_tokens=False) == text


def test_converted_tokenizer_matches_tiktoken_on_python_sources(
    tok: Tokenizer, tiktoken_gpt2: tiktoken.Encoding
) -> None:
    sources = sorted(Path(os.__file__).parent.glob("*.py"))[:40]
    assert sources
    for source in sources:
        text = source.read_text(errors="replace")
        assert tok.encode(text) == tiktoken_gpt2.encode(text, disallowed_special=()), source


@pytest.mark.parametrize("text", SAMPLES)
def test_detokenizer_streams_exactly_the_full_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text.replace(END_OF_TEXT, ""))
    detok = Detokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert "".join(pieces) + detok.flush() == tok.decode(ids)
    # No piece may carry half a character.
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_holds_back_a_split_character(tok: Tokenizer) -> None:
    ids = tok.encode("🎉")
    assert len(ids) > 1, "the emoji must span several byte-level tokens for this test"
    detok = Detokenizer(tok)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🎉"


# ---- stop strings and finish reasons -----------------------------------------------------------


def _stream_all(choice: ChoiceText, ids: list[int], final: bool = True) -> list[str]:
    pieces = []
    for end in range(1, len(ids) + 1):
        choice.update(ids[:end])
        pieces.append(choice.take())
    if final:
        choice.finish(generation_complete=True)
        pieces.append(choice.take())
    return pieces


def test_stop_string_across_token_boundary_is_cut_exactly(tok: Tokenizer) -> None:
    ids = tok.encode("hello world, hello world")
    assert tok.encode("hello") + tok.encode(" world") == ids[:2]
    choice = ChoiceText(tok, ["o w"], max_tokens=100)
    pieces = _stream_all(choice, ids)
    assert "".join(pieces) == "hell"
    assert choice.finish_reason == "stop"
    # The model went on, but the choice stopped consuming at the stop string.
    assert choice.accepted == 2


def test_text_that_may_start_a_stop_string_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("a = 1\n\nb = 2\ndef f")
    choice = ChoiceText(tok, ["\ndef "], max_tokens=100)
    sent = []
    for end in range(1, len(ids) + 1):
        choice.update(ids[:end])
        sent.append(choice.take())
        # Nothing sent is ever taken back: every prefix sent is a prefix of the final answer.
        assert "a = 1\n\nb = 2".startswith("".join(sent))
    choice.finish(generation_complete=True)
    sent.append(choice.take())
    assert "".join(sent) == "a = 1\n\nb = 2"
    assert choice.finish_reason == "stop"


def test_held_back_newline_is_released_when_the_stop_does_not_follow(tok: Tokenizer) -> None:
    choice = ChoiceText(tok, ["\n\n#"], max_tokens=100)
    ids = tok.encode("x = 1\n\nprint(x)")
    pieces = _stream_all(choice, ids)
    assert "".join(pieces) == "x = 1\n\nprint(x)"
    assert choice.finish_reason == "stop"  # fewer tokens than max_tokens: the model ended itself


def test_max_tokens_gives_length(tok: Tokenizer) -> None:
    ids = tok.encode("one two three four five")
    choice = ChoiceText(tok, [], max_tokens=3)
    choice.update(ids)
    assert choice.finish_reason == "length"
    assert choice.take() == tok.decode(ids[:3])


def test_end_id_ends_the_choice_without_text(tok: Tokenizer) -> None:
    ids = [*tok.encode("done"), END_OF_TEXT_ID, *tok.encode(" more")]
    choice = ChoiceText(tok, [], max_tokens=50, end_id=END_OF_TEXT_ID)
    choice.update(ids)
    assert (choice.take(), choice.finish_reason, choice.accepted) == ("done", "stop", 1)


def test_logprobs_follow_the_text_and_drop_tokens_cut_by_a_stop(tok: Tokenizer) -> None:
    ids = tok.encode("alpha beta gamma delta")
    logprobs = [-0.5, -1.0, -1.5, -2.0]
    choice = ChoiceText(tok, [" gam"], max_tokens=50, want_logprobs=True)
    choice.update(ids, logprobs)
    choice.finish(generation_complete=True)
    assert choice.take() == "alpha beta"
    reported = choice.take_logprobs(offset=10)
    assert reported is not None
    assert reported.tokens == ["alpha", " beta"]
    assert reported.token_logprobs == [-0.5, -1.0]
    assert reported.text_offset == [10, 15]
    assert reported.top_logprobs is None


# ---- prompt planning ---------------------------------------------------------------------------


def test_prompt_fits_untouched(tok: Tokenizer) -> None:
    plan = plan_prompt(tok, "def f():", None, None, context_length=64, max_tokens=16)
    assert (plan.ids, plan.trimmed_tokens) == (tok.encode("def f():"), 0)


def test_long_prompt_is_trimmed_from_the_left(tok: Tokenizer) -> None:
    prompt = " ".join(f"w{i}" for i in range(100))
    ids = tok.encode(prompt)
    plan = plan_prompt(tok, prompt, None, None, context_length=40, max_tokens=10)
    assert len(plan.ids) == 30
    assert plan.ids == ids[-30:]
    assert plan.trimmed_tokens == len(ids) - 30


def test_fim_prompt_order_and_suffix_budget(tok: Tokenizer) -> None:
    fim = FimTemplate(prefix="<PRE>", suffix="<SUF>", middle="<MID>")
    plan = plan_prompt(tok, "def f():\n", "return 1\n", fim, context_length=256, max_tokens=16)
    assert tok.decode(plan.ids) == "<PRE>def f():\n<SUF>return 1\n<MID>"
    spm = fim.model_copy(update={"order": "spm"})
    plan = plan_prompt(tok, "def f():\n", "return 1\n", spm, context_length=256, max_tokens=16)
    assert tok.decode(plan.ids) == "<SUF>return 1\n<PRE>def f():\n<MID>"
    # Too long: the prompt loses its left, the suffix its right; the suffix keeps a quarter of the room.
    prompt = " ".join(f"p{i}" for i in range(300))
    suffix = " ".join(f"s{i}" for i in range(300))
    plan = plan_prompt(tok, prompt, suffix, fim, context_length=200, max_tokens=20)
    markers = sum(len(tok.encode(m)) for m in ("<PRE>", "<SUF>", "<MID>"))
    assert len(plan.ids) == 200 - 20
    room = 200 - 20 - markers
    text = tok.decode(plan.ids)
    assert text.startswith("<PRE>") and text.endswith("<MID>")
    assert prompt.endswith(text[len("<PRE>") : text.index("<SUF>")])
    assert suffix.startswith(text[text.index("<SUF>") + len("<SUF>") : -len("<MID>")])
    assert len(tok.encode(suffix)) > room // 4
    assert plan.trimmed_tokens == len(tok.encode(prompt)) + len(tok.encode(suffix)) - room


def test_max_tokens_must_leave_room_for_a_prompt(tok: Tokenizer) -> None:
    with pytest.raises(ProxyError) as caught:
        plan_prompt(tok, "x", None, None, context_length=32, max_tokens=32)
    assert (caught.value.status, caught.value.param) == (400, "max_tokens")


def test_suffix_stop_is_the_first_meaningful_line() -> None:
    assert suffix_stop("\n\nprint(add(1, 2))\nmore") == "print(add(1, 2))"
    assert suffix_stop("    )\nprint(add(1, 2))") is None
    assert suffix_stop(None) is None


# ---- request validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("frequency_penalty", 0.5),
        ("logit_bias", {"50256": -100}),
        ("best_of", 3),
        ("logprobs", 2),
        ("stop", ["a", "b", "c", "d", "e"]),
    ],
)
def test_unsupported_parameters_are_refused_by_name(field: str, value: object) -> None:
    request = CompletionRequest.model_validate({"prompt": "x", field: value})
    with pytest.raises(ProxyError) as caught:
        request.check_supported()
    assert (caught.value.status, caught.value.param) == (400, field if field != "stop" else "stop")


def test_copilot_body_is_accepted() -> None:
    body = {
        "prompt": "# Path: add.py\ndef add(a, b):\n",
        "suffix": "print(add(1, 2))\n",
        "max_tokens": 500,
        "temperature": 0.2,
        "top_p": 1,
        "n": 3,
        "stop": ["\ndef ", "\nclass ", "\nif ", "\n\n#"],
        "stream": True,
        "extra": {"language": "python", "next_indent": 0, "trim_by_indentation": True},
        "nwo": "acme/widgets",
        "code_annotations": False,
    }
    request = CompletionRequest.model_validate(body)
    request.check_supported()
    assert request.prompts() == [body["prompt"]]
    assert request.stop_strings() == body["stop"]


def test_prompt_forms() -> None:
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompts() == [[1, 2, 3]]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert CompletionRequest.model_validate({"prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]


# ---- route table -------------------------------------------------------------------------------


def _route(name: str, **fields: object) -> ModelRoute:
    values: dict[str, object] = {"name": name, "triton_model": "m", "tokenizer": "/t.json", **fields}
    return ModelRoute.model_validate(values)


def test_route_table_round_trips_and_looks_up_aliases() -> None:
    table = RouteTable(models=(_route("a", aliases=("codex",), endpoints=("h:8001",)), _route("b")))
    again = RouteTable.from_yaml(table.to_yaml())
    assert again == table
    assert again.lookup("codex") == table.models[0]
    assert again.lookup("zzz") is None
    assert RouteTable.from_yaml("") == RouteTable()


@pytest.mark.parametrize(
    "models",
    [
        [
            {"name": "a", "triton_model": "m", "tokenizer": "t"},
            {"name": "b", "aliases": ["a"], "triton_model": "m", "tokenizer": "t"},
        ],
        [{"name": "bad/name", "triton_model": "m", "tokenizer": "t"}],
        [
            {
                "name": "a",
                "triton_model": "m",
                "tokenizer": "t",
                "default_max_tokens": 99,
                "max_tokens_limit": 10,
            }
        ],
        [{"name": "a", "triton_model": "m", "tokenizer": "t", "unknown": 1}],
    ],
)
def test_invalid_route_tables_are_refused(models: list[dict[str, object]]) -> None:
    with pytest.raises(ValidationError):
        RouteTable.model_validate({"version": 1, "models": models})


async def test_watcher_follows_kubelet_symlink_swaps(tmp_path: Path) -> None:
    """ConfigMap volumes: routes.yaml -> ..data/routes.yaml, ..data -> ..<timestamp>; updates swap ..data."""
    seen: list[RouteTable] = []

    async def on_change(table: RouteTable) -> None:
        seen.append(table)

    def publish(version: str, table: RouteTable) -> None:
        folder = tmp_path / f"..{version}"
        folder.mkdir()
        (folder / "routes.yaml").write_text(table.to_yaml())
        link = tmp_path / "..data_tmp"
        link.symlink_to(folder.name)
        link.rename(tmp_path / "..data")  # atomic swap, as the kubelet does

    first = RouteTable(models=(_route("a"),))
    second = RouteTable(models=(_route("b"),))
    publish("v1", first)
    (tmp_path / "routes.yaml").symlink_to("..data/routes.yaml")
    watcher = RouteWatcher(tmp_path / "routes.yaml", poll_s=0.02, on_change=on_change)
    await watcher.start()
    try:
        assert seen == [first]
        publish("v2", second)
        for _ in range(100):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.02)
        assert seen == [first, second]
        # An invalid table keeps the last good one.
        publish("v3", RouteTable())
        (tmp_path / "..v3" / "routes.yaml").write_text("models: [{name: 1}]")
        await asyncio.sleep(0.2)
        assert seen == [first, second]
    finally:
        await watcher.stop()


# ---- auth --------------------------------------------------------------------------------------


def test_open_proxy_issues_tokens_and_lets_everyone_in() -> None:
    auth = TokenAuthority(None, ttl_s=600)
    token = auth.issue(now=1000)
    assert (token.expires_at, token.refresh_in) == (1600, 300)
    auth.check_exchange(None)
    auth.check_request(None)


def test_shared_token_guards_exchange_and_requests() -> None:
    auth = TokenAuthority("s3cret", ttl_s=600)
    with pytest.raises(ProxyError) as caught:
        auth.check_exchange("token wrong")
    assert caught.value.status == 401
    auth.check_exchange("token s3cret")
    issued = auth.issue(now=1000).token
    auth.check_request(f"Bearer {issued}", now=1500)
    auth.check_request("Bearer s3cret", now=1500)
    for bad in (None, "Bearer nope", f"Bearer {issued}x", f"Bearer {issued.replace('1600', '9999')}"):
        with pytest.raises(ProxyError):
            auth.check_request(bad, now=1500)
    with pytest.raises(ProxyError):
        auth.check_request(f"Bearer {issued}", now=1601)  # expired
