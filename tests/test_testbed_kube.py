"""The Kubernetes testbed is real: API server, controllers, scheduler and KWOK nodes behave like a cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from pilotfleet_serve import procs
from pilotfleet_testbed import gobuild, kube, nodes, versions
from pilotfleet_testbed.kube import Cluster, StartError
from pilotfleet_testbed.leftovers import processes_mentioning

pytestmark = pytest.mark.testbed

# The API handles are typed Any: we pass plain manifests (which the client sends as they are) where its
# type hints ask for V1 model objects.

GPU = nodes.GPU_RESOURCE
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}


def _pool_nodes(core: Any) -> list[Any]:
    return list(core.list_node(label_selector=f"{nodes.POOL_LABEL}=true").items)


def _pods(core: Any, namespace: str, selector: str) -> list[Any]:
    return list(core.list_namespaced_pod(namespace, label_selector=selector).items)


def _gpu_deployment(name: str, replicas: int, gpus: int, min_major: int | None) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "tolerations": [GPU_TOLERATION],
        "containers": [
            {
                "name": "triton",
                "image": "nvcr.io/nvidia/tritonserver:24.08-py3",
                "resources": {"limits": {GPU: str(gpus)}, "requests": {"cpu": "100m"}},
            }
        ],
    }
    if min_major is not None:
        pod_spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": "nvidia.com/gpu.compute.major",
                                    "operator": "Gt",
                                    "values": [str(min_major - 1)],
                                }
                            ]
                        }
                    ]
                }
            }
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


def _free_gpus(core: Any) -> dict[str, int]:
    """Free `nvidia.com/gpu` per node as the scheduler sees it: allocatable minus live pods' requests."""
    free = {n.metadata.name: int((n.status.allocatable or {}).get(GPU, "0")) for n in _pool_nodes(core)}
    for pod in core.list_pod_for_all_namespaces().items:
        if pod.spec.node_name in free and pod.status.phase not in ("Succeeded", "Failed"):
            for container in pod.spec.containers:
                limits = (container.resources and container.resources.limits) or {}
                free[pod.spec.node_name] -= int(limits.get(GPU, "0"))
    return free


def _unschedulable_message(pod: Any) -> str | None:
    for cond in pod.status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False" and cond.reason == "Unschedulable":
            return str(cond.message)
    return None


def test_node_pool_is_parameterizable() -> None:
    """A benchmark can ask for many nodes of chosen types; unknown types are refused."""
    pool = nodes.node_pool({"a100": 60, "t4": 40}, cpu_nodes=0)
    assert len(pool) == 100
    assert {n["metadata"]["labels"]["nvidia.com/gpu.product"] for n in pool} == {
        "NVIDIA-A100-SXM4-80GB",
        "Tesla-T4",
    }
    assert len({n["metadata"]["name"] for n in pool}) == 100
    with pytest.raises(ValueError, match="mi300"):
        nodes.node_pool({"mi300": 1})


