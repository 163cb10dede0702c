"""Check that a downloaded tree holds what the backend will load, before anything is published.

FasterTransformer (GPT-J layout, as FauxPilot's converter writes it): a `<tp>-gpu/config.ini` and, for every
layer and every tensor-parallel rank, the split weight files at the sizes the config implies.
Hugging Face: `config.json` plus every safetensors shard (the index's, or all of them), each with a
well-formed header whose tensors end exactly at the end of the file (a truncated shard fails).
"""

from __future__ import annotations

import configparser
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from pilotfleet_fetch.errors import BadCheckpoint, MissingShard

log = logging.getLogger(__name__)

_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_MAX_SAFETENSORS_HEADER = 100 << 20


@dataclass(frozen=True)
class FtConfig:
    """The GPT-J hyper-parameters FT's Triton config needs, read from config.ini."""

    head_num: int
    size_per_head: int
    inter_size: int
    num_layer: int
    rotary_embedding: int
    vocab_size: int
    start_id: int
    end_id: int
    weight_data_type: str
    model_name: str

    @property
    def hidden(self) -> int:
        """Model width (heads times head size)."""
        return self.head_num * self.size_per_head


@dataclass(frozen=True)
class FtCheckpoint:
    """A verified FT checkpoint directory (`.../<tp>-gpu`)."""

    directory: Path
    config: FtConfig
    tensor_para_size: int


def _int(section: configparser.SectionProxy, *keys: str, default: int | None = None) -> int:
    for key in keys:
        value = section.get(key)
        if value not in (None, "", "None"):
            try:
                return int(float(str(value)))
            except ValueError as exc:
                raise BadCheckpoint(f"config.ini: {key} = {value!r} is not a number") from exc
    if default is None:
        raise BadCheckpoint(f"config.ini has none of {', '.join(keys)}")
    return default


def read_ft_config(path: Path) -> tuple[FtConfig, int | None]:
    """Parse FT's config.ini (FT's own key names, or the HF names FauxPilot's converter copies in).

    Returns the config and the tensor-parallel size the checkpoint declares, if it declares one.
    """
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(path.read_text())
    except (configparser.Error, UnicodeDecodeError) as exc:
        raise BadCheckpoint(f"{path}: unreadable config.ini ({exc})") from exc
    if not parser.sections():
        raise BadCheckpoint(f"{path}: config.ini has no section")
    sec = parser[parser.sections()[0]]
    head_num = _int(sec, "head_num", "n_head")
    size_per_head = _int(sec, "size_per_head", default=0) or _int(sec, "n_embd") // head_num
    hidden = head_num * size_per_head
    config = FtConfig(
        head_num=head_num,
        size_per_head=size_per_head,
        inter_size=_int(sec, "inter_size", "n_inner", default=4 * hidden),
        num_layer=_int(sec, "num_layer", "n_layer"),
        rotary_embedding=_int(sec, "rotary_embedding", "rotary_dim", default=size_per_head),
        vocab_size=_int(sec, "vocab_size"),
        start_id=_int(sec, "start_id", "bos_token_id", default=50256),
        end_id=_int(sec, "end_id", "eos_token_id", default=50256),
        weight_data_type=sec.get("weight_data_type", "fp32").strip(),
        model_name=sec.get("model_name", sec.get("_name_or_path", "model")).strip(),
    )
    if config.weight_data_type not in _DTYPE_BYTES:
        raise BadCheckpoint(f"{path}: unknown weight_data_type {config.weight_data_type!r}")
    declared = _int(sec, "tensor_para_size", "infer_gpu_num", default=0) or None
    return config, declared


