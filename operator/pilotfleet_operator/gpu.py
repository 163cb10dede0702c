"""GPU placement, pure: node affinity from a model's GPU rules, and the check that some node can host it.

Nodes are described by NVIDIA GPU Feature Discovery labels and the `nvidia.com/gpu` extended resource.
A backend image only has kernels for a range of compute capabilities, so placement has a lower *and* an
upper bound (an FT build for sm_70..sm_86 cannot run on a 9.0 GPU).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pilotfleet_operator.models import CodeCompletionModelSpec
from pilotfleet_operator.settings import Settings, parse_capability

GPU_RESOURCE = "nvidia.com/gpu"
LABEL_MAJOR = "nvidia.com/gpu.compute.major"
LABEL_MINOR = "nvidia.com/gpu.compute.minor"
LABEL_MEMORY = "nvidia.com/gpu.memory"
LABEL_PRODUCT = "nvidia.com/gpu.product"
# GPU node pools are commonly tainted so that only GPU workloads land there.
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}

Capability = tuple[int, int]


def format_capability(capability: Capability) -> str:
    """Format (8, 6) as "8.6"."""
    return f"{capability[0]}.{capability[1]}"


@dataclass(frozen=True)
class GpuRequirement:
    """What one Triton replica needs from a node."""

    count: int
    min_capability: Capability
    max_capability: Capability
    min_memory_mib: int | None = None
    products: tuple[str, ...] = ()
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()

    def describe(self) -> str:
        """Human wording, e.g. "2 GPUs with compute capability 7.0-8.6 and >= 16384 MiB each"."""
        text = (
            f"{self.count} GPU{'s' if self.count > 1 else ''} with compute capability "
            f"{format_capability(self.min_capability)}-{format_capability(self.max_capability)}"
        )
        if self.min_memory_mib:
            text += f" and >= {self.min_memory_mib} MiB each"
        if self.products:
            text += f" of product {' or '.join(self.products)}"
        if self.node_selector:
            text += " on nodes labelled " + ",".join(
                f"{k}={v}" for k, v in sorted(self.node_selector.items())
            )
        return text


def requirement_for(spec: CodeCompletionModelSpec, settings: Settings) -> GpuRequirement:
    """Combine the spec's GPU rules with the backend image's supported compute-capability range.

    The range's upper bound is the spec's `maxComputeCapability`, else the default image's; with a custom
    `image` the spec's minimum is taken as is, with the default image the image's minimum is a floor.
    """
    image_low, image_high = settings.capability_range_for(spec.backend)
    gpus = spec.gpus
    high = parse_capability(gpus.max_compute_capability) if gpus.max_compute_capability else image_high
    low = parse_capability(gpus.min_compute_capability)
    if not spec.image:
        # The default image has no kernels below its range, whatever the spec's minimum says.
        low = max(low, image_low)
    return GpuRequirement(
        count=gpus.count,
        min_capability=low,
        max_capability=high,
        min_memory_mib=gpus.min_memory_mib,
        products=tuple(gpus.products),
        node_selector=dict(spec.node_selector),
        tolerations=tuple(pod_tolerations(spec)),
    )


def pod_tolerations(spec: CodeCompletionModelSpec) -> list[dict[str, Any]]:
    """Tolerations of the Triton pods: the GPU taint plus the spec's own."""
    own = [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in spec.tolerations]
    return [dict(GPU_TOLERATION), *own]


def _expr(key: str, operator: str, *values: int | str) -> dict[str, Any]:
    return {"key": key, "operator": operator, "values": [str(v) for v in values]}


