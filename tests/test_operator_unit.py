"""The operator's pure core: API models, CRD generation, GPU placement, builders, status."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pilotfleet_operator import builders, crd, gpu, naming
from pilotfleet_operator.cli import crd_directories
from pilotfleet_operator.models import (
    CodeCompletionModel,
    CodeCompletionModelStatus,
    ConditionStatus,
    ConditionType,
    Phase,
)
from pilotfleet_operator.reconcile import pod_scheduling, weights_state
from pilotfleet_operator.settings import Settings
from pilotfleet_operator.status import Observed, WeightsState, compute_status, status_patch, transitions
from pilotfleet_proxy.routes import RouteTable
from pilotfleet_testbed import nodes
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load_example(name: str, namespace: str = "team-a", uid: str = "uid-1") -> CodeCompletionModel:
    """An example manifest as the API server would return it (namespace, uid, generation set)."""
    body = yaml.safe_load((ROOT / "examples" / name).read_text())
    body["metadata"].update(namespace=namespace, uid=uid, generation=1)
    return CodeCompletionModel.from_body(body)


def with_spec(model: CodeCompletionModel, **changes: Any) -> CodeCompletionModel:
    """A copy of `model` with spec fields changed (camelCase keys, as in a manifest)."""
    spec = model.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    spec.update(changes)
    return CodeCompletionModel.from_body({"metadata": model.metadata, "spec": spec})


def test_committed_crds_match_the_models() -> None:
    """`pilotfleet crds` output is committed; any model change without regenerating fails here."""
    expected = crd.crd_yaml()
    for directory in crd_directories(ROOT):
        path = directory / crd.CRD_FILENAME
        assert path.exists(), f"{path} missing: run `pilotfleet crds`"
        assert path.read_text() == expected, f"{path} is stale: run `pilotfleet crds`"


def _walk(schema: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(schema, dict):
        found.append((path, schema))
        for key, value in schema.items():
            found += _walk(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            found += _walk(value, f"{path}/{i}")
    return found


def test_crd_schema_is_structural_with_defaults_and_rules() -> None:
    version = crd.crd()["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "title" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: a union the API server cannot take"
        if "properties" in node:
            assert node.get("type") == "object", path
            assert "additionalProperties" not in node, path
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["engine", "weights"]
    assert spec["properties"]["backend"]["enum"] == ["fastertransformer", "python"]
    assert spec["properties"]["backend"]["default"] == "fastertransformer"
    gpus = spec["properties"]["gpus"]
    assert gpus["default"] == {"count": 1, "minComputeCapability": "7.0", "products": []}
    assert gpus["properties"]["minComputeCapability"]["default"] == "7.0"
    assert gpus["properties"]["count"]["minimum"] == 1
    assert any("count in [1, 2, 4, 8]" in rule["rule"] for rule in gpus["x-kubernetes-validations"])
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Engine",
        "Backend",
        "GPUs",
        "Ready",
        "Phase",
        "Fetched",
        "Age",
    ]
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    model = load_example(path.name)
    assert model.kind == naming.KIND
    assert len(model.name) <= naming.MAX_MODEL_NAME_LENGTH


def test_spec_rejects_unknown_fields_and_bad_values() -> None:
    model = load_example("codegen-350m-mono.yaml")
    with pytest.raises(ValidationError, match="gpuCount"):
        with_spec(model, gpuCount=2)
    with pytest.raises(ValidationError, match="minComputeCapability"):
        with_spec(model, gpus={"minComputeCapability": "seven"})


def _node_by_key() -> dict[str, dict[str, Any]]:
    """The testbed's simulated node pool, one node per GPU type, by GPU key (and "cpu")."""
    pool = nodes.node_pool(per_gpu_type=1, cpu_nodes=1)
    return {node["metadata"]["name"].split("-")[2]: node for node in pool}


def _affinity_allows(affinity: dict[str, Any], labels: dict[str, str]) -> bool:
    """Evaluate required node affinity the way the scheduler does (terms ORed, expressions ANDed)."""

    def match(expr: dict[str, Any]) -> bool:
        value = labels.get(expr["key"])
        op = expr["operator"]
        if op == "Exists":
            return value is not None
        if value is None:
            return False
        if op == "In":
            return value in expr["values"]
        bound = int(expr["values"][0])
        return int(value) > bound if op == "Gt" else int(value) < bound

    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    return any(all(match(e) for e in term["matchExpressions"]) for term in terms)


