"""The operator against the testbed's real API server, controllers, scheduler and KWOK GPU nodes.

Here the weights fetch Job is completed by KWOK (its pods move to Succeeded), so these tests check that
the operator creates the Job, waits for it and reflects its result; tests/test_fetch_job_e2e.py runs the
real `pilotfleet fetch` in that Job, end to end.
Storage is a static PersistentVolume per claim, pre-bound the way a cluster admin would provide it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kopf.testing import KopfRunner
from pilotfleet_operator import crd, naming
from pilotfleet_operator.apply import (
    CONFIGMAPS,
    CRDS,
    DEPLOYMENTS,
    JOBS,
    MODELS,
    NODES,
    PODS,
    PVCS,
    SERVICES,
    ApiError,
    Kube,
    Resource,
)
from pilotfleet_operator.gpu import node_gpus
from pilotfleet_operator.settings import CapabilityRange, Settings
from pilotfleet_proxy.routes import RouteTable
from pilotfleet_serve import procs
from pilotfleet_testbed.kube import Cluster
from pilotfleet_testbed.polling import wait_for

pytestmark = pytest.mark.testbed
log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
EVENTS = Resource("v1", "events")
PVS = Resource("v1", "persistentvolumes", namespaced=False)
EXAMPLES = (
    "codegen-350m-mono.yaml",
    "codegen-6b-multi.yaml",
    "codegen-16b-multi.yaml",
    "tiny-starcoder-python.yaml",
)


def example(name: str) -> dict[str, Any]:
    """An example manifest."""
    body: dict[str, Any] = yaml.safe_load((ROOT / "examples" / name).read_text())
    return body


def condition(model: dict[str, Any], kind: str) -> dict[str, Any]:
    """One status condition of a model object ({} when absent)."""
    for cond in (model.get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return {}


@pytest.fixture(scope="session")
def ccm_crd(kube_cluster: Cluster) -> None:
    """The CodeCompletionModel CRD installed from the generated YAML and Established."""
    api = kube_cluster.api_client()
    try:
        kube = Kube(api)
        kube.apply(crd.crd())

        def established() -> bool:
            obj = kube.get(CRDS, None, naming.CRD_NAME) or {}
            conds = (obj.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conds)

        wait_for(established, "the CRD to be Established", timeout=30)
    finally:
        api.close()


@pytest.fixture
def kube(k8s_api: Any) -> Kube:
    """The operator's own API access, as the admin."""
    return Kube(k8s_api)


