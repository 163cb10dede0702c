"""A model's status, computed purely from what one reconcile observed.

`compute_status` keeps a condition's lastTransitionTime while its status stays the same, so an unchanged
world yields an equal status and no write; `transitions` lists the condition changes that deserve an Event.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pilotfleet_fetch.errors import ALL_ERRORS

from pilotfleet_operator.models import (
    CodeCompletionModelStatus,
    Condition,
    ConditionStatus,
    ConditionType,
    Phase,
)

TRUE, FALSE = ConditionStatus.TRUE, ConditionStatus.FALSE
FETCH_FAILED = "FetchFailed"
# Reasons that mean a person has to act; their Events are Warnings. A failed fetch reports the fetch
# job's own reason code (ChecksumMismatch, NotFound, ...; docs/fetch.md), or FetchFailed without one.
WARNING_REASONS = frozenset(
    {"NoSuitableGPU", FETCH_FAILED, "Unschedulable", "NameConflict", *(e.reason for e in ALL_ERRORS)}
)


class WeightsState(StrEnum):
    """Where the weights fetch stands."""

    NOT_STARTED = "NotStarted"
    FETCHING = "Fetching"
    READY = "Ready"
    FAILED = "Failed"


@dataclass(frozen=True)
class Observed:
    """What one reconcile saw of a model's world."""

    generation: int
    weights: WeightsState
    weights_message: str
    gpu_problem: str | None
    desired_replicas: int
    scheduled_pods: int
    unschedulable: str | None
    ready_replicas: int
    routed: bool
    route_problem: str | None
    url: str
    # The fetch job's reason code when the weights fetch failed (WeightsReady's reason then).
    weights_reason: str = FETCH_FAILED


@dataclass(frozen=True)
class Transition:
    """A condition that changed status or reason."""

    type: ConditionType
    status: ConditionStatus
    reason: str
    message: str

    @property
    def event_type(self) -> str:
        """Kubernetes Event type: Warning for reasons that need a person, else Normal."""
        return "Warning" if self.reason in WARNING_REASONS else "Normal"


def _weights(obs: Observed) -> tuple[ConditionStatus, str, str]:
    if obs.weights is WeightsState.READY:
        return TRUE, "Fetched", obs.weights_message
    if obs.weights is WeightsState.FAILED:
        return FALSE, obs.weights_reason, obs.weights_message
    if obs.weights is WeightsState.FETCHING:
        return FALSE, "Fetching", obs.weights_message
    return FALSE, "NotStarted", obs.weights_message


def _scheduled(obs: Observed) -> tuple[ConditionStatus, str, str]:
    if obs.gpu_problem:
        return FALSE, "NoSuitableGPU", obs.gpu_problem
    if obs.weights is not WeightsState.READY:
        return FALSE, "WaitingForWeights", "Triton pods start once the weights are fetched"
    if obs.desired_replicas == 0:
        return TRUE, "ScaledToZero", "replicas.min is 0"
    if obs.unschedulable:
        return FALSE, "Unschedulable", obs.unschedulable
    placed = f"{obs.scheduled_pods}/{obs.desired_replicas} Triton pods placed on nodes"
    if obs.scheduled_pods >= obs.desired_replicas:
        return TRUE, "Scheduled", placed
    return FALSE, "Pending", placed


def _inference(obs: Observed) -> tuple[ConditionStatus, str, str]:
    ready = f"{obs.ready_replicas}/{obs.desired_replicas} Triton replicas ready"
    if obs.ready_replicas >= 1:
        return TRUE, "TritonReady", ready
    if obs.desired_replicas == 0:
        return FALSE, "ScaledToZero", "replicas.min is 0"
    return FALSE, "TritonNotReady", ready


def _routed(obs: Observed) -> tuple[ConditionStatus, str, str]:
    if obs.route_problem:
        return FALSE, "NameConflict", obs.route_problem
    if obs.routed and obs.ready_replicas:
        return TRUE, "InRouteTable", f"the proxy routes this model to {obs.url}"
    if obs.routed:
        return TRUE, "InRouteTable", "in the route table without a ready endpoint (the proxy answers 503)"
    return FALSE, "NotRouted", "not in the route table yet"


def compute_status(previous: CodeCompletionModelStatus, obs: Observed, now: str) -> CodeCompletionModelStatus:
    """Return the status for `obs`; `now` (RFC 3339) stamps conditions whose status changed."""
    parts = {
        ConditionType.WEIGHTS_READY: _weights(obs),
        ConditionType.SCHEDULED: _scheduled(obs),
        ConditionType.INFERENCE_READY: _inference(obs),
        ConditionType.ROUTED: _routed(obs),
    }
    first_false = next(((kind, part) for kind, part in parts.items() if part[0] is not TRUE), None)
    if first_false is None and obs.ready_replicas >= obs.desired_replicas:
        parts[ConditionType.READY] = (TRUE, "Ready", f"serving as {obs.url}")
    elif first_false is None:
        parts[ConditionType.READY] = (FALSE, "Scaling", parts[ConditionType.INFERENCE_READY][2])
    else:
        kind, (_, reason, message) = first_false
        parts[ConditionType.READY] = (FALSE, reason, f"{kind.value}: {message}")

    before = {c.type: c for c in previous.conditions}
    conditions = []
    for kind, (status, reason, message) in parts.items():
        old = before.get(kind)
        since = old.last_transition_time if old is not None and old.status is status else now
        conditions.append(
            Condition(
                type=kind,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=since,
                observed_generation=obs.generation,
            )
        )
    return CodeCompletionModelStatus(
        phase=_phase(obs, parts[ConditionType.READY][0] is TRUE),
        observed_generation=obs.generation,
        conditions=conditions,
        ready_replicas=obs.ready_replicas,
        desired_replicas=obs.desired_replicas,
        ready=f"{obs.ready_replicas}/{obs.desired_replicas}",
        url=obs.url,
        fetch=previous.fetch,
    )


def _phase(obs: Observed, ready: bool) -> Phase:
    if obs.gpu_problem or obs.unschedulable:
        return Phase.UNSCHEDULABLE
    if obs.weights is WeightsState.FAILED:
        return Phase.FAILED
    if obs.weights is not WeightsState.READY:
        return Phase.FETCHING
    return Phase.READY if ready else Phase.STARTING


def transitions(previous: CodeCompletionModelStatus, new: CodeCompletionModelStatus) -> list[Transition]:
    """Conditions of `new` whose status or reason differs from `previous`."""
    before = {c.type: (c.status, c.reason) for c in previous.conditions}
    return [
        Transition(c.type, c.status, c.reason, c.message)
        for c in new.conditions
        if before.get(c.type) != (c.status, c.reason)
    ]


def status_patch(status: CodeCompletionModelStatus) -> dict[str, Any]:
    """The merge patch of `.status` the operator owns (it leaves `fetch` to the fetch job)."""
    return {"status": status.model_dump(by_alias=True, exclude_none=True, exclude={"fetch"}, mode="json")}
