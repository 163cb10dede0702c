"""A real GPT-2 tokenizer offline: tiktoken's BPE ranks from the openai-whisper sdist, as a HF tokenizer.json.

The `openai-whisper` sdist ships `whisper/assets/gpt2.tiktoken` (tiktoken's r50k_base ranks). Hugging Face
`tokenizers` needs a vocabulary of byte-level unicode strings plus an ordered merge list, so the merges are
recovered from the ranks: every token of two or more bytes was made by exactly one merge, the one BPE finds
when only lower-ranked tokens may be used. The result encodes to the same ids as tiktoken.
"""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pilotfleet_serve.cache import cache_dir

log = logging.getLogger(__name__)

WHISPER_SDIST = "openai-whisper==20250625"
RANKS_MEMBER_SUFFIX = "whisper/assets/gpt2.tiktoken"
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
# GPT-2's pre-tokenizer pattern; HF's ByteLevel pre-tokenizer applies the same one with use_regex.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_to_unicode() -> dict[int, str]:
    """Return GPT-2's reversible map from each byte to a printable unicode character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            # Unprintable bytes move past the byte range so every byte gets a visible stand-in.
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def read_ranks(path: Path) -> dict[bytes, int]:
    """Parse a `.tiktoken` file: one `<base64 token bytes> <rank>` pair per line."""
    ranks: dict[bytes, int] = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run BPE on `token` with only tokens ranked below it; what remains is the pair that forms it."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank = limit
        best_index = -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_index = rank, i
        if best_index < 0:
            raise ValueError(f"token {token!r} (rank {limit}) is not reachable by merging lower ranks")
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts[0], parts[1]


def tokenizer_json_from_ranks(ranks: dict[bytes, int]) -> dict[str, object]:
    """Build a HF `tokenizers` ByteLevel BPE tokenizer (as the tokenizer.json dict) from tiktoken ranks."""
    to_unicode = byte_to_unicode()

    def visible(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {visible(token): rank for token, rank in ranks.items()}
    merges: list[list[str]] = []
    for token, _rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _split_by_lower_ranks(token, ranks)
            merges.append([visible(left), visible(right)])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": END_OF_TEXT_ID,
                "content": END_OF_TEXT,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {**vocab, END_OF_TEXT: END_OF_TEXT_ID},
            "merges": merges,
        },
    }


def _write_atomically(target: Path, data: bytes) -> None:
    """Write through a unique temporary file and rename: concurrent test runs may build the same file."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name, delete=False) as out:
        out.write(data)
    Path(out.name).replace(target)


def gpt2_ranks_file() -> Path:
    """Return the cached `gpt2.tiktoken`, fetching the openai-whisper sdist with pip the first time."""
    target = cache_dir() / "tokenizers" / "gpt2.tiktoken"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        result = subprocess.run(
            [*command, "-d", tmp, WHISPER_SDIST], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"pip download {WHISPER_SDIST} failed:\n{result.stderr[-2000:]}")
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if len(sdists) != 1:
            raise RuntimeError(f"expected one sdist from pip download {WHISPER_SDIST}, got {sdists}")
        with tarfile.open(sdists[0]) as archive:
            member = next((m for m in archive.getmembers() if m.name.endswith(RANKS_MEMBER_SUFFIX)), None)
            handle = archive.extractfile(member) if member else None
            if handle is None:
                raise RuntimeError(f"{sdists[0].name} has no {RANKS_MEMBER_SUFFIX}")
            _write_atomically(target, handle.read())
    log.info("cached GPT-2 BPE ranks at %s", target)
    return target


def gpt2_tokenizer_json() -> Path:
    """Return a cached HF tokenizer.json for GPT-2 (ids equal to tiktoken's r50k_base), building it once."""
    target = cache_dir() / "tokenizers" / "gpt2" / "tokenizer.json"
    if target.exists():
        return target
    ranks = read_ranks(gpt2_ranks_file())
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, json.dumps(tokenizer_json_from_ranks(ranks), ensure_ascii=False).encode())
    log.info("built GPT-2 tokenizer.json at %s", target)
    return target
