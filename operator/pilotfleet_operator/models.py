"""The CodeCompletionModel API (`pilotfleet.dev/v1alpha1`) as pydantic models.

These models are the single source of the CRD schema (`crd.py` turns them into OpenAPI v3 with the CEL
rules below) and the typed view the builders work on. Field docstrings become the schema's descriptions,
which `kubectl explain ccm.spec` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema
from pydantic.alias_generators import to_camel

from pilotfleet_operator import naming

ComputeCapability = Annotated[str, StringConstraints(pattern=r"^[0-9]+\.[0-9]$")]
StorageSize = Annotated[
    str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
]
# Kubernetes quantities are written as numbers (`cpu: 2`) or strings (`memory: 16Gi`).
Quantity = Annotated[
    int | str,
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}),
]
DnsName = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
]
EngineName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", max_length=63)
]


def rules(*entries: tuple[str, str] | tuple[str, str, str]) -> dict[str, Any]:
    """Return a json_schema_extra holding CEL rules: (rule, message) or (rule, message, fieldPath)."""
    validations = []
    for entry in entries:
        rule: dict[str, str] = {"rule": entry[0], "message": entry[1]}
        if len(entry) == 3:
            rule["fieldPath"] = entry[2]
        validations.append(rule)
    return {"x-kubernetes-validations": validations}


def defaulted(factory: Callable[[], BaseModel]) -> Any:
    """A sub-object field that the API server defaults to the sub-object with all its own defaults.

    The full object rather than `{}`: the API server checks a default against the CEL rules as it is.
    """
    default = factory().model_dump(by_alias=True, exclude_none=True, mode="json")
    return Field(default_factory=factory, json_schema_extra={"default": default})


class ApiModel(BaseModel):
    """Base of every spec model: camelCase in YAML, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        use_attribute_docstrings=True,
    )


class Backend(StrEnum):
    """The Triton backend that serves the model."""

    FASTERTRANSFORMER = "fastertransformer"
    PYTHON = "python"


class HuggingFaceSource(ApiModel):
    """A Hugging Face repository pinned to a revision."""

    repo: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+$")]
    """Repository id, `owner/name`."""
    revision: Annotated[str, StringConstraints(min_length=1, max_length=255)] = "main"
    """Branch, tag or commit; pin a commit for reproducible fleets."""


class WeightsSource(ApiModel):
    """Where the weights come from; exactly one of `url` or `huggingFace`."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            ("has(self.url) != has(self.huggingFace)", "exactly one of url or huggingFace must be set"),
        )
    )

    url: Annotated[str, StringConstraints(pattern=r"^(https?|s3)://.+$", max_length=2048)] | None = None
    """An archive (`.tar.zst`, `.tar.gz`) or file over HTTPS or S3; FauxPilot's pre-converted FT weights."""
    hugging_face: HuggingFaceSource | None = None
    """A Hugging Face repository (for the `python` backend)."""
    sha256: Annotated[str, StringConstraints(pattern=r"^[a-f0-9]{64}$")] | None = None
    """Expected SHA-256 of the archive at `url`; the fetch job refuses anything else."""
    credentials_secret: DnsName | None = None
    """Secret in the model's namespace whose key `token` authenticates the download."""
    tokenizer: Annotated[str, StringConstraints(pattern=r"^(https?|s3|hf)://.+$", max_length=2048)] | None = (
        None
    )
    """Tokenizer files when the weights carry none (FauxPilot's FT archives): a URL of `tokenizer.json` or
    an archive, or `hf://owner/repo`; Triton serves it to the proxy."""


class AccessMode(StrEnum):
    """PersistentVolumeClaim access mode of the weights volume."""

    READ_WRITE_ONCE = "ReadWriteOnce"
    READ_WRITE_MANY = "ReadWriteMany"
    READ_WRITE_ONCE_POD = "ReadWriteOncePod"


