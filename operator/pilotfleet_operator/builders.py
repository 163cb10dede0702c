"""Desired state of a model's children, as pure functions of the model and the settings.

No I/O, deterministic output (sorted keys where order is free), full labels and owner references. The
weights PVC is shared with the fetch job (`pilotfleet fetch`, docs/fetch.md): the Job publishes the whole
Triton model repository for one weights hash into `/weights/<weights-hash>/` (the main model's
`config.pbtxt`, written from the checkpoint's own config plus the spec values passed on its command line,
the checkpoint, the tokenizer files, and the `tokenizer` model that serves them to the proxy), and the
Triton pods serve that folder as their model repository. The fetch job is the only writer of that folder.
"""

from __future__ import annotations

from typing import Any

from pilotfleet_fetch.errors import ALL_ERRORS, USAGE_EXIT_CODE
from pilotfleet_proxy.routes import RouteTable

from pilotfleet_operator import gpu, naming
from pilotfleet_operator.models import Backend, CodeCompletionModel
from pilotfleet_operator.settings import Settings

WEIGHTS_MOUNT = "/weights"
GRPC_PORT = 8001
HTTP_PORT = 8000
METRICS_PORT = 8002
TOKENIZER_MODEL = "tokenizer"
# Triton model names per backend; the proxy finds them in the route table.
TRITON_MODEL = {Backend.FASTERTRANSFORMER: "fastertransformer", Backend.PYTHON: "huggingface"}
# Loading a 16B checkpoint takes minutes and Triton answers its health endpoints only once models load.
STARTUP_PROBE_PERIOD_S = 10
STARTUP_PROBE_FAILURES = 180
FETCH_CONTAINER = "fetch"
# Where the fetch job writes its `{"reason", "message"}` on failure, and the kubelet reads it from.
TERMINATION_LOG = "/dev/termination-log"
# Exit codes after which another attempt cannot help (bad command line, 404, checksum, ...): the Job
# fails at once. Stalled and Unreachable are retried up to the Job's backoffLimit.
PERMANENT_EXIT_CODES = sorted({USAGE_EXIT_CODE, *(e.exit_code for e in ALL_ERRORS if e.permanent)})
# The one permission of a fetch Job: patch its own model's status.fetch (progress).
FETCH_RULES = [
    {
        "apiGroups": [naming.GROUP],
        "resources": [f"{naming.PLURAL}/status"],
        "verbs": ["patch"],
    }
]


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


def weights_source(model: CodeCompletionModel) -> str:
    """The model's weight source as `pilotfleet fetch --source` takes it: a URL, or `hf://owner/repo`."""
    weights = model.spec.weights
    if weights.hugging_face is not None:
        return f"hf://{weights.hugging_face.repo}"
    if weights.url is None:  # the CRD's CEL rule makes this unreachable for stored objects
        raise ValueError("spec.weights needs url or huggingFace")
    return weights.url


def fetch_options(model: CodeCompletionModel) -> list[str]:
    """The options of `pilotfleet fetch` for the model, all but `--dest`: the spec values the fetch job
    writes into the Triton repository next to what only it can read (the checkpoint's config)."""
    spec = model.spec
    weights = spec.weights
    options = ["--source", weights_source(model)]
    if weights.hugging_face is not None:
        options += ["--revision", weights.hugging_face.revision]
    if weights.sha256:
        options += ["--sha256", weights.sha256]
    if weights.tokenizer:
        options += ["--tokenizer", weights.tokenizer]
    options += [
        "--backend",
        spec.backend.value,
        "--model-name",
        TRITON_MODEL[spec.backend],
        "--max-seq-len",
        str(spec.limits.context_length),
        "--tokenizer-model",
        TOKENIZER_MODEL,
    ]
    if spec.backend is Backend.FASTERTRANSFORMER:
        # FT shards are per tensor-parallel size: a new GPU count is a new checkpoint.
        options += ["--tp", str(spec.gpus.count)]
    elif spec.python is not None:
        options += ["--dtype", spec.python.dtype.value]
    return options


def weights_hash(model: CodeCompletionModel) -> str:
    """Identity of the model's Triton repository: everything the fetch job is asked to do.

    Any change of it is a new folder and a new Job, while the running pods keep reading the old folder.
    """
    return naming.short_hash(fetch_options(model))


def weights_dir(model: CodeCompletionModel) -> str:
    """The model's Triton repository, as the fetch job and the Triton pods see it."""
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


def fetch_rbac_for_model(model: CodeCompletionModel, settings: Settings) -> list[dict[str, Any]]:
    """The fetch Job's ServiceAccount, and a Role (with its RoleBinding) that lets it patch only the
    status of its own model, for progress."""
    name = naming.fetch_service_account_name(model.name)
    rules = [{**rule, "resourceNames": [model.name]} for rule in FETCH_RULES]
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _metadata(model, name, naming.COMPONENT_FETCH),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(model, name, naming.COMPONENT_FETCH),
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(model, name, naming.COMPONENT_FETCH),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": model.namespace}],
        },
    ]


def fetch_job_for_model(model: CodeCompletionModel, settings: Settings) -> dict[str, Any]:
    """The Job that downloads, verifies and publishes the model's Triton repository (`pilotfleet fetch`)."""
    digest = weights_hash(model)
    env: list[dict[str, Any]] = [
        {"name": "PILOTFLEET_MODEL_NAME", "value": model.name},
        {
            "name": "PILOTFLEET_MODEL_NAMESPACE",
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        },
        {"name": "PILOTFLEET_TERMINATION_LOG", "value": TERMINATION_LOG},
    ]
    if model.spec.weights.credentials_secret:
        secret = {"name": model.spec.weights.credentials_secret, "key": "token"}
        env.append({"name": "PILOTFLEET_FETCH_TOKEN", "valueFrom": {"secretKeyRef": secret}})
    container: dict[str, Any] = {
        "name": FETCH_CONTAINER,
        "image": settings.fetch_image,
        "command": ["pilotfleet"],
        "args": ["fetch", *fetch_options(model), "--dest", f"{WEIGHTS_MOUNT}/{digest}"],
        "env": sorted(env, key=lambda e: str(e["name"])),
        "volumeMounts": [{"name": "weights", "mountPath": WEIGHTS_MOUNT}],
        "terminationMessagePath": TERMINATION_LOG,
        # A crash before the job could write its reason still leaves the end of its log as the message.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": naming.fetch_service_account_name(model.name),
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "containers": [container],
        "volumes": [{"name": "weights", "persistentVolumeClaim": {"claimName": naming.pvc_name(model.name)}}],
    }
    if settings.fetch_node_selector:
        pod_spec["nodeSelector"] = dict(sorted(settings.fetch_node_selector.items()))
    if settings.fetch_tolerations:
        pod_spec["tolerations"] = [dict(t) for t in settings.fetch_tolerations]
    metadata = _metadata(model, naming.fetch_job_name(model.name, digest), naming.COMPONENT_FETCH)
    metadata["annotations"] = {naming.ANNOTATION_WEIGHTS_HASH: digest}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": settings.fetch_backoff_limit,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": FETCH_CONTAINER,
                            "operator": "In",
                            "values": PERMANENT_EXIT_CODES,
                        },
                    },
                    # A pod evicted or preempted did nothing wrong: not counted against backoffLimit.
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                ]
            },
            "template": {
                "metadata": {"labels": naming.labels(model.name, naming.COMPONENT_FETCH)},
                "spec": pod_spec,
            },
        },
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
                    f"--model-repository={weights_dir(model)}",
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
                    {"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True},
                    {"name": "shm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
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
