"""The echo models' Triton Python-backend classes (`TritonPythonModel`s); imported only by the backend stub.

A built model repository holds a two-line `model.py` that imports one of these classes. That works
because the stub runs the testbed's own virtual environment (`tritonserver.server_env` puts its bin first
on PATH), where this package is installed; the rule lives in one module, `echo_rule`, next to this one.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils
from pilotfleet_serve.ft_input import FTInputError

from pilotfleet_testbed.triton_models.echo_rule import (
    EchoRow,
    ft_outputs,
    generate,
    rows_from_tensors,
)

# How long finalize() waits for streams still running when Triton unloads the model.
_FINALIZE_JOIN_S = 5.0


def _optional(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _required(request: Any, name: str) -> np.ndarray:
    array = _optional(request, name)
    if array is None:
        raise FTInputError(f"missing input tensor {name}")
    return array


class _EchoBase:
    """What both echo models share: configuration and reading an FT request."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the model's parameters from its config (Triton calls this once per instance)."""
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.name: str = config["name"]
        self.token_delay_s = float(parameters.get("token_delay_ms", "0")) / 1000.0
        self.max_seq_len = int(parameters.get("max_seq_len", "2048"))

    def read(self, request: Any) -> tuple[list[EchoRow], list[list[int]], bool]:
        """Return the request's rows, what the rule generates for each, and whether log probs were asked."""
        rows = rows_from_tensors(
            input_ids=_required(request, "input_ids"),
            input_lengths=_required(request, "input_lengths"),
            request_output_len=_required(request, "request_output_len"),
            end_id=_optional(request, "end_id"),
            stop_words_list=_optional(request, "stop_words_list"),
            max_seq_len=self.max_seq_len,
        )
        want_log_probs = _optional(request, "is_return_log_probs")
        return (
            rows,
            [generate(row) for row in rows],
            bool(want_log_probs is not None and want_log_probs.any()),
        )

    @staticmethod
    def response(outputs: dict[str, np.ndarray]) -> Any:
        """Wrap packed FT outputs into a Triton response."""
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])

    @staticmethod
    def error_response(exc: Exception) -> Any:
        """A Triton error response: INVALID_ARG for a bad request, INTERNAL for anything else."""
        code = (
            pb_utils.TritonError.INVALID_ARG
            if isinstance(exc, FTInputError)
            else pb_utils.TritonError.INTERNAL
        )
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), code))


class EchoModel(_EchoBase):
    """`ft-echo`: unary; answers every request with the whole generation at once."""

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer each request of the (dynamically batched) list on its own."""
        responses = []
        for request in requests:
            try:
                rows, generations, log_probs = self.read(request)
                steps = max((row.output_len for row in rows), default=0)
                # A slow model takes its per-token delay for every token it produced.
                time.sleep(self.token_delay_s * max((len(g) for g in generations), default=0))
                width = _required(request, "input_ids").shape[1]
                responses.append(self.response(ft_outputs(rows, generations, steps, width, log_probs)))
            except FTInputError as exc:
                responses.append(self.error_response(exc))
        return responses


class EchoStreamModel(_EchoBase):
    """`ft-echo-stream`: decoupled; one response per generated token, each with the sequence so far."""

    def initialize(self, args: dict[str, str]) -> None:
        """Read the config and prepare to track the threads that serve streams."""
        super().initialize(args)
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def execute(self, requests: list[Any]) -> None:
        """Hand every request to its own thread and return at once.

        Served inline, one stream would block the model instance until it finished, so concurrent
        streams would run one after another.
        """
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            rows, generations, log_probs = self.read(request)
            width = _required(request, "input_ids").shape[1]
            total = max((len(g) for g in generations), default=0)
            sent = 0
            # With nothing to generate, one final response still carries the prompt.
            for step in range(1, total + 1) if total else [0]:
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
                if request.is_cancelled() or self._closing.is_set():
                    request_id = request.request_id()
                    pb_utils.Logger.log_info(
                        f"{self.name}: request '{request_id}' cancelled after {sent} of {total} tokens"
                    )
                    sender.send(flags=final)
                    return
                outputs = ft_outputs(rows, generations, step, width, log_probs)
                sender.send(self.response(outputs), flags=final if step == total else 0)
                sent = step
        except Exception as exc:  # an unanswered stream would hang its client forever
            sender.send(self.error_response(exc), flags=final)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def finalize(self) -> None:
        """Stop the streams still running so the stub can exit (Triton calls this on unload)."""
        self._closing.set()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=_FINALIZE_JOIN_S)