def create_model(kube: Kube, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a CodeCompletionModel, as `kubectl create` would."""
    return kube.request("POST", MODELS.path(namespace), body=body)


def create_pre_bound_volume(
    kube: Kube, namespace: str, model: str, access_modes: list[str], host_path: str | None = None
) -> str:
    """Create a hostPath PersistentVolume pre-bound to the weights claim of `model`; return its name.

    The host path defaults to a folder under /tmp named after the volume (nothing is written there).
    """
    name = f"{namespace}-{model}"[:63]
    kube.request(
        "POST",
        PVS.path(),
        body={
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": "100Gi"},
                "accessModes": access_modes,
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": host_path or f"/tmp/pilotfleet-pv/{name}"},
                "claimRef": {"namespace": namespace, "name": naming.pvc_name(model)},
            },
        },
    )
    return name


@pytest.fixture
def volumes(kube: Kube, k8s_namespace: str) -> Iterator[Callable[[str], None]]:
    """Provide a PersistentVolume pre-bound to the weights claim of a model; all deleted afterwards."""
    created: list[str] = []

    def provide(model: str) -> None:
        modes = ["ReadWriteOnce", "ReadWriteMany"]
        created.append(create_pre_bound_volume(kube, k8s_namespace, model, modes))

    yield provide
    for name in created:
        kube.delete(PVS, None, name)


class OperatorUnderTest:
    """The operator run in-process by kopf's KopfRunner; can be restarted, and reports if it died."""

    def __init__(self, namespace: str) -> None:
        self.args = ["run", "--standalone", "--namespace", namespace, "-m", "pilotfleet_operator.handlers"]
        self.runner: KopfRunner | None = None

    def start(self) -> None:
        """Start an operator instance."""
        self.runner = KopfRunner(self.args, timeout=30)
        self.runner.__enter__()

    def stop(self) -> None:
        """Stop the instance, checking that it ended cleanly."""
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.__exit__(None, None, None)
            assert runner.exception is None, runner.output
            assert runner.exit_code == 0, runner.output

    @property
    def running(self) -> bool:
        """True between `start()` and `stop()`."""
        return self.runner is not None

    def restart(self) -> None:
        """Stop the running instance and start a fresh one (new process state, same cluster state)."""
        self.stop()
        self.start()

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
        """Like `wait_for`, but fail at once, with its output, if the operator has exited."""

        def check() -> Any:
            if self.runner is None or self.runner.future.done():
                output = self.runner.output if self.runner is not None else "(not started)"
                raise AssertionError(f"the operator exited while waiting for {what}:\n{output[-3000:]}")
            return condition()

        return wait_for(check, what, timeout)


def set_operator_env(monkeypatch: pytest.MonkeyPatch, cluster: Cluster, namespace: str) -> None:
    """Point the in-process operator at `cluster`, confined to `namespace`, retrying fast."""
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("PILOTFLEET_OPERATOR_NAMESPACE", namespace)
    monkeypatch.setenv("PILOTFLEET_OPERATOR_WATCH_NAMESPACES", json.dumps([namespace]))
    monkeypatch.setenv("PILOTFLEET_OPERATOR_RETRY_DELAY", "0.5")


Handle = TypeVar("Handle", bound=OperatorUnderTest)


@contextlib.contextmanager
def operating(handle: Handle, kube: Kube, namespace: str) -> Iterator[Handle]:
    """Run `handle` for the block; the models of `namespace` are deleted before it stops."""
    handle.start()
    try:
        yield handle
    finally:
        # Delete the models while the operator runs, so that their finalizers are honoured.
        if handle.running:
            for model in kube.list(MODELS, namespace):
                kube.delete(MODELS, namespace, model["metadata"]["name"])
            handle.wait_for(lambda: not kube.list(MODELS, namespace), "the models to be deleted", 60)
        handle.stop()


@pytest.fixture
def operator(
    kube_cluster: Cluster, k8s_namespace: str, kube: Kube, ccm_crd: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[OperatorUnderTest]:
    """The operator watching the test namespace; the models are deleted before it stops."""
    set_operator_env(monkeypatch, kube_cluster, k8s_namespace)
    with operating(OperatorUnderTest(k8s_namespace), kube, k8s_namespace) as handle:
        yield handle


def test_bad_manifests_are_rejected_naming_the_field(kube: Kube, k8s_namespace: str, ccm_crd: None) -> None:
    good = example("codegen-350m-mono.yaml")
    # A good manifest is accepted and the API server fills in the schema's defaults.
    stored = kube.request("POST", MODELS.path(k8s_namespace), query={"dryRun": "All"}, body=good)
    assert stored["spec"]["storage"]["retainOnDelete"] is True
    assert stored["spec"]["gpus"]["minComputeCapability"] == "7.0"
    assert stored["spec"]["replicas"] == {"min": 1, "max": 1}

    def rejected(spec_changes: dict[str, Any], name: str = "bad") -> str:
        body = {**good, "metadata": {"name": name}, "spec": {**good["spec"], **spec_changes}}
        with pytest.raises(ApiError) as info:
            create_model(kube, k8s_namespace, body)
        assert info.value.status == 422
        return info.value.message

    both = {"url": "https://example.com/w.tar.zst", "huggingFace": {"repo": "a/b"}}
    message = rejected({"weights": both})
    assert "spec.weights" in message and "exactly one of url or huggingFace" in message
    message = rejected({"gpus": {"count": 3}})
    assert "spec.gpus.count" in message and "1, 2, 4 or 8" in message
    message = rejected({"backend": "onnx"})
    assert "spec.backend" in message and "Unsupported value" in message
    no_ft = {key: value for key, value in good["spec"].items() if key != "fasterTransformer"}
    with pytest.raises(ApiError) as info:
        create_model(kube, k8s_namespace, {**good, "metadata": {"name": "bad"}, "spec": no_ft})
    assert "spec.fasterTransformer" in info.value.message
    message = rejected({"limits": {"defaultMaxTokens": 4096}})
    assert "spec.limits.defaultMaxTokens" in message
    message = rejected({}, name="x" * 41)
    assert "metadata.name must be at most 40 characters" in message


def _pods_of(kube: Kube, namespace: str, model: str) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in naming.selector_labels(model, naming.COMPONENT_TRITON).items())
    return kube.list(PODS, namespace, selector)


def test_examples_become_ready_on_matching_gpus(
    kube: Kube, k8s_namespace: str, volumes: Callable[[str], None], operator: OperatorUnderTest
) -> None:
    started = time.monotonic()
    for name in EXAMPLES:
        body = example(name)
        volumes(body["metadata"]["name"])
        create_model(kube, k8s_namespace, body)
    names = [example(name)["metadata"]["name"] for name in EXAMPLES]

    def all_ready() -> list[dict[str, Any]] | None:
        models = [kube.get(MODELS, k8s_namespace, n) or {} for n in names]
        ready = all(condition(m, "Ready").get("status") == "True" for m in models)
        return models if ready else None

    models = operator.wait_for(all_ready, "all four examples to be Ready", timeout=120)
    log.info("4 examples Ready in %.1fs", time.monotonic() - started)
    settings = Settings()
    nodes = {n["metadata"]["name"]: n for n in kube.list(NODES)}
    for model in models:
        name, spec, status = model["metadata"]["name"], model["spec"], model["status"]
        assert status["phase"] == "Ready" and status["ready"] == "1/1"
        assert status["observedGeneration"] == model["metadata"]["generation"]
        assert status["url"] == f"{name}-triton.{k8s_namespace}.svc:8001"
        for kind in ("WeightsReady", "Scheduled", "InferenceReady", "Routed"):
            assert condition(model, kind)["status"] == "True", (name, kind)
        # Every child exists and is owned by the model.
        uid = model["metadata"]["uid"]
        children = [
            kube.get(PVCS, k8s_namespace, naming.pvc_name(name)),
            kube.get(DEPLOYMENTS, k8s_namespace, naming.triton_name(name)),
            kube.get(SERVICES, k8s_namespace, naming.triton_name(name)),
            *kube.list(JOBS, k8s_namespace, naming.children_selector(name)),
        ]
        assert all(child is not None for child in children), name
        for child in children:
            assert child is not None and child["metadata"]["ownerReferences"][0]["uid"] == uid
        assert len(children) == 4, f"{name}: exactly one fetch Job"
        # The Triton pod runs on a node whose GPUs satisfy the rules of the model's backend image.
        low, high = CapabilityRange.parse(
            settings.fastertransformer_compute_capability
            if spec["backend"] == "fastertransformer"
            else settings.python_compute_capability
        )
        pods = _pods_of(kube, k8s_namespace, name)
        assert len(pods) == 1 and pods[0]["status"]["phase"] == "Running", name
        node = nodes[pods[0]["spec"]["nodeName"]]
        gpus = node_gpus(node)
        assert gpus.capability is not None and low <= gpus.capability <= high, (
            name,
            node["metadata"]["name"],
        )
        assert gpus.count >= spec["gpus"]["count"]
        assert gpus.memory_mib is not None and gpus.memory_mib >= spec["gpus"]["minMemoryMiB"]
        assert gpus.product != "Tesla-P40"
        # An Event tells the story.
        events = kube.list(EVENTS, k8s_namespace)
        reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == name}
        assert {"Fetched", "Scheduled", "TritonReady", "Ready"} <= reasons, (name, reasons)

    routes = kube.get(CONFIGMAPS, k8s_namespace, naming.ROUTES_CONFIGMAP)
    assert routes is not None
    table = RouteTable.from_yaml(routes["data"][naming.ROUTES_KEY])
    assert sorted(route.name for route in table.models) == sorted(m["spec"]["engine"] for m in models)
    for model in models:
        route = table.lookup(model["spec"]["engine"])
        assert route is not None and route.endpoints == (model["status"]["url"],)
    copilot = table.lookup("copilot-codex")
    assert copilot is not None and copilot.name == "codegen-350m-mono"


