"""`pilotfleet operator` as a local process against the testbed, as whoever a kubeconfig names.

No image runs on KWOK's simulated nodes, so the operator pod that the Helm chart deploys there never
executes anything. Tests, the demo and the benchmark run the operator here instead, with the kubeconfig
of the chart's ServiceAccount (`chart.serviceaccount_kubeconfig`): the same code and the same RBAC as
that pod would have.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from pilotfleet_serve import procs

log = logging.getLogger(__name__)

# kopf (APIForbiddenError) and the kubernetes client ("(403) Reason: Forbidden") both name the reason;
# a bare "403" would also match log timestamps such as "01:33:58,403".
_REFUSED = re.compile(r"forbidden", re.IGNORECASE)


def operator_env(
    kubeconfig: Path, namespace: str, watch_namespaces: Sequence[str] = (), retry_delay: float = 0.5
) -> dict[str, str]:
    """Return the environment of an operator that logs in with `kubeconfig` and keeps its route table in
    `namespace`, watching `watch_namespaces` (every namespace when empty, the chart's default)."""
    env = {
        "KUBECONFIG": str(kubeconfig),
        "PILOTFLEET_OPERATOR_NAMESPACE": namespace,
        # A short retry keeps a converging model from idling between checks on the fast simulated nodes.
        "PILOTFLEET_OPERATOR_RETRY_DELAY": str(retry_delay),
    }
    if watch_namespaces:
        env["PILOTFLEET_OPERATOR_WATCH_NAMESPACES"] = json.dumps(list(watch_namespaces))
    return env


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def start_operator(
    kubeconfig: Path,
    namespace: str,
    log_dir: Path,
    watch_namespaces: Sequence[str] = (),
    retry_delay: float = 0.5,
    name: str = "operator",
    timeout: float = 60.0,
) -> procs.Process:
    """Start `pilotfleet operator` (output in `<log_dir>/<name>.log`) and return once kopf answers its
    liveness probe; raise StartError with the log tail if it exits or does not come up in `timeout`."""
    url = f"http://127.0.0.1:{procs.free_port()}/healthz"
    argv = [sys.executable, "-m", "pilotfleet_cli.main", "operator", "--liveness", url]
    env = operator_env(kubeconfig, namespace, watch_namespaces, retry_delay)
    proc = procs.start(name, argv, log_dir, env)
    try:
        proc.wait_until(lambda: _healthy(url), timeout, "answering its liveness probe")
    except BaseException:
        proc.stop()
        raise
    log.info("`pilotfleet operator` (%s) running as pid %d, log %s", name, proc.pid, proc.log_path)
    return proc


def refused_requests(log_path: Path) -> list[str]:
    """Return the lines of an operator log that report a request the API server refused (HTTP 403)."""
    if not log_path.exists():
        return []
    return [line for line in log_path.read_text(errors="replace").splitlines() if _REFUSED.search(line)]
