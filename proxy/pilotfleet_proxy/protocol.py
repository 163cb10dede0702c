"""OpenAI completion request/response models, as Copilot and OpenAI-style clients send and expect them."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pilotfleet_proxy.errors import bad_request

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4
MAX_N = 16
# Copilot clients send these alongside the OpenAI fields; they steer nothing here and are accepted quietly.
COPILOT_FIELDS = frozenset(
    {"extra", "nwo", "code_annotations", "intent", "intent_threshold", "prompt_tokens"}
)

StopString = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """POST /v1/completions (and Copilot's /v1/engines/{engine}/completions) body."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = ""
    suffix: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    best_of: int | None = Field(default=None, ge=1)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    user: str | None = None

    def stop_strings(self) -> list[str]:
        """The stop strings as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def check_supported(self) -> None:
        """Refuse, naming the parameter, what this proxy cannot honour; log fields it ignores."""
        if len(self.stop_strings()) > MAX_STOP_STRINGS:
            raise bad_request(f"stop: at most {MAX_STOP_STRINGS} stop strings are allowed", param="stop")
        if self.frequency_penalty != 0:
            raise bad_request(
                "frequency_penalty is not supported by this backend (use presence_penalty)",
                param="frequency_penalty",
            )
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported", param="best_of")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")
        if self.logprobs:
            raise bad_request(
                "logprobs: only 0 is supported (the chosen tokens' log probabilities); "
                "the backend returns no alternatives",
                param="logprobs",
            )
        if self.logprobs is not None and self.echo:
            raise bad_request("logprobs together with echo is not supported", param="echo")
        if isinstance(self.prompt, list) and not self.prompt:
            raise bad_request("prompt must not be an empty list", param="prompt")
        ignored = sorted(set(self.model_extra or {}) - COPILOT_FIELDS)
        if ignored:
            log.debug("ignoring unknown completion fields: %s", ", ".join(ignored))

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [[p for p in prompt if isinstance(p, int)]]
        return [p if isinstance(p, str) else list(p) for p in prompt if isinstance(p, str | list)]


class ChoiceLogprobs(BaseModel):
    """Log probabilities of the tokens of one choice (real ones from the backend, never made up)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One completion."""

    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A completion response, or one streamed chunk of it (same id in every chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCapabilities(BaseModel):
    """What a Copilot client reads from a model card: completion models are offered for ghost text."""

    type: Literal["completion"] = "completion"
    family: str
    # The tokenizer the client counts prompt tokens with for its prompt budget; it knows only its own
    # (cl100k_base, o200k_base). The proxy re-tokenizes with the model's own tokenizer and trims to fit.
    tokenizer: Literal["cl100k_base"] = "cl100k_base"
    object: Literal["model_capabilities"] = "model_capabilities"


class ModelCard(BaseModel):
    """One entry of GET /v1/models (OpenAI) and GET /models (Copilot's model list, same shape).

    Copilot clients use the first completion model of the list as their default engine and offer the
    others in their model picker, so a signed-in editor needs no engine setting.
    """

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pilotfleet"
    aliases: list[str] = Field(default_factory=list)
    context_length: int
    name: str
    version: str
    model_picker_enabled: bool = True
    capabilities: ModelCapabilities


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class CopilotToken(BaseModel):
    """GET /copilot_internal/v2/token: the token a Copilot client sends with its completions."""

    model_config = ConfigDict(extra="allow")

    token: str
    expires_at: int
    refresh_in: int
    # Base URLs the client uses after sign-in, by role (`api`, `proxy`, `telemetry`, `origin-tracker`).
    endpoints: dict[str, str] | None = None


class CopilotUser(BaseModel):
    """GET /copilot_internal/user: the signed-in user's plan, as Copilot clients read it."""

    login: str
    copilot_plan: Literal["business"] = "business"
    chat_enabled: bool = False
    endpoints: dict[str, str]


class ExperimentAssignment(BaseModel):
    """One named set of experiment parameters."""

    Id: str
    Parameters: dict[str, str | int | float | bool] = Field(default_factory=dict)


class ExperimentConfig(BaseModel):
    """GET {telemetry}/telemetry: Copilot's experiment (A/B flag) config; empty means every default."""

    Features: list[str] = Field(default_factory=list)
    Flights: dict[str, str] = Field(default_factory=dict)
    Configs: list[ExperimentAssignment] = Field(default_factory=lambda: [ExperimentAssignment(Id="vscode")])
    ParameterGroups: list[dict[str, Any]] = Field(default_factory=list)
    AssignmentContext: str = ""


def dump(model: BaseModel, **kwargs: Any) -> bytes:
    """Serialize a response model compactly (pydantic's Rust serializer, no extra copies)."""
    return model.model_dump_json(**kwargs).encode()
