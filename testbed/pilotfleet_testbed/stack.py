"""The whole testbed as one unit: build every part, bring it up, record it, report on it, take it down.

`pilotfleet testbed up` runs in one process and exits, leaving the parts running; everything needed to
find and stop them later is recorded in `state.json` in the state folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pilotfleet_serve import procs, tritonserver

from pilotfleet_testbed import copilot, gobuild, k8s_tools, kube, nodes, triton

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass
class Timings:
    """Seconds each part took, for the user and for the README's figures."""

    seconds: dict[str, float] = field(default_factory=dict)

    def measure(self, name: str, began: float) -> None:
        """Record the time since `began` under `name`."""
        self.seconds[name] = round(time.monotonic() - began, 2)


@dataclass
class Parts:
    """The built parts of the testbed: where each binary lives."""

    kube: gobuild.KubeBinaries
    tools: k8s_tools.K8sTools
    copilot_language_server: Path


def build(timings: Timings | None = None) -> Parts:
    """Build or fetch every part (cached by version; a warm call takes milliseconds)."""
    timings = timings or Timings()
    began = time.monotonic()
    kube_bins = gobuild.ensure_all()
    timings.measure("build kubernetes+etcd+kwok", began)
    began = time.monotonic()
    tools = k8s_tools.ensure_k8s_tools()
    timings.measure("fetch helm+kubectl", began)
    began = time.monotonic()
    language_server = copilot.ensure_copilot_language_server()
    timings.measure("install copilot language server", began)
    began = time.monotonic()
    tritonserver.check_numpy()
    tritonserver.find_dist()
    timings.measure("check triton", began)
    return Parts(kube=kube_bins, tools=tools, copilot_language_server=language_server)


@dataclass
class Running:
    """What `up` started, as recorded in state.json."""

    kubeconfig: str
    api_url: str
    cluster_pids: dict[str, int]
    triton_pid: int
    triton_grpc: str
    triton_http: str
    triton_shm_prefix: str
    helm: str
    kubectl: str
    # `pilotfleet operator` when something (the demo) runs it locally against this testbed.
    operator_pid: int | None = None

    def save(self, state: Path) -> None:
        """Write the record to `state/state.json`."""
        (state / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, state: Path) -> Running | None:
        """Read the record, or None when nothing is up."""
        path = state / STATE_FILE
        if not path.exists():
            return None
        data: dict[str, Any] = json.loads(path.read_text())
        return cls(**data)


def up(state: Path, timings: Timings | None = None) -> Running:
    """Start the control plane with the default node pool and a CPU Triton with our test models."""
    timings = timings or Timings()
    if Running.load(state) is not None:
        raise procs.StartError(
            f"the testbed already runs (see {state / STATE_FILE}); stop it with `pilotfleet testbed down`"
        )
    parts = build(timings)
    if state.exists():
        shutil.rmtree(state)
    state.mkdir(parents=True)
    began = time.monotonic()
    cluster = kube.Cluster.start(state / "kube", parts.kube)
    timings.measure("start control plane", began)
    try:
        began = time.monotonic()
        nodes.create_nodes(cluster.api_client(), nodes.node_pool())
        timings.measure("create node pool", began)
        began = time.monotonic()
        repo = triton.build_model_repository(state / "models")
        server = tritonserver.TritonServer.start(repo, state / "triton")
        timings.measure("start triton", began)
    except BaseException:
        cluster.stop()
        raise
    assert server.pid is not None
    running = Running(
        kubeconfig=str(cluster.kubeconfig),
        api_url=cluster.api_url,
        cluster_pids=cluster.pids,
        triton_pid=server.pid,
        triton_grpc=server.url,
        triton_http=server.http_url,
        triton_shm_prefix=server.shm_prefix,
        helm=str(parts.tools.helm),
        kubectl=str(parts.tools.kubectl),
    )
    running.save(state)
    return running


def down(state: Path) -> bool:
    """Stop everything `up` recorded; return False when nothing was recorded."""
    running = Running.load(state)
    if running is None:
        return False
    # The operator first: it would log every API error while the control plane goes away under it.
    if running.operator_pid is not None:
        procs.stop_group(running.operator_pid, "operator")
    procs.stop_group(running.triton_pid, "tritonserver")
    for region in tritonserver.SHM_DIR.glob(f"{running.triton_shm_prefix}*"):
        region.unlink(missing_ok=True)
    kube.stop_recorded(running.cluster_pids)
    (state / STATE_FILE).unlink()
    return True


def status(state: Path) -> dict[str, str]:
    """Return one line of health per part of a testbed started by `up`."""
    running = Running.load(state)
    if running is None:
        return {"testbed": "down"}
    report = {
        name: "running" if procs.group_running(pid) else "NOT RUNNING"
        for name, pid in sorted(running.cluster_pids.items())
    }
    report["triton"] = "running" if procs.group_running(running.triton_pid) else "NOT RUNNING"
    if running.operator_pid is not None:
        report["operator"] = "running" if procs.group_running(running.operator_pid) else "NOT RUNNING"
    report["kubeconfig"] = running.kubeconfig
    report["triton grpc"] = running.triton_grpc
    return report
