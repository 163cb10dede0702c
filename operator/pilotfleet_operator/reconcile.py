"""One level-based reconcile of a CodeCompletionModel: observe, plan, apply, prune, publish routes, status.

Called for create, update, resume and the drift timer alike (handlers.py); idempotent, so a restart in
the middle of it simply runs it again.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from pilotfleet_operator import builders, gpu, naming
from pilotfleet_operator.apply import (
    DEPLOYMENTS,
    MODELS,
    NODES,
    PODS,
    PVCS,
    Kube,
    apply_all,
    prune,
)
from pilotfleet_operator.models import CodeCompletionModel, CodeCompletionModelStatus, ConditionType
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

log = logging.getLogger(__name__)

# The Job controller labels each pod with its Job's name.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@dataclass
class Runtime:
    """What every handler shares: the API access, the settings, and the route table's lock."""

    kube: Kube
    settings: Settings
    watch_namespaces: tuple[str, ...] = ()
    # One writer at a time rebuilds the fleet-wide route table from a fresh listing.
    routes_lock: threading.Lock = field(default_factory=threading.Lock)


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


def _parse_models(items: Iterable[dict[str, Any]]) -> list[CodeCompletionModel]:
    models = []
    for item in items:
        if item["metadata"].get("deletionTimestamp"):
            continue
        try:
            models.append(CodeCompletionModel.from_body(item))
        except ValidationError as exc:
            # The CRD schema should make this impossible; one bad object must not unroute the fleet.
            log.error(
                "skipping %s/%s in the route table: %s",
                item["metadata"].get("namespace"),
                item["metadata"].get("name"),
                exc,
            )
    return models


def _list_all(rt: Runtime, resource: Any, label_selector: str | None = None) -> list[dict[str, Any]]:
    if not rt.watch_namespaces:
        return rt.kube.list(resource, None, label_selector)
    return [obj for ns in rt.watch_namespaces for obj in rt.kube.list(resource, ns, label_selector)]


def publish_routes(rt: Runtime) -> dict[tuple[str, str], str | None]:
    """Rebuild the route table from the fleet as it is; return {(ns, name): problem or None} per model."""
    with rt.routes_lock:
        models = _parse_models(_list_all(rt, MODELS))
        selector = naming.component_selector(naming.COMPONENT_TRITON)
        ready = {
            (d["metadata"]["namespace"], d["metadata"]["labels"].get(naming.LABEL_MODEL, ""))
            for d in _list_all(rt, DEPLOYMENTS, selector)
            if ((d.get("status") or {}).get("readyReplicas") or 0) >= 1
        }
        entries, problems = builders.route_entries(models, ready, rt.settings)
        rt.kube.apply(builders.routes_configmap(entries, rt.settings))
    result: dict[tuple[str, str], str | None] = {(m.namespace, m.name): None for m in models}
    result.update(problems)
    return result


def reconcile(rt: Runtime, model: CodeCompletionModel) -> Outcome:
    """Bring the model's children to the desired state and report where it stands."""
    kube, settings = rt.kube, rt.settings
    ns, name = model.namespace, model.name
    req = gpu.requirement_for(model.spec, settings)
    problem = gpu.no_suitable_gpu(req, kube.list(NODES))
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
        apply_all(kube, fixed)
        job = kube.apply(builders.fetch_job_for_model(model, settings))
        job_pods = (
            kube.list(PODS, ns, f"{JOB_NAME_LABEL}={job['metadata']['name']}") if job_failed(job) else []
        )
        weights, weights_reason, weights_message = weights_state(job, job_pods)
        if weights is WeightsState.READY:
            deployment = kube.apply(desired_deployment)
        else:
            # New weights are on their way: the running Deployment keeps serving the old ones meanwhile.
            deployment = kube.get(DEPLOYMENTS, ns, naming.triton_name(name))
        prune(kube, ns, name, [*fixed, builders.fetch_job_for_model(model, settings), desired_deployment])

    pods = kube.list(
        PODS,
        ns,
        ",".join(f"{k}={v}" for k, v in naming.selector_labels(name, naming.COMPONENT_TRITON).items()),
    )
    scheduled, unschedulable = pod_scheduling(pods) if deployment else (0, None)
    ready_replicas = int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)

    routed = publish_routes(rt)
    key = (ns, name)
    observed = Observed(
        generation=model.generation,
        weights=weights,
        weights_message=weights_message,
        gpu_problem=problem,
        desired_replicas=model.spec.replicas.min,
        scheduled_pods=scheduled,
        unschedulable=unschedulable,
        ready_replicas=ready_replicas,
        routed=key in routed and routed[key] is None,
        route_problem=routed.get(key),
        url=builders.grpc_endpoint(model, settings),
        weights_reason=weights_reason,
    )
    new = compute_status(model.status, observed, now_rfc3339())
    patch = status_patch(new)
    if patch != status_patch(model.status):
        kube.merge_patch(MODELS, ns, name, patch, subresource="status")
    ready = any(c.type is ConditionType.READY and c.status.value == "True" for c in new.conditions)
    return Outcome(
        status=new,
        transitions=transitions(model.status, new),
        converged=ready or problem is not None or weights is WeightsState.FAILED,
        permanent_problem=problem,
    )


def cleanup(rt: Runtime, model: CodeCompletionModel) -> None:
    """On deletion: drop the model's routes and, when retained, free its PVC from garbage collection."""
    publish_routes(rt)
    if model.spec.storage.retain_on_delete:
        pvc = naming.pvc_name(model.name)
        if rt.kube.get(PVCS, model.namespace, pvc) is not None:
            rt.kube.merge_patch(PVCS, model.namespace, pvc, {"metadata": {"ownerReferences": None}})
            log.info("kept PVC %s/%s (retainOnDelete)", model.namespace, pvc)
