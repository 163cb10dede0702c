"""A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, controller manager, scheduler, KWOK.

KWOK plays the kubelets: it manages the nodes that carry `KWOK_NODE_ANNOTATION`, marks them Ready,
reports their pods Running and moves Job pods to Succeeded (its default "fast" stages).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pilotfleet_serve import procs
from pilotfleet_serve.procs import Process, StartError

from pilotfleet_testbed import gobuild

log = logging.getLogger(__name__)

# Nodes with this annotation are KWOK's to play; nodes.py puts it on every simulated node.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE = "fake"
SERVICE_CIDR = "10.96.0.0/16"
# KWOK hands out pod IPs from here; a /16 leaves room for benchmarks with thousands of pods.
POD_CIDR = "10.244.0.1/16"
ADMIN_USER = "admin"
START_TIMEOUT = 60.0
STOP_ORDER = ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")


def _openssl(command: str, cwd: Path) -> None:
    """Run `openssl <command>` (arguments without spaces, split on whitespace) in `cwd`."""
    proc = subprocess.run(["openssl", *command.split()], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise StartError(f"openssl {command} failed:\n{proc.stderr.strip()}")


def write_pki(pki: Path) -> None:
    """Write a CA, an API server serving certificate signed by it, and the service-account key pair.

    EC P-256 keys: generated in milliseconds, and accepted for TLS and service-account tokens (ES256).
    """
    pki.mkdir(parents=True, exist_ok=True)
    new_key = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650"
    _openssl(
        f"req -x509 {new_key} -keyout ca.key -out ca.crt -subj /CN=pilotfleet-testbed-ca"
        " -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign",
        pki,
    )
    sans = ",".join(
        [
            "IP:127.0.0.1",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
    )
    _openssl(
        f"req -x509 {new_key} -CA ca.crt -CAkey ca.key -keyout apiserver.key -out apiserver.crt"
        f" -subj /CN=kube-apiserver -addext subjectAltName={sans}"
        " -addext basicConstraints=critical,CA:FALSE"
        " -addext keyUsage=critical,digitalSignature,keyEncipherment -addext extendedKeyUsage=serverAuth",
        pki,
    )
    _openssl("genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out sa.key", pki)
    _openssl("pkey -in sa.key -pubout -out sa.pub", pki)


def kubeconfig_for(api_url: str, ca_pem: bytes, token: str) -> dict[str, Any]:
    """Return a kubeconfig (as a dict) that reaches `api_url` with a bearer token, trusting `ca_pem`."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "pilotfleet-testbed",
                "cluster": {
                    "server": api_url,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [
            {"name": "pilotfleet-testbed", "context": {"cluster": "pilotfleet-testbed", "user": ADMIN_USER}}
        ],
        "current-context": "pilotfleet-testbed",
        "preferences": {},
    }


