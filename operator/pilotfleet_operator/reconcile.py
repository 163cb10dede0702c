"""One level-based reconcile of a CodeCompletionModel: observe, plan, apply, prune, publish routes, status.

Called for create, update and resume, and by the model's daemon when a child changes or the drift interval
passes (handlers.py); idempotent, so a restart in the middle of it simply runs it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pilotfleet_operator import builders, gpu, naming
from pilotfleet_operator.apply import (
    DEPLOYMENTS,
    MODELS,
    PODS,
    PVCS,
    Kube,
    apply_all,
    prune,
)
from pilotfleet_operator.models import CodeCompletionModel, CodeCompletionModelStatus, ConditionType
from pilotfleet_operator.routing import RoutePublisher, RouteResult
from pilotfleet_operator.settings import Settings
from pilotfleet_operator.status import (
    FETCH_FAILED,
    Observed,
    Transition,
    WeightsState,
    compute_status,
    status_patch,
    transitions,
)
from pilotfleet_operator.watch import Fleet, Nudges

log = logging.getLogger(__name__)

# The Job controller labels each pod with its Job's name.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@dataclass
class Runtime:
    """What every handler shares: the API access, the settings, the route table and the models' wakers."""

    kube: Kube
    settings: Settings
    routes: RoutePublisher
    nudges: Nudges


@dataclass(frozen=True)
class Outcome:
    """What a reconcile ended with."""

    status: CodeCompletionModelStatus
    transitions: list[Transition]
    # Nothing more will happen without a change in the world: Ready, or waiting for a person.
    converged: bool
    # Set when the spec cannot work in this cluster (NoSuitableGPU): the handler reports it as permanent.
    permanent_problem: str | None


def now_rfc3339() -> str:
    """The current time as Kubernetes writes it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_failed(job: dict[str, Any] | None) -> bool:
    """True when the Job has given up (its Failed condition is set)."""
    conditions = ((job or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Failed" and c.get("status") == "True" for c in conditions)


def fetch_failure(pods: Iterable[dict[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) of the last failed fetch container, from its termination message.

    The fetch job writes `{"reason", "message"}` (docs/fetch.md); anything else there is the end of its
    log (terminationMessagePolicy FallbackToLogsOnError), reported as FetchFailed with the exit code.
    """
    latest: tuple[str, dict[str, Any]] | None = None
    for pod in pods:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if container.get("name") != builders.FETCH_CONTAINER or not terminated:
                continue
            if terminated.get("exitCode") == 0:
                continue
            finished = str(terminated.get("finishedAt") or "")
            if latest is None or finished >= latest[0]:
                latest = (finished, terminated)
    if latest is None:
        return None
    terminated = latest[1]
    text = str(terminated.get("message") or "").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("reason"), str) and parsed["reason"]:
        return parsed["reason"], str(parsed.get("message", ""))
    last_line = text.splitlines()[-1] if text else ""
    return FETCH_FAILED, f"exit code {terminated.get('exitCode')}" + (f": {last_line}" if last_line else "")


def weights_state(
    job: dict[str, Any] | None, pods: Iterable[dict[str, Any]] = ()
) -> tuple[WeightsState, str, str]:
    """Read the fetch Job's status: (state, reason, message); `pods` are the Job's pods, read for the
    fetch job's own failure reason once the Job has failed."""
    if job is None:
        return WeightsState.NOT_STARTED, "NotStarted", "the fetch job does not exist yet"
    name = job["metadata"]["name"]
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") == "Complete":
            return WeightsState.READY, "Fetched", f"weights fetched and verified by job {name}"
    if job_failed(job):
        failure = fetch_failure(pods)
        if failure is not None:
            return WeightsState.FAILED, failure[0], f"fetch job {name} failed: {failure[1]}"
        cond = next(c for c in status["conditions"] if c.get("type") == "Failed")
        detail = cond.get("message") or cond.get("reason") or "failed"
        return WeightsState.FAILED, FETCH_FAILED, f"fetch job {name} failed: {detail}"
    if status.get("succeeded"):
        return WeightsState.READY, "Fetched", f"weights fetched and verified by job {name}"
    return WeightsState.FETCHING, "Fetching", f"fetch job {name} is running"


def current_ready_replicas(deployment: Mapping[str, Any] | None) -> int:
    """Ready replicas that run the Deployment's current pod template.

    During a rolling update the old pods still count in `readyReplicas`, so a model must not be Ready at
    its new generation on their account: until the Deployment controller has seen the new template, none
    count; afterwards the pods not yet updated are taken off (assumed ready, which can only undercount).
    """
    if not deployment:
        return 0
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration") or 0) < int(deployment["metadata"].get("generation") or 0):
        return 0
    outdated = int(status.get("replicas") or 0) - int(status.get("updatedReplicas") or 0)
    return max(0, int(status.get("readyReplicas") or 0) - outdated)


def pod_scheduling(pods: Iterable[dict[str, Any]]) -> tuple[int, str | None]:
    """Count the pods the scheduler placed; return the scheduler's message for one it could not place."""
    scheduled, problem = 0, None
    for pod in pods:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") != "PodScheduled":
                continue
            if cond.get("status") == "True":
                scheduled += 1
            elif cond.get("reason") == "Unschedulable":
                problem = cond.get("message") or "the scheduler found no node"
    return scheduled, problem


@dataclass(frozen=True)
class ChildrenState:
    """What converging a model's children found (everything of its status but the route table)."""

    weights: WeightsState
    weights_reason: str
    weights_message: str
    gpu_problem: str | None
    scheduled_pods: int
    unschedulable: str | None
    ready_replicas: int