def test_nodes_are_ready_with_gfd_labels_and_gpu_capacity(kube_cluster: Cluster, k8s_api: Any) -> None:
    """Every simulated node is Ready (KWOK) and carries GFD labels, GPU capacity and the GPU taint."""
    core: Any = client.CoreV1Api(k8s_api)
    by_name = {n.metadata.name: n for n in _pool_nodes(core)}
    expected = nodes.node_pool()
    assert set(by_name) == {m["metadata"]["name"] for m in expected}
    for node in by_name.values():
        assert nodes.node_schedulable(node), node.metadata.name

    seen_capabilities = set()
    for gpu in nodes.GPU_TYPES:
        node = by_name[f"kwok-gpu-{gpu.key}-0"]
        labels = node.metadata.labels
        seen_capabilities.add(
            (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"])
        )
        assert labels["nvidia.com/gpu.product"] == gpu.product
        assert labels["nvidia.com/gpu.memory"] == str(gpu.memory_mib)
        assert labels["nvidia.com/gpu.count"] == str(gpu.gpus_per_node)
        assert node.status.capacity[GPU] == node.status.allocatable[GPU] == str(gpu.gpus_per_node)
        assert [(t.key, t.value, t.effect) for t in node.spec.taints] == [(GPU, "present", "NoSchedule")]
    assert seen_capabilities == {("6", "1"), ("7", "0"), ("7", "5"), ("8", "0"), ("8", "6"), ("9", "0")}
    assert {by_name[f"kwok-gpu-{k}-0"].status.allocatable[GPU] for k in ("t4", "a10", "v100", "a100")} == {
        "1",
        "2",
        "4",
        "8",
    }

    cpu_nodes = [n for n in by_name.values() if n.metadata.name.startswith("kwok-cpu-")]
    assert len(cpu_nodes) == 2
    for node in cpu_nodes:
        assert GPU not in node.status.allocatable
        assert not node.spec.taints


def test_gpu_pods_land_only_on_compute_7_or_newer(
    kube_cluster: Cluster, k8s_api: Any, k8s_namespace: str
) -> None:
    """With every eligible GPU taken, one more replica stays Pending although the P40s sit idle."""
    core: Any = client.CoreV1Api(k8s_api)
    apps: Any = client.AppsV1Api(k8s_api)
    by_name = {n.metadata.name: n for n in _pool_nodes(core)}
    free = _free_gpus(core)
    eligible = sum(
        count
        for name, count in free.items()
        if int(by_name[name].metadata.labels.get("nvidia.com/gpu.compute.major", "0")) >= 7
    )
    assert eligible >= 4, f"the default pool should have free GPUs of compute >= 7.0, got {free}"
    idle_pascal = sum(
        count
        for name, count in free.items()
        if by_name[name].metadata.labels.get("nvidia.com/gpu.compute.major") == "6"
    )
    assert idle_pascal > 0, "the test needs an idle P40 to prove the affinity keeps pods off it"

    apps.create_namespaced_deployment(k8s_namespace, _gpu_deployment("codegen", eligible + 1, 1, min_major=7))

    def settled() -> bool:
        pods = _pods(core, k8s_namespace, "app=codegen")
        running = [p for p in pods if p.status.phase == "Running"]
        pending = [p for p in pods if _unschedulable_message(p)]
        return len(running) == eligible and len(pending) == 1

    kube_cluster.wait_for(settled, f"{eligible} Running pods and 1 unschedulable", timeout=60)
    pods = _pods(core, k8s_namespace, "app=codegen")
    for pod in pods:
        if pod.status.phase != "Running":
            continue
        labels = by_name[pod.spec.node_name].metadata.labels
        assert int(labels["nvidia.com/gpu.compute.major"]) >= 7, (pod.metadata.name, pod.spec.node_name)
        assert pod.status.pod_ip, "KWOK reports a pod IP for running pods"
    placed = {p.spec.node_name for p in pods if p.spec.node_name}
    assert not any(n.startswith(("kwok-gpu-p40", "kwok-cpu")) for n in placed), placed
    (pending,) = [p for p in pods if p.status.phase == "Pending"]
    message = _unschedulable_message(pending)
    assert message is not None
    assert "nvidia.com/gpu" in message
    assert "affinity" in message  # the P40s were rejected by the affinity, not by capacity

    # Give the GPUs back before the next test looks at free capacity.
    apps.delete_namespaced_deployment("codegen", k8s_namespace)
    kube_cluster.wait_for(lambda: not _pods(core, k8s_namespace, "app=codegen"), "the pods to be deleted")


def test_unsatisfiable_gpu_request_stays_pending(
    kube_cluster: Cluster, k8s_api: Any, k8s_namespace: str
) -> None:
    """No node has 16 GPUs: the scheduler marks the pod Unschedulable and says why."""
    core: Any = client.CoreV1Api(k8s_api)
    apps: Any = client.AppsV1Api(k8s_api)
    apps.create_namespaced_deployment(k8s_namespace, _gpu_deployment("codegen-16b", 1, 16, min_major=None))

    def unschedulable() -> bool:
        return any(_unschedulable_message(p) for p in _pods(core, k8s_namespace, "app=codegen-16b"))

    kube_cluster.wait_for(unschedulable, "the scheduler to mark the pod Unschedulable")
    (pod,) = _pods(core, k8s_namespace, "app=codegen-16b")
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None
    assert "Insufficient nvidia.com/gpu" in str(_unschedulable_message(pod))


@pytest.fixture
def widget_crd(kube_cluster: Cluster, k8s_api: Any) -> Iterator[str]:
    """A small CRD with a structural schema and a CEL rule, established; deleted after the test."""
    ext: Any = client.ApiextensionsV1Api(k8s_api)
    group = "testbed.pilotfleet.dev"
    spec_schema = {
        "type": "object",
        "required": ["minReplicas", "maxReplicas"],
        "properties": {
            "minReplicas": {"type": "integer", "minimum": 0},
            "maxReplicas": {"type": "integer", "minimum": 1},
        },
        "x-kubernetes-validations": [
            {
                "rule": "self.minReplicas <= self.maxReplicas",
                "message": "minReplicas must not exceed maxReplicas",
            }
        ],
    }
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": spec_schema}}},
                }
            ],
        },
    }
    ext.create_custom_resource_definition(crd)
    try:
        kube_cluster.wait_for(
            lambda: any(
                c.type == "Established" and c.status == "True"
                for c in ext.read_custom_resource_definition(f"widgets.{group}").status.conditions or []
            ),
            "the CRD to be Established",
        )
        yield group
    finally:
        ext.delete_custom_resource_definition(f"widgets.{group}")