def _capability_terms(low: Capability, high: Capability) -> list[list[dict[str, Any]]]:
    """Node selector terms (ORed) matching low <= (major, minor) <= high with GFD's integer labels."""

    def at_least_minor(minor: int) -> list[dict[str, Any]]:
        return [_expr(LABEL_MINOR, "Gt", minor - 1)] if minor > 0 else [_expr(LABEL_MINOR, "Exists")]

    if low[0] == high[0]:
        return [
            [_expr(LABEL_MAJOR, "In", low[0]), *at_least_minor(low[1]), _expr(LABEL_MINOR, "Lt", high[1] + 1)]
        ]
    terms = [[_expr(LABEL_MAJOR, "In", low[0]), *at_least_minor(low[1])]]
    if high[0] - low[0] >= 2:
        terms.append([_expr(LABEL_MAJOR, "Gt", low[0]), _expr(LABEL_MAJOR, "Lt", high[0])])
    terms.append([_expr(LABEL_MAJOR, "In", high[0]), _expr(LABEL_MINOR, "Lt", high[1] + 1)])
    return terms


def node_affinity(req: GpuRequirement) -> dict[str, Any]:
    """The pod `affinity` that keeps Triton on nodes whose GPUs satisfy `req`."""
    shared = []
    if req.min_memory_mib:
        shared.append(_expr(LABEL_MEMORY, "Gt", req.min_memory_mib - 1))
    if req.products:
        shared.append(_expr(LABEL_PRODUCT, "In", *sorted(req.products)))
    terms = [
        {"matchExpressions": [*term, *shared]}
        for term in _capability_terms(req.min_capability, req.max_capability)
    ]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


@dataclass(frozen=True)
class NodeGpus:
    """The GPUs of one node as GFD and the kubelet report them."""

    name: str
    count: int
    capability: Capability | None
    memory_mib: int | None
    product: str | None

    def summary(self) -> str:
        """E.g. "2x NVIDIA-A100 (8.0, 40960 MiB)"."""
        if self.count == 0 or self.capability is None:
            return "no GPUs"
        memory = f", {self.memory_mib} MiB" if self.memory_mib is not None else ""
        return f"{self.count}x {self.product or 'unknown GPU'} ({format_capability(self.capability)}{memory})"


def _int(value: Any) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def node_gpus(node: Mapping[str, Any]) -> NodeGpus:
    """Read a Node object's GPUs."""
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = node.get("status") or {}
    amount = (status.get("allocatable") or {}).get(
        GPU_RESOURCE, (status.get("capacity") or {}).get(GPU_RESOURCE)
    )
    major, minor = _int(labels.get(LABEL_MAJOR)), _int(labels.get(LABEL_MINOR))
    return NodeGpus(
        name=str(meta.get("name", "")),
        count=_int(amount) or 0,
        capability=(major, minor) if major is not None and minor is not None else None,
        memory_mib=_int(labels.get(LABEL_MEMORY)),
        product=labels.get(LABEL_PRODUCT),
    )


def _tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    for tol in tolerations:
        if tol.get("effect") and tol.get("effect") != taint.get("effect"):
            continue
        if not tol.get("key"):
            if tol.get("operator") == "Exists":
                return True
            continue
        if tol.get("key") != taint.get("key"):
            continue
        if tol.get("operator") == "Exists" or tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def node_fits(req: GpuRequirement, node: Mapping[str, Any]) -> bool:
    """Return True when one replica could be placed on this node (ignoring what already runs there)."""
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return False
    labels = (node.get("metadata") or {}).get("labels") or {}
    if any(labels.get(key) != value for key, value in req.node_selector.items()):
        return False
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(req.tolerations, taint):
            return False
    gpus = node_gpus(node)
    if gpus.count < req.count or gpus.capability is None:
        return False
    if not req.min_capability <= gpus.capability <= req.max_capability:
        return False
    if req.min_memory_mib and (gpus.memory_mib is None or gpus.memory_mib < req.min_memory_mib):
        return False
    return not req.products or gpus.product in req.products


def no_suitable_gpu(req: GpuRequirement, nodes: Iterable[Mapping[str, Any]]) -> str | None:
    """Return None if some node fits `req`, else a message saying what is needed and what the cluster has."""
    nodes = list(nodes)
    if any(node_fits(req, node) for node in nodes):
        return None
    inventory = Counter(node_gpus(node).summary() for node in nodes)
    have = "; ".join(
        f"{summary} on {n} node{'s' if n > 1 else ''}" for summary, n in sorted(inventory.items())
    )
    return f"no node offers {req.describe()}; the cluster has: {have or 'no nodes'}"
