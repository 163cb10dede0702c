"""The fast decode path (issue #7): batch slots in a preallocated KV cache, steps replayed as CUDA graphs.

Plain `generate()` spends most of a decode step in Python launching a few hundred small kernels; on a GPU
the weights are read in a fraction of that time. Here every running row owns a slot of one preallocated
key/value cache and keeps its own positions, so a decode step has the same shapes step after step: on a
GPU it is captured once per (batch bucket, attention window) as a CUDA graph and then replayed, with the
next token ids and positions living in device buffers the graph reads. Per step the host only chooses
tokens (on the device) and copies the chosen ids back once, which streaming needs anyway.

- Rows join the lowest free slots (their prompts are prefilled together, right-padded) and leave when
  they finish; a step runs the smallest batch bucket (1, 2, 4, 8, ...) that covers the highest busy slot.
  Free slots inside it compute rows nobody reads.
- A step attends over the smallest window (64, 128, 256, ...) that covers the longest row, not over the
  whole cache, so short rows do not pay for the longest context the cache could hold.
- The cache grows (slots and length, by doubling) only when a row needs more, so memory follows use; a
  growth drops the captured graphs, which are captured again on first use.
- On a CPU the same code runs the same steps without graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from pilotfleet_serve.generation import (
    BatchDecoder,
    Decoder,
    Row,
    accept_tokens,
    choose_tokens,
    model_call_options,
    rows_to_admit,
)

log = logging.getLogger(__name__)

# The smallest attention window a decode step uses: below it, more graphs would buy no speed.
MIN_WINDOW = 64


def bucket(n: int, limit: int, floor: int = 1) -> int:
    """The smallest power of two >= max(n, floor), capped at `limit`."""
    size = floor
    while size < n:
        size *= 2
    return min(size, limit)


class SlotCache:
    """Keys and values [slots, heads, length, head_dim] per layer, written in place at each row's own columns.

    The model gets it as its cache object: each attention layer calls `update()`, which writes the new
    keys and values of input row i at slot `slots[i]`, columns `columns[i]`, and returns what the layer
    attends to: during a prefill (`window` None) only the new states, since a new row's prompt attends to
    itself alone; during a decode step (rows are slots 0..n-1) the first `window` columns of those slots.
    The decoder sets `slots`, `columns` and `window` before each model call.
    """

    def __init__(self) -> None:
        """An empty cache; layers are allocated on their first update, at the reserved capacity."""
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.capacity = (1, MIN_WINDOW)
        self.slots = torch.zeros(0, dtype=torch.long)
        self.columns = torch.zeros((0, 0), dtype=torch.long)
        self.window: int | None = None

    def reserve(self, slots: int, length: int) -> bool:
        """Make room for `slots` slots of `length` columns; True when the tensors moved (graphs are stale)."""
        old_slots, old_length = self.capacity
        if slots <= old_slots and length <= old_length:
            return False
        self.capacity = (max(slots, old_slots), max(length, old_length))
        for layers in (self.keys, self.values):
            for i, old in enumerate(layers):
                grown = old.new_zeros((self.capacity[0], old.shape[1], self.capacity[1], old.shape[3]))
                grown[:old_slots, :, :old_length] = old
                layers[i] = grown
        return bool(self.keys)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new keys and values [n, heads, q, head_dim]; return what the layer attends to."""
        if layer_idx == len(self.keys):
            for layers, states in ((self.keys, key_states), (self.values, value_states)):
                heads, dim = states.shape[1], states.shape[3]
                layers.append(states.new_zeros((self.capacity[0], heads, self.capacity[1], dim)))
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # Two index tensors split by a slice: the indexed view is [n, q, heads, head_dim].
        where = (self.slots.unsqueeze(1), slice(None), self.columns)
        keys[where] = key_states.transpose(1, 2)
        values[where] = value_states.transpose(1, 2)
        if self.window is None:
            return key_states, value_states
        n = key_states.shape[0]
        return keys[:n, :, : self.window], values[:n, :, : self.window]


def supports_static_decode(model: PreTrainedModel) -> bool:
    """True for models whose every layer attends over the whole sequence (no sliding windows, no state).

    Those only need keys and values written at a position and an explicit mask, which `SlotCache` and
    the decoder provide; other layer kinds keep state the slot cache does not model.
    """
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "sliding_window", None):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(kind == "full_attention" for kind in layer_types)


