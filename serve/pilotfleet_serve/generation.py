"""The decode loop of pilotfleet's Hugging Face backend: plain torch and transformers, no Triton.

Three layers, each replaceable on its own:

- `choose_tokens`: penalties, bad words, greedy or seeded top-k/top-p sampling for a batch of rows, all
  on the logits' device; `accept_tokens` then copies the chosen ids to the host once per step;
- a `Decoder`, the running batch. Rows join between steps and leave when they finish, so a request never
  waits for a long one ahead of it to end. `BatchDecoder` here keeps one dynamic KV cache (new rows are
  prefilled and the caches merged, left-padded); `static_decode.StaticBatchDecoder` (issue #7) keeps
  fixed slots of a preallocated cache and replays its steps as CUDA graphs on a GPU;
- `Scheduler`: one thread that feeds the decoder from a queue of jobs (the rows of one request) and
  reports each job's progress after every step, which is what streaming needs.

Conventions follow FasterTransformer, the interface the proxy speaks: the end id ends a row and is not
part of its output; a stop word ends a row and stays in its output (the proxy trims text itself).
"""

from __future__ import annotations

import enum
import inspect
import logging
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How a row picks its next token. Temperature 0 (or top_k 1) is greedy; top_k 0 means no top-k."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        """True when the row takes the most likely token."""
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass(frozen=True)
class RowSpec:
    """One sequence to generate: its prompt ids, limits, stop conditions and sampling."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    end_id: int | None = None
    stop_words: tuple[tuple[int, ...], ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()
    sampling: Sampling = field(default_factory=Sampling)


class Finish(enum.Enum):
    """Why a row stopped."""

    LENGTH = "length"
    END = "end"
    STOP_WORD = "stop_word"
    CANCELLED = "cancelled"


class Row:
    """A row being generated: what it produced so far and, once done, why it stopped."""

    def __init__(self, spec: RowSpec, device: torch.device) -> None:
        """Start a row; a sampled row gets its own random generator (seeded when the spec says so)."""
        self.spec = spec
        self.tokens: list[int] = []
        self.log_probs: list[float] = []
        self.finish: Finish | None = Finish.LENGTH if spec.max_new_tokens <= 0 else None
        self.generator: torch.Generator | None = None
        if not spec.sampling.greedy:
            seed = spec.sampling.seed if spec.sampling.seed is not None else random.getrandbits(63)
            self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def done(self) -> bool:
        """True once the row stopped."""
        return self.finish is not None

    def accept(self, token: int, log_prob: float) -> None:
        """Take the token chosen for this row and decide whether the row goes on."""
        spec = self.spec
        if spec.end_id is not None and token == spec.end_id:
            self.finish = Finish.END
            return
        self.tokens.append(token)
        self.log_probs.append(log_prob)
        if self._ends_with_stop_word():
            self.finish = Finish.STOP_WORD
        elif len(self.tokens) >= spec.max_new_tokens:
            self.finish = Finish.LENGTH

    def _ends_with_stop_word(self) -> bool:
        # FT compares the tail of the whole sequence, so a stop word may begin inside the prompt.
        for word in self.spec.stop_words:
            n = len(word)
            if n == 0 or n > len(self.spec.prompt) + len(self.tokens):
                continue
            tail = self.tokens[-n:] if n <= len(self.tokens) else [*self.spec.prompt, *self.tokens][-n:]
            if tuple(tail) == word:
                return True
        return False

    def history(self) -> list[int]:
        """The prompt followed by the generated ids."""
        return [*self.spec.prompt, *self.tokens]


def _apply_penalties(logits: torch.Tensor, row: Row) -> None:
    """Penalties and bad words for one row, in place on its logits [V]."""
    sampling = row.spec.sampling
    if sampling.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.history())), dtype=torch.long, device=logits.device)
        if seen.numel():
            values = logits[seen]
            # The CTRL/HF rule: shrink positive logits, grow negative ones, so both become less likely.
            logits[seen] = torch.where(
                values > 0, values / sampling.repetition_penalty, values * sampling.repetition_penalty
            )
    if sampling.presence_penalty != 0.0 and row.tokens:
        generated = torch.tensor(sorted(set(row.tokens)), dtype=torch.long, device=logits.device)
        logits[generated] -= sampling.presence_penalty
    if row.spec.bad_words:
        history = row.history()
        for word in row.spec.bad_words:
            prefix = list(word[:-1])
            if word and (not prefix or history[-len(prefix) :] == prefix):
                logits[word[-1]] = float("-inf")


