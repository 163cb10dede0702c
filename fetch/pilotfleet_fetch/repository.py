"""Lay out the Triton model repository from a verified checkpoint (inside the staging area).

FT: `<name>/config.pbtxt` rendered from the checkpoint's config.ini and the spec, weights in
`<name>/1/<tp>-gpu/` (FauxPilot's layout; `model_checkpoint_path` points there as Triton will see it).
Hugging Face: pilotfleet's Python-backend model (`pilotfleet_serve.repository`), weights in `<name>/1/hf/`.
Tokenizer files go to `<name>/1/tokenizer/`, inside the version folder where Triton never looks for models.
With `RepositorySpec.tokenizer_model`, a tiny Python-backend model of that name serves `tokenizer.json` to
the proxy (routes with `tokenizer: triton://<name>`), so the published folder is the whole Triton model
repository and this module is its only writer.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pilotfleet_fetch.verify import FtCheckpoint

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


@dataclass(frozen=True)
class RepositorySpec:
    """What the CodeCompletionModel spec says about the Triton model."""

    model_name: str = "fastertransformer"
    tp: int = 1
    serve_path: Path = Path("/models")
    """Where Triton sees the published directory (the PVC mount path in the Triton pod)."""
    max_seq_len: int = 2048
    max_batch_size: int = 1024
    decoupled: bool = False
    dtype: str = "auto"
    """Torch dtype of the Python backend (`auto`, `float16`, `bfloat16`, `float32`)."""
    tokenizer_model: str | None = None
    """Name of the Triton model that serves tokenizer.json to the proxy; none when unset."""


def _param(key: str, value: object) -> str:
    return f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'


_FT_TENSORS = """\
input [
  { name: "input_ids" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "input_lengths" data_type: TYPE_UINT32 dims: [ 1 ] },
  { name: "request_output_len" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "start_id" data_type: TYPE_UINT32 dims: [ 1 ] optional: true },
  { name: "end_id" data_type: TYPE_UINT32 dims: [ 1 ] optional: true },
  { name: "runtime_top_k" data_type: TYPE_UINT32 dims: [ 1 ] optional: true },
  { name: "runtime_top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "beam_search_diversity_rate" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "len_penalty" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "repetition_penalty" data_type: TYPE_FP32 dims: [ 1 ] optional: true },
  { name: "random_seed" data_type: TYPE_UINT64 dims: [ 1 ] optional: true },
  { name: "is_return_log_probs" data_type: TYPE_BOOL dims: [ 1 ] optional: true },
  { name: "beam_width" data_type: TYPE_UINT32 dims: [ 1 ] optional: true },
  { name: "bad_words_list" data_type: TYPE_INT32 dims: [ 2, -1 ] optional: true },
  { name: "stop_words_list" data_type: TYPE_INT32 dims: [ 2, -1 ] optional: true }
]
output [
  { name: "output_ids" data_type: TYPE_UINT32 dims: [ -1, -1 ] },
  { name: "sequence_length" data_type: TYPE_UINT32 dims: [ -1 ] },
  { name: "cum_log_probs" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "output_log_probs" data_type: TYPE_FP32 dims: [ -1, -1 ] }
]
"""


def ft_config_pbtxt(ckpt: FtCheckpoint, spec: RepositorySpec) -> str:
    """FT's Triton config for the GPT-J checkpoint; hyper-parameters come from its config.ini."""
    cfg = ckpt.config
    checkpoint_path = spec.serve_path / spec.model_name / "1" / f"{spec.tp}-gpu"
    params = [
        ("tensor_para_size", spec.tp),
        ("pipeline_para_size", 1),
        ("max_seq_len", spec.max_seq_len),
        ("is_half", 1 if cfg.weight_data_type in ("fp16", "bf16") else 0),
        ("head_num", cfg.head_num),
        ("size_per_head", cfg.size_per_head),
        ("inter_size", cfg.inter_size),
        ("vocab_size", cfg.vocab_size),
        ("start_id", cfg.start_id),
        ("end_id", cfg.end_id),
        ("decoder_layers", cfg.num_layer),
        ("model_name", cfg.model_name),
        ("rotary_embedding", cfg.rotary_embedding),
        ("model_type", "GPT-J"),
        ("model_checkpoint_path", checkpoint_path),
        ("enable_custom_all_reduce", 0),
    ]
    lines = [
        f'name: "{spec.model_name}"',
        'backend: "fastertransformer"',
        f'default_model_filename: "{spec.model_name}"',
        f"max_batch_size: {spec.max_batch_size}",
        f"model_transaction_policy {{ decoupled: {'true' if spec.decoupled else 'false'} }}",
        _FT_TENSORS.rstrip("\n"),
        # FT places its own work on the GPUs; Triton's instance is a CPU-side handle.
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
        *(_param(key, value) for key, value in params),
    ]
    return "\n".join(lines) + "\n"


def _move(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def place_tokenizer(files: list[Path], model_dir: Path) -> Path | None:
    """Copy tokenizer files into `<model>/1/tokenizer/`; return that folder, or None when there are none."""
    wanted = [f for f in files if f.name in TOKENIZER_FILES]
    if not wanted:
        return None
    folder = model_dir / "1" / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for src in wanted:
        shutil.copyfile(src, folder / src.name)
    return folder


def write_ft_repository(repo: Path, ckpt: FtCheckpoint, spec: RepositorySpec) -> Path:
    """Move the checkpoint into `repo/<name>/1/<tp>-gpu/` and write config.pbtxt; return the model folder."""
    model_dir = repo / spec.model_name
    _move(ckpt.directory, model_dir / "1" / f"{spec.tp}-gpu")
    (model_dir / "config.pbtxt").write_text(ft_config_pbtxt(ckpt, spec))
    return model_dir


def write_hf_repository(repo: Path, checkpoint: Path, spec: RepositorySpec) -> Path:
    """Move the HF checkpoint into `repo/<name>/1/hf/` beside pilotfleet's Python-backend model."""
    from pilotfleet_serve.repository import HFModelConfig, write_hf_model

    model_dir = repo / spec.model_name
    _move(checkpoint, model_dir / "1" / "hf")
    serve_dir = spec.serve_path / spec.model_name / "1" / "hf"
    write_hf_model(
        repo,
        HFModelConfig(
            name=spec.model_name,
            model_dir=serve_dir,
            decoupled=spec.decoupled,
            max_seq_len=spec.max_seq_len,
            dtype=spec.dtype,
            gpu=spec.tp > 0,
        ),
    )
    return model_dir


def tokenizer_model_config(name: str, tokenizer_json: Path) -> str:
    """config.pbtxt of the tokenizer model: no required input, output `tokenizer_json` (BYTES [1])."""
    return (
        "\n".join(
            [
                f'name: "{name}"',
                'backend: "python"',
                "max_batch_size: 0",
                'input [ { name: "request" data_type: TYPE_BOOL dims: [ 1 ] optional: true } ]',
                'output [ { name: "tokenizer_json" data_type: TYPE_STRING dims: [ 1 ] } ]',
                "instance_group [ { count: 1 kind: KIND_CPU } ]",
                _param("tokenizer_path", tokenizer_json),
            ]
        )
        + "\n"
    )


def write_tokenizer_model(repo: Path, name: str, tokenizer_json: Path) -> Path:
    """Write `<repo>/<name>/` serving the file `tokenizer_json` (the path as Triton sees it); return it."""
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(tokenizer_model_config(name, tokenizer_json))
    source = resources.files("pilotfleet_fetch").joinpath("tokenizer_model.py")
    (folder / "1" / "model.py").write_text(source.read_text())
    return folder