class StaticBatchDecoder:
    """A `Decoder` over fixed slots of a `SlotCache`, its decode steps replayed as CUDA graphs on a GPU."""

    def __init__(
        self,
        model: PreTrainedModel,
        max_rows: int = 16,
        max_len: int | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        """Wrap a loaded causal LM (on its device, in eval mode).

        `max_len` bounds prompt plus generated tokens per row (default and cap: the model's
        `max_position_embeddings`); `cuda_graphs` defaults to True on a CUDA device.
        """
        self.model = model
        self.device = model.device
        self.max_rows = max_rows
        limits = [n for n in (max_len, getattr(model.config, "max_position_embeddings", None)) if n]
        if not limits:
            raise ValueError("max_len is needed: the model's config has no max_position_embeddings")
        self.max_len = int(min(limits))
        self.rows: list[Row] = []
        self._slots: list[int] = []  # the slot of each row in `rows`
        self._lengths = [0] * max_rows  # per busy slot: the position of the token it feeds next
        self._cache = SlotCache()
        # What a decode step reads, per slot: the token to feed and its position (also its cache column).
        self._ids = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self._slot_index = torch.arange(max_rows, device=self.device)
        self._column_index = torch.arange(self.max_len, device=self.device)
        self._active = torch.zeros(0, dtype=torch.long, device=self.device)
        self._logits: torch.Tensor | None = None  # [max_rows, V]: each step's logits land here
        self._cache_arg, self._logits_to_keep = model_call_options(model)
        self._mask_min = torch.finfo(model.dtype).min
        self._use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool: Any = None

    def free_rows(self) -> int:
        """How many more rows may join now."""
        return self.max_rows - len(self.rows)

    def admit(self, specs: Sequence[Row]) -> None:
        """Prefill new rows into free slots, choose their first token, and add them to the running batch."""
        rows = rows_to_admit(self, specs)
        if not rows:
            return
        for row in rows:
            need = len(row.spec.prompt) + row.spec.max_new_tokens - 1
            if not row.spec.prompt or need > self.max_len:
                raise ValueError(
                    f"a row of {len(row.spec.prompt)} + {row.spec.max_new_tokens} tokens does not fit"
                )
        busy = set(self._slots)
        slots = [s for s in range(self.max_rows) if s not in busy][: len(rows)]
        lengths = [len(row.spec.prompt) for row in rows]
        width = max(lengths)
        with torch.inference_mode():
            self._reserve(bucket(max(slots) + 1, self.max_rows), bucket(width, self.max_len, MIN_WINDOW))
            logits = self._prefill(rows, slots, lengths, width)
            if self._logits is None:
                self._logits = logits.new_zeros((self.max_rows, logits.shape[-1]), dtype=torch.float32)
            tokens, log_probs = choose_tokens(logits, rows)
            index = torch.tensor(slots, device=self.device)
            self._ids.index_copy_(0, index, tokens)
            self._positions.index_copy_(0, index, torch.tensor(lengths, device=self.device))
            accept_tokens(rows, tokens, log_probs)
        for slot, length in zip(slots, lengths, strict=True):
            self._lengths[slot] = length
        self.rows.extend(rows)
        self._slots.extend(slots)
        self._active = torch.tensor(self._slots, device=self.device)
        self._drop_finished()

    def step(self) -> None:
        """Run one decode step for every running row."""
        self._drop_finished()
        if not self.rows:
            return
        batch = bucket(max(self._slots) + 1, self.max_rows)
        window = bucket(max(self._lengths[s] for s in self._slots) + 1, self.max_len, MIN_WINDOW)
        with torch.inference_mode():
            self._reserve(batch, window)
            logits = self._decode(batch, window).index_select(0, self._active)
            tokens, log_probs = choose_tokens(logits, self.rows)
            self._ids.index_copy_(0, self._active, tokens)
            self._positions.index_add_(0, self._active, torch.ones_like(tokens))
            accept_tokens(self.rows, tokens, log_probs)
        for slot in self._slots:
            self._lengths[slot] += 1
        self._drop_finished()

    def reset(self) -> None:
        """Forget every row (after a failed step); the cache and the captured graphs stay."""
        self.rows, self._slots = [], []
        self._lengths = [0] * self.max_rows
        self._active = self._active[:0]
        with torch.inference_mode():
            self._positions.zero_()

    def _call(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: Any
    ) -> torch.Tensor:
        """One model call with the slot cache; the logits it returns."""
        kwargs: dict[str, Any] = {self._cache_arg: self._cache}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits

    def _prefill(self, rows: list[Row], slots: list[int], lengths: list[int], width: int) -> torch.Tensor:
        """Run the new rows' prompts (right-padded to `width`) into their slots; their last logits [n, V]."""
        n = len(rows)
        ids = torch.zeros((n, width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : lengths[i]] = torch.tensor(row.spec.prompt, dtype=torch.long)
        columns = self._column_index[:width]
        last = torch.tensor(lengths, device=self.device) - 1
        # Row i, query r sees columns c <= r of its prompt; pad queries see the prompt, so none sees nothing.
        seen = (columns.unsqueeze(0) <= columns.unsqueeze(1)).unsqueeze(0) & (
            columns.view(1, 1, width) <= last.view(n, 1, 1)
        )
        mask = self._mask(seen.unsqueeze(1))
        self._cache.slots = torch.tensor(slots, device=self.device)
        self._cache.columns = columns.expand(n, width)
        self._cache.window = None
        logits = self._call(ids.to(self.device), mask, columns.expand(n, width), last)
        rows_index = torch.arange(n, device=self.device)
        if self._logits_to_keep:
            # logits_to_keep=last keeps those positions for every row: row i wants its own, the diagonal.
            return logits[rows_index, rows_index]
        return logits[rows_index, last]

    def _mask(self, seen: torch.Tensor) -> torch.Tensor:
        """An additive attention mask in the model's dtype: 0 where `seen`, the dtype's minimum elsewhere."""
        zeros = torch.zeros(seen.shape, dtype=self.model.dtype, device=self.device)
        return zeros.masked_fill(~seen, self._mask_min)

    def _decode_eager(self, batch: int, window: int) -> torch.Tensor:
        """One decode step for slots 0..batch-1, attending over `window` columns; logits land in `_logits`."""
        assert self._logits is not None
        positions = self._positions[:batch].unsqueeze(1)
        self._cache.slots = self._slot_index[:batch]
        self._cache.columns = positions
        self._cache.window = window
        mask = self._mask((self._column_index[:window].unsqueeze(0) <= positions).view(batch, 1, 1, window))
        logits = self._call(self._ids[:batch].unsqueeze(1), mask, positions, 1)
        self._logits[:batch].copy_(logits[:, -1])
        return self._logits[:batch]

    def _decode(self, batch: int, window: int) -> torch.Tensor:
        """The decode step: a graph replay when one is (or can be) captured for this shape, else eager."""
        if not self._use_graphs:
            return self._decode_eager(batch, window)
        graph = self._graphs.get((batch, window))
        if graph is None:
            try:
                graph = self._capture(batch, window)
            except Exception:
                # Whatever the model does that a graph cannot hold, it still runs eagerly.
                log.warning("CUDA graph capture failed; decoding without graphs", exc_info=True)
                self._use_graphs = False
                return self._decode_eager(batch, window)
        graph.replay()
        assert self._logits is not None
        return self._logits[:batch]

    def _capture(self, batch: int, window: int) -> torch.cuda.CUDAGraph:
        """Capture the decode step for this shape (all graphs share one memory pool; they never overlap)."""
        # Warm-up on a side stream (as graph capture requires). It runs the real current step, so the
        # keys and values it writes are the ones the replay right after writes again.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._decode_eager(batch, window)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._decode_eager(batch, window)
        self._graphs[(batch, window)] = graph
        log.info("captured the decode step for batch %d, window %d", batch, window)
        return graph

    def _reserve(self, slots: int, length: int) -> None:
        if self._cache.reserve(slots, length):
            self._graphs.clear()
            self._pool = None

    def _drop_finished(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        freed = [s for i, s in enumerate(self._slots) if i not in keep]
        self.rows = [self.rows[i] for i in keep]
        self._slots = [self._slots[i] for i in keep]
        with torch.inference_mode():
            # A free slot inside a batch bucket still runs: position 0 keeps its writes at column 0.
            self._positions.index_fill_(0, torch.tensor(freed, device=self.device), 0)
        self._active = torch.tensor(self._slots, dtype=torch.long, device=self.device)


def make_decoder(model: PreTrainedModel, max_rows: int = 16, max_len: int | None = None) -> Decoder:
    """The fastest decoder that handles `model`: `StaticBatchDecoder`, else the dynamic `BatchDecoder`."""
    if supports_static_decode(model):
        return StaticBatchDecoder(model, max_rows=max_rows, max_len=max_len)
    log.info("%s has layers the slot cache does not model; using the dynamic cache", type(model).__name__)
    return BatchDecoder(model, max_rows=max_rows)
