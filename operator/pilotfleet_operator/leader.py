"""Leader election over a coordination.k8s.io Lease: with several operator replicas, one reconciles."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from pilotfleet_operator.apply import load_client_config
from pilotfleet_operator.settings import Settings

log = logging.getLogger(__name__)


class _Healthy(BaseHTTPRequestHandler):
    """Answers the liveness path with 200 while this replica waits as a follower."""

    path_expected = "/healthz"

    def do_GET(self) -> None:
        """200 on the liveness path, 404 elsewhere."""
        self.send_response(200 if self.path == self.path_expected else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds are not worth a log line."""


def _follower_health(liveness: str | None) -> ThreadingHTTPServer | None:
    """Serve the liveness URL while following (kopf serves it once leading), so probes pass."""
    if not liveness:
        return None
    url = urlsplit(liveness)
    handler = type("Healthy", (_Healthy,), {"path_expected": url.path or "/"})
    server = ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), handler)
    threading.Thread(target=server.serve_forever, name="follower-health", daemon=True).start()
    return server


def run_as_leader(
    settings: Settings, work: Callable[[threading.Event], None], liveness: str | None = None
) -> int:
    """Wait until this replica holds the Lease, then run `work(lost)`.

    `lost` is set when the Lease cannot be renewed; `work` must then stop. Returns 0 when `work` ended on
    its own and 1 when leadership was lost, so that the pod restarts as a follower. While following, the
    `liveness` URL (if any) answers 200.
    """
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    # The client's Lease lock uses the process-wide default configuration.
    load_client_config().close()
    identity = settings.pod_name or socket.gethostname()
    leading, lost = threading.Event(), threading.Event()
    config = electionconfig.Config(
        LeaseLock(settings.lease_name, settings.namespace, identity),
        lease_duration=settings.lease_duration_s,
        renew_deadline=settings.renew_deadline_s,
        retry_period=settings.retry_period_s,
        onstarted_leading=leading.set,
        onstopped_leading=lost.set,
    )
    # A daemon thread: a follower or a stopping leader exits without waiting for the election loop.
    election = threading.Thread(
        target=leaderelection.LeaderElection(config).run, name="leader-election", daemon=True
    )
    election.start()
    log.info("%s waiting for Lease %s/%s", identity, settings.namespace, settings.lease_name)
    health = _follower_health(liveness)
    try:
        while not leading.wait(timeout=1.0):
            if not election.is_alive():
                log.error("leader election ended before %s became leader", identity)
                return 1
    finally:
        if health is not None:
            health.shutdown()
            health.server_close()
    log.info("%s leads (Lease %s/%s)", identity, settings.namespace, settings.lease_name)
    work(lost)
    if lost.is_set():
        log.error(
            "%s lost Lease %s/%s; exiting so that another replica leads",
            identity,
            settings.namespace,
            settings.lease_name,
        )
        return 1
    return 0
