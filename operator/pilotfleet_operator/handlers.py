"""kopf registrations, and nothing else: each handler hands off to reconcile.py.

Run with `pilotfleet operator` (or `kopf run -m pilotfleet_operator.handlers`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import kopf

from pilotfleet_operator import naming
from pilotfleet_operator.apply import Kube, load_client_config
from pilotfleet_operator.models import CodeCompletionModel
from pilotfleet_operator.reconcile import Outcome, Runtime, cleanup, reconcile
from pilotfleet_operator.settings import Settings

# Drift check of every model; kopf fixes a timer's interval when the handler is registered.
RESYNC_INTERVAL_S = 30.0
RESOURCE = (naming.GROUP, naming.VERSION, naming.PLURAL)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """Log in from the pod's ServiceAccount, else from KUBECONFIG as it is set when the operator starts.

    kopf's default login goes through the `kubernetes` client, which reads KUBECONFIG only once, on import.
    """
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Keep kopf's own bookkeeping under our API group, and build the shared runtime."""
    settings.persistence.finalizer = naming.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.KOPF_PREFIX, key="last-handled-configuration"
    )
    # Our own Events carry the story; kopf's per-handler chatter stays in the log.
    settings.posting.level = logging.WARNING
    operator_settings = Settings()
    memo.runtime = Runtime(
        kube=Kube(load_client_config()),
        settings=operator_settings,
        watch_namespaces=tuple(operator_settings.watch_namespaces),
    )


@kopf.on.cleanup()
def close(memo: kopf.Memo, **_: Any) -> None:
    """Close the API client's connection pool."""
    runtime: Runtime | None = memo.get("runtime")
    if runtime is not None:
        runtime.kube.api_client.close()


def _run(body: kopf.Body, memo: kopf.Memo) -> Outcome:
    runtime: Runtime = memo.runtime
    # Timers and change handlers of one object may overlap; one reconcile at a time per object.
    lock: threading.Lock = memo.setdefault("object_lock", threading.Lock())
    with lock:
        outcome = reconcile(runtime, CodeCompletionModel.from_body(body))
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
def converge(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Reconcile after any change; retry until the model is Ready or needs a person."""
    outcome = _run(body, memo)
    if outcome.permanent_problem:
        raise kopf.PermanentError(outcome.permanent_problem)
    if not outcome.converged:
        phase = outcome.status.phase.value if outcome.status.phase else "Pending"
        raise kopf.TemporaryError(f"model is {phase}", delay=memo.runtime.settings.retry_delay)


@kopf.timer(*RESOURCE, interval=RESYNC_INTERVAL_S, initial_delay=RESYNC_INTERVAL_S)
def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Repair drift of converged models, and notice when the cluster gains suitable GPUs."""
    _run(body, memo)


@kopf.on.delete(*RESOURCE)
def delete(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Unroute the model and keep or release its weights PVC; garbage collection removes the rest."""
    cleanup(memo.runtime, CodeCompletionModel.from_body(body))