@pytest.mark.parametrize(
    ("example", "allowed"),
    [
        # FT image: compute capability 7.0-8.6, so never the Pascal P40 nor the Hopper H100.
        ("codegen-350m-mono.yaml", {"v100", "t4", "a100", "a10"}),
        ("codegen-6b-multi.yaml", {"v100", "a100", "a10"}),
        ("codegen-16b-multi.yaml", {"v100", "a100"}),
        # Python image: 7.0-9.0, so the H100 too.
        ("tiny-starcoder-python.yaml", {"v100", "t4", "a100", "a10", "h100"}),
    ],
)
def test_gpu_placement_rules(example: str, allowed: set[str]) -> None:
    model = load_example(example)
    req = gpu.requirement_for(model.spec, Settings())
    affinity = gpu.node_affinity(req)
    by_key = _node_by_key()
    fits = {key for key, node in by_key.items() if gpu.node_fits(req, node)}
    assert fits == allowed
    # The affinity the scheduler sees agrees on labels (it does not count GPUs: the resource request does).
    by_labels = {
        key for key, node in by_key.items() if _affinity_allows(affinity, node["metadata"]["labels"])
    }
    assert by_labels >= fits
    assert "p40" not in by_labels and "cpu" not in by_labels
    assert gpu.no_suitable_gpu(req, by_key.values()) is None


def test_capability_range_across_three_majors() -> None:
    req = gpu.GpuRequirement(count=1, min_capability=(6, 1), max_capability=(8, 0))
    affinity = gpu.node_affinity(req)
    major, minor = gpu.LABEL_MAJOR, gpu.LABEL_MINOR
    cases = {(6, 0): False, (6, 1): True, (7, 5): True, (8, 0): True, (8, 6): False, (9, 0): False}
    for (maj, mnr), expected in cases.items():
        assert _affinity_allows(affinity, {major: str(maj), minor: str(mnr)}) is expected, (maj, mnr)


def test_no_suitable_gpu_lists_what_the_cluster_has() -> None:
    model = with_spec(load_example("codegen-16b-multi.yaml"), gpus={"count": 8, "minMemoryMiB": 90000})
    req = gpu.requirement_for(model.spec, Settings())
    message = gpu.no_suitable_gpu(req, _node_by_key().values())
    assert message is not None
    assert message.startswith("no node offers 8 GPUs with compute capability 7.0-8.6 and >= 90000 MiB each")
    assert "4x Tesla-P40 (6.1, 24576 MiB) on 1 node" in message
    assert "8x NVIDIA-A100-SXM4-80GB (8.0, 81920 MiB) on 1 node" in message
    assert "no GPUs on 1 node" in message
    # An A100 node of 8 GPUs would do with less memory per GPU.
    fitting = with_spec(model, gpus={"count": 8, "minMemoryMiB": 40000})
    assert gpu.no_suitable_gpu(gpu.requirement_for(fitting.spec, Settings()), _node_by_key().values()) is None


def test_untolerated_taints_and_node_selector_exclude_nodes() -> None:
    model = load_example("codegen-350m-mono.yaml")
    node = _node_by_key()["t4"]
    req = gpu.requirement_for(model.spec, Settings())
    assert gpu.node_fits(req, node)
    tainted = {**node, "spec": {"taints": [{"key": "team", "value": "ml", "effect": "NoSchedule"}]}}
    assert not gpu.node_fits(req, tainted)
    tolerant = with_spec(model, tolerations=[{"key": "team", "operator": "Equal", "value": "ml"}])
    assert gpu.node_fits(gpu.requirement_for(tolerant.spec, Settings()), tainted)
    selective = with_spec(model, nodeSelector={"pool": "inference"})
    assert not gpu.node_fits(gpu.requirement_for(selective.spec, Settings()), node)


def test_children_carry_labels_and_owner_reference() -> None:
    model = load_example("codegen-6b-multi.yaml")
    settings = Settings()
    children = [
        builders.pvc_for_model(model, settings),
        builders.fetch_job_for_model(model, settings),
        builders.deployment_for_model(model, settings),
        builders.service_for_model(model, settings),
        *builders.fetch_rbac_for_model(model, settings),
    ]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["labels"][naming.LABEL_MODEL] == "codegen-6b-multi"
        assert meta["labels"][naming.LABEL_MANAGED_BY] == naming.MANAGED_BY
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "pilotfleet.dev/v1alpha1",
                "kind": "CodeCompletionModel",
                "name": "codegen-6b-multi",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    # Deterministic: the same input gives the same output.
    assert builders.deployment_for_model(model, settings) == children[2]