def _sample(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Draw one token per row from logits [N, V] with each row's temperature, top-k and top-p, on the device.

    Each row draws its noise from its own generator, so a row samples the same tokens whatever batch it
    runs in, and nothing here waits for the device.
    """
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([r.spec.sampling.temperature for r in rows], device=device)
    top_k = torch.tensor([r.spec.sampling.top_k or vocab for r in rows], device=device)
    top_p = torch.tensor([r.spec.sampling.top_p for r in rows], device=device)
    ordered, order = torch.sort(logits / temperature.unsqueeze(1), dim=-1, descending=True)
    ranks = torch.arange(vocab, device=device)
    ordered = ordered.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    # Drop a token when the ones before it already reach top_p; the first one always stays.
    drop = (torch.cumsum(probs, dim=-1) - probs) > top_p.unsqueeze(1)
    probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
    # probs / Exp(1) noise peaks at index i with probability probs[i] (the exponential race).
    noise = torch.stack([torch.empty(vocab, device=device).exponential_(generator=r.generator) for r in rows])
    # A zero draw would turn a dropped token's 0 / 0 into NaN, which argmax takes as the largest value.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    picked = torch.argmax(probs / noise, dim=-1, keepdim=True)
    return order.gather(1, picked).squeeze(1)


def choose_tokens(logits: torch.Tensor, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token of every row from the last position's logits [B, V], on the logits' device.

    Returns the tokens [B] and their log probabilities [B] under the model's own distribution (before
    penalties, temperature and truncation), which is what clients asking for logprobs want to see.
    Both stay on the device: the caller copies them to the host once per step.
    """
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    processed = logits
    if any(
        r.spec.sampling.repetition_penalty != 1.0 or r.spec.sampling.presence_penalty or r.spec.bad_words
        for r in rows
    ):
        processed = logits.clone()
        for i, row in enumerate(rows):
            _apply_penalties(processed[i], row)
    tokens = processed.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.spec.sampling.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        drawn = _sample(processed.index_select(0, index), [rows[i] for i in sampled])
        tokens = tokens.index_copy(0, index, drawn)
    return tokens, log_probs.gather(1, tokens.unsqueeze(1)).squeeze(1)


def accept_tokens(rows: Sequence[Row], tokens: torch.Tensor, log_probs: torch.Tensor) -> None:
    """Hand each row its chosen token: the one copy to the host that a decode step needs."""
    # float64 holds every token id exactly, so one transfer carries ids and log probabilities together.
    host = torch.stack((tokens.double(), log_probs.double())).cpu().tolist()
    for row, token, log_prob in zip(rows, host[0], host[1], strict=True):
        row.accept(int(token), log_prob)


class Decoder(Protocol):
    """What the scheduler drives: a running batch that rows join and leave between decode steps."""

    device: torch.device
    max_rows: int
    rows: list[Row]

    def free_rows(self) -> int:
        """How many more rows may join now."""
        ...

    def admit(self, specs: Sequence[Row]) -> None:
        """Prefill new rows, choose their first token, and add them to the running batch."""
        ...

    def step(self) -> None:
        """Run one decode step for every running row."""
        ...

    def reset(self) -> None:
        """Forget every row (after a failed step)."""
        ...


def rows_to_admit(decoder: Decoder, specs: Sequence[Row]) -> list[Row]:
    """The rows of `specs` that still run; raise ValueError when they do not fit `decoder` now."""
    rows = [r for r in specs if not r.done]
    if len(rows) > decoder.free_rows():
        raise ValueError(f"{len(rows)} rows do not fit: {decoder.free_rows()} free")
    return rows


def model_call_options(model: PreTrainedModel) -> tuple[str, bool]:
    """The name of the model's cache argument and whether it accepts `logits_to_keep`."""
    accepted = inspect.signature(model.forward).parameters
    # transformers 5.x renamed `past_key_values` to `cache` (the old name goes away in 5.40).
    return ("cache" if "cache" in accepted else "past_key_values"), "logits_to_keep" in accepted


class BatchDecoder:
    """The running batch: a KV cache, attention mask and position per row; rows join and leave between steps.

    Rows are left-padded to a common cache length; the attention mask hides the padding and explicit
    position ids keep every row's positions its own, as Hugging Face's batched `generate()` does.
    """

    def __init__(self, model: PreTrainedModel, max_rows: int = 16) -> None:
        """Wrap a loaded causal LM (already on its device, in eval mode)."""
        self.model = model
        self.device = model.device
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._next = torch.zeros((0,), dtype=torch.long, device=self.device)
        self._positions = torch.zeros((0,), dtype=torch.long, device=self.device)
        # Computing logits for the last position only saves a [B, L, V] tensor at prefill.
        self._cache_arg, self._logits_to_keep = model_call_options(model)

    def free_rows(self) -> int:
        """How many more rows may join now (0 while rows run in a cache that cannot be merged)."""
        if self.rows and not self._mergeable(self._cache):
            return 0
        return self.max_rows - len(self.rows)

    def admit(self, specs: Sequence[Row]) -> None:
        """Prefill new rows, choose their first token, and merge them into the running batch."""
        rows = rows_to_admit(self, specs)
        if not rows:
            return
        width = max(len(r.spec.prompt) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.spec.prompt)
            ids[i, width - n :] = torch.tensor(row.spec.prompt, dtype=torch.long)
            mask[i, width - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache)
        tokens, log_probs = choose_tokens(logits, rows)
        accept_tokens(rows, tokens, log_probs)
        self._merge(rows, cache, mask, tokens, positions[:, -1] + 1)
        self._drop_finished()

    def step(self) -> None:
        """Run one decode step for every running row."""
        self._drop_finished()
        if not self.rows or self._cache is None:
            return
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self._forward(self._next.unsqueeze(1), self._mask, self._positions.unsqueeze(1), self._cache)
        tokens, log_probs = choose_tokens(logits, self.rows)
        accept_tokens(self.rows, tokens, log_probs)
        self._next = tokens
        self._positions = self._positions + 1
        self._drop_finished()

    def reset(self) -> None:
        """Forget every row and the cache (after a failed step)."""
        self.rows = []
        self._cache = None
        self._mask = self._mask[:0, :0]
        self._next = self._next[:0]
        self._positions = self._positions[:0]

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """One model call; return the logits of each row's last position [B, V]."""
        kwargs: dict[str, Any] = {self._cache_arg: cache}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :]

    @staticmethod
    def _mergeable(cache: DynamicCache | None) -> bool:
        return cache is not None and _plain_layers(cache) is not None

    def _merge(
        self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, nxt: torch.Tensor, pos: torch.Tensor
    ) -> None:
        if self._cache is None or not self.rows:
            self.rows, self._cache, self._mask, self._next, self._positions = rows, cache, mask, nxt, pos
            return
        length = max(self._mask.shape[1], mask.shape[1])
        old_layers, new_layers = _plain_layers(self._cache), _plain_layers(cache)
        assert old_layers is not None and new_layers is not None
        for old, new in zip(old_layers, new_layers, strict=True):
            assert old.keys is not None and old.values is not None
            assert new.keys is not None and new.values is not None
            old.keys = torch.cat([_left_pad(old.keys, length, 2), _left_pad(new.keys, length, 2)])
            old.values = torch.cat([_left_pad(old.values, length, 2), _left_pad(new.values, length, 2)])
        self._mask = torch.cat([_left_pad(self._mask, length, 1), _left_pad(mask, length, 1)])
        self.rows = [*self.rows, *rows]
        self._next = torch.cat([self._next, nxt])
        self._positions = torch.cat([self._positions, pos])

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        index = torch.tensor(keep, device=self.device)
        self.rows = [self.rows[i] for i in keep]
        self._mask = self._mask.index_select(0, index)
        self._next = self._next.index_select(0, index)
        self._positions = self._positions.index_select(0, index)
        assert self._cache is not None
        self._cache.batch_select_indices(index)
        # Columns that only the departed rows used are padding for everyone left: cut them.
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0].item()) if used.numel() else 0
        layers = _plain_layers(self._cache)
        if start and layers is not None:
            self._mask = self._mask[:, start:]
            for layer in layers:
                assert layer.keys is not None and layer.values is not None
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]


