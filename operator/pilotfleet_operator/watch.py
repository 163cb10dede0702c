"""What the operator keeps in memory from its watches, and how a child's change wakes its model.

kopf indexes (registered in handlers.py) hold the cluster's GPU nodes, the served models and which models
have a ready Triton replica, so that no reconcile lists the cluster. The functions here turn one watched
object into its index entry or into a *signal*: the few fields of a child whose change can change its
model's status. `Nudges` wakes a model's daemon when a signal changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from pilotfleet_operator import gpu, naming
from pilotfleet_operator.models import CodeCompletionModel

log = logging.getLogger(__name__)

ModelKey = tuple[str, str]


@dataclass(frozen=True)
class Fleet:
    """The kopf indexes a reconcile reads; live views, so read them on kopf's event loop only."""

    # Every Node's entry (node_entry), all under the key None.
    nodes: Mapping[Any, Iterable[Mapping[str, Any]]]
    # The served models by (namespace, name).
    models: Mapping[ModelKey, Iterable[CodeCompletionModel]]
    # The models with at least one ready Triton replica.
    ready: Collection[ModelKey]

    def node_list(self) -> list[Mapping[str, Any]]:
        """A snapshot of every Node's entry, safe to hand to a thread."""
        return [node for entries in self.nodes.values() for node in entries]


def node_entry(node: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a Node that GPU placement reads (gpu.node_fits, gpu.no_suitable_gpu).

    Heartbeats and conditions are left out, so a node's entry changes only when its GPUs, labels,
    taints or schedulability do.
    """
    meta = node.get("metadata") or {}
    spec = node.get("spec") or {}
    status = node.get("status") or {}
    return {
        "metadata": {"name": meta.get("name", ""), "labels": dict(meta.get("labels") or {})},
        "spec": {"unschedulable": bool(spec.get("unschedulable")), "taints": list(spec.get("taints") or [])},
        "status": {
            key: {gpu.GPU_RESOURCE: (status.get(key) or {})[gpu.GPU_RESOURCE]}
            for key in ("allocatable", "capacity")
            if gpu.GPU_RESOURCE in (status.get(key) or {})
        },
    }


def model_entry(body: Mapping[str, Any]) -> CodeCompletionModel | None:
    """The model as the route table sees it; None while it is being deleted or if it does not parse."""
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    try:
        return CodeCompletionModel.from_body(body)
    except ValidationError as exc:
        # The CRD schema should make this impossible; one bad object must not unroute the fleet.
        log.error("leaving %s/%s out of the route table: %s", meta.get("namespace"), meta.get("name"), exc)
        return None


def model_of(child: Mapping[str, Any]) -> ModelKey | None:
    """(namespace, model name) of the model a labelled child belongs to."""
    meta = child.get("metadata") or {}
    model = (meta.get("labels") or {}).get(naming.LABEL_MODEL)
    namespace = meta.get("namespace")
    return (str(namespace), str(model)) if model and namespace else None


def ready_replicas(deployment: Mapping[str, Any]) -> int:
    """status.readyReplicas of a Deployment (0 when unset)."""
    return int((deployment.get("status") or {}).get("readyReplicas") or 0)


def job_signal(job: Mapping[str, Any]) -> Hashable:
    """A fetch Job matters to its model when it completes or fails."""
    conditions = (job.get("status") or {}).get("conditions") or []
    finished = {c.get("type") for c in conditions if c.get("status") == "True"} & {"Complete", "Failed"}
    return tuple(sorted(str(kind) for kind in finished))


def deployment_signal(deployment: Mapping[str, Any]) -> Hashable:
    """A Triton Deployment matters to its model when its rollout moves or its ready replica count changes."""
    status = deployment.get("status") or {}
    return tuple(
        status.get(key) or 0 for key in ("observedGeneration", "replicas", "updatedReplicas", "readyReplicas")
    )


def pod_signal(pod: Mapping[str, Any]) -> Hashable:
    """A Triton pod matters to its model when the scheduler places it or gives up on it."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled":
            return cond.get("status"), cond.get("reason")
    return None


class Nudges:
    """Wake-up events of the models' daemons, set when a child's signal changes.

    Lives on the event loop: kopf calls the child watch handlers and the daemons there, so no lock.
    """

    def __init__(self) -> None:
        self._wakers: dict[ModelKey, asyncio.Event] = {}
        # Last signal per child (kind, namespace, name); a child seen for the first time sets its baseline,
        # since the create or resume handler of its model reconciles anyway.
        self._signals: dict[tuple[str, str, str], Hashable] = {}

    def follow(self, key: ModelKey) -> asyncio.Event:
        """Register the daemon of model `key`; return the event that wakes it."""
        return self._wakers.setdefault(key, asyncio.Event())

    def forget(self, key: ModelKey) -> None:
        """The daemon of model `key` has stopped."""
        self._wakers.pop(key, None)

    def nudge(self, keys: Iterable[ModelKey]) -> None:
        """Wake the daemons of these models (those without a daemon are being deleted or not served)."""
        for key in keys:
            waker = self._wakers.get(key)
            if waker is not None:
                waker.set()

    def child_event(self, kind: str, child: Mapping[str, Any], signal: Hashable, deleted: bool) -> bool:
        """Record a watch event of a child; wake its model when `signal` changed or the child is gone.

        Returns whether the model was nudged (a model without a daemon is nudged in vain).
        """
        key = model_of(child)
        if key is None:
            return False
        child_id = (kind, key[0], str((child.get("metadata") or {}).get("name")))
        if deleted:
            self._signals.pop(child_id, None)
            changed = True
        else:
            changed = child_id in self._signals and self._signals[child_id] != signal
            self._signals[child_id] = signal
        if changed:
            self.nudge([key])
        return changed
