"""Operator latency and scale on the testbed, against the floor of the same cluster without the operator.

Starts a fresh control plane with KWOK GPU nodes (100 by default, FasterTransformer-capable: A100, V100,
A10, T4) and runs, in this order:

1. latency, floor: N bare Deployment+Service pairs (one GPU pod each, the same GPU affinity) created
   directly through the API, one every `--interval` seconds: time from the POST to both objects being
   listed, and to the Deployment's pod being ready. This is what Kubernetes itself takes.
2. latency, operator: N CodeCompletionModels applied at the same pace to `pilotfleet operator` (a local
   process, cluster-wide): time from apply to its children (weights PVC, Service, fetch Job) being listed,
   and to the model's Ready condition (fetch Job completed by KWOK, Deployment ready, route published).
3. scale: the fleet (200 by default) applied at once, bare pairs first, then models: time to all ready,
   and the operator's peak resident memory (VmHWM of its process).

Times come from polling the API every `POLL_S`; the operator moves a converging model on when its
children change (`--retry-delay` only spaces retries after API errors). Prints a Markdown table.
(Named `operator_bench.py`, not `operator.py`: a script's folder comes first on sys.path, and a file named
`operator.py` there would shadow the stdlib module for every benchmark in this folder.)

    .venv/bin/python benchmarks/operator_bench.py [--models 20] [--fleet 200] [--fleet-nodes 100]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pilotfleet_operator import crd, naming
from pilotfleet_operator.apply import (
    CRDS,
    DEPLOYMENTS,
    JOBS,
    MODELS,
    PODS,
    PVCS,
    SERVICES,
    ApiError,
    Kube,
    Resource,
)
from pilotfleet_operator.settings import Settings
from pilotfleet_serve import procs
from pilotfleet_testbed import demo, gobuild, kube, nodes, operator_proc, paths

log = logging.getLogger("benchmarks.operator")

POLL_S = 0.05
PVS = Resource("v1", "persistentvolumes", namespaced=False)
NAMESPACES = Resource("v1", "namespaces", namespaced=False)
OPERATOR_NAMESPACE = "pilotfleet-system"
# FasterTransformer's default range is 7.0-8.6: these four GPU types all qualify, so every node counts.
FLEET_GPU_TYPES = ("a100", "v100", "a10", "t4")
EXAMPLE = "codegen-350m-mono.yaml"


@dataclass
class Run:
    """When each object of a run was applied, first seen with its children, and first seen ready."""

    applied: dict[str, float] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)
    ready: dict[str, float] = field(default_factory=dict)

    def seconds(self, stage: dict[str, float]) -> list[float]:
        """Seconds from apply to `stage`, one per object."""
        return [stage[name] - self.applied[name] for name in self.applied]

    def all_ready_s(self) -> float:
        """Seconds from the first apply to the last object ready."""
        return max(self.ready.values()) - min(self.applied.values())


# An observer lists a namespace and returns (names whose children all exist, names that are ready).
Observer = Callable[[], tuple[set[str], set[str]]]


def drive(
    names: Sequence[str], apply: Callable[[str], None], observe: Observer, interval: float, timeout: float
) -> Run:
    """Apply one object per `interval` seconds (all at once when 0) while polling `observe` until every
    object is ready; raise TimeoutError naming what is missing."""
    run = Run()
    pending = list(names)
    next_apply = time.monotonic()
    deadline = next_apply + timeout + interval * len(names)
    while len(run.ready) < len(names):
        now = time.monotonic()
        while pending and now >= next_apply:
            name = pending.pop(0)
            run.applied[name] = time.monotonic()
            apply(name)
            next_apply += interval
            now = time.monotonic()
        created, ready = observe()
        seen = time.monotonic()
        for name in created & run.applied.keys():
            run.created.setdefault(name, seen)
        for name in ready & run.applied.keys():
            run.created.setdefault(name, seen)
            run.ready.setdefault(name, seen)
        if seen > deadline:
            missing = sorted(set(names) - run.ready.keys())
            raise TimeoutError(
                f"{len(missing)} of {len(names)} not ready after {timeout:.0f}s: {missing[:5]}"
            )
        time.sleep(POLL_S)
    return run


def quantile(values: Iterable[float], q: float) -> float:
    """The q-th quantile (0..1) of the values, interpolated between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def bare_pair(namespace: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A one-GPU Deployment (compute capability >= 7.0, GPU toleration) and its Service: the floor."""
    labels = {"app": name}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "tolerations": [
                        {"key": nodes.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {
                                                "key": "nvidia.com/gpu.compute.major",
                                                "operator": "Gt",
                                                "values": ["6"],
                                            }
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    "containers": [
                        {
                            "name": "triton",
                            "image": "pilotfleet-triton:bench",
                            "resources": {"limits": {nodes.GPU_RESOURCE: "1"}},
                        }
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": "grpc", "port": 8001}]},
    }
    return deployment, service


def model_body(name: str) -> dict[str, Any]:
    """The CodeGen 350M example under another name and engine (no aliases: they must be unique)."""
    body: dict[str, Any] = yaml.safe_load((paths.project_root() / "examples" / EXAMPLE).read_text())
    body = copy.deepcopy(body)
    body["metadata"]["name"] = name
    body["spec"]["engine"] = name
    body["spec"].pop("aliases", None)
    return body


class Bench:
    """One fresh cluster for the whole benchmark, driven as the admin."""

    def __init__(self, workdir: Path, gpu_nodes: int) -> None:
        self.workdir = workdir
        self.cluster = kube.Cluster.start(workdir / "kube", gobuild.ensure_all())
        self.api = self.cluster.api_client()
        self.kube = Kube(self.api)
        per_type = {key: gpu_nodes // len(FLEET_GPU_TYPES) for key in FLEET_GPU_TYPES}
        per_type[FLEET_GPU_TYPES[0]] += gpu_nodes - sum(per_type.values())
        began = time.monotonic()
        nodes.create_nodes(self.api, nodes.node_pool(per_type, cpu_nodes=4), ready_timeout=120)
        self.nodes_s = time.monotonic() - began
        self.operator: procs.Process | None = None

    def namespace(self, name: str) -> str:
        """Create a namespace and wait for its default ServiceAccount (pods need it to be admitted)."""
        self.kube.request("POST", NAMESPACES.path(), body={"metadata": {"name": name}})
        path = f"/api/v1/namespaces/{name}/serviceaccounts/default"
        self.cluster.wait_for(lambda: self._exists(path), f"the default ServiceAccount in {name}")
        return name

    def _exists(self, path: str) -> bool:
        try:
            self.kube.request("GET", path)
        except ApiError:
            return False
        return True

    def floor(self, count: int, interval: float, timeout: float, label: str) -> Run:
        """Bare Deployment+Service pairs created directly through the API."""
        ns = self.namespace(f"floor-{label}")

        def apply(name: str) -> None:
            deployment, service = bare_pair(ns, name)
            self.kube.request("POST", DEPLOYMENTS.path(ns), body=deployment)
            self.kube.request("POST", SERVICES.path(ns), body=service)

        def observe() -> tuple[set[str], set[str]]:
            services = {s["metadata"]["name"] for s in self.kube.list(SERVICES, ns)}
            deployments = self.kube.list(DEPLOYMENTS, ns)
            created = {d["metadata"]["name"] for d in deployments} & services
            ready = {
                d["metadata"]["name"] for d in deployments if (d.get("status") or {}).get("readyReplicas")
            }
            return created, ready

        names = [f"d{i:03d}" for i in range(count)]
        result = drive(names, apply, observe, interval, timeout)
        # Give the GPUs back before the next run needs them.
        self.kube.delete(NAMESPACES, None, ns)
        self.cluster.wait_for(lambda: not self.kube.list(PODS, ns), f"the pods of {ns} to go", timeout)
        return result

    def start_operator(self, retry_delay: float) -> None:
        """Install the CRD and start `pilotfleet operator`, cluster-wide, as the admin."""
        self.kube.apply(crd.crd())
        self.cluster.wait_for(self._crd_established, "the CRD to be Established")
        self.namespace(OPERATOR_NAMESPACE)
        self.operator = operator_proc.start_operator(
            self.cluster.kubeconfig, OPERATOR_NAMESPACE, self.workdir / "operator", retry_delay=retry_delay
        )

    def _crd_established(self) -> bool:
        conditions = ((self.kube.get(CRDS, None, naming.CRD_NAME) or {}).get("status") or {}).get(
            "conditions"
        )
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions or [])

    def models(self, count: int, interval: float, timeout: float, label: str) -> Run:
        """CodeCompletionModels applied to the running operator."""
        ns = self.namespace(f"models-{label}")
        # Engine names are unique across the fleet (a repeated one is a NameConflict, never Ready).
        names = [f"{label}-{i:03d}" for i in range(count)]
        for name in names:
            self.kube.request("POST", PVS.path(), body=demo.weights_volume(ns, naming.pvc_name(name)))

        def apply(name: str) -> None:
            self.kube.request("POST", MODELS.path(ns), body=model_body(name))

        def observe() -> tuple[set[str], set[str]]:
            def owners(resource: Resource) -> set[str]:
                return {
                    o["metadata"]["labels"].get(naming.LABEL_MODEL, "")
                    for o in self.kube.list(resource, ns, f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}")
                }

            # The fetch Job is applied after the other children, but list them all to be sure.
            created = owners(PVCS) & owners(SERVICES) & owners(JOBS)
            ready = {
                m["metadata"]["name"]
                for m in self.kube.list(MODELS, ns)
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (m.get("status") or {}).get("conditions") or []
                )
            }
            return created, ready

        return drive(names, apply, observe, interval, timeout)

    def operator_memory_mib(self) -> tuple[float, float]:
        """The operator process's resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
        assert self.operator is not None
        fields: dict[str, float] = {}
        for line in Path(f"/proc/{self.operator.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
        return fields["VmRSS"], fields["VmHWM"]

    def close(self, failed: bool) -> None:
        """Stop the operator and the cluster; after a failure, log the end of the operator's log."""
        if self.operator is not None:
            if failed:
                log.error(
                    "operator log %s ends:\n%s",
                    self.operator.log_path,
                    procs.log_tail(self.operator.log_path, 40),
                )
            refused = operator_proc.refused_requests(self.operator.log_path)
            if refused:
                log.warning("the operator was refused %d requests, e.g. %s", len(refused), refused[0])
            self.operator.stop()
        self.api.close()
        self.cluster.stop()


def ratio(value: float, floor: float) -> str:
    """`value / floor` as a Markdown cell."""
    return f"{value / floor:.1f}x" if floor > 0 else "-"


def table(rows: Sequence[tuple[str, str, str, str]]) -> str:
    """A Markdown table of (measure, operator, floor, ratio) rows."""
    lines = ["| measure | operator | floor | ratio |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> str:
    """Run every part and return the report (machine, date, settings, table)."""
    with tempfile.TemporaryDirectory(prefix="pilotfleet-bench-operator-") as tmp:
        bench = Bench(Path(tmp), args.fleet_nodes)
        try:
            log.info("%d GPU nodes schedulable in %.1fs", args.fleet_nodes, bench.nodes_s)
            floor_latency = bench.floor(args.models, args.interval, args.timeout, "latency")
            log.info("floor latency done")
            floor_fleet = bench.floor(args.fleet, 0.0, args.timeout, "fleet")
            log.info("floor fleet: %d ready in %.1fs", args.fleet, floor_fleet.all_ready_s())
            bench.start_operator(args.retry_delay)
            idle_rss, _ = bench.operator_memory_mib()
            latency = bench.models(args.models, args.interval, args.timeout, "latency")
            log.info("operator latency done")
            fleet = bench.models(args.fleet, 0.0, args.timeout, "fleet")
            log.info("operator fleet: %d Ready in %.1fs", args.fleet, fleet.all_ready_s())
            _, peak_rss = bench.operator_memory_mib()
        except BaseException:
            bench.close(failed=True)
            raise
        bench.close(failed=False)

    rows: list[tuple[str, str, str, str]] = []
    for stage, op_stage, floor_stage in (
        ("children created", latency.created, floor_latency.created),
        ("Ready", latency.ready, floor_latency.ready),
    ):
        for q in (0.5, 0.99):
            value = quantile(latency.seconds(op_stage), q)
            floor_value = quantile(floor_latency.seconds(floor_stage), q)
            rows.append(
                (
                    f"apply -> {stage}, p{round(q * 100)} of {args.models}",
                    f"{value:.2f} s",
                    f"{floor_value:.2f} s",
                    ratio(value, floor_value),
                )
            )
    op_all, floor_all = fleet.all_ready_s(), floor_fleet.all_ready_s()
    rows.append(
        (
            f"{args.fleet} at once on {args.fleet_nodes} GPU nodes -> all Ready",
            f"{op_all:.1f} s",
            f"{floor_all:.1f} s",
            ratio(op_all, floor_all),
        )
    )
    rows.append(("operator resident memory, idle -> peak", f"{idle_rss:.0f} -> {peak_rss:.0f} MiB", "-", "-"))
    rows.append((f"{args.fleet_nodes} GPU nodes created -> schedulable", f"{bench.nodes_s:.1f} s", "-", "-"))
    header = (
        f"{platform.node()}: {platform.processor() or platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}, "
        f"{datetime.now(UTC):%Y-%m-%d}; operator retry delay {args.retry_delay:g} s, "
        f"latency models applied one per {args.interval:g} s, fleet applied at once"
    )
    return f"{header}\n\n{table(rows)}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the benchmark and print its table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=20, help="models for the latency percentiles")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between latency applies")
    parser.add_argument("--fleet", type=int, default=200, help="models applied at once for the scale run")
    parser.add_argument("--fleet-nodes", type=int, default=100, help="simulated GPU nodes")
    parser.add_argument(
        "--retry-delay",
        type=float,
        default=Settings.model_fields["retry_delay"].default,
        help="PILOTFLEET_OPERATOR_RETRY_DELAY of the operator (default: the operator's own default)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for each run to be ready")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the cluster and the operator are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