class Storage(ApiModel):
    """The PersistentVolumeClaim that holds the weights."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.accessMode == oldSelf.accessMode", "accessMode is immutable", ".accessMode"),
            (
                "has(self.storageClassName) == has(oldSelf.storageClassName) && "
                "(!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
                "storageClassName is immutable",
                ".storageClassName",
            ),
            (
                "quantity(self.size).compareTo(quantity(oldSelf.size)) >= 0",
                "size can grow but not shrink",
                ".size",
            ),
        )
    )

    size: StorageSize = "20Gi"
    """Capacity requested for the weights (all shards for every GPU count you serve)."""
    storage_class_name: DnsName | None = None
    """StorageClass of the claim; the cluster default when unset."""
    access_mode: AccessMode = AccessMode.READ_WRITE_ONCE
    """ReadWriteMany lets replicas on several nodes share one copy of the weights."""
    retain_on_delete: bool = True
    """Keep the claim (and the downloaded weights) when the model is deleted."""


class Gpus(ApiModel):
    """The GPUs of one Triton replica and the rules for where it may run."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            ("self.count in [1, 2, 4, 8]", "count must be 1, 2, 4 or 8 (the tensor-parallel size)", ".count"),
            (
                "!has(self.maxComputeCapability) || "
                "double(self.minComputeCapability) <= double(self.maxComputeCapability)",
                "maxComputeCapability must not be below minComputeCapability",
                ".maxComputeCapability",
            ),
        )
    )

    count: Annotated[int, Field(ge=1, le=8)] = 1
    """GPUs per replica; for FasterTransformer this is the tensor-parallel size."""
    min_compute_capability: ComputeCapability = "7.0"
    """Lowest CUDA compute capability (`major.minor`); FT kernels crash on Pascal (6.x)."""
    max_compute_capability: ComputeCapability | None = None
    """Highest compute capability the image has kernels for; the backend image's range when unset."""
    min_memory_mib: Annotated[int, Field(ge=1)] | None = Field(default=None, alias="minMemoryMiB")
    """Memory each GPU must have, in MiB (GPU Feature Discovery's `nvidia.com/gpu.memory`)."""
    products: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=32)] = []
    """Allow-list of `nvidia.com/gpu.product` values; any product when empty."""


class Replicas(ApiModel):
    """How many Triton replicas serve the model."""

    model_config = ConfigDict(json_schema_extra=rules(("self.max >= self.min", "max must be >= min", ".max")))

    min: Annotated[int, Field(ge=0, le=1000)] = 1
    """Replicas the operator runs (0 parks the model without deleting its weights)."""
    max: Annotated[int, Field(ge=1, le=1000)] = 1
    """Upper bound reserved for autoscaling."""


class FimOrder(StrEnum):
    """Order of the fill-in-the-middle segments in the prompt."""

    PSM = "psm"
    SPM = "spm"


class FimTemplate(ApiModel):
    """The model's own fill-in-the-middle tokens."""

    prefix: Annotated[str, StringConstraints(min_length=1)]
    """Token that starts the prefix, e.g. `<fim_prefix>`."""
    suffix: Annotated[str, StringConstraints(min_length=1)]
    """Token that starts the suffix, e.g. `<fim_suffix>`."""
    middle: Annotated[str, StringConstraints(min_length=1)]
    """Token after which the model writes the middle, e.g. `<fim_middle>`."""
    order: FimOrder = FimOrder.PSM
    """Prefix-suffix-middle or suffix-prefix-middle."""


class Limits(ApiModel):
    """What clients may ask of the model; published in the route table."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "self.defaultMaxTokens <= self.maxTokensLimit",
                "defaultMaxTokens must be <= maxTokensLimit",
                ".defaultMaxTokens",
            ),
            (
                "self.maxTokensLimit <= self.contextLength",
                "maxTokensLimit must be <= contextLength",
                ".maxTokensLimit",
            ),
        )
    )

    context_length: Annotated[int, Field(ge=16, le=1_048_576)] = 2048
    """Prompt plus completion tokens the model accepts (FT's `max_seq_len`)."""
    default_max_tokens: Annotated[int, Field(ge=1, le=1_048_576)] = 64
    """Completion length when a request gives no `max_tokens`."""
    max_tokens_limit: Annotated[int, Field(ge=1, le=1_048_576)] = 2048
    """Largest `max_tokens` a request may ask for."""
    end_id: Annotated[int, Field(ge=0)] = 50256
    """End-of-text token id."""
    stop_tokens: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=16)] = []
    """Extra stop sequences applied to every request."""
    fim: FimTemplate | None = None
    """Fill-in-the-middle template; without it `suffix` is not supported for this model."""


