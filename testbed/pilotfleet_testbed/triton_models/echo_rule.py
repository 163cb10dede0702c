"""The echo models' generation rule and FT tensor packing: pure numpy, shared by both models.

The rule (predictable by tests, and it exercises stop handling):

- generated token ``i`` is ``prompt[i % len(prompt)]``: the model cycles through the prompt's own ids;
- it generates ``request_output_len`` tokens, or none when the prompt is empty;
- it stops before emitting ``end_id`` (the end id is not part of the sequence, as in FT);
- it stops after a token that completes a stop word (the stop word stays in the sequence, as in FT);
  a stop word may start inside the prompt, because FT compares the tail of the whole sequence;
- the log probability of generated token ``t`` at step ``i`` is ``-ln(2 + (t + i) % 5)``: "the model"
  gave that token a probability of 1/2, 1/3, ... or 1/6.

Rows of a batch are independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pilotfleet_serve.ft_input import FTInputError, parse_word_list


@dataclass(frozen=True)
class EchoRow:
    """One row of an FT request, reduced to what the echo rule reads."""

    prompt: tuple[int, ...]
    output_len: int
    end_id: int | None = None
    stop_words: tuple[tuple[int, ...], ...] = field(default=())


def log_prob(token: int, step: int) -> float:
    """Return the log probability "the model" gives generated `token` at 0-based `step`."""
    return -math.log(2 + (token + step) % 5)


def generate(row: EchoRow) -> list[int]:
    """Return the ids the echo rule generates for `row` (without the prompt)."""
    prompt = row.prompt
    if not prompt:
        return []
    sequence = list(prompt)
    generated: list[int] = []
    for step in range(row.output_len):
        token = prompt[step % len(prompt)]
        if row.end_id is not None and token == row.end_id:
            break
        generated.append(token)
        sequence.append(token)
        if any(word and tuple(sequence[-len(word) :]) == word for word in row.stop_words):
            break
    return generated


def rows_from_tensors(
    input_ids: npt.NDArray[np.uint32],
    input_lengths: npt.NDArray[np.uint32],
    request_output_len: npt.NDArray[np.uint32],
    end_id: npt.NDArray[np.uint32] | None = None,
    stop_words_list: npt.NDArray[np.int32] | None = None,
    max_seq_len: int = 2048,
) -> list[EchoRow]:
    """Turn FT-shaped request tensors ([B, L], [B, 1], ...) into rows, checking them like FT would."""
    if input_ids.ndim != 2:
        raise FTInputError(f"input_ids must have shape [B, L], got {list(input_ids.shape)}")
    width = input_ids.shape[1]
    rows = []
    for b in range(input_ids.shape[0]):
        length = int(input_lengths[b].reshape(-1)[0])
        if length > width:
            raise FTInputError(f"input_lengths[{b}] = {length} exceeds input_ids width {width}")
        output_len = int(request_output_len[b].reshape(-1)[0])
        if length + output_len > max_seq_len:
            raise FTInputError(
                f"row {b}: prompt ({length}) + request_output_len ({output_len}) "
                f"exceeds max_seq_len {max_seq_len}"
            )
        rows.append(
            EchoRow(
                prompt=tuple(int(t) for t in input_ids[b, :length]),
                output_len=output_len,
                end_id=None if end_id is None else int(end_id[b].reshape(-1)[0]),
                stop_words=() if stop_words_list is None else parse_word_list(stop_words_list[b]),
            )
        )
    return rows


def ft_outputs(
    rows: Sequence[EchoRow],
    generations: Sequence[Sequence[int]],
    steps: int,
    width: int,
    log_probs: bool,
) -> dict[str, npt.NDArray[np.generic]]:
    """Pack FT's output tensors showing the first `steps` generated ids of every row.

    `output_ids` is [B, 1, width + steps]: each row's real prompt, then its generated ids, then padding
    (the row's end id, else 0); `sequence_length` counts the valid part. With `log_probs`, also
    `output_log_probs` [B, 1, steps] (0 past a row's end) and `cum_log_probs` [B, 1].
    """
    batch = len(rows)
    output_ids = np.zeros((batch, 1, width + steps), dtype=np.uint32)
    sequence_length = np.zeros((batch, 1), dtype=np.uint32)
    output_log_probs = np.zeros((batch, 1, steps), dtype=np.float32)
    for b, (row, generated) in enumerate(zip(rows, generations, strict=True)):
        shown = list(generated[:steps])
        valid = [*row.prompt, *shown]
        if row.end_id is not None:
            output_ids[b, 0, :] = row.end_id
        output_ids[b, 0, : len(valid)] = valid
        sequence_length[b, 0] = len(valid)
        output_log_probs[b, 0, : len(shown)] = [log_prob(t, i) for i, t in enumerate(shown)]
    outputs: dict[str, npt.NDArray[np.generic]] = {
        "output_ids": output_ids,
        "sequence_length": sequence_length,
    }
    if log_probs:
        outputs["output_log_probs"] = output_log_probs
        outputs["cum_log_probs"] = output_log_probs.sum(axis=2, dtype=np.float32)
    return outputs
