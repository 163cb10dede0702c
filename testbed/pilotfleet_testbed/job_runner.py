"""A local kubelet for Job pods: runs the pods scheduled to one dedicated node as local processes.

KWOK's kubelets only pretend to run containers. This runner makes a pod's work real, so a Job such as the
operator's weights fetch really downloads, reports progress through its own RBAC, and ends with its own
exit code and termination message. What it stands in for, exactly:

- the kubelet of one node: it registers the Node `local-runner` (without KWOK's annotation, so KWOK leaves
  it alone; tainted `RUNNER_TAINT`, so only pods that tolerate it land here), keeps it Ready with a Lease
  and status heartbeats, and patches pod status as a kubelet does: Running, then Succeeded or Failed with
  the container's exit code and termination message (or, with `FallbackToLogsOnError`, its log's end);
  pods being deleted are stopped and then removed;
- the container runtime: the one container's `command` + `args` run as a local process (found on this
  machine's PATH with the project's venv first; the image is not pulled), with the pod's env resolved
  (`value`, `fieldRef`, `secretKeyRef`, `configMapKeyRef`);
- the container's filesystem: volumes are not mounted; instead every argument and env value that is a
  container path under a volumeMount, or the termination message path, is rewritten to the local path
  behind it: a PVC's bound PersistentVolume (`hostPath` or `local`), an emptyDir, or the projected
  ServiceAccount volume, whose token comes from the TokenRequest API bound to the pod, as the kubelet's;
- in-cluster API access: the `kubernetes` client reads in-cluster credentials from fixed paths, so the
  process gets `KUBECONFIG` naming the API server, its CA and that projected token file instead.

Not supported (the pod fails with a message saying so): init containers, more than one container, other
volume types. No resource limits, probes or restarts (`restartPolicy: Never` is what Jobs here use).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from pilotfleet_operator.apply import ApiError, Kube

from pilotfleet_testbed.kube import Cluster

log = logging.getLogger(__name__)

NODE_NAME = "local-runner"
RUNNER_TAINT = {"key": "pilotfleet.dev/local-runner", "value": "true", "effect": "NoSchedule"}
NODE_LEASE_NAMESPACE = "kube-node-lease"
HEARTBEAT_S = 10.0
POLL_S = 0.25
# The kubelet keeps at most this much of a termination message, and of the log fallback.
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_BYTES = 2048
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE_PATCH = "application/merge-patch+json"


class PodSpecError(Exception):
    """The pod asks for something this runner cannot provide; the pod fails with this message."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class RunningPod:
    """One pod's local process and where its files are."""

    namespace: str
    name: str
    uid: str
    workdir: Path
    process: subprocess.Popen[bytes] | None = None
    termination_log: Path | None = None
    fallback_to_logs: bool = False
    started_at: str = field(default_factory=_now)
    waiter: threading.Thread | None = None

    @property
    def log_path(self) -> Path:
        """stdout and stderr of the container."""
        return self.workdir / "container.log"