def test_deployment_for_model() -> None:
    model = load_example("codegen-6b-multi.yaml")
    settings = Settings(shm_size="4Gi")
    deployment = builders.deployment_for_model(model, settings)
    assert deployment["metadata"]["name"] == "codegen-6b-multi-triton"
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"]["matchLabels"] == naming.selector_labels("codegen-6b-multi", "triton")
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == settings.fastertransformer_image
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert container["resources"]["requests"] == {"cpu": 4, "memory": "32Gi", "nvidia.com/gpu": 2}
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": 8001,
        "http": 8000,
        "metrics": 8002,
    }
    assert gpu.GPU_TOLERATION in pod["tolerations"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}
    assert volumes["weights"]["persistentVolumeClaim"] == {
        "claimName": "codegen-6b-multi-weights",
        "readOnly": True,
    }
    assert set(volumes) == {"weights", "shm"}
    # Triton serves the repository the fetch job published for exactly these weights and options.
    assert f"--model-repository=/weights/{builders.weights_hash(model)}" in container["args"]
    assert {"name": "weights", "mountPath": "/weights", "readOnly": True} in container["volumeMounts"]


def test_spec_changes_roll_the_pods() -> None:
    model = load_example("codegen-350m-mono.yaml")
    settings = Settings()
    before = builders.deployment_for_model(model, settings)["spec"]["template"]
    longer = with_spec(model, limits={"contextLength": 4096, "maxTokensLimit": 2048})
    after = builders.deployment_for_model(longer, settings)["spec"]["template"]
    # max_seq_len lives in the fetched config.pbtxt: a new repository folder, so new pods.
    assert after["metadata"]["annotations"] != before["metadata"]["annotations"]
    assert after["spec"]["containers"][0]["args"] != before["spec"]["containers"][0]["args"]
    # Replica count is not part of the repository.
    more = with_spec(model, replicas={"min": 2, "max": 2})
    assert builders.weights_hash(more) == builders.weights_hash(model)