def _plain_layers(cache: DynamicCache) -> list[DynamicLayer] | None:
    """The cache's layers when all are plain key/value tensors, else None.

    Those can be padded, concatenated and cut; sliding-window or other layer kinds keep state we would
    have to understand first, so their rows wait for an empty batch instead of joining a running one.
    """
    layers = list(cache.layers)
    if all(type(layer) is DynamicLayer for layer in layers):
        return cast(list[DynamicLayer], layers)
    return None


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` on the left of `dim` up to `length`."""
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    # F.pad lists (left, right) pairs from the last dimension backwards.
    pads = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pads)


def generate(
    model: PreTrainedModel, specs: Iterable[RowSpec], max_rows: int = 16, decoder: Decoder | None = None
) -> list[Row]:
    """Generate every row to its end in one batch and return them (the loop without a scheduler).

    `decoder` defaults to a `BatchDecoder` for `model`; pass another one (with room for every row) to
    run the same rows through it.
    """
    rows = [Row(spec, model.device) for spec in specs]
    if decoder is None:
        decoder = BatchDecoder(model, max_rows=max(max_rows, len(rows)))
    with torch.inference_mode():
        decoder.admit(rows)
        while decoder.rows:
            decoder.step()
    return rows


@dataclass
class Job:
    """The rows of one request, and how the scheduler reports back to whoever submitted them.

    `on_progress(job, final)` runs on the scheduler thread after each step that changed the job, with
    `final` on the last call; `on_error(job, message)` instead when the job failed.
    `is_cancelled()` is asked once per step while the job runs.
    """

    rows: list[Row]
    on_progress: Callable[[Job, bool], None]
    on_error: Callable[[Job, str], None]
    is_cancelled: Callable[[], bool] = lambda: False
    _seen: int = -1

    @property
    def done(self) -> bool:
        """True when every row stopped."""
        return all(row.done for row in self.rows)

    def progress(self) -> int:
        """A number that grows whenever a row of the job produced a token or stopped."""
        return sum(len(row.tokens) + (1 if row.done else 0) for row in self.rows)


class Scheduler:
    """One thread that runs a `Decoder` for queued jobs and reports their progress after every step."""

    def __init__(self, decoder: Decoder, name: str = "pilotfleet-decoder") -> None:
        """Prepare (not start) the scheduler; call `start()`."""
        self.decoder = decoder
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        """Start the decode thread."""
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; rows of one job always run together, so it must fit in the batch on its own."""
        if len(job.rows) > self.decoder.max_rows:
            raise ValueError(f"{len(job.rows)} rows exceed the batch limit of {self.decoder.max_rows}")
        with self._cond:
            if self._closing:
                raise RuntimeError("the scheduler is shut down")
            self._pending.append(job)
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what runs or waits, report it, and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _take(self) -> list[Job]:
        """Pending jobs that fit now, first come first served (called with the lock held)."""
        free = self.decoder.free_rows()
        taken: list[Job] = []
        while self._pending and len(self._pending[0].rows) <= free:
            job = self._pending.pop(0)
            free -= len(job.rows)
            taken.append(job)
        return taken

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._closing or self._pending or self._running):
                        self._cond.wait()
                    if self._closing:
                        self._cancel_all([*self._running, *self._pending])
                        return
                    new = self._take()
                try:
                    if new:
                        self._running.extend(new)
                        self.decoder.admit([row for job in new for row in job.rows])
                    else:
                        self.decoder.step()
                except Exception as exc:
                    log.exception("decode step failed; failing %d running jobs", len(self._running))
                    self.decoder.reset()
                    for job in self._running:
                        job.on_error(job, f"generation failed: {exc}")
                    self._running = []
                    continue
                self._report()

    def _report(self) -> None:
        still: list[Job] = []
        for job in self._running:
            if not job.done and job.is_cancelled():
                for row in job.rows:
                    if not row.done:
                        row.finish = Finish.CANCELLED
            progress = job.progress()
            if progress != job._seen or job.done:
                job._seen = progress
                job.on_progress(job, job.done)
            if not job.done:
                still.append(job)
        self._running = still

    @staticmethod
    def _cancel_all(jobs: Iterable[Job]) -> None:
        for job in jobs:
            for row in job.rows:
                if not row.done:
                    row.finish = Finish.CANCELLED
            job.on_progress(job, True)
