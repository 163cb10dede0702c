"""FasterTransformer's tensor interface (docs/architecture.md) for our Hugging Face backend, as plain numpy.

`rows_from_inputs` turns one Triton request's FT input tensors ([B, ...]) into `RowSpec`s, checking them
as FT does; `pack_outputs` turns the rows back into FT's output tensors. No Triton import here, so both
are unit tested directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from pilotfleet_serve.ft_input import FTInputError, parse_word_list
from pilotfleet_serve.generation import Row, RowSpec, Sampling

# Reads one optional input tensor of the request by name (None when the client did not send it).
InputGetter = Callable[[str], npt.NDArray[Any] | None]


def _per_row(value: npt.NDArray[Any] | None, b: int) -> Any:
    """Row `b`'s scalar of a [B, 1] input, or None when the input is absent."""
    return None if value is None else value[b].reshape(-1)[0].item()


def rows_from_inputs(get: InputGetter, max_seq_len: int, default_end_id: int | None) -> list[RowSpec]:
    """Read one request's FT inputs (via `get`) into one `RowSpec` per batch row."""
    input_ids, input_lengths, output_len = get("input_ids"), get("input_lengths"), get("request_output_len")
    if input_ids is None or input_lengths is None or output_len is None:
        raise FTInputError("input_ids, input_lengths and request_output_len are required")
    if input_ids.ndim != 2:
        raise FTInputError(f"input_ids must have shape [B, L], got {list(input_ids.shape)}")
    beam_width = get("beam_width")
    if beam_width is not None and int(beam_width.max()) > 1:
        raise FTInputError("beam search is not supported: beam_width must be 1")
    optional = {
        name: get(name)
        for name in (
            "end_id",
            "runtime_top_k",
            "runtime_top_p",
            "temperature",
            "repetition_penalty",
            "presence_penalty",
            "random_seed",
        )
    }
    stop_words, bad_words = get("stop_words_list"), get("bad_words_list")
    width = input_ids.shape[1]
    specs = []
    for b in range(input_ids.shape[0]):
        length = int(_per_row(input_lengths, b))
        if not 0 < length <= width:
            raise FTInputError(f"input_lengths[{b}] = {length} must be in 1..{width} (the input_ids width)")
        new_tokens = int(_per_row(output_len, b))
        if length + new_tokens > max_seq_len:
            raise FTInputError(
                f"row {b}: prompt ({length}) + request_output_len ({new_tokens}) "
                f"exceeds max_seq_len {max_seq_len}"
            )
        end_id = _per_row(optional["end_id"], b)
        top_p = _per_row(optional["runtime_top_p"], b)
        temperature = _per_row(optional["temperature"], b)
        rep = _per_row(optional["repetition_penalty"], b)
        top_k = _per_row(optional["runtime_top_k"], b)
        # FT's defaults: top_k 1 and top_p 0, and top_k 0 with top_p 0 also means greedy (top_k 1).
        if not top_k and not top_p:
            top_k = 1
        sampling = Sampling(
            temperature=1.0 if temperature is None else float(temperature),
            top_k=int(top_k or 0),
            top_p=float(top_p) if top_p else 1.0,
            seed=_per_row(optional["random_seed"], b),
            repetition_penalty=1.0 if not rep else float(rep),
            presence_penalty=float(_per_row(optional["presence_penalty"], b) or 0.0),
        )
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1 or sampling.repetition_penalty <= 0:
            raise FTInputError(f"row {b}: temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0 needed")
        specs.append(
            RowSpec(
                prompt=tuple(int(t) for t in input_ids[b, :length]),
                max_new_tokens=new_tokens,
                end_id=default_end_id if end_id is None else int(end_id),
                stop_words=() if stop_words is None else parse_word_list(stop_words[b]),
                bad_words=() if bad_words is None else parse_word_list(bad_words[b]),
                sampling=sampling,
            )
        )
    return specs


def pack_outputs(rows: Sequence[Row], width: int, log_probs: bool) -> dict[str, npt.NDArray[Any]]:
    """FT's output tensors for the rows of one request, showing what they generated so far.

    `output_ids` is [B, 1, width + steps] (steps: the most any row generated): each row's prompt, its
    generated ids, then padding with its end id (else 0); `sequence_length` [B, 1] counts the valid part.
    With `log_probs` also `output_log_probs` [B, 1, steps] (0 past a row's end) and `cum_log_probs` [B, 1].
    """
    steps = max((len(row.tokens) for row in rows), default=0)
    batch = len(rows)
    output_ids = np.zeros((batch, 1, width + steps), dtype=np.uint32)
    sequence_length = np.zeros((batch, 1), dtype=np.uint32)
    output_log_probs = np.zeros((batch, 1, steps), dtype=np.float32)
    for b, row in enumerate(rows):
        valid = row.history()
        if row.spec.end_id is not None:
            output_ids[b, 0, :] = row.spec.end_id
        output_ids[b, 0, : len(valid)] = valid
        sequence_length[b, 0] = len(valid)
        output_log_probs[b, 0, : len(row.log_probs)] = row.log_probs
    outputs: dict[str, npt.NDArray[Any]] = {"output_ids": output_ids, "sequence_length": sequence_length}
    if log_probs:
        outputs["output_log_probs"] = output_log_probs
        outputs["cum_log_probs"] = output_log_probs.sum(axis=2, dtype=np.float32)
    return outputs
