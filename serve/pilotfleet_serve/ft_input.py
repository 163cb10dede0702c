"""What reading FasterTransformer's input tensors needs without torch: its error and its word lists.

The Hugging Face backend (`ft.py`) and the testbed's echo models, which run where torch is absent,
check requests with the same code.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class FTInputError(ValueError):
    """The request's tensors are wrong; the client gets this message as a Triton error."""


def parse_word_list(words: npt.NDArray[np.int32]) -> tuple[tuple[int, ...], ...]:
    """Decode one row of FT's `stop_words_list` or `bad_words_list`: [2, N], ids then end offsets (-1 pad)."""
    if words.ndim != 2 or words.shape[0] != 2:
        raise FTInputError(f"word lists must have shape [2, N] per row, got {list(words.shape)}")
    ids, offsets = words[0].tolist(), words[1].tolist()
    result: list[tuple[int, ...]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        if end < start or end > len(ids):
            raise FTInputError(f"word list offset {end} is out of order or past its {len(ids)} ids")
        result.append(tuple(int(i) for i in ids[start:end]))
        start = end
    return tuple(result)