def test_no_suitable_gpu_is_refused_with_condition_and_event(
    kube: Kube, k8s_namespace: str, operator: OperatorUnderTest
) -> None:
    body = example("codegen-16b-multi.yaml")
    body["metadata"]["name"] = "too-big"
    body["spec"]["engine"] = "too-big"
    body["spec"]["gpus"] = {"count": 8, "minMemoryMiB": 100000}
    create_model(kube, k8s_namespace, body)

    def refused() -> dict[str, Any] | None:
        model = kube.get(MODELS, k8s_namespace, "too-big") or {}
        return model if condition(model, "Scheduled").get("reason") == "NoSuitableGPU" else None

    model = operator.wait_for(refused, "the NoSuitableGPU condition", timeout=60)
    scheduled = condition(model, "Scheduled")
    assert scheduled["status"] == "False"
    assert "8 GPUs with compute capability 7.0-8.6 and >= 100000 MiB each" in scheduled["message"]
    assert "Tesla-P40 (6.1, 24576 MiB)" in scheduled["message"]
    assert model["status"]["phase"] == "Unschedulable"
    events = wait_for(
        lambda: [
            e
            for e in kube.list(EVENTS, k8s_namespace)
            if e["involvedObject"].get("name") == "too-big" and e["reason"] == "NoSuitableGPU"
        ],
        "the NoSuitableGPU Event",
        timeout=30,
    )
    assert events[0]["type"] == "Warning"
    # Nothing was started that would take storage or a GPU.
    for resource in (JOBS, DEPLOYMENTS, PVCS):
        assert kube.list(resource, k8s_namespace, naming.children_selector("too-big")) == []


