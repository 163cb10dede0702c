"""Triton Python-backend model that serves a model's tokenizer.json to the pilotfleet proxy.

`pilotfleet fetch --tokenizer-model NAME` copies this file to `<NAME>/1/model.py` in the repository it
publishes; the config's parameter `tokenizer_path` names the file. Every request, with or without the
optional `request` input, gets the file's bytes as output `tokenizer_json` (BYTES [1]): routes that say
`tokenizer: triton://NAME` load it once per route-table load, so proxy pods need no tokenizer of their own.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Answers every request with the tokenizer.json bytes read once at load."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the tokenizer file named by the `tokenizer_path` parameter."""
        params = json.loads(args["model_config"])["parameters"]
        with open(params["tokenizer_path"]["string_value"], "rb") as handle:
            self.payload = np.array([handle.read()], dtype=np.object_)

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, each the whole file."""
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("tokenizer_json", self.payload)]) for _ in requests
        ]
