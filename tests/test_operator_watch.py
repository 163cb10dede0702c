"""What the operator keeps from its watches: index entries and the child signals that wake a model."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import yaml
from pilotfleet_operator import gpu, naming, watch
from pilotfleet_operator.reconcile import current_ready_replicas
from pilotfleet_operator.settings import Settings
from pilotfleet_testbed import nodes
from test_operator_unit import ROOT, load_example


def _child(kind_labels: dict[str, str], name: str, status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "team-a", "labels": kind_labels}, "status": status}


def test_node_entry_keeps_what_placement_reads_and_drops_heartbeats() -> None:
    a100 = next(n for n in nodes.node_pool(1) if "a100" in n["metadata"]["name"])
    beating = copy.deepcopy(a100)
    beating["status"]["conditions"] = [
        {"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-25T01:00:00Z"}
    ]
    beating["metadata"]["resourceVersion"] = "42"
    entry = watch.node_entry(beating)
    # A heartbeat does not change the entry, so kopf's index does not churn.
    assert entry == watch.node_entry(a100)
    # Placement answers the same from the entry as from the full Node.
    for example in ("codegen-350m-mono.yaml", "codegen-16b-multi.yaml"):
        req = gpu.requirement_for(load_example(example).spec, Settings())
        assert gpu.node_fits(req, entry) == gpu.node_fits(req, a100)
        assert gpu.node_gpus(entry) == gpu.node_gpus(a100)
    cordoned = {**a100, "spec": {**a100["spec"], "unschedulable": True}}
    assert watch.node_entry(cordoned) != entry
    assert not gpu.node_fits(
        gpu.requirement_for(load_example("codegen-350m-mono.yaml").spec, Settings()), cordoned
    )


def test_model_entry_leaves_out_models_being_deleted() -> None:
    body = yaml.safe_load((ROOT / "examples" / "codegen-350m-mono.yaml").read_text())
    body["metadata"].update(namespace="team-a", uid="u1")
    model = watch.model_entry(body)
    assert model is not None and (model.namespace, model.name) == ("team-a", "codegen-350m-mono")
    body["metadata"]["deletionTimestamp"] = "2026-11-25T01:00:00Z"
    assert watch.model_entry(body) is None


def test_signals_change_only_when_the_model_can_change() -> None:
    running = {"active": 1, "ready": 1}
    complete = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    failed = {"failed": 5, "conditions": [{"type": "Failed", "status": "True"}]}
    assert watch.job_signal({"status": running}) == watch.job_signal({"status": {"active": 1}})
    assert len({watch.job_signal({"status": s}) for s in (running, complete, failed)}) == 3
    # A Deployment matters when its rollout moves or its ready count changes, not on its conditions.
    rolling = {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1, "readyReplicas": 1}
    progressing = {
        **rolling,
        "conditions": [{"type": "Progressing", "status": "True"}],
        "unavailableReplicas": 1,
    }
    assert watch.deployment_signal({"status": rolling}) == watch.deployment_signal({"status": progressing})
    for key in ("observedGeneration", "replicas", "updatedReplicas", "readyReplicas"):
        moved = {**rolling, key: rolling[key] + 1}
        assert watch.deployment_signal({"status": moved}) != watch.deployment_signal({"status": rolling}), key
    pending = {"phase": "Pending"}
    unschedulable = {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}
    placed = {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]}
    assert len({watch.pod_signal({"status": s}) for s in (pending, unschedulable, placed)}) == 3


def test_nudges_wake_a_model_on_a_changed_signal_only() -> None:
    async def scenario() -> None:
        nudges = watch.Nudges()
        waker = nudges.follow(("team-a", "m1"))
        labels = naming.labels("m1", naming.COMPONENT_TRITON)
        deployment = _child(labels, "m1-triton", {"replicas": 1})

        def event(status: dict[str, Any], deleted: bool = False) -> bool:
            body = {**deployment, "status": status}
            return nudges.child_event("Deployment", body, watch.deployment_signal(body), deleted)

        # First sight sets the baseline (the model's own create/resume handler reconciles anyway).
        assert not event({"replicas": 1}) and not waker.is_set()
        assert not event({"replicas": 1, "unavailableReplicas": 1}) and not waker.is_set()
        assert event({"replicas": 1, "readyReplicas": 1}) and waker.is_set()
        waker.clear()
        assert event({}, deleted=True) and waker.is_set()
        # A child of another model does not wake this one; one without the model label wakes nobody.
        waker.clear()
        other = {
            **deployment,
            "metadata": {**deployment["metadata"], "labels": naming.labels("m2", "triton")},
        }
        assert nudges.child_event("Deployment", other, 0, True) and not waker.is_set()
        assert not nudges.child_event(
            "Deployment", {"metadata": {"name": "x", "namespace": "team-a"}}, 0, True
        )
        # A model whose daemon has stopped is not woken.
        nudges.forget(("team-a", "m1"))
        waker.clear()
        event({"replicas": 1})
        assert event({"replicas": 1, "readyReplicas": 1}) and not waker.is_set()

    asyncio.run(scenario())


def test_ready_replicas_of_the_current_template_only() -> None:
    def deployment(generation: int, observed: int, replicas: int, updated: int, ready: int) -> dict[str, Any]:
        status = {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated}
        return {"metadata": {"generation": generation}, "status": {**status, "readyReplicas": ready}}

    assert current_ready_replicas(None) == 0
    assert current_ready_replicas(deployment(1, 1, 1, 1, 1)) == 1
    # New template applied, not yet seen by the Deployment controller: the old pod's readiness does not count.
    assert current_ready_replicas(deployment(2, 1, 1, 1, 1)) == 0
    # Surge: the new pod exists but only the old one is ready.
    assert current_ready_replicas(deployment(2, 2, 2, 1, 1)) == 0
    # Both ready, the old one not yet gone; then the old one gone.
    assert current_ready_replicas(deployment(2, 2, 2, 1, 2)) == 1
    assert current_ready_replicas(deployment(2, 2, 1, 1, 1)) == 1