def test_crd_schema_and_cel_rule_are_enforced(
    kube_cluster: Cluster, k8s_api: Any, k8s_namespace: str, widget_crd: str
) -> None:
    """The API server accepts a valid custom object and rejects invalid ones with 422 naming the field."""
    custom: Any = client.CustomObjectsApi(k8s_api)

    def create(name: str, spec: dict[str, Any]) -> Any:
        body = {"apiVersion": f"{widget_crd}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}
        return custom.create_namespaced_custom_object(widget_crd, "v1", k8s_namespace, "widgets", body)

    # Right after Established the new resource may still be missing from the API server's routes.
    deadline = time.monotonic() + 30
    while True:
        try:
            create("ok", {"minReplicas": 1, "maxReplicas": 3})
            break
        except ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)

    with pytest.raises(ApiException) as cel:
        create("inverted", {"minReplicas": 5, "maxReplicas": 2})
    assert cel.value.status == 422
    assert "spec" in str(cel.value.body)
    assert "minReplicas must not exceed maxReplicas" in str(cel.value.body)

    with pytest.raises(ApiException) as schema:
        create("negative", {"minReplicas": -1, "maxReplicas": 2})
    assert schema.value.status == 422
    assert "spec.minReplicas" in str(schema.value.body)


def test_job_completes_on_a_kwok_node(kube_cluster: Cluster, k8s_api: Any, k8s_namespace: str) -> None:
    """KWOK runs Job pods to Succeeded, so the Job controller marks the Job Complete."""
    batch: Any = client.BatchV1Api(k8s_api)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "fetch-weights"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": {"type": "kwok"},
                    "containers": [{"name": "fetch", "image": "busybox", "command": ["true"]}],
                }
            },
        },
    }
    batch.create_namespaced_job(k8s_namespace, job)

    def complete() -> bool:
        status = batch.read_namespaced_job_status("fetch-weights", k8s_namespace).status
        return any(c.type == "Complete" and c.status == "True" for c in status.conditions or [])

    kube_cluster.wait_for(complete, "the Job to complete", timeout=60)
    assert batch.read_namespaced_job_status("fetch-weights", k8s_namespace).status.succeeded == 1


def test_cluster_stops_without_leftovers(tmp_path: Path, kube_cluster: Cluster) -> None:
    """A second cluster starts beside the session one (own ports), serves, and leaves nothing behind."""
    cluster = Cluster.start(tmp_path / "second", gobuild.ensure_all())
    try:
        assert cluster.api_port != kube_cluster.api_port
        api = cluster.api_client()
        try:
            version = client.VersionApi(api).get_code()
            core: Any = client.CoreV1Api(api)
            namespaces = {n.metadata.name for n in core.list_namespace().items}
        finally:
            api.close()
        assert version.git_version == f"v{versions.KUBERNETES}"
        assert {"default", "kube-system"} <= namespaces
        components = set(cluster.pids)
        ports = [cluster.api_port, cluster.etcd_port]
    finally:
        cluster.stop()
    assert components == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
    assert not processes_mentioning(str(tmp_path))
    assert not any(procs.port_open(p) for p in ports)


# What `pilotfleet testbed up` does: start, print what to record, exit with the cluster left running.
STARTER = """
import json, sys
from pathlib import Path
from pilotfleet_testbed.kube import Cluster
cluster = Cluster.start(Path(sys.argv[1]))
print(json.dumps({"pids": cluster.pids, "ports": [cluster.api_port, cluster.etcd_port]}))
"""


def test_recorded_cluster_outlives_its_starter_and_stops_from_its_pids(tmp_path: Path) -> None:
    """A cluster started by a command that exits keeps serving; `stop_recorded` ends it all later."""
    started = subprocess.run(
        [sys.executable, "-c", STARTER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert started.returncode == 0, started.stderr[-3000:]
    state = json.loads(started.stdout.splitlines()[-1])
    try:
        assert all(procs.port_open(p) for p in state["ports"])
        assert (tmp_path / "kubeconfig").exists()
    finally:
        kube.stop_recorded(state["pids"])
    assert not processes_mentioning(str(tmp_path))
    assert not any(procs.port_open(p) for p in state["ports"])


def test_a_component_that_dies_fails_start_with_its_log(tmp_path: Path) -> None:
    """A component that cannot start raises StartError naming it, and nothing is left running."""
    real = gobuild.ensure_all()
    broken = gobuild.KubeBinaries(
        etcd=real.etcd,
        kube_apiserver=real.kube_apiserver,
        kube_controller_manager=real.kube_controller_manager,
        kube_scheduler=Path("/bin/false"),
        kwok=real.kwok,
    )
    with pytest.raises(StartError, match="kube-scheduler exited"):
        Cluster.start(tmp_path, broken)
    assert (tmp_path / "logs" / "kube-apiserver.log").exists()
    assert not processes_mentioning(str(tmp_path))
