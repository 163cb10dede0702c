"""The simulated node pool: GPU nodes labelled the way GPU Feature Discovery labels them, plus CPU nodes.

`node_pool()` is pure data; `create_nodes()` posts it to a cluster, where KWOK (see kube.py) marks the
nodes Ready and runs their pods.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pilotfleet_testbed.kube import KWOK_NODE_ANNOTATION, KWOK_NODE_ANNOTATION_VALUE

log = logging.getLogger(__name__)

GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
# Every simulated node carries this label, so tests and benchmarks can select or delete them together.
POOL_LABEL = "pilotfleet.dev/testbed-pool"


@dataclass(frozen=True)
class GpuType:
    """One GPU model as GPU Feature Discovery describes it."""

    key: str
    product: str
    compute_major: int
    compute_minor: int
    memory_mib: int
    gpus_per_node: int


GPU_TYPES: tuple[GpuType, ...] = (
    # Pascal: FasterTransformer's kernels crash here, so placement rules must keep models off it.
    GpuType("p40", "Tesla-P40", 6, 1, 24576, 4),
    GpuType("v100", "Tesla-V100-SXM2-16GB", 7, 0, 16384, 4),
    GpuType("t4", "Tesla-T4", 7, 5, 15360, 1),
    GpuType("a100", "NVIDIA-A100-SXM4-80GB", 8, 0, 81920, 8),
    GpuType("a10", "NVIDIA-A10", 8, 6, 23028, 2),
    GpuType("h100", "NVIDIA-H100-80GB-HBM3", 9, 0, 81559, 8),
)

DEFAULT_CPU_NODES = 2


def _node(
    name: str, labels: Mapping[str, str], allocatable: Mapping[str, str], taints: Sequence[Mapping[str, str]]
) -> dict[str, Any]:
    capacity = dict(sorted(allocatable.items()))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE},
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "type": "kwok",
                POOL_LABEL: "true",
                **labels,
            },
        },
        "spec": {"taints": [dict(t) for t in taints]},
        # KWOK keeps a created node's capacity and allocatable (its node-initialize stage copies them).
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def gpu_node(gpu: GpuType, index: int) -> dict[str, Any]:
    """Return the Node manifest of the `index`-th simulated node with `gpu.gpus_per_node` GPUs."""
    labels = {
        "node.kubernetes.io/instance-type": f"gpu-{gpu.key}-x{gpu.gpus_per_node}",
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": gpu.product,
        "nvidia.com/gpu.compute.major": str(gpu.compute_major),
        "nvidia.com/gpu.compute.minor": str(gpu.compute_minor),
        "nvidia.com/gpu.memory": str(gpu.memory_mib),
        "nvidia.com/gpu.count": str(gpu.gpus_per_node),
    }
    # Roughly a cloud GPU instance: 12 cores and 96 GiB of host memory per GPU.
    allocatable = {
        "cpu": str(12 * gpu.gpus_per_node),
        "memory": f"{96 * gpu.gpus_per_node}Gi",
        "pods": "110",
        "ephemeral-storage": "500Gi",
        GPU_RESOURCE: str(gpu.gpus_per_node),
    }
    return _node(f"kwok-gpu-{gpu.key}-{index}", labels, allocatable, [GPU_TAINT])


def cpu_node(index: int) -> dict[str, Any]:
    """Return the Node manifest of the `index`-th simulated CPU-only node."""
    allocatable = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "200Gi"}
    return _node(f"kwok-cpu-{index}", {"node.kubernetes.io/instance-type": "cpu-16"}, allocatable, [])


def node_pool(
    per_gpu_type: int | Mapping[str, int] = 1, cpu_nodes: int = DEFAULT_CPU_NODES
) -> list[dict[str, Any]]:
    """Return Node manifests: `per_gpu_type` nodes of each GPU type (a count, or a count per GPU key
    such as `{"a100": 50, "t4": 50}`, other types then getting none) plus `cpu_nodes` CPU-only nodes."""
    counts = (
        {gpu.key: per_gpu_type for gpu in GPU_TYPES} if isinstance(per_gpu_type, int) else dict(per_gpu_type)
    )
    unknown = set(counts) - {gpu.key for gpu in GPU_TYPES}
    if unknown:
        raise ValueError(f"unknown GPU types {sorted(unknown)}; known: {[g.key for g in GPU_TYPES]}")
    manifests = [gpu_node(gpu, i) for gpu in GPU_TYPES for i in range(counts.get(gpu.key, 0))]
    manifests += [cpu_node(i) for i in range(cpu_nodes)]
    return manifests


def create_nodes(
    api_client: Any, manifests: Sequence[Mapping[str, Any]], ready_timeout: float = 60.0
) -> None:
    """Create the nodes (a `kubernetes.client.ApiClient` as admin) and wait until all report Ready."""
    from kubernetes import client  # imported here: the testbed's CLI must not pay for it

    # Any: plain manifests go where the client's type hints ask for V1Node objects.
    core: Any = client.CoreV1Api(api_client)
    for manifest in manifests:
        core.create_node(body=dict(manifest))
    names = {m["metadata"]["name"] for m in manifests}
    deadline = time.monotonic() + ready_timeout
    while True:
        ready = {
            node.metadata.name
            for node in core.list_node(label_selector=f"{POOL_LABEL}=true").items
            if node_schedulable(node)
        }
        missing = names - ready
        if not missing:
            log.info("%d simulated nodes Ready", len(names))
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(missing)} simulated nodes not Ready after {ready_timeout:.0f}s "
                f"(is kwok running?): {sorted(missing)[:5]}"
            )
        time.sleep(0.2)


def node_schedulable(node: Any) -> bool:
    """Return True when a node (a `kubernetes.client.V1Node`) is Ready and its not-ready taint is gone.

    The node lifecycle controller taints new nodes `node.kubernetes.io/not-ready` and lifts the taint a
    moment after KWOK reports them Ready; until then the scheduler places nothing there.
    """
    ready = any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])
    lifecycle_taints = [t for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/")]
    return ready and not lifecycle_taints