class FasterTransformerConfig(ApiModel):
    """Architecture of a GPT-J-layout checkpoint, written into FT's `config.pbtxt`."""

    head_num: Annotated[int, Field(ge=1)]
    """Attention heads; must be divisible by `gpus.count`."""
    size_per_head: Annotated[int, Field(ge=1)]
    """Hidden size divided by `headNum`."""
    decoder_layers: Annotated[int, Field(ge=1)]
    """Number of transformer layers."""
    rotary_embedding: Annotated[int, Field(ge=0)]
    """Rotary embedding dimensions (`rotary_dim`)."""
    inter_size: Annotated[int, Field(ge=1)] | None = None
    """Feed-forward size; 4 x hidden size when unset."""
    vocab_size: Annotated[int, Field(ge=1)] = 51200
    """Vocabulary size of the checkpoint (CodeGen pads GPT-2's to 51200)."""
    start_id: Annotated[int, Field(ge=0)] = 50256
    """Start token id."""
    is_half: bool = True
    """Run in FP16."""


class PythonDtype(StrEnum):
    """Torch dtype of the Python backend."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class PythonConfig(ApiModel):
    """Settings of the Python (Hugging Face) backend."""

    dtype: PythonDtype = PythonDtype.FLOAT16
    """Weights dtype."""


class TolerationOperator(StrEnum):
    """Toleration operator."""

    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    """Taint effect."""

    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(ApiModel):
    """A pod toleration (as in a pod spec)."""

    key: str | None = None
    """Taint key; empty with operator Exists tolerates everything."""
    operator: TolerationOperator = TolerationOperator.EQUAL
    """Exists or Equal."""
    value: str | None = None
    """Taint value for Equal."""
    effect: TaintEffect | None = None
    """Effect to tolerate; all effects when unset."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated."""


class ResourceRequirements(ApiModel):
    """Extra CPU/memory resources of the Triton container (GPUs come from `gpus.count`)."""

    requests: dict[str, Quantity] = {}
    """Requested resources, e.g. `cpu: 4`, `memory: 32Gi`."""
    limits: dict[str, Quantity] = {}
    """Resource limits."""


class CodeCompletionModelSpec(ApiModel):
    """A code-completion model served by Triton behind the shared pilotfleet proxy."""

    model_config = ConfigDict(
        json_schema_extra=rules(
            (
                "self.backend != 'fastertransformer' || has(self.fasterTransformer)",
                "fasterTransformer is required for backend fastertransformer",
                ".fasterTransformer",
            ),
            (
                "self.backend != 'fastertransformer' || !has(self.fasterTransformer) || "
                "self.fasterTransformer.headNum % self.gpus.count == 0",
                "fasterTransformer.headNum must be divisible by gpus.count",
                ".gpus.count",
            ),
            (
                "self.backend != 'fastertransformer' || has(self.weights.url)",
                "backend fastertransformer needs weights.url (a converted checkpoint)",
                ".weights",
            ),
        )
    )

    engine: EngineName
    """Model name clients send (`model`, or the Copilot engine)."""
    aliases: Annotated[list[EngineName], Field(max_length=16)] = []
    """Other names that route to this model."""
    backend: Backend = Backend.FASTERTRANSFORMER
    """`fastertransformer` for converted GPT-J-layout checkpoints, `python` for Hugging Face models."""
    weights: WeightsSource
    """Where the weights come from."""
    storage: Storage = defaulted(Storage)
    """The weights volume."""
    gpus: Gpus = defaulted(Gpus)
    """GPUs per replica and placement rules."""
    replicas: Replicas = defaulted(Replicas)
    """Replica count."""
    limits: Limits = defaulted(Limits)
    """Model limits published to the proxy."""
    faster_transformer: FasterTransformerConfig | None = None
    """Checkpoint architecture (backend fastertransformer)."""
    python: PythonConfig | None = None
    """Python backend settings."""
    image: Annotated[str, StringConstraints(min_length=1)] | None = None
    """Triton image; the operator's image for the backend when unset."""
    resources: ResourceRequirements | None = None
    """Extra resources of the Triton container."""
    node_selector: dict[str, str] = {}
    """Extra node labels the Triton pods require."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = []
    """Extra tolerations (the `nvidia.com/gpu` one is always added)."""
    priority_class_name: DnsName | None = None
    """PriorityClass of the Triton pods."""


class ConditionStatus(StrEnum):
    """Status of a condition."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    """The conditions a CodeCompletionModel reports, in the order they are reached."""

    WEIGHTS_READY = "WeightsReady"
    SCHEDULED = "Scheduled"
    INFERENCE_READY = "InferenceReady"
    ROUTED = "Routed"
    READY = "Ready"


class Phase(StrEnum):
    """One-word summary of where the model is."""

    PENDING = "Pending"
    FETCHING = "Fetching"
    UNSCHEDULABLE = "Unschedulable"
    STARTING = "Starting"
    READY = "Ready"
    FAILED = "Failed"


class StatusModel(BaseModel):
    """Base of the status models: camelCase, unknown fields kept (other writers may add some)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", use_attribute_docstrings=True
    )


