"""Desired state of a model's children, as pure functions of the model and the settings.

No I/O, deterministic output (sorted keys where order is free), full labels and owner references. The
weights PVC layout is a contract with the fetch job (`pilotfleet fetch`): it publishes a verified copy of
a weight source into `/weights/<weights-hash>/`, holding `tokenizer.json` and, for FasterTransformer,
`<N>-gpu/` (the shards for tensor-parallel size N) or, for the Python backend, `hf/` (the Hugging Face
checkpoint).
"""

from __future__ import annotations

from typing import Any

from pilotfleet_proxy.routes import RouteTable

from pilotfleet_operator import gpu, naming
from pilotfleet_operator.models import Backend, CodeCompletionModel
from pilotfleet_operator.settings import Settings

WEIGHTS_MOUNT = "/weights"
REPOSITORY_MOUNT = "/models"
GRPC_PORT = 8001
HTTP_PORT = 8000
METRICS_PORT = 8002
TOKENIZER_MODEL = "tokenizer"
# Triton model names per backend; the proxy finds them in the route table.
TRITON_MODEL = {Backend.FASTERTRANSFORMER: "fastertransformer", Backend.PYTHON: "huggingface"}
# Loading a 16B checkpoint takes minutes and Triton answers its health endpoints only once models load.
STARTUP_PROBE_PERIOD_S = 10
STARTUP_PROBE_FAILURES = 180
FT_MAX_BATCH_SIZE = 1024

# FT's tensor interface (docs/architecture.md), without the batch dimension: (name, type, dims, optional).
INPUTS: tuple[tuple[str, str, str, bool], ...] = (
    ("input_ids", "TYPE_UINT32", "[ -1 ]", False),
    ("input_lengths", "TYPE_UINT32", "[ 1 ]", False),
    ("request_output_len", "TYPE_UINT32", "[ 1 ]", False),
    ("start_id", "TYPE_UINT32", "[ 1 ]", True),
    ("end_id", "TYPE_UINT32", "[ 1 ]", True),
    ("runtime_top_k", "TYPE_UINT32", "[ 1 ]", True),
    ("runtime_top_p", "TYPE_FP32", "[ 1 ]", True),
    ("temperature", "TYPE_FP32", "[ 1 ]", True),
    ("len_penalty", "TYPE_FP32", "[ 1 ]", True),
    ("repetition_penalty", "TYPE_FP32", "[ 1 ]", True),
    ("presence_penalty", "TYPE_FP32", "[ 1 ]", True),
    ("random_seed", "TYPE_UINT64", "[ 1 ]", True),
    ("is_return_log_probs", "TYPE_BOOL", "[ 1 ]", True),
    ("beam_width", "TYPE_UINT32", "[ 1 ]", True),
    ("beam_search_diversity_rate", "TYPE_FP32", "[ 1 ]", True),
    ("stop_words_list", "TYPE_INT32", "[ 2, -1 ]", True),
    ("bad_words_list", "TYPE_INT32", "[ 2, -1 ]", True),
)
OUTPUTS: tuple[tuple[str, str, str], ...] = (
    ("output_ids", "TYPE_UINT32", "[ -1, -1 ]"),
    ("sequence_length", "TYPE_UINT32", "[ 1 ]"),
    ("output_log_probs", "TYPE_FP32", "[ -1, -1 ]"),
    ("cum_log_probs", "TYPE_FP32", "[ 1 ]"),
)

TOKENIZER_MODEL_PY = '''\
"""Serves the model's tokenizer.json to the pilotfleet proxy (output `tokenizer_json`, BYTES [1])."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"])["parameters"]
        with open(params["tokenizer_path"]["string_value"], "rb") as handle:
            self.payload = np.array([handle.read()], dtype=np.object_)

    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("tokenizer_json", self.payload)]) for _ in requests
        ]
'''


def owner_reference(model: CodeCompletionModel) -> dict[str, Any]:
    """The controller owner reference that makes Kubernetes garbage-collect a child with its model."""
    return {
        "apiVersion": naming.API_VERSION,
        "kind": naming.KIND,
        "name": model.name,
        "uid": model.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(model: CodeCompletionModel, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": model.namespace,
        "labels": naming.labels(model.name, component),
        "ownerReferences": [owner_reference(model)],
    }


def weights_hash(model: CodeCompletionModel) -> str:
    """Identity of the weights a model needs: its source and, for FT, the shard count (TP size)."""
    spec = model.spec
    identity: dict[str, Any] = {
        "weights": spec.weights.model_dump(by_alias=True, exclude_none=True, exclude={"credentials_secret"}),
        "backend": spec.backend.value,
    }
    if spec.backend is Backend.FASTERTRANSFORMER:
        identity["gpus"] = spec.gpus.count
    return naming.short_hash(identity)


def weights_dir(model: CodeCompletionModel) -> str:
    """Where the fetch job publishes this model's verified weights inside the Triton pod."""
    return f"{WEIGHTS_MOUNT}/{weights_hash(model)}"


def pvc_for_model(model: CodeCompletionModel, settings: Settings) -> dict[str, Any]:
    """The PersistentVolumeClaim that holds the model's weights."""
    storage = model.spec.storage
    spec: dict[str, Any] = {
        "accessModes": [storage.access_mode.value],
        "resources": {"requests": {"storage": storage.size}},
    }
    if storage.storage_class_name:
        spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(model, naming.pvc_name(model.name), naming.COMPONENT_WEIGHTS),
        "spec": spec,
    }