def ft_shard_sizes(config: FtConfig, tp: int) -> dict[str, int]:
    """Every file FT loads for `tp` GPUs, with its size in bytes."""
    h, inter, width = config.hidden, config.inter_size, _DTYPE_BYTES[config.weight_data_type]
    if h % tp or inter % tp:
        raise MissingShard(f"hidden size {h} / inter size {inter} do not split across {tp} GPUs")
    files = {
        "model.wte.bin": config.vocab_size * h,
        "model.final_layernorm.weight.bin": h,
        "model.final_layernorm.bias.bin": h,
        "model.lm_head.weight.bin": config.vocab_size * h,
        "model.lm_head.bias.bin": config.vocab_size,
    }
    for layer in range(config.num_layer):
        base = f"model.layers.{layer}."
        files[base + "input_layernorm.weight.bin"] = h
        files[base + "input_layernorm.bias.bin"] = h
        files[base + "mlp.dense_4h_to_h.bias.bin"] = h
        for rank in range(tp):
            files[base + f"attention.query_key_value.weight.{rank}.bin"] = h * 3 * h // tp
            files[base + f"attention.dense.weight.{rank}.bin"] = h // tp * h
            files[base + f"mlp.dense_h_to_4h.weight.{rank}.bin"] = h * inter // tp
            files[base + f"mlp.dense_h_to_4h.bias.{rank}.bin"] = inter // tp
            files[base + f"mlp.dense_4h_to_h.weight.{rank}.bin"] = inter // tp * h
    return {name: elements * width for name, elements in files.items()}


def _list(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def verify_ft(root: Path, tp: int) -> FtCheckpoint:
    """Find the `<tp>-gpu` checkpoint under `root` and check every shard; MissingShard if anything is off."""
    configs = sorted(root.rglob("config.ini"))
    if not configs:
        raise MissingShard("no FasterTransformer config.ini in the download")
    matching = [c for c in configs if c.parent.name == f"{tp}-gpu"]
    if not matching:
        found = ", ".join(str(c.parent.relative_to(root)) for c in configs)
        raise MissingShard(f"no checkpoint for {tp} GPU(s) (need a '{tp}-gpu' directory); found: {found}")
    directory = matching[0].parent
    config, declared = read_ft_config(matching[0])
    if declared is not None and declared != tp:
        raise MissingShard(f"{directory.name}/config.ini declares {declared} GPU(s), {tp} requested")
    missing, wrong = [], []
    for name, size in ft_shard_sizes(config, tp).items():
        path = directory / name
        if not path.is_file():
            missing.append(name)
        elif path.stat().st_size != size:
            wrong.append(f"{name} ({path.stat().st_size} bytes, expected {size})")
    if missing:
        raise MissingShard(f"{len(missing)} shard file(s) missing for {tp} GPU(s): {_list(missing)}")
    if wrong:
        raise MissingShard(f"{len(wrong)} shard file(s) of the wrong size: {_list(wrong)}")
    log.info("verified FT checkpoint %s: %d layers, %d GPU(s)", directory, config.num_layer, tp)
    return FtCheckpoint(directory, config, tp)


def check_safetensors(path: Path) -> None:
    """Parse a safetensors header; the last tensor must end at the end of the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise MissingShard(f"{path.name}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise MissingShard(f"{path.name}: truncated safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadCheckpoint(f"{path.name}: unreadable safetensors header ({exc})") from exc
    ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        raise MissingShard(f"{path.name}: {size} bytes on disk, its header describes {expected}")


def find_hf_root(root: Path) -> Path:
    """The directory holding config.json: the download itself or its single top-level directory."""
    if (root / "config.json").is_file():
        return root
    candidates = sorted(p.parent for p in root.glob("*/config.json"))
    if len(candidates) == 1:
        return candidates[0]
    raise BadCheckpoint("no Hugging Face config.json in the download")


def verify_hf(root: Path) -> Path:
    """Check a Hugging Face checkpoint under `root`; return its directory."""
    directory = find_hf_root(root)
    try:
        json.loads((directory / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadCheckpoint(f"config.json is not valid JSON ({exc})") from exc
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise BadCheckpoint(f"{index.name} is unreadable ({exc})") from exc
    else:
        shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        raise MissingShard("no .safetensors weights next to config.json")
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
        raise MissingShard(f"{len(missing)} safetensors shard(s) missing: {_list(missing)}")
    for shard in shards:
        check_safetensors(directory / shard)
    log.info("verified Hugging Face checkpoint %s: %d safetensors file(s)", directory, len(shards))
    return directory