class Condition(StatusModel):
    """One observation about the model."""

    type: ConditionType
    """Condition type."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str
    """CamelCase reason."""
    message: str = ""
    """What a human needs to know."""
    last_transition_time: str
    """When `status` last changed (RFC 3339)."""
    observed_generation: int = 0
    """Generation of the spec this condition was computed for."""


class FetchProgress(StatusModel):
    """Progress of the weights download, written by the fetch job."""

    bytes_done: int | None = None
    """Bytes downloaded so far."""
    bytes_total: int | None = None
    """Bytes to download, when known."""
    bytes_per_second: float | None = None
    """Recent download rate."""
    eta_seconds: float | None = None
    """Estimated seconds left."""
    progress: str | None = None
    """Percentage done (or bytes, when the total is unknown), for `kubectl get`."""


class CodeCompletionModelStatus(StatusModel):
    """Observed state of a CodeCompletionModel."""

    phase: Phase | None = None
    """Pending, Fetching, Unschedulable, Starting, Ready or Failed."""
    observed_generation: int | None = None
    """The spec generation this status describes."""
    conditions: Annotated[
        list[Condition],
        Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
    ] = []
    """WeightsReady, Scheduled, InferenceReady, Routed and Ready."""
    ready_replicas: int | None = None
    """Triton replicas ready to serve."""
    desired_replicas: int | None = None
    """Triton replicas wanted."""
    ready: str | None = None
    """`ready/desired`, for `kubectl get`."""
    url: str | None = None
    """Triton gRPC endpoint the proxy routes this model to."""
    fetch: FetchProgress | None = None
    """Download progress of the weights."""


class CodeCompletionModel(BaseModel):
    """A whole CodeCompletionModel object as read from the API."""

    model_config = ConfigDict(extra="ignore")

    api_version: str = Field(default=naming.API_VERSION, alias="apiVersion")
    kind: str = naming.KIND
    metadata: dict[str, Any]
    spec: CodeCompletionModelSpec
    status: CodeCompletionModelStatus = CodeCompletionModelStatus()

    @classmethod
    def from_body(cls, body: Any) -> CodeCompletionModel:
        """Parse an API object (a dict or kopf's Body)."""
        data = {key: body[key] for key in ("apiVersion", "kind", "metadata", "spec", "status") if key in body}
        return cls.model_validate(data)

    @property
    def name(self) -> str:
        """metadata.name."""
        return str(self.metadata["name"])

    @property
    def namespace(self) -> str:
        """metadata.namespace."""
        return str(self.metadata["namespace"])

    @property
    def uid(self) -> str:
        """metadata.uid (for owner references)."""
        return str(self.metadata["uid"])

    @property
    def generation(self) -> int:
        """metadata.generation."""
        return int(self.metadata.get("generation", 0))