def fetch_job_for_model(model: CodeCompletionModel, settings: Settings) -> dict[str, Any]:
    """The Job that downloads, verifies and publishes the weights into the PVC (`pilotfleet fetch`)."""
    spec = model.spec
    digest = weights_hash(model)
    args = [
        "fetch",
        f"--dest={WEIGHTS_MOUNT}/{digest}",
        f"--backend={spec.backend.value}",
        f"--gpus={spec.gpus.count}",
        f"--model={model.namespace}/{model.name}",
    ]
    weights = spec.weights
    if weights.url:
        args.append(f"--url={weights.url}")
    if weights.hugging_face:
        args += [f"--hf-repo={weights.hugging_face.repo}", f"--revision={weights.hugging_face.revision}"]
    if weights.sha256:
        args.append(f"--sha256={weights.sha256}")
    container: dict[str, Any] = {
        "name": "fetch",
        "image": settings.fetch_image,
        "command": ["pilotfleet"],
        "args": args,
        "volumeMounts": [{"name": "weights", "mountPath": WEIGHTS_MOUNT}],
    }
    if weights.credentials_secret:
        container["env"] = [
            {
                "name": "PILOTFLEET_FETCH_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": weights.credentials_secret, "key": "token"}},
            }
        ]
    metadata = _metadata(model, naming.fetch_job_name(model.name, digest), naming.COMPONENT_FETCH)
    metadata["annotations"] = {naming.ANNOTATION_WEIGHTS_HASH: digest}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": settings.fetch_backoff_limit,
            "template": {
                "metadata": {"labels": naming.labels(model.name, naming.COMPONENT_FETCH)},
                "spec": {
                    "restartPolicy": "Never",
                    "enableServiceLinks": False,
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "weights",
                            "persistentVolumeClaim": {"claimName": naming.pvc_name(model.name)},
                        }
                    ],
                },
            },
        },
    }


def _pbtxt_parameters(params: dict[str, str]) -> str:
    return "".join(
        f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
        for key, value in params.items()
    )


def _pbtxt_io(
    inputs: tuple[tuple[str, str, str, bool], ...], outputs: tuple[tuple[str, str, str], ...]
) -> str:
    def tensor(name: str, dtype: str, dims: str, optional: bool = False) -> str:
        flag = "    optional: true\n" if optional else ""
        return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {dims}\n{flag}  }}'

    ins = ",\n".join(tensor(*spec) for spec in inputs)
    outs = ",\n".join(tensor(*spec) for spec in outputs)
    return f"input [\n{ins}\n]\noutput [\n{outs}\n]\n"


def triton_config_for_model(model: CodeCompletionModel, settings: Settings) -> str:
    """The `config.pbtxt` of the model's Triton model (FasterTransformer or Python backend)."""
    spec = model.spec
    name = TRITON_MODEL[spec.backend]
    head = f'name: "{name}"\nbackend: "{spec.backend.value}"\nmax_batch_size: {FT_MAX_BATCH_SIZE}\n'
    if spec.backend is Backend.FASTERTRANSFORMER:
        ft = spec.faster_transformer
        if ft is None:  # the CRD's CEL rule makes this unreachable for stored objects
            raise ValueError("backend fastertransformer needs spec.fasterTransformer")
        hidden = ft.head_num * ft.size_per_head
        params = {
            "tensor_para_size": str(spec.gpus.count),
            "pipeline_para_size": "1",
            "data_type": "fp16" if ft.is_half else "fp32",
            "is_half": "1" if ft.is_half else "0",
            "max_seq_len": str(spec.limits.context_length),
            "head_num": str(ft.head_num),
            "size_per_head": str(ft.size_per_head),
            "inter_size": str(ft.inter_size or 4 * hidden),
            "vocab_size": str(ft.vocab_size),
            "start_id": str(ft.start_id),
            "end_id": str(spec.limits.end_id),
            "decoder_layers": str(ft.decoder_layers),
            "rotary_embedding": str(ft.rotary_embedding),
            "model_name": spec.engine,
            "model_type": "GPT-J",
            "model_checkpoint_path": f"{weights_dir(model)}/{spec.gpus.count}-gpu",
            "int8_mode": "0",
            "enable_custom_all_reduce": "0",
        }
        # FT spreads one model instance over all of the pod's GPUs itself.
        instances = "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
    else:
        dtype = spec.python.dtype.value if spec.python else "float16"
        params = {
            "model_dir": f"{weights_dir(model)}/hf",
            "dtype": dtype,
            "end_id": str(spec.limits.end_id),
            "max_seq_len": str(spec.limits.context_length),
        }
        # The model batches inside (rows join between decode steps); Triton hands over what has arrived.
        instances = "dynamic_batching { }\ninstance_group [\n  {\n    count: 1\n    kind: KIND_GPU\n  }\n]\n"
    return head + _pbtxt_io(INPUTS, OUTPUTS) + instances + _pbtxt_parameters(params)


