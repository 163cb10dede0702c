"""Pure completion logic: prompt building (FIM, left trimming), stop strings, finish reasons, log probs.

Nothing here does I/O; the routers feed it token ids as the backend produces them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pilotfleet_proxy.errors import bad_request
from pilotfleet_proxy.protocol import ChoiceLogprobs
from pilotfleet_proxy.routes import FimTemplate
from pilotfleet_proxy.tokenizer import Detokenizer, Tokenizer

FinishReason = Literal["stop", "length"]
# A suffix line shorter than this (`)`, `}`, `else:`) is too common to mean "the model reached the suffix".
MIN_SUFFIX_STOP_CHARS = 8


@dataclass(frozen=True)
class PromptPlan:
    """The token ids sent to the model for one prompt, and how much of the client's prompt was cut."""

    ids: list[int]
    trimmed_tokens: int


def plan_prompt(
    tokenizer: Tokenizer,
    prompt: str | list[int],
    suffix: str | None,
    fim: FimTemplate | None,
    context_length: int,
    max_tokens: int,
) -> PromptPlan:
    """Build the model's input ids and fit them, with `max_tokens` to generate, into `context_length`.

    With a FIM template and a suffix, the prompt becomes the model's fill-in-the-middle prompt. When the
    result is too long, the prompt loses tokens on the left (farthest from the cursor) and the suffix on
    the right; the suffix keeps at least a quarter of the room when the prompt is long.
    """
    if max_tokens >= context_length:
        raise bad_request(
            f"max_tokens ({max_tokens}) must be less than the model's context length ({context_length})",
            param="max_tokens",
            code="context_length_exceeded",
        )
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    use_fim = fim is not None and bool(suffix)
    suffix_ids = tokenizer.encode(suffix) if use_fim and suffix else []
    markers = [tokenizer.encode(m) for m in (fim.prefix, fim.suffix, fim.middle)] if fim and use_fim else []
    room = context_length - max_tokens - sum(len(m) for m in markers)
    if room < 1:
        raise bad_request(
            f"max_tokens ({max_tokens}) leaves no room for the prompt in {context_length} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    trimmed = 0
    if len(prompt_ids) + len(suffix_ids) > room:
        suffix_keep = min(len(suffix_ids), max(room // 4, room - len(prompt_ids)))
        prompt_keep = room - suffix_keep
        trimmed = max(0, len(prompt_ids) - prompt_keep) + (len(suffix_ids) - suffix_keep)
        prompt_ids = prompt_ids[len(prompt_ids) - prompt_keep :] if prompt_keep else []
        suffix_ids = suffix_ids[:suffix_keep]
    if not markers:
        return PromptPlan(ids=prompt_ids, trimmed_tokens=trimmed)
    assert fim is not None
    prefix_marker, suffix_marker, middle_marker = markers
    if fim.order == "psm":
        ids = [*prefix_marker, *prompt_ids, *suffix_marker, *suffix_ids, *middle_marker]
    else:
        ids = [*suffix_marker, *suffix_ids, *prefix_marker, *prompt_ids, *middle_marker]
    return PromptPlan(ids=ids, trimmed_tokens=trimmed)


def suffix_stop(suffix: str | None) -> str | None:
    """For a model without FIM: the suffix's first meaningful line, where a completion should end.

    A model that cannot see the code below the cursor tends to write it again; stopping before the first
    line of the suffix keeps that duplicate out of the editor.
    """
    for line in (suffix or "").splitlines():
        if len(line.strip()) >= MIN_SUFFIX_STOP_CHARS:
            return line.strip()
        if line.strip():
            return None
    return None


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclass
class _TokenRecord:
    text: str
    logprob: float
    offset: int


class ChoiceText:
    """One choice's text as the model generates it: stop strings honoured exactly, finish reason decided.

    `update` takes the whole generated sequence so far (FT's streaming convention); `take` returns the text
    that can be sent now: text that might still turn out to be the start of a stop string is held back.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        stops: Sequence[str],
        max_tokens: int,
        end_id: int | None = None,
        want_logprobs: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.max_tokens = max_tokens
        self.end_id = end_id
        self.want_logprobs = want_logprobs
        self.detokenizer = Detokenizer(tokenizer)
        self.text = ""
        self.finish_reason: FinishReason | None = None
        # Ids consumed from the backend's sequence, and those that are part of the completion.
        self.seen = 0
        self.accepted = 0
        self.sent = 0
        self.tokens: list[_TokenRecord] = []
        self.tokens_sent = 0
        self._longest_stop = max((len(s) for s in self.stops), default=0)

    @property
    def finished(self) -> bool:
        """True once a stop string, the end id or max_tokens ended this choice."""
        return self.finish_reason is not None

    def update(self, generated: Sequence[int], logprobs: Sequence[float] | None = None) -> None:
        """Consume the ids of `generated` not seen before (and their log probs, when given)."""
        for index in range(self.seen, len(generated)):
            self.seen = index + 1
            if self.finished:
                continue
            token = int(generated[index])
            if token == self.end_id:
                self.finish_reason = "stop"
                continue
            self.accepted += 1
            before = len(self.text)
            self.text += self.detokenizer.add(token)
            if self.want_logprobs and logprobs is not None:
                piece = self.tokenizer.decode([token])
                self.tokens.append(_TokenRecord(piece, float(logprobs[index]), before))
            self._apply_stops(before)
            if not self.finished and self.accepted >= self.max_tokens:
                self.finish(generation_complete=True)

    def _apply_stops(self, before: int) -> None:
        if not self.stops:
            return
        # Only a match ending in the new text is new; it may start up to len(stop) - 1 chars earlier.
        start = max(0, before - self._longest_stop + 1)
        hits = [pos for stop in self.stops if (pos := self.text.find(stop, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def finish(self, generation_complete: bool) -> None:
        """The backend is done with this choice: release held text and settle the finish reason.

        `generation_complete` is False when the backend ended early without saying why (e.g. its own
        length limit), which counts as "length".
        """
        if self.finished:
            return
        before = len(self.text)
        self.text += self.detokenizer.flush()
        self._apply_stops(before)
        if not self.finished:
            # Fewer tokens than asked, without a stop string: the model ended the text itself.
            hit_limit = self.accepted >= self.max_tokens or not generation_complete
            self.finish_reason = "length" if hit_limit else "stop"

    def take(self) -> str:
        """Text not yet sent that no later token can change."""
        end = len(self.text) if self.finished else len(self.text) - _held_back(self.text, self.stops)
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece

    def take_logprobs(self, offset: int = 0) -> ChoiceLogprobs | None:
        """Log probs of tokens whose text was taken and not yet reported; text offsets shifted by `offset`."""
        if not self.want_logprobs:
            return None
        records: list[_TokenRecord] = []
        while self.tokens_sent < len(self.tokens):
            record = self.tokens[self.tokens_sent]
            if record.offset >= self.sent:
                if not self.finished:
                    break
                # Cut away by a stop string: not part of the completion.
            else:
                records.append(record)
            self.tokens_sent += 1
        return ChoiceLogprobs(
            tokens=[r.text for r in records],
            token_logprobs=[r.logprob for r in records],
            top_logprobs=None,
            text_offset=[r.offset + offset for r in records],
        )