def test_fetch_job_runs_the_fetch_command_line() -> None:
    """The Job's command line is exactly `pilotfleet fetch`'s (parsed by its own parser), one contract."""
    import argparse

    from pilotfleet_fetch.cli import add_arguments

    model = load_example("codegen-6b-multi.yaml")
    model = with_spec(
        model,
        weights={
            **model.spec.weights.model_dump(by_alias=True, exclude_none=True),
            "credentialsSecret": "hf",
        },
    )
    settings = Settings(
        fetch_node_selector={"pool": "cpu"},
        fetch_tolerations=[{"key": "pool", "operator": "Exists", "effect": "NoSchedule"}],
    )
    job = builders.fetch_job_for_model(model, settings)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["pilotfleet"] and container["args"][0] == "fetch"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(container["args"][1:])
    assert args.source == model.spec.weights.url
    assert args.tokenizer == model.spec.weights.tokenizer
    assert (args.backend, args.tp, args.model_name) == ("fastertransformer", 2, "fastertransformer")
    assert args.max_seq_len == model.spec.limits.context_length
    assert args.tokenizer_model == builders.TOKENIZER_MODEL
    assert str(args.dest) == builders.weights_dir(model)
    env = {e["name"]: e for e in container["env"]}
    assert env["PILOTFLEET_FETCH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["PILOTFLEET_MODEL_NAME"]["value"] == model.name
    assert env["PILOTFLEET_MODEL_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["PILOTFLEET_TERMINATION_LOG"]["value"] == container["terminationMessagePath"]
    assert pod["serviceAccountName"] == naming.fetch_service_account_name(model.name)
    assert pod["nodeSelector"] == {"pool": "cpu"}
    assert pod["tolerations"] == [{"key": "pool", "operator": "Exists", "effect": "NoSchedule"}]
    # Permanent failures fail the Job at once; Stalled (16) and Unreachable (18) are retried.
    fail_job = job["spec"]["podFailurePolicy"]["rules"][0]
    assert fail_job["action"] == "FailJob"
    assert fail_job["onExitCodes"]["values"] == [2, 10, 11, 12, 13, 14, 15, 17]
    # The Job's identity may patch only its own model's status.
    sa, role, binding = builders.fetch_rbac_for_model(model, settings)
    assert role["rules"] == [
        {
            "apiGroups": ["pilotfleet.dev"],
            "resources": ["codecompletionmodels/status"],
            "verbs": ["patch"],
            "resourceNames": [model.name],
        }
    ]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "team-a"}
    ]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_fetch_job_for_a_hugging_face_model() -> None:
    model = load_example("tiny-starcoder-python.yaml")
    args = builders.fetch_job_for_model(model, Settings())["spec"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert args[args.index("--source") + 1] == "hf://bigcode/tiny_starcoder_py"
    assert args[args.index("--revision") + 1] == "main"
    assert args[args.index("--model-name") + 1] == "huggingface"
    assert args[args.index("--dtype") + 1] == "float16"
    assert "--tp" not in args


def test_fetch_job_follows_the_weight_source() -> None:
    model = load_example("codegen-350m-mono.yaml")
    settings = Settings()
    job = builders.fetch_job_for_model(model, settings)
    moved = with_spec(model, weights={"url": "https://example.com/other.tar.zst"})
    assert builders.fetch_job_for_model(moved, settings)["metadata"]["name"] != job["metadata"]["name"]
    # For FT the shard count is part of the weights' identity.
    wider = with_spec(model, gpus={"count": 2})
    assert builders.weights_hash(wider) != builders.weights_hash(model)


def test_route_entries_validate_against_the_proxy_schema() -> None:
    settings = Settings()
    models = [load_example(p.name, uid=f"uid-{i}") for i, p in enumerate(EXAMPLES)]
    ready = {("team-a", "codegen-350m-mono")}
    entries, problems = builders.route_entries(models, ready, settings)
    assert problems == {}
    configmap = builders.routes_configmap(entries, settings)
    table = RouteTable.from_yaml(configmap["data"][naming.ROUTES_KEY])
    route = table.lookup("copilot-codex")
    assert route is not None and route.name == "codegen-350m-mono"
    assert route.endpoints == ("codegen-350m-mono-triton.team-a.svc:8001",)
    assert route.tokenizer == "triton://tokenizer"
    starcoder = table.lookup("tiny-starcoder")
    assert starcoder is not None and starcoder.endpoints == () and starcoder.fim is not None
    assert starcoder.triton_model == "huggingface"


def test_route_name_conflict_leaves_the_newer_model_out() -> None:
    older = load_example("codegen-350m-mono.yaml")
    older.metadata["creationTimestamp"] = "2026-01-01T00:00:00Z"
    newer_body = {
        "metadata": {**older.metadata, "name": "impostor", "creationTimestamp": "2026-02-01T00:00:00Z"},
        "spec": {**older.spec.model_dump(by_alias=True, exclude_none=True, mode="json"), "engine": "codegen"},
    }
    newer = CodeCompletionModel.from_body(newer_body)
    entries, problems = builders.route_entries([newer, older], set(), Settings())
    assert [e["name"] for e in entries] == ["codegen-350m-mono"]
    assert problems == {
        (
            "team-a",
            "impostor",
        ): "name 'codegen' is already served by CodeCompletionModel team-a/codegen-350m-mono"
    }


def _observed(**changes: Any) -> Observed:
    base: dict[str, Any] = {
        "generation": 3,
        "weights": WeightsState.READY,
        "weights_message": "fetched",
        "gpu_problem": None,
        "desired_replicas": 1,
        "scheduled_pods": 1,
        "unschedulable": None,
        "ready_replicas": 1,
        "routed": True,
        "route_problem": None,
        "url": "m-triton.ns.svc:8001",
    }
    base.update(changes)
    return Observed(**base)


def test_status_ready_and_stable() -> None:
    first = compute_status(CodeCompletionModelStatus(), _observed(), "2026-01-01T00:00:00Z")
    assert first.phase is Phase.READY
    assert first.ready == "1/1"
    assert {c.type: c.status for c in first.conditions} == {t: ConditionStatus.TRUE for t in ConditionType}
    assert [t.type for t in transitions(CodeCompletionModelStatus(), first)] == list(ConditionType)
    # Same world later: same status (transition times kept), nothing to write, no Events.
    again = compute_status(first, _observed(), "2026-01-01T00:05:00Z")
    assert status_patch(again) == status_patch(first)
    assert transitions(first, again) == []


def test_status_no_suitable_gpu() -> None:
    status = compute_status(
        CodeCompletionModelStatus(),
        _observed(gpu_problem="no node offers 8 GPUs", weights=WeightsState.NOT_STARTED, ready_replicas=0),
        "2026-01-01T00:00:00Z",
    )
    assert status.phase is Phase.UNSCHEDULABLE
    by_type = {c.type: c for c in status.conditions}
    assert by_type[ConditionType.SCHEDULED].reason == "NoSuitableGPU"
    assert by_type[ConditionType.READY].status is ConditionStatus.FALSE
    assert by_type[ConditionType.READY].message.startswith("WeightsReady:")
    warnings = [t for t in transitions(CodeCompletionModelStatus(), status) if t.event_type == "Warning"]
    assert [t.reason for t in warnings] == ["NoSuitableGPU"]


def test_status_fetch_failed() -> None:
    status = compute_status(
        CodeCompletionModelStatus(),
        _observed(
            weights=WeightsState.FAILED,
            weights_reason="ChecksumMismatch",
            weights_message="fetch job x failed: sha256 differs",
        ),
        "2026-01-01T00:00:00Z",
    )
    assert status.phase is Phase.FAILED
    weights = next(c for c in status.conditions if c.type is ConditionType.WEIGHTS_READY)
    assert (weights.status, weights.reason) == (ConditionStatus.FALSE, "ChecksumMismatch")
    ready = next(c for c in status.conditions if c.type is ConditionType.READY)
    assert ready.status is ConditionStatus.FALSE
    warnings = [t for t in transitions(CodeCompletionModelStatus(), status) if t.event_type == "Warning"]
    assert {t.reason for t in warnings} == {"ChecksumMismatch"}


def _failed_pod(exit_code: int, message: str, finished: str) -> dict[str, Any]:
    terminated = {"exitCode": exit_code, "message": message, "finishedAt": finished}
    return {"status": {"containerStatuses": [{"name": "fetch", "state": {"terminated": terminated}}]}}


def test_weights_state_follows_the_job() -> None:
    job: dict[str, Any] = {"metadata": {"name": "m-fetch-abc"}, "status": {"active": 1}}
    assert weights_state(None)[0] is WeightsState.NOT_STARTED
    assert weights_state(job) == (WeightsState.FETCHING, "Fetching", "fetch job m-fetch-abc is running")
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}
    assert weights_state(job)[0] is WeightsState.READY
    job["status"] = {
        "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "x"}]
    }
    assert weights_state(job) == (WeightsState.FAILED, "FetchFailed", "fetch job m-fetch-abc failed: x")
    # The fetch job's own reason, from the termination message of its last failed attempt.
    pods = [
        _failed_pod(18, '{"reason": "Unreachable", "message": "connection refused"}', "2026-01-01T00:00:01Z"),
        _failed_pod(12, '{"reason": "ChecksumMismatch", "message": "sha256 is 00"}', "2026-01-01T00:00:09Z"),
    ]
    assert weights_state(job, pods) == (
        WeightsState.FAILED,
        "ChecksumMismatch",
        "fetch job m-fetch-abc failed: sha256 is 00",
    )
    # A crash with no reason written: the end of its log (FallbackToLogsOnError) and the exit code.
    crashed = [_failed_pod(1, "Traceback (most recent call last):\nMemoryError", "2026-01-01T00:00:01Z")]
    assert weights_state(job, crashed)[1:] == (
        "FetchFailed",
        "fetch job m-fetch-abc failed: exit code 1: MemoryError",
    )


def test_pod_scheduling_reports_the_schedulers_message() -> None:
    placed = {"metadata": {}, "status": {"conditions": [{"type": "PodScheduled", "status": "True"}]}}
    stuck = {
        "metadata": {},
        "status": {
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/8 nodes are available: 8 Insufficient nvidia.com/gpu.",
                }
            ]
        },
    }
    leaving = {**placed, "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert pod_scheduling([placed, leaving]) == (1, None)
    assert pod_scheduling([placed, stuck]) == (1, "0/8 nodes are available: 8 Insufficient nvidia.com/gpu.")