def tokenizer_config_for_model(model: CodeCompletionModel) -> str:
    """The `config.pbtxt` of the tiny Python model that serves the model's tokenizer.json to the proxy."""
    return (
        f'name: "{TOKENIZER_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
        + _pbtxt_io((("request", "TYPE_BOOL", "[ 1 ]", True),), (("tokenizer_json", "TYPE_STRING", "[ 1 ]"),))
        + "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n"
        + _pbtxt_parameters({"tokenizer_path": f"{weights_dir(model)}/tokenizer.json"})
    )


def _repository_files(model: CodeCompletionModel, settings: Settings) -> dict[str, tuple[str, str]]:
    """The Triton model repository as {configmap key: (path in the repository, content)}."""
    main = TRITON_MODEL[model.spec.backend]
    files = {
        "model.config.pbtxt": (f"{main}/config.pbtxt", triton_config_for_model(model, settings)),
        "tokenizer.config.pbtxt": (f"{TOKENIZER_MODEL}/config.pbtxt", tokenizer_config_for_model(model)),
        "tokenizer.model.py": (f"{TOKENIZER_MODEL}/1/model.py", TOKENIZER_MODEL_PY),
    }
    if model.spec.backend is Backend.PYTHON:
        shim = f"from {settings.python_model_module} import TritonPythonModel  # noqa: F401\n"
        files["model.model.py"] = (f"{main}/1/model.py", shim)
    else:
        # Triton loads a model only with a version folder; FT reads its weights from model_checkpoint_path.
        files["model.version"] = (f"{main}/1/README", f"weights: {weights_dir(model)}\n")
    return dict(sorted(files.items()))


def triton_configmap_for_model(model: CodeCompletionModel, settings: Settings) -> dict[str, Any]:
    """The ConfigMap holding the Triton model repository (mounted at /models)."""
    files = _repository_files(model, settings)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(model, naming.triton_config_name(model.name), naming.COMPONENT_TRITON_CONFIG),
        "data": {key: content for key, (_, content) in files.items()},
    }


def _resources(model: CodeCompletionModel) -> dict[str, Any]:
    extra = model.spec.resources
    requests = dict(extra.requests) if extra else {}
    limits = dict(extra.limits) if extra else {}
    # Extended resources must be equal in requests and limits; the spec cannot override the GPU count.
    limits[gpu.GPU_RESOURCE] = model.spec.gpus.count
    requests[gpu.GPU_RESOURCE] = model.spec.gpus.count
    return {"requests": dict(sorted(requests.items())), "limits": dict(sorted(limits.items()))}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 3,
    }


