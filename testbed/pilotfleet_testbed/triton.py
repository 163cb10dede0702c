"""The testbed's Triton model repository: our FT-shaped echo models, plus any complete model folders.

`pilotfleet_serve.tritonserver.TritonServer` runs it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from pilotfleet_testbed.triton_models.config import DEFAULT_MODELS, EchoModel, config_pbtxt, model_py


def build_model_repository(
    dest: Path, models: Sequence[EchoModel] = DEFAULT_MODELS, extra: Iterable[Path] = ()
) -> Path:
    """Write a Triton model repository at `dest`: our echo `models`, plus copies of `extra` model dirs.

    Each extra dir is a complete Triton model (config.pbtxt and version folders) named by its folder.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for model in models:
        folder = dest / model.name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(config_pbtxt(model))
        (folder / "1" / "model.py").write_text(model_py(model))
    for source in extra:
        target = dest / source.name
        if target.exists():
            raise ValueError(f"model {source.name} is already in the repository {dest}")
        shutil.copytree(source, target)
    return dest