def test_spec_change_rolls_restart_converges_delete_keeps_pvc(
    kube: Kube, k8s_namespace: str, volumes: Callable[[str], None], operator: OperatorUnderTest
) -> None:
    body = example("codegen-350m-mono.yaml")
    name = body["metadata"]["name"]
    volumes(name)
    create_model(kube, k8s_namespace, body)

    def ready_at(generation: int) -> dict[str, Any] | None:
        model = kube.get(MODELS, k8s_namespace, name) or {}
        ok = (model.get("status") or {}).get("observedGeneration") == generation
        return model if ok and condition(model, "Ready").get("status") == "True" else None

    operator.wait_for(lambda: ready_at(1), "the model to be Ready")
    deployment = kube.get(DEPLOYMENTS, k8s_namespace, naming.triton_name(name))
    assert deployment is not None
    old_hash = deployment["spec"]["template"]["metadata"]["annotations"][naming.ANNOTATION_WEIGHTS_HASH]
    old_pod = _pods_of(kube, k8s_namespace, name)[0]["metadata"]["name"]

    # A spec change reaches the running Deployment as a rolling update to a new pod template.
    kube.merge_patch(MODELS, k8s_namespace, name, {"spec": {"limits": {"contextLength": 4096}}})
    operator.wait_for(lambda: ready_at(2), "the model to be Ready at generation 2")

    def rolled() -> bool:
        dep = kube.get(DEPLOYMENTS, k8s_namespace, naming.triton_name(name)) or {}
        annotations = dep["spec"]["template"]["metadata"]["annotations"]
        status = dep.get("status") or {}
        pods = [p["metadata"]["name"] for p in _pods_of(kube, k8s_namespace, name)]
        return bool(
            annotations[naming.ANNOTATION_WEIGHTS_HASH] != old_hash
            and status.get("updatedReplicas") == 1
            and status.get("readyReplicas") == 1
            and status.get("replicas") == 1
            and old_pod not in pods
        )

    operator.wait_for(rolled, "the rolling update to replace the pod", timeout=60)
    # max_seq_len goes into config.pbtxt through the fetch job, the repository's only writer.
    jobs = kube.list(JOBS, k8s_namespace, naming.children_selector(name))
    args = [j["spec"]["template"]["spec"]["containers"][0]["args"] for j in jobs]
    assert [a[a.index("--max-seq-len") + 1] for a in args] == ["4096"]

    # Restart mid-reconcile: a change lands, the operator stops before it converges, a new one finishes.
    kube.merge_patch(MODELS, k8s_namespace, name, {"spec": {"gpus": {"count": 2}}})
    operator.restart()
    operator.wait_for(lambda: ready_at(3), "Ready after the restart")
    # The new shard count is new weights: one fetch Job for them, the old one pruned; one Deployment.
    jobs = kube.list(JOBS, k8s_namespace, naming.children_selector(name))
    assert [j["metadata"]["name"] for j in jobs] == [
        f"{name}-fetch-{jobs[0]['metadata']['annotations'][naming.ANNOTATION_WEIGHTS_HASH]}"
    ]
    assert len(kube.list(DEPLOYMENTS, k8s_namespace, naming.children_selector(name))) == 1
    pods = _pods_of(kube, k8s_namespace, name)
    assert [p["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for p in pods] == ["2"]

    # Delete: the children go with the model, the retained PVC stays, and so does nothing in the routes.
    kube.delete(MODELS, k8s_namespace, name)
    operator.wait_for(lambda: kube.get(MODELS, k8s_namespace, name) is None, "the model to be deleted", 60)
    wait_for(
        lambda: (
            kube.get(DEPLOYMENTS, k8s_namespace, naming.triton_name(name)) is None
            and not kube.list(JOBS, k8s_namespace, naming.children_selector(name))
        ),
        "garbage collection of the Deployment and Job",
        timeout=60,
    )
    pvc = kube.get(PVCS, k8s_namespace, naming.pvc_name(name))
    assert pvc is not None and not pvc["metadata"].get("ownerReferences")
    routes = kube.get(CONFIGMAPS, k8s_namespace, naming.ROUTES_CONFIGMAP) or {}
    assert RouteTable.from_yaml(routes["data"][naming.ROUTES_KEY]).models == ()


def test_delete_without_retain_removes_the_pvc(
    kube: Kube, k8s_namespace: str, volumes: Callable[[str], None], operator: OperatorUnderTest
) -> None:
    body = example("codegen-350m-mono.yaml")
    body["spec"]["storage"]["retainOnDelete"] = False
    name = body["metadata"]["name"]
    volumes(name)
    create_model(kube, k8s_namespace, body)
    operator.wait_for(
        lambda: condition(kube.get(MODELS, k8s_namespace, name) or {}, "Ready").get("status") == "True",
        "the model to be Ready",
    )
    kube.delete(MODELS, k8s_namespace, name)
    operator.wait_for(
        lambda: kube.get(PVCS, k8s_namespace, naming.pvc_name(name)) is None,
        "garbage collection of the PVC",
        timeout=60,
    )


def test_leader_election_one_replica_reconciles_and_fails_over(
    kube_cluster: Cluster,
    kube: Kube,
    k8s_namespace: str,
    volumes: Callable[[str], None],
    ccm_crd: None,
    tmp_path: Path,
) -> None:
    """Two `pilotfleet operator` processes with leader election: one leads, the other takes over."""
    env = {
        "KUBECONFIG": str(kube_cluster.kubeconfig),
        "PILOTFLEET_OPERATOR_NAMESPACE": k8s_namespace,
        "PILOTFLEET_OPERATOR_WATCH_NAMESPACES": json.dumps([k8s_namespace]),
        "PILOTFLEET_OPERATOR_RETRY_DELAY": "0.5",
        "PILOTFLEET_OPERATOR_LEADER_ELECTION": "true",
        "PILOTFLEET_OPERATOR_LEASE_NAME": "pilotfleet-operator",
        "PILOTFLEET_OPERATOR_LEASE_DURATION_S": "4",
        "PILOTFLEET_OPERATOR_RENEW_DEADLINE_S": "3",
        "PILOTFLEET_OPERATOR_RETRY_PERIOD_S": "1",
    }
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{k8s_namespace}/leases/pilotfleet-operator"

    def holder() -> str:
        try:
            return str(kube.request("GET", lease_path)["spec"].get("holderIdentity", ""))
        except ApiError:
            return ""

    def start(identity: str) -> tuple[procs.Process, int]:
        port = procs.free_port()
        argv = [
            sys.executable,
            "-m",
            "pilotfleet_cli.main",
            "operator",
            "--liveness",
            f"http://127.0.0.1:{port}/healthz",
        ]
        return procs.start(
            f"operator-{identity}", argv, tmp_path, {**env, "PILOTFLEET_OPERATOR_POD_NAME": identity}
        ), port

    def healthy(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    first, _ = start("first")
    second: procs.Process | None = None
    try:
        first.wait_until(lambda: holder() == "first", 30, "leading")
        second, second_port = start("second")
        second.wait_until(lambda: healthy(second_port), 30, "answering its liveness probe as a follower")
        body = example("codegen-350m-mono.yaml")
        name = body["metadata"]["name"]
        volumes(name)
        create_model(kube, k8s_namespace, body)

        def ready_at(generation: int) -> bool:
            model = kube.get(MODELS, k8s_namespace, name) or {}
            ok = (model.get("status") or {}).get("observedGeneration") == generation
            return ok and condition(model, "Ready").get("status") == "True"

        first.wait_until(lambda: ready_at(1), 60, "reconciling the model to Ready")
        assert holder() == "first"
        assert "second leads" not in second.log_path.read_text()

        # The leader crashes: the follower takes the Lease once it expires, and carries on reconciling.
        os.killpg(first.pid, signal.SIGKILL)
        first.popen.wait()
        second.wait_until(lambda: holder() == "second", 30, "taking over the Lease")
        kube.merge_patch(MODELS, k8s_namespace, name, {"spec": {"limits": {"contextLength": 4096}}})
        second.wait_until(lambda: ready_at(2), 60, "reconciling the change as the new leader")
        assert "second leads" in second.log_path.read_text()
        kube.delete(MODELS, k8s_namespace, name)
        second.wait_until(lambda: kube.get(MODELS, k8s_namespace, name) is None, 60, "finalizing the model")
    finally:
        first.stop()
        if second is not None:
            second.stop()
