"""kopf registrations, and nothing else: each handler hands off to reconcile.py or watch.py.

Run with `pilotfleet operator` (or `kopf run -m pilotfleet_operator.handlers`).

How a model is driven: its create/update/resume handler reconciles it once; from then on its daemon
reconciles it whenever one of its children (fetch Job, Triton Deployment, Triton pods) changes in a way
that can change its status, and every RESYNC_INTERVAL_S as the safety net against drift and for new GPU
nodes. What a reconcile needs to know about the rest of the cluster (GPU nodes, the fleet for the route
table) comes from kopf indexes, never from listing the cluster.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from pilotfleet_operator import naming, watch
from pilotfleet_operator.apply import ApiError, Kube, load_client_config
from pilotfleet_operator.models import CodeCompletionModel
from pilotfleet_operator.reconcile import Outcome, Runtime, cleanup, reconcile
from pilotfleet_operator.routing import RoutePublisher
from pilotfleet_operator.settings import Settings

log = logging.getLogger(__name__)

# Drift check of every model, and how soon a model without suitable GPUs notices new nodes.
RESYNC_INTERVAL_S = 30.0
# A model's daemon is cancelled at once when the model goes or the operator stops; a reconcile it had
# started finishes in its thread on its own.
DAEMON_CANCELLATION_TIMEOUT_S = 10.0
RESOURCE = (naming.GROUP, naming.VERSION, naming.PLURAL)
# kopf passes each index to every handler as a keyword argument named by the index's id.
NODES_INDEX, MODELS_INDEX, READY_INDEX = "gpu_nodes", "served_models", "ready_models"
# Children whose changes wake their model (the labels every child carries; watch.py says which changes).
CHILD_LABELS: dict[str, Any] = {
    naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
    naming.LABEL_MODEL: kopf.PRESENT,
}
TRITON_LABELS: dict[str, Any] = {
    **CHILD_LABELS,
    naming.LABEL_COMPONENT: naming.COMPONENT_TRITON,
}


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Log in from the pod's ServiceAccount, else from KUBECONFIG as it is set when the operator starts.

    kopf's default login goes through the `kubernetes` client, which reads KUBECONFIG only once, on import.
    """
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's own bookkeeping under our API group, and build the shared runtime."""
    settings.persistence.finalizer = naming.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.KOPF_PREFIX, key="last-handled-configuration"
    )
    # Our own Events carry the story; kopf's per-handler chatter stays in the log.
    settings.posting.level = logging.WARNING
    operator_settings = Settings()
    kube = Kube(load_client_config())
    nudges = watch.Nudges()
    memo.runtime = Runtime(
        kube=kube,
        settings=operator_settings,
        routes=RoutePublisher(kube, operator_settings, on_change=nudges.nudge),
        nudges=nudges,
    )


@kopf.on.cleanup()
def close(memo: kopf.Memo, **_: Any) -> None:
    """Close the API client's connection pool."""
    runtime: Runtime | None = memo.get("runtime")
    if runtime is not None:
        runtime.kube.api_client.close()


@kopf.index("", "v1", "nodes", id=NODES_INDEX)
async def index_node(body: kopf.Body, **_: Any) -> dict[None, dict[str, Any]]:
    """Every Node's GPUs, labels, taints and schedulability, for placement checks."""
    return {None: watch.node_entry(body)}


@kopf.index(*RESOURCE, id=MODELS_INDEX)
async def index_model(body: kopf.Body, **_: Any) -> dict[watch.ModelKey, CodeCompletionModel]:
    """The models in the route table, by (namespace, name)."""
    model = watch.model_entry(body)
    # An empty result (not None) takes a model out of the index once its deletion starts.
    return {(model.namespace, model.name): model} if model is not None else {}


@kopf.index("apps", "v1", "deployments", labels=TRITON_LABELS, id=READY_INDEX)
async def index_ready(body: kopf.Body, **_: Any) -> dict[watch.ModelKey, bool]:
    """The models with at least one ready Triton replica (their routes carry an endpoint)."""
    key = watch.model_of(body)
    return {key: True} if key is not None and watch.ready_replicas(body) >= 1 else {}