def converge_children(
    rt: Runtime, model: CodeCompletionModel, nodes: Iterable[Mapping[str, Any]], full: bool = True
) -> ChildrenState:
    """Bring the model's children to the desired state (blocking API calls); `nodes` are the cluster's
    Nodes as the index holds them (watch.node_entry).

    A full pass applies every child and prunes unwanted ones; otherwise (a child changed, so the model
    moves on) only the fetch Job and, once the weights are ready, the Deployment are applied.
    """
    kube, settings = rt.kube, rt.settings
    ns, name = model.namespace, model.name
    req = gpu.requirement_for(model.spec, settings)
    problem = gpu.no_suitable_gpu(req, nodes)
    deployment: dict[str, Any] | None
    weights_reason = FETCH_FAILED
    if problem:
        # Refuse before anything is fetched or any GPU is taken; what already runs keeps running.
        weights, weights_message = WeightsState.NOT_STARTED, "waiting for a node with suitable GPUs"
        deployment = kube.get(DEPLOYMENTS, ns, naming.triton_name(name))
    else:
        desired_deployment = builders.deployment_for_model(model, settings)
        fixed = [
            builders.pvc_for_model(model, settings),
            builders.service_for_model(model, settings),
            # The fetch Job's identity exists before the Job, or its pods are refused.
            *builders.fetch_rbac_for_model(model, settings),
        ]
        if full:
            apply_all(kube, fixed)
        desired_job = builders.fetch_job_for_model(model, settings)
        job = kube.apply(desired_job)
        job_pods = (
            kube.list(PODS, ns, f"{JOB_NAME_LABEL}={job['metadata']['name']}") if job_failed(job) else []
        )
        weights, weights_reason, weights_message = weights_state(job, job_pods)
        if weights is WeightsState.READY:
            deployment = kube.apply(desired_deployment)
        else:
            # New weights are on their way: the running Deployment keeps serving the old ones meanwhile.
            deployment = kube.get(DEPLOYMENTS, ns, naming.triton_name(name))
        if full:
            prune(kube, ns, name, [*fixed, desired_job, desired_deployment])

    pods = kube.list(
        PODS,
        ns,
        ",".join(f"{k}={v}" for k, v in naming.selector_labels(name, naming.COMPONENT_TRITON).items()),
    )
    scheduled, unschedulable = pod_scheduling(pods) if deployment else (0, None)
    return ChildrenState(
        weights=weights,
        weights_reason=weights_reason,
        weights_message=weights_message,
        gpu_problem=problem,
        scheduled_pods=scheduled,
        unschedulable=unschedulable,
        ready_replicas=current_ready_replicas(deployment),
    )


def settle_status(
    rt: Runtime, model: CodeCompletionModel, children: ChildrenState, routed: RouteResult
) -> Outcome:
    """Compute the model's status and write it if it changed (a blocking API call)."""
    key = (model.namespace, model.name)
    observed = Observed(
        generation=model.generation,
        weights=children.weights,
        weights_message=children.weights_message,
        gpu_problem=children.gpu_problem,
        desired_replicas=model.spec.replicas.min,
        scheduled_pods=children.scheduled_pods,
        unschedulable=children.unschedulable,
        ready_replicas=children.ready_replicas,
        routed=key in routed and routed[key] is None,
        route_problem=routed.get(key),
        url=builders.grpc_endpoint(model, rt.settings),
        weights_reason=children.weights_reason,
    )
    new = compute_status(model.status, observed, now_rfc3339())
    patch = status_patch(new)
    if patch != status_patch(model.status):
        rt.kube.merge_patch(MODELS, model.namespace, model.name, patch, subresource="status")
    ready = any(c.type is ConditionType.READY and c.status.value == "True" for c in new.conditions)
    return Outcome(
        status=new,
        transitions=transitions(model.status, new),
        converged=ready or children.gpu_problem is not None or children.weights is WeightsState.FAILED,
        permanent_problem=children.gpu_problem,
    )


async def reconcile(rt: Runtime, model: CodeCompletionModel, fleet: Fleet, full: bool = True) -> Outcome:
    """Bring the model's children to the desired state, publish the routes, and report where it stands
    (`full`: see converge_children).

    Runs on kopf's event loop; the blocking API calls run in threads, the route table on the loop, where
    the indexes in `fleet` live.
    """
    children = await asyncio.to_thread(converge_children, rt, model, fleet.node_list(), full)
    key = (model.namespace, model.name)
    routed = await rt.routes.publish(fleet.models, fleet.ready, asked_by=key)
    return await asyncio.to_thread(settle_status, rt, model, children, routed)


async def cleanup(rt: Runtime, model: CodeCompletionModel, fleet: Fleet) -> None:
    """On deletion: drop the model's routes and, when retained, free its PVC from garbage collection."""
    await rt.routes.publish(fleet.models, fleet.ready)
    if model.spec.storage.retain_on_delete:
        await asyncio.to_thread(release_pvc, rt.kube, model)


def release_pvc(kube: Kube, model: CodeCompletionModel) -> None:
    """Remove the weights PVC's owner reference, so that garbage collection keeps it."""
    pvc = naming.pvc_name(model.name)
    if kube.get(PVCS, model.namespace, pvc) is not None:
        kube.merge_patch(PVCS, model.namespace, pvc, {"metadata": {"ownerReferences": None}})
        log.info("kept PVC %s/%s (retainOnDelete)", model.namespace, pvc)
