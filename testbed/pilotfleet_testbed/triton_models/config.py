"""Echo model specifications and the config.pbtxt and model.py a model repository holds for each."""

from __future__ import annotations

from dataclasses import dataclass

# FT's inputs (GUIDE.md section 2, docs/architecture.md): name, Triton dtype, dims after the batch dim.
# The echo rule reads the first five; the rest are accepted so that a client sending FT's full set works.
_REQUIRED_INPUTS = (
    ("input_ids", "TYPE_UINT32", "[ -1 ]"),
    ("input_lengths", "TYPE_UINT32", "[ 1 ]"),
    ("request_output_len", "TYPE_UINT32", "[ 1 ]"),
)
_OPTIONAL_INPUTS = (
    ("end_id", "TYPE_UINT32", "[ 1 ]"),
    ("stop_words_list", "TYPE_INT32", "[ 2, -1 ]"),
    ("start_id", "TYPE_UINT32", "[ 1 ]"),
    ("runtime_top_k", "TYPE_UINT32", "[ 1 ]"),
    ("runtime_top_p", "TYPE_FP32", "[ 1 ]"),
    ("temperature", "TYPE_FP32", "[ 1 ]"),
    ("len_penalty", "TYPE_FP32", "[ 1 ]"),
    ("repetition_penalty", "TYPE_FP32", "[ 1 ]"),
    ("presence_penalty", "TYPE_FP32", "[ 1 ]"),
    ("random_seed", "TYPE_UINT64", "[ 1 ]"),
    ("is_return_log_probs", "TYPE_BOOL", "[ 1 ]"),
    ("beam_width", "TYPE_UINT32", "[ 1 ]"),
    ("beam_search_diversity_rate", "TYPE_FP32", "[ 1 ]"),
    ("bad_words_list", "TYPE_INT32", "[ 2, -1 ]"),
)
_OUTPUTS = (
    ("output_ids", "TYPE_UINT32", "[ -1, -1 ]"),
    ("sequence_length", "TYPE_UINT32", "[ 1 ]"),
    ("output_log_probs", "TYPE_FP32", "[ -1, -1 ]"),
    ("cum_log_probs", "TYPE_FP32", "[ 1 ]"),
)


@dataclass(frozen=True)
class EchoModel:
    """One echo model of a repository: its name, unary or streaming, and how slow it is."""

    name: str
    decoupled: bool = False
    token_delay_ms: float = 0.0
    max_batch_size: int = 8
    max_seq_len: int = 2048

    @property
    def class_name(self) -> str:
        """The `echo_models` class the backend stub loads for this model."""
        return "EchoStreamModel" if self.decoupled else "EchoModel"


ECHO = EchoModel("ft-echo")
ECHO_STREAM = EchoModel("ft-echo-stream", decoupled=True)
ECHO_STREAM_SLOW = EchoModel("ft-echo-stream-slow", decoupled=True, token_delay_ms=20.0)
DEFAULT_MODELS = (ECHO, ECHO_STREAM, ECHO_STREAM_SLOW)


def _tensor(name: str, dtype: str, dims: str, optional: bool = False) -> str:
    flag = " optional: true" if optional else ""
    return f'  {{ name: "{name}" data_type: {dtype} dims: {dims}{flag} }}'


def config_pbtxt(model: EchoModel) -> str:
    """Return the model's config.pbtxt (complete: the server runs with --disable-auto-complete-config)."""
    inputs = [_tensor(*spec) for spec in _REQUIRED_INPUTS]
    inputs += [_tensor(*spec, optional=True) for spec in _OPTIONAL_INPUTS]
    outputs = [_tensor(*spec) for spec in _OUTPUTS]
    parameters = {"token_delay_ms": f"{model.token_delay_ms:g}", "max_seq_len": str(model.max_seq_len)}
    params = ",\n".join(
        f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}' for key, value in parameters.items()
    )
    sep = ",\n"
    return (
        f'name: "{model.name}"\n'
        'backend: "python"\n'
        f"max_batch_size: {model.max_batch_size}\n"
        f"model_transaction_policy {{ decoupled: {'true' if model.decoupled else 'false'} }}\n"
        "dynamic_batching { }\n"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        f"input [\n{sep.join(inputs)}\n]\n"
        f"output [\n{sep.join(outputs)}\n]\n"
        f"parameters [\n{params}\n]\n"
    )


def model_py(model: EchoModel) -> str:
    """Return the model.py that points the backend stub at the model's class in `echo_models`."""
    return (
        f'"""Triton Python-backend entry point of {model.name}; the code lives in the testbed package."""\n\n'
        "from pilotfleet_testbed.triton_models.echo_models import "
        f"{model.class_name} as TritonPythonModel\n\n"
        '__all__ = ["TritonPythonModel"]\n'
    )