class JobRunner:
    """The runner; `start()` registers the node and begins running its pods, `stop()` undoes it all."""

    def __init__(self, cluster: Cluster, workdir: Path, node_name: str = NODE_NAME) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.node_name = node_name
        self._api = cluster.api_client()
        self.kube = Kube(self._api)
        self._pods: dict[str, RunningPod] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        self._failure: BaseException | None = None

    @property
    def node_selector(self) -> dict[str, str]:
        """The node selector that puts a pod on this runner."""
        return {"kubernetes.io/hostname": self.node_name}

    @property
    def tolerations(self) -> list[dict[str, str]]:
        """The toleration a pod needs to be placed on this runner."""
        return [{"key": RUNNER_TAINT["key"], "operator": "Exists", "effect": RUNNER_TAINT["effect"]}]

    def pod_log(self, namespace: str, name: str) -> Path:
        """Where the container output of pod `namespace/name` goes."""
        return self.workdir / f"{namespace}_{name}" / "container.log"

    def start(self, ready_timeout: float = 60.0) -> JobRunner:
        """Register the node, wait until the scheduler may use it, and start running its pods."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kube.request("POST", "/api/v1/nodes", body=self._node_manifest())
        self._heartbeat()
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self._schedulable():
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {self.node_name} not schedulable after {ready_timeout:.0f}s")
            time.sleep(0.2)
        log.info("job runner node %s ready (work dir %s)", self.node_name, self.workdir)
        return self

    def describe(self) -> str:
        """The pods on the node, their phase and container state, and each local log's end (for failures)."""
        lines = []
        pods = self.kube.request(
            "GET", "/api/v1/pods", query={"fieldSelector": f"spec.nodeName={self.node_name}"}
        ).get("items", [])
        for pod in pods:
            meta, status = pod["metadata"], pod.get("status", {})
            states = [c.get("state") for c in status.get("containerStatuses", [])]
            lines.append(f"pod {meta['namespace']}/{meta['name']}: {status.get('phase')} {states}")
            log_path = self.pod_log(meta["namespace"], meta["name"])
            if log_path.exists():
                lines += ["  " + line for line in log_path.read_text(errors="replace").splitlines()[-15:]]
        return "\n".join(lines) or f"no pods on node {self.node_name}"

    def check_alive(self) -> None:
        """Raise if the runner's loop died (with its exception as the cause)."""
        if self._failure is not None:
            raise RuntimeError(f"the job runner for node {self.node_name} failed") from self._failure

    def stop(self) -> None:
        """Stop every local process, the loop, and remove the node and its Lease; safe to call twice."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            pods = list(self._pods.values())
            self._pods.clear()
        for pod in pods:
            self._kill(pod)
        with contextlib.suppress(ApiError):
            self.kube.request("DELETE", f"/api/v1/nodes/{self.node_name}")
        with contextlib.suppress(ApiError):
            self.kube.request("DELETE", self._lease_path())
        self._api.close()

    # The node -------------------------------------------------------------------------------------

    def _node_manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "spec": {"taints": [dict(RUNNER_TAINT)]},
        }

    def _lease_path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases/{self.node_name}"

    def _heartbeat(self) -> None:
        """Renew the node's Lease and Ready condition, as the kubelet does every few seconds."""
        now = _now()
        capacity = {"cpu": "2", "memory": "8Gi", "pods": "20", "ephemeral-storage": "20Gi"}
        status = {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "pilotfleet job runner is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
        }
        self.kube.request(
            "PATCH",
            f"/api/v1/nodes/{self.node_name}/status",
            body={"status": status},
            content_type=STRATEGIC_MERGE,
        )
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": 40, "renewTime": _micro_now()}
        try:
            self.kube.request("PATCH", self._lease_path(), body={"spec": spec}, content_type=MERGE_PATCH)
        except ApiError as exc:
            if exc.status != 404:
                raise
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.node_name, "namespace": NODE_LEASE_NAMESPACE},
                "spec": spec,
            }
            self.kube.request("POST", self._lease_path().rsplit("/", 1)[0], body=lease)

    def _schedulable(self) -> bool:
        node = self.kube.request("GET", f"/api/v1/nodes/{self.node_name}")
        ready = any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in node.get("status", {}).get("conditions", [])
        )
        lifecycle = [t for t in node["spec"].get("taints", []) if t["key"].startswith("node.kubernetes.io/")]
        return ready and not lifecycle

    # The loop ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        last_beat = time.monotonic()
        try:
            while not self._stop.wait(POLL_S):
                if time.monotonic() - last_beat > HEARTBEAT_S:
                    self._heartbeat()
                    last_beat = time.monotonic()
                pods = self.kube.request(
                    "GET", "/api/v1/pods", query={"fieldSelector": f"spec.nodeName={self.node_name}"}
                ).get("items", [])
                for pod in pods:
                    self._sync(pod)
        except BaseException as exc:
            log.exception("job runner loop failed")
            self._failure = exc

    def _sync(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        with self._lock:
            running = self._pods.get(uid)
        if meta.get("deletionTimestamp"):
            if running is not None:
                self._kill(running)
            # The kubelet's last word on a pod being deleted: it is gone from the node.
            with contextlib.suppress(ApiError):
                self.kube.request(
                    "DELETE",
                    f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                    body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                )
            return
        if running is not None or pod.get("status", {}).get("phase") not in (None, "Pending"):
            return
        record = RunningPod(
            meta["namespace"], meta["name"], uid, self.workdir / f"{meta['namespace']}_{meta['name']}"
        )
        with self._lock:
            self._pods[uid] = record
        try:
            self._launch(pod, record)
        except (PodSpecError, ApiError, OSError) as exc:
            log.warning("pod %s/%s cannot run here: %s", record.namespace, record.name, exc)
            self._report_end(record, 128, str(exc), reason="RunContainerError")
            return
        record.waiter = threading.Thread(target=self._wait, args=(record,), name=f"pod-{record.name}")
        record.waiter.start()

    # One pod -------------------------------------------------------------------------------------

    def _launch(self, pod: dict[str, Any], record: RunningPod) -> None:
        spec = pod["spec"]
        if spec.get("initContainers") or len(spec["containers"]) != 1:
            raise PodSpecError("the job runner runs exactly one container and no init containers")
        container = spec["containers"][0]
        record.workdir.mkdir(parents=True, exist_ok=True)
        volumes = {
            v["name"]: self._volume(pod, v, record.workdir / "volumes") for v in spec.get("volumes", [])
        }
        paths: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            local = volumes[mount["name"]] / mount.get("subPath", "")
            paths[mount["mountPath"].rstrip("/")] = local
        record.termination_log = record.workdir / "termination-log"
        record.termination_log.write_text("")
        paths[container.get("terminationMessagePath", "/dev/termination-log")] = record.termination_log
        record.fallback_to_logs = container.get("terminationMessagePolicy") == "FallbackToLogsOnError"

        def translate(value: str) -> str:
            for mount_path in sorted(paths, key=len, reverse=True):
                if value == mount_path or value.startswith(mount_path + "/"):
                    return str(paths[mount_path]) + value[len(mount_path) :]
            return value

        env = {
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
            "HOME": str(record.workdir),
        }
        token_dir = next(
            (paths[m] for m in paths if m == "/var/run/secrets/kubernetes.io/serviceaccount"), None
        )
        if token_dir is not None:
            env["KUBECONFIG"] = str(self._kubeconfig(record.workdir, token_dir / "token"))
        for var in container.get("env", []):
            value = self._env_value(pod, var)
            if value is not None:
                env[var["name"]] = translate(value)
        argv = [translate(a) for a in [*container.get("command", []), *container.get("args", [])]]
        if not argv:
            raise PodSpecError("the container has no command (the runner cannot read an image's entrypoint)")
        program = shutil.which(argv[0], path=env["PATH"])
        if program is None:
            raise PodSpecError(f"{argv[0]!r} is not on the runner's PATH {env['PATH']}")
        with record.log_path.open("wb") as out:
            record.process = subprocess.Popen(
                [program, *argv[1:]],
                env=env,
                cwd=record.workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        log.info("pod %s/%s running as pid %d: %s", record.namespace, record.name, record.process.pid, argv)
        record.started_at = _now()
        state = {"running": {"startedAt": record.started_at}}
        self._patch_status(record, "Running", container, state, ready=True)

    def _volume(self, pod: dict[str, Any], volume: dict[str, Any], root: Path) -> Path:
        name = volume["name"]
        namespace = pod["metadata"]["namespace"]
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            pvc = self.kube.request("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            pv_name = pvc.get("spec", {}).get("volumeName")
            if not pv_name:
                raise PodSpecError(f"PersistentVolumeClaim {claim} is not bound")
            pv = self.kube.request("GET", f"/api/v1/persistentvolumes/{pv_name}")["spec"]
            source = pv.get("hostPath") or pv.get("local")
            if not source:
                raise PodSpecError(f"PersistentVolume {pv_name} is neither hostPath nor local")
            path = Path(source["path"])
            path.mkdir(parents=True, exist_ok=True)
            return path
        local = root / name
        local.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            return local
        if "projected" in volume:
            for source in volume["projected"].get("sources", []):
                self._projected(pod, source, local)
            return local
        raise PodSpecError(f"volume {name}: only persistentVolumeClaim, emptyDir and projected are supported")

    def _projected(self, pod: dict[str, Any], source: dict[str, Any], into: Path) -> None:
        meta = pod["metadata"]
        if "serviceAccountToken" in source:
            token_spec = source["serviceAccountToken"]
            request: dict[str, Any] = {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "expirationSeconds": token_spec.get("expirationSeconds", 3607),
                    "boundObjectRef": {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "name": meta["name"],
                        "uid": meta["uid"],
                    },
                },
            }
            if token_spec.get("audience"):
                request["spec"]["audiences"] = [token_spec["audience"]]
            account = pod["spec"].get("serviceAccountName", "default")
            answer = self.kube.request(
                "POST",
                f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
                body=request,
            )
            (into / token_spec.get("path", "token")).write_text(answer["status"]["token"])
        elif "configMap" in source:
            ref = source["configMap"]
            data = self.kube.request(
                "GET", f"/api/v1/namespaces/{meta['namespace']}/configmaps/{ref['name']}"
            ).get("data", {})
            for item in ref.get("items") or [{"key": k, "path": k} for k in data]:
                (into / item["path"]).write_text(data[item["key"]])
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items", []):
                value = self._field(pod, item["fieldRef"]["fieldPath"])
                (into / item["path"]).write_text(value)
        else:
            raise PodSpecError(f"projected source {sorted(source)} is not supported")

    def _kubeconfig(self, workdir: Path, token_file: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "in-cluster",
                    "cluster": {
                        "server": self.cluster.api_url,
                        "certificate-authority": str(self.cluster.ca_file),
                    },
                }
            ],
            "users": [{"name": "pod", "user": {"tokenFile": str(token_file)}}],
            "contexts": [{"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "pod"}}],
            "current-context": "in-cluster",
        }
        path = workdir / "kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path

    def _field(self, pod: dict[str, Any], field_path: str) -> str:
        values = {
            "metadata.name": pod["metadata"]["name"],
            "metadata.namespace": pod["metadata"]["namespace"],
            "metadata.uid": pod["metadata"]["uid"],
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
            "status.hostIP": "127.0.0.1",
            "status.podIP": "127.0.0.1",
        }
        if field_path not in values:
            raise PodSpecError(f"fieldRef {field_path} is not supported")
        return str(values[field_path])

    def _env_value(self, pod: dict[str, Any], var: dict[str, Any]) -> str | None:
        """The value of one env entry; None for a missing optional key (the variable is then unset)."""
        if "valueFrom" not in var:
            return str(var.get("value", ""))
        source = var["valueFrom"]
        namespace = pod["metadata"]["namespace"]
        if "fieldRef" in source:
            return self._field(pod, source["fieldRef"]["fieldPath"])
        for kind, plural, decode in (
            ("secretKeyRef", "secrets", True),
            ("configMapKeyRef", "configmaps", False),
        ):
            if kind not in source:
                continue
            ref = source[kind]
            try:
                obj = self.kube.request("GET", f"/api/v1/namespaces/{namespace}/{plural}/{ref['name']}")
            except ApiError as exc:
                if exc.status == 404 and ref.get("optional"):
                    return None
                raise PodSpecError(f"env {var['name']}: {plural[:-1]} {ref['name']}: {exc}") from exc
            data = obj.get("data", {})
            if ref["key"] not in data:
                if ref.get("optional"):
                    return None
                raise PodSpecError(f"env {var['name']}: {plural[:-1]} {ref['name']} has no key {ref['key']}")
            value = data[ref["key"]]
            return base64.b64decode(value).decode() if decode else str(value)
        raise PodSpecError(f"env {var['name']}: valueFrom {sorted(source)} is not supported")

    def _wait(self, record: RunningPod) -> None:
        assert record.process is not None
        code = record.process.wait()
        if self._stop.is_set():
            return
        message = record.termination_log.read_bytes()[:MAX_MESSAGE_BYTES] if record.termination_log else b""
        if not message.strip() and code != 0 and record.fallback_to_logs:
            message = record.log_path.read_bytes()[-FALLBACK_LOG_BYTES:]
        log.info("pod %s/%s exited with status %d", record.namespace, record.name, code)
        try:
            self._report_end(record, code, message.decode(errors="replace"))
        except ApiError as exc:
            # The pod may be gone already (its namespace deleted while it ran).
            log.info("could not report the end of pod %s/%s: %s", record.namespace, record.name, exc)

    def _report_end(self, record: RunningPod, code: int, message: str, reason: str | None = None) -> None:
        pod = self.kube.request("GET", f"/api/v1/namespaces/{record.namespace}/pods/{record.name}")
        container = pod["spec"]["containers"][0]
        terminated = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "message": message,
            "startedAt": record.started_at,
            "finishedAt": _now(),
            "containerID": f"local://{record.process.pid if record.process else 0}",
        }
        self._patch_status(
            record, "Succeeded" if code == 0 else "Failed", container, {"terminated": terminated}, ready=False
        )

    def _patch_status(
        self, record: RunningPod, phase: str, container: dict[str, Any], state: dict[str, Any], ready: bool
    ) -> None:
        now = _now()
        flag = "True" if ready else "False"
        conditions = [
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
        ]
        status = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "startTime": record.started_at,
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": ready,
                    "started": "running" in state,
                    "restartCount": 0,
                    "state": state,
                }
            ],
        }
        self.kube.request(
            "PATCH",
            f"/api/v1/namespaces/{record.namespace}/pods/{record.name}/status",
            body={"status": status},
            content_type=STRATEGIC_MERGE,
        )

    def _kill(self, record: RunningPod, grace: float = 5.0) -> None:
        process = record.process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if record.waiter is not None and record.waiter is not threading.current_thread():
            record.waiter.join(timeout=grace)