@dataclass
class Cluster:
    """A running control plane; `start()` brings it up, `stop()` leaves no process or port behind."""

    workdir: Path
    api_port: int
    etcd_port: int
    admin_token: str
    processes: dict[str, Process] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """The API server's URL (HTTPS on 127.0.0.1)."""
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig for kubectl, helm and the `kubernetes` client, as the admin (system:masters)."""
        return self.workdir / "kubeconfig"

    @property
    def ca_file(self) -> Path:
        """The CA that signed the API server's serving certificate."""
        return self.workdir / "pki" / "ca.crt"

    @property
    def log_dir(self) -> Path:
        """Where each component writes `<name>.log`."""
        return self.workdir / "logs"

    @property
    def pids(self) -> dict[str, int]:
        """Process-group id of each running component, for recording and a later `procs.stop_group`."""
        return {name: proc.pid for name, proc in self.processes.items()}

    @classmethod
    def start(cls, workdir: Path, binaries: gobuild.KubeBinaries | None = None) -> Cluster:
        """Bring up the control plane and KWOK with state in `workdir`; build the binaries if needed.

        Every start is a fresh, empty cluster (earlier etcd data in `workdir` is removed). Returns once
        /readyz is ok and the `default` ServiceAccount exists. On any failure everything started so far
        is stopped and StartError carries the failing component's log tail.
        """
        bins = binaries or gobuild.ensure_all()
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(workdir / "etcd", ignore_errors=True)
        cluster = cls(
            workdir=workdir,
            api_port=procs.free_port(),
            etcd_port=procs.free_port(),
            admin_token=secrets.token_hex(16),
        )
        started = time.monotonic()
        try:
            cluster._start_all(bins)
        except BaseException:
            cluster.stop()
            raise
        log.info(
            "Kubernetes testbed up at %s in %.1fs (workdir %s)",
            cluster.api_url,
            time.monotonic() - started,
            workdir,
        )
        return cluster

    def _start_all(self, bins: gobuild.KubeBinaries) -> None:
        pki = self.workdir / "pki"
        write_pki(pki)
        token_file = pki / "tokens.csv"
        token_file.write_text(f"{self.admin_token},{ADMIN_USER},{ADMIN_USER},system:masters\n")
        token_file.chmod(0o600)
        self.kubeconfig.write_text(
            yaml.safe_dump(kubeconfig_for(self.api_url, self.ca_file.read_bytes(), self.admin_token))
        )
        self.kubeconfig.chmod(0o600)

        etcd = self._run("etcd", self._etcd_argv(bins.etcd))
        etcd.wait_until(lambda: self._http_ok(self.etcd_port, "/health", tls=False), START_TIMEOUT, "healthy")
        apiserver = self._run("kube-apiserver", self._apiserver_argv(bins.kube_apiserver, pki))
        apiserver.wait_until(lambda: self._http_ok(self.api_port, "/readyz"), START_TIMEOUT, "ready")

        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0"]
        self._run(
            "kube-controller-manager",
            [
                bins.kube_controller_manager,
                *common,
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                # Its default is under /usr/libexec, which it would create on the host.
                f"--flex-volume-plugin-dir={self.workdir / 'flexvolume'}",
                # Its client's default 20 requests/s made the node lifecycle controller lift the
                # not-ready taint of 100 new nodes over ~20 s (1.6 s with these limits).
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                # KWOK's node heartbeats fall behind on busy cores (100 nodes and 200 models on 2 cores);
                # a node marked NotReady for that leaves its pods NotReady for good (KWOK does not
                # mark them Ready again). Simulated nodes never fail, so allow long silences.
                "--node-monitor-grace-period=5m",
            ],
        )
        self._run("kube-scheduler", [bins.kube_scheduler, *common])
        self._run("kwok", self._kwok_argv(bins.kwok))
        # The controller manager creates the default ServiceAccount; pods cannot be admitted before it.
        path = "/api/v1/namespaces/default/serviceaccounts/default"
        self.processes["kube-controller-manager"].wait_until(
            lambda: self._all_alive() and self._http_ok(self.api_port, path),
            START_TIMEOUT,
            "serving (default ServiceAccount created)",
        )

    def _etcd_argv(self, etcd: Path) -> list[str | Path]:
        peer = f"http://127.0.0.1:{procs.free_port()}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        return [
            etcd,
            "--name=testbed",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=testbed={peer}",
            # A throwaway test store: durability buys nothing and fsync costs seconds per test run.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]

    def _apiserver_argv(self, apiserver: Path, pki: Path) -> list[str | Path]:
        return [
            apiserver,
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.api_port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            # The `kubernetes` Service's Endpoints would be 127.0.0.1, which validation rejects (an
            # error in the log every few seconds); nothing in the testbed dials it from a pod.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true",
        ]

    def _kwok_argv(self, kwok: Path) -> list[str | Path]:
        config = self.workdir / "kwok.yaml"
        # An explicit (empty) config keeps a developer's ~/.kwok/kwok.yaml out of the testbed.
        config.write_text("apiVersion: config.kwok.x-k8s.io/v1alpha1\nkind: KwokConfiguration\noptions: {}\n")
        return [
            kwok,
            f"--config={config}",
            f"--kubeconfig={self.kubeconfig}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}={KWOK_NODE_ANNOTATION_VALUE}",
            f"--cidr={POD_CIDR}",
            "--node-ip=127.0.0.1",
        ]

    def _run(self, name: str, argv: Sequence[str | Path]) -> Process:
        proc = procs.start(name, argv, self.log_dir, cwd=self.workdir)
        self.processes[name] = proc
        return proc

    def _all_alive(self) -> bool:
        for proc in self.processes.values():
            if not proc.alive():
                raise StartError(
                    f"{proc.name} exited with status {proc.popen.returncode}; "
                    f"log {proc.log_path}:\n{procs.log_tail(proc.log_path)}"
                )
        return True

    def _http_ok(self, port: int, path: str, tls: bool = True) -> bool:
        """Return True when GET `path` answers 200 (as the admin, over TLS for the API server)."""
        conn: http.client.HTTPConnection
        if tls:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=ctx)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.admin_token}"})
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def api_client(self) -> Any:
        """Return a new `kubernetes.client.ApiClient` for this cluster, as the admin."""
        from kubernetes import config  # imported here: the testbed's CLI must not pay for it

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def check_alive(self) -> None:
        """Raise StartError, with its log tail, if any component has exited."""
        self._all_alive()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Poll `condition` until it is true; a component that dies meanwhile fails fast with its log.

        Raises TimeoutError naming `what` when time runs out.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            self._all_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every component, clients first and etcd last; safe to call twice."""
        for name in STOP_ORDER:
            proc = self.processes.pop(name, None)
            if proc is not None:
                with contextlib.suppress(OSError):
                    proc.stop(timeout=10.0)
        log.info("Kubernetes testbed at %s stopped", self.api_url)


def stop_recorded(pids: Mapping[str, int]) -> None:
    """Stop components recorded from `Cluster.pids` by an earlier process (`pilotfleet testbed down`)."""
    for name in STOP_ORDER:
        if name in pids:
            procs.stop_group(pids[name], name)
