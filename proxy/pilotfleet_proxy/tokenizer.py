"""Per-model tokenizers from the model's own artifacts (a HF tokenizer.json), and streaming detokenization."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import tokenizers

from pilotfleet_proxy.routes import TRITON_TOKENIZER_SCHEME

log = logging.getLogger(__name__)


class Tokenizer:
    """A model's tokenizer: text <-> token ids, without adding special tokens the client did not write."""

    def __init__(self, inner: tokenizers.Tokenizer, source: str) -> None:
        self.inner = inner
        self.source = source

    @classmethod
    def from_json(cls, data: str, source: str) -> Tokenizer:
        """Build from the text of a tokenizer.json."""
        return cls(tokenizers.Tokenizer.from_str(data), source)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens spelled in the text (e.g. FIM markers) are recognized."""
        return list(self.inner.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, without special tokens."""
        return str(self.inner.decode(list(ids), skip_special_tokens=True))


async def load_tokenizer(spec: str, fetch_from_triton: Callable[[str], Awaitable[bytes]]) -> Tokenizer:
    """Load the tokenizer a route names: a tokenizer.json path, or `triton://<model>` served by Triton."""
    if spec.startswith(TRITON_TOKENIZER_SCHEME):
        model = spec.removeprefix(TRITON_TOKENIZER_SCHEME)
        data = (await fetch_from_triton(model)).decode()
    else:
        data = Path(spec).read_text()
    tokenizer = Tokenizer.from_json(data, spec)
    log.info("loaded tokenizer %s (%d tokens)", spec, tokenizer.inner.get_vocab_size())
    return tokenizer


class Detokenizer:
    """Turn a growing list of generated ids into text, one stable piece at a time.

    Decoding token by token breaks characters split over several byte-level tokens and drops the
    leading spaces some decoders strip at the start of a sequence. So each step decodes a window that
    starts one already-decoded stretch back, and only text that no later token can change is released.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (may be empty while a character is unfinished)."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
        window = self.tokenizer.decode(self.ids[self._prefix_offset :])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return window[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text of ids still held back (an unfinished character at the very end), when nothing follows."""
        prefix = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
        window = self.tokenizer.decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return window[len(prefix) :]
