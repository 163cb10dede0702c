"""Write Triton model folders for the Hugging Face backend (`hf_model/`) into a model repository."""

from __future__ import annotations

import shutil
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_PACKAGE = "pilotfleet_serve.hf_model"


@dataclass(frozen=True)
class HFModelConfig:
    """One Triton model serving a Hugging Face causal-LM directory (config.json, safetensors, tokenizer)."""

    name: str
    model_dir: Path
    decoupled: bool
    max_seq_len: int = 2048
    # Triton's bound on the rows of one request (n completions per prompt travel as rows).
    max_batch_size: int = 16
    # Rows decoded together across requests; more wait for a free slot.
    max_batch_rows: int = 16
    dtype: str = "auto"
    torch_threads: int = 0
    gpu: bool = False


def config_pbtxt(model: HFModelConfig) -> str:
    """Return the model's config.pbtxt, the package's template filled in."""
    template = string.Template(resources.files(_PACKAGE).joinpath("config.pbtxt").read_text())
    return template.substitute(
        name=model.name,
        max_batch_size=model.max_batch_size,
        decoupled="true" if model.decoupled else "false",
        instance_kind="KIND_GPU" if model.gpu else "KIND_CPU",
        model_dir=str(model.model_dir.resolve()),
        max_seq_len=model.max_seq_len,
        max_batch_rows=model.max_batch_rows,
        dtype=model.dtype,
        torch_threads=model.torch_threads,
    )


def write_hf_model(repo: Path, model: HFModelConfig) -> Path:
    """Write `<repo>/<name>/config.pbtxt` and `<repo>/<name>/1/model.py`; return the model folder."""
    folder = repo / model.name
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(config_pbtxt(model))
    with resources.as_file(resources.files(_PACKAGE).joinpath("model.py")) as source:
        shutil.copyfile(source, version / "model.py")
    return folder