def _fleet(kwargs: dict[str, Any]) -> watch.Fleet:
    return watch.Fleet(nodes=kwargs[NODES_INDEX], models=kwargs[MODELS_INDEX], ready=kwargs[READY_INDEX])


async def _run(body: kopf.Body, memo: kopf.Memo, fleet: watch.Fleet, full: bool = True) -> Outcome:
    runtime: Runtime = memo.runtime
    # The change handlers and the daemon of one object may overlap; one reconcile at a time per object.
    lock: asyncio.Lock = memo.setdefault("object_lock", asyncio.Lock())
    async with lock:
        outcome = await reconcile(runtime, CodeCompletionModel.from_body(body), fleet, full)
    for change in outcome.transitions:
        kopf.event(
            body,
            type=change.event_type,
            reason=change.reason,
            message=f"{change.type.value}={change.status.value}: {change.message}",
        )
    return outcome


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE)
async def converge(
    body: kopf.Body,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Reconcile after any change of the spec; the model's daemon carries it on from there."""
    try:
        outcome = await _run(body, memo, _fleet(kwargs))
    except ApiError as exc:
        raise kopf.TemporaryError(str(exc), delay=memo.runtime.settings.retry_delay) from exc
    if outcome.permanent_problem:
        raise kopf.PermanentError(outcome.permanent_problem)


@kopf.daemon(*RESOURCE, cancellation_timeout=DAEMON_CANCELLATION_TIMEOUT_S)
async def follow(
    body: kopf.Body,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Reconcile the model when one of its children changed, after a failure once RETRY_DELAY has
    passed, and fully every RESYNC_INTERVAL_S; kopf cancels it when the model is deleted or the operator
    stops."""
    runtime: Runtime = memo.runtime
    key = (body.metadata.namespace or "", body.metadata.name or "")
    waker = runtime.nudges.follow(key)
    fleet = _fleet(kwargs)
    timeout, failed = RESYNC_INTERVAL_S, False
    try:
        while True:
            try:
                await asyncio.wait_for(waker.wait(), timeout=timeout)
                woken = True
            except TimeoutError:
                woken = False
            waker.clear()
            try:
                # A child's change moves the model on; the interval (or a failed pass) calls for all of it.
                await _run(body, memo, fleet, full=failed or not woken)
            except ApiError as exc:
                log.warning(
                    "reconcile of %s/%s failed, retrying in %gs: %s", *key, runtime.settings.retry_delay, exc
                )
                timeout, failed = runtime.settings.retry_delay, True
            else:
                timeout, failed = RESYNC_INTERVAL_S, False
    finally:
        runtime.nudges.forget(key)


@kopf.on.event("batch", "v1", "jobs", labels=CHILD_LABELS)
async def job_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Wake the model when its fetch Job completes or fails."""
    memo.runtime.nudges.child_event("Job", body, watch.job_signal(body), event["type"] == "DELETED")


@kopf.on.event("apps", "v1", "deployments", labels=TRITON_LABELS)
async def deployment_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Wake the model when its ready replica count changes, or its Deployment is deleted."""
    memo.runtime.nudges.child_event(
        "Deployment", body, watch.deployment_signal(body), event["type"] == "DELETED"
    )


@kopf.on.event("", "v1", "pods", labels=TRITON_LABELS)
async def pod_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Wake the model when the scheduler places one of its Triton pods or cannot."""
    memo.runtime.nudges.child_event("Pod", body, watch.pod_signal(body), event["type"] == "DELETED")


@kopf.on.delete(*RESOURCE)
async def delete(
    body: kopf.Body,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """Unroute the model and keep or release its weights PVC; garbage collection removes the rest."""
    await cleanup(memo.runtime, CodeCompletionModel.from_body(body), _fleet(kwargs))