def deployment_for_model(model: CodeCompletionModel, settings: Settings) -> dict[str, Any]:
    """The Triton Deployment: GPUs, GFD placement, model repository, weights, probes, rolling updates."""
    spec = model.spec
    name = naming.triton_name(model.name)
    files = _repository_files(model, settings)
    req = gpu.requirement_for(spec, settings)
    pod_spec: dict[str, Any] = {
        "enableServiceLinks": False,
        "affinity": gpu.node_affinity(req),
        "tolerations": gpu.pod_tolerations(spec),
        "containers": [
            {
                "name": "triton",
                "image": spec.image or settings.image_for(spec.backend),
                "command": ["tritonserver"],
                "args": [
                    f"--model-repository={REPOSITORY_MOUNT}",
                    f"--grpc-port={GRPC_PORT}",
                    f"--http-port={HTTP_PORT}",
                    f"--metrics-port={METRICS_PORT}",
                    "--disable-auto-complete-config",
                ],
                "ports": [
                    {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                    {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                    {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
                ],
                "readinessProbe": _probe("/v2/health/ready", 5, 3),
                "livenessProbe": _probe("/v2/health/live", 10, 6),
                "startupProbe": _probe("/v2/health/live", STARTUP_PROBE_PERIOD_S, STARTUP_PROBE_FAILURES),
                "resources": _resources(model),
                "volumeMounts": [
                    {"name": "repository", "mountPath": REPOSITORY_MOUNT, "readOnly": True},
                    {"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True},
                    {"name": "shm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {
                "name": "repository",
                "configMap": {
                    "name": naming.triton_config_name(model.name),
                    "items": [{"key": key, "path": path} for key, (path, _) in files.items()],
                },
            },
            {
                "name": "weights",
                "persistentVolumeClaim": {"claimName": naming.pvc_name(model.name), "readOnly": True},
            },
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        ],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(sorted(spec.node_selector.items()))
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(model, name, naming.COMPONENT_TRITON),
        "spec": {
            "replicas": spec.replicas.min,
            "selector": {"matchLabels": naming.selector_labels(model.name, naming.COMPONENT_TRITON)},
            # GPUs are scarce: a new pod starts before an old one stops, so serving never drops to zero.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": naming.labels(model.name, naming.COMPONENT_TRITON),
                    "annotations": {
                        naming.ANNOTATION_CONFIG_HASH: naming.short_hash(
                            {key: content for key, (_, content) in files.items()}
                        ),
                        naming.ANNOTATION_WEIGHTS_HASH: weights_hash(model),
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def service_for_model(model: CodeCompletionModel, settings: Settings) -> dict[str, Any]:
    """The ClusterIP Service in front of the Triton pods (gRPC for the proxy, HTTP, metrics)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(model, naming.triton_name(model.name), naming.COMPONENT_TRITON),
        "spec": {
            "type": "ClusterIP",
            "selector": naming.selector_labels(model.name, naming.COMPONENT_TRITON),
            "ports": [
                {
                    "name": "grpc",
                    "port": GRPC_PORT,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    "appProtocol": "grpc",
                },
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"},
            ],
        },
    }


def grpc_endpoint(model: CodeCompletionModel, settings: Settings) -> str:
    """The Triton gRPC `host:port` of the model's Service."""
    host = f"{naming.triton_name(model.name)}.{model.namespace}.svc"
    if settings.cluster_domain:
        host += f".{settings.cluster_domain}"
    return f"{host}:{GRPC_PORT}"


def route_entry_for_model(model: CodeCompletionModel, settings: Settings) -> dict[str, Any]:
    """The model's entry in the proxy's route table (docs/architecture.md, the route table contract)."""
    spec = model.spec
    limits = spec.limits
    return {
        "name": spec.engine,
        "aliases": list(spec.aliases),
        "triton_model": TRITON_MODEL[spec.backend],
        "streaming_model": None,
        "endpoints": [grpc_endpoint(model, settings)],
        "tokenizer": f"triton://{TOKENIZER_MODEL}",
        "context_length": limits.context_length,
        "default_max_tokens": limits.default_max_tokens,
        "max_tokens_limit": limits.max_tokens_limit,
        "end_id": limits.end_id,
        "fim": limits.fim.model_dump(mode="json") if limits.fim else None,
    }


def route_entries(
    models: list[CodeCompletionModel], ready: set[tuple[str, str]], settings: Settings
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], str]]:
    """The route table entries of a fleet, and {(namespace, name): problem} for models left out.

    Every model is listed, with its endpoint only while some replica is ready (`ready` holds the
    (namespace, name) of those), so the proxy answers 503 rather than 404 for a model still starting.
    A name or alias already taken by an older model is a conflict: the newer model is left out.
    """
    taken: dict[str, str] = {}
    entries = []
    problems = {}
    for model in sorted(
        models, key=lambda m: (str(m.metadata.get("creationTimestamp", "")), m.namespace, m.name)
    ):
        key = (model.namespace, model.name)
        owner = f"{model.namespace}/{model.name}"
        clash = [name for name in (model.spec.engine, *model.spec.aliases) if name in taken]
        if clash:
            problems[key] = f"name {clash[0]!r} is already served by CodeCompletionModel {taken[clash[0]]}"
            continue
        for name in (model.spec.engine, *model.spec.aliases):
            taken[name] = owner
        entry = route_entry_for_model(model, settings)
        if key not in ready:
            entry["endpoints"] = []
        entries.append(entry)
    return entries, problems


def routes_configmap(entries: list[dict[str, Any]], settings: Settings) -> dict[str, Any]:
    """The fleet's route table ConfigMap; entries sorted by name so that equal tables are equal text."""
    table = RouteTable.model_validate({"version": 1, "models": sorted(entries, key=lambda e: str(e["name"]))})
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": naming.ROUTES_CONFIGMAP,
            "namespace": settings.namespace,
            "labels": {
                naming.LABEL_NAME: naming.PART_OF,
                naming.LABEL_COMPONENT: naming.COMPONENT_ROUTES,
                naming.LABEL_PART_OF: naming.PART_OF,
                naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
            },
        },
        "data": {naming.ROUTES_KEY: table.to_yaml()},
    }
