"""Triton Python-backend model: a Hugging Face causal LM behind FasterTransformer's tensor interface.

A model repository holds a copy of this file as `<model>/1/model.py` and a filled-in `config.pbtxt` (the
template next to it). The backend stub runs the project's virtual environment, so the decode loop
comes from `pilotfleet_serve.generation`. The same file serves both twins the proxy uses: unary
(`decoupled: false`, one response when the rows end) and streaming (`decoupled: true`, one response per
decode step with the whole sequence so far, FT's streaming convention, the last one flagged final).
`execute` only queues requests: one decode thread batches all of them, rows joining between steps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from transformers import AutoModelForCausalLM

from pilotfleet_serve.ft import pack_outputs, rows_from_inputs
from pilotfleet_serve.generation import Finish, Job, Row, Scheduler
from pilotfleet_serve.static_decode import make_decoder

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _device(args: dict[str, str]) -> torch.device:
    """The instance's device: the GPU Triton assigned (instance kind GPU), else the CPU."""
    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return torch.device("cuda", int(args.get("model_instance_device_id", "0")))
    return torch.device("cpu")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    """The weights' dtype: `auto` is float32 on CPU (fast there) and bfloat16/float16 on a GPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _default_end_id(model: Any) -> int | None:
    """The model's own end-of-sequence id, used for requests that send no `end_id`."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


class TritonPythonModel:
    """The Triton model class; one instance per model instance (and so per device)."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load the model onto this instance's device and start the decode thread."""
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.name: str = config["name"]
        self.decoupled = bool(pb_utils.using_decoupled_model_transaction_policy(config))
        threads = int(params.get("torch_threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        device = _device(args)
        dtype = _dtype(params.get("dtype") or "auto", device)
        model = AutoModelForCausalLM.from_pretrained(params["model_dir"], dtype=dtype, device_map=str(device))
        model.eval()
        self.max_seq_len = int(params.get("max_seq_len") or model.config.max_position_embeddings)
        self.end_id = _default_end_id(model)
        # The static-cache decoder (CUDA graphs on a GPU) where the model allows, else the dynamic one.
        decoder = make_decoder(
            model, max_rows=int(params.get("max_batch_rows") or 16), max_len=self.max_seq_len
        )
        self.scheduler = Scheduler(decoder, name=f"decode-{self.name}")
        self.scheduler.start()
        pb_utils.Logger.log_info(
            f"{self.name}: {type(model).__name__} from {params['model_dir']} on {device} ({dtype}, "
            f"{type(decoder).__name__}), "
            f"{'streaming' if self.decoupled else 'unary'}, {torch.get_num_threads()} torch threads, "
            f"pid {os.getpid()}"
        )

    def execute(self, requests: list[Any]) -> None:
        """Queue every request for the decode thread and return at once; responses go through senders."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.scheduler.submit(self._job(request, sender))
            except (ValueError, RuntimeError) as exc:
                # FTInputError is a ValueError; RuntimeError: the model is being unloaded.
                _send_error(sender, str(exc))

    def _job(self, request: Any, sender: Any) -> Job:
        """The decode job for one request: its rows, and callbacks that answer through `sender`."""

        def read(name: str) -> np.ndarray | None:
            return _input(request, name)

        def on_error(_job: Job, message: str) -> None:
            _send_error(sender, message)

        specs = rows_from_inputs(read, max_seq_len=self.max_seq_len, default_end_id=self.end_id)
        input_ids = read("input_ids")
        assert input_ids is not None  # rows_from_inputs checked it
        want = read("is_return_log_probs")
        return Job(
            rows=[Row(spec, self.scheduler.decoder.device) for spec in specs],
            on_progress=self._progress_sender(
                sender, input_ids.shape[1], bool(want is not None and want.any())
            ),
            on_error=on_error,
            is_cancelled=request.is_cancelled,
        )

    def _progress_sender(self, sender: Any, width: int, log_probs: bool) -> Callable[[Job, bool], None]:
        """The job callback that turns progress into responses (every step streaming, the end unary)."""
        final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

        def on_progress(job: Job, final: bool) -> None:
            if any(row.finish is Finish.CANCELLED for row in job.rows):
                # Nobody reads a cancelled stream; closing it is all Triton needs.
                if final:
                    sender.send(flags=final_flag)
                return
            if not final and not self.decoupled:
                return
            outputs = pack_outputs(job.rows, width, log_probs)
            response = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]
            )
            sender.send(response, flags=final_flag if final else 0)

        return on_progress

    def finalize(self) -> None:
        """Stop the decode thread (Triton calls this on unload and shutdown); running streams end."""
        self.scheduler.close()


def _input(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _send_error(sender: Any, message: str) -> None:
    sender.send(
        pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )
