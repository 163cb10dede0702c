"""Download progress (bytes done/total, rate, ETA), handed every few seconds to pluggable reporters."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

_RATE_WINDOW_S = 10.0


@dataclass(frozen=True)
class Snapshot:
    """Progress at one moment."""

    label: str
    done: int
    total: int | None
    bytes_per_second: float
    eta_seconds: float | None
    finished: bool = False


class Reporter(Protocol):
    """Something that shows progress: a log line, a Kubernetes status patch."""

    def report(self, snap: Snapshot) -> None:
        """Show one snapshot; must not raise for transient trouble (log it instead)."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def progress_text(snap: Snapshot) -> str:
    """A summary for `kubectl get ccm`: the percentage, or the bytes so far when the total is unknown."""
    if snap.total:
        return f"{min(100 * snap.done // snap.total, 100)}%"
    return _human(snap.done)


class LogReporter:
    """Progress as log lines (always on: `kubectl logs` of the fetch job shows them)."""

    def report(self, snap: Snapshot) -> None:
        """Log one line: done/total (percent), rate, ETA."""
        total = f" / {_human(snap.total)} ({100 * snap.done / snap.total:.0f}%)" if snap.total else ""
        eta = f", ETA {snap.eta_seconds:.0f}s" if snap.eta_seconds is not None and not snap.finished else ""
        verb = "fetched" if snap.finished else "fetching"
        log.info(
            "%s %s: %s%s at %s/s%s",
            verb,
            snap.label,
            _human(snap.done),
            total,
            _human(snap.bytes_per_second),
            eta,
        )


class KubeStatusReporter:
    """Patches `status.fetch` of one CodeCompletionModel (the job's RBAC allows nothing else)."""

    def __init__(self, name: str, namespace: str, api_client: Any) -> None:
        self._path = (
            f"/apis/pilotfleet.dev/v1alpha1/namespaces/{namespace}/codecompletionmodels/{name}/status"
        )
        self._api = api_client

    @classmethod
    def from_environment(cls, name: str, namespace: str) -> KubeStatusReporter:
        """Use the in-cluster service account, or KUBECONFIG when run outside a pod."""
        # The kubernetes client is slow to import; only jobs that report to a cluster pay for it.
        from kubernetes import client, config

        cfg = client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(client_configuration=cfg)
        return cls(name, namespace, client.ApiClient(cfg))

    def report(self, snap: Snapshot) -> None:
        """Send a JSON merge patch with the camelCase fields of the CRD's FetchProgress."""
        body = {
            "status": {
                "fetch": {
                    "bytesDone": snap.done,
                    "bytesTotal": snap.total,
                    "bytesPerSecond": round(snap.bytes_per_second, 1),
                    "etaSeconds": None if snap.eta_seconds is None else round(snap.eta_seconds, 1),
                    "progress": progress_text(snap),
                }
            }
        }
        try:
            method, url, headers, data, _ = self._api.param_serialize(
                method="PATCH",
                resource_path=self._path,
                header_params={"Content-Type": "application/merge-patch+json", "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self._api.call_api(method, url, header_params=headers, body=data, _request_timeout=5)
            answer = response.read()
            if not 200 <= response.status < 300:
                log.warning("could not patch %s: HTTP %d %s", self._path, response.status, answer[:300])
        except Exception as exc:  # status is a courtesy: any failure is logged, the download goes on
            log.warning("could not patch %s: %s", self._path, exc)

    def close(self) -> None:
        """Close the API client's connection pool."""
        self._api.close()


class Progress:
    """Thread-safe byte counter; a ticker thread hands snapshots to the reporters every `interval` s."""

    def __init__(
        self,
        reporters: Sequence[Reporter],
        interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._reporters = list(reporters)
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._label = ""
        self._done = 0
        self._transferred = 0
        self._total: int | None = None
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self._thread = threading.Thread(target=self._tick, name="fetch-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def begin(self, label: str, total: int | None) -> None:
        """Start counting towards `total` bytes (None: learnt from the server file by file)."""
        with self._lock:
            self._label, self._total, self._done, self._transferred = label, total, 0, 0
            self._samples.clear()
            self._samples.append((self._clock(), 0))

    def learn_total(self, n: int) -> None:
        """Add the size of a file whose size the source did not list."""
        with self._lock:
            self._total = n if self._total is None else self._total + n

    def skip(self, n: int) -> None:
        """Count `n` bytes already on disk from an earlier run (done, but not part of the rate)."""
        with self._lock:
            self._done += n

    def advance(self, n: int) -> None:
        """Count `n` more bytes received (called by the download threads)."""
        with self._lock:
            self._done += n
            self._transferred += n

    def rewind(self, n: int) -> None:
        """Forget `n` done bytes (a server without Range support made us start a file over)."""
        with self._lock:
            self._done -= n

    @property
    def done(self) -> int:
        """Bytes done so far."""
        with self._lock:
            return self._done

    def snapshot(self, finished: bool = False) -> Snapshot:
        """Current progress; the rate is measured over the last few seconds."""
        now = self._clock()
        with self._lock:
            self._samples.append((now, self._transferred))
            while len(self._samples) > 2 and now - self._samples[1][0] > _RATE_WINDOW_S:
                self._samples.popleft()
            t0, d0 = self._samples[0]
            rate = (self._transferred - d0) / (now - t0) if now > t0 else 0.0
            left = None if self._total is None else max(self._total - self._done, 0)
            eta = left / rate if left is not None and rate > 0 else None
            return Snapshot(self._label, self._done, self._total, rate, 0.0 if finished else eta, finished)

    def report(self, finished: bool = False) -> None:
        """Hand the current snapshot to every reporter now."""
        snap = self.snapshot(finished)
        for reporter in self._reporters:
            reporter.report(snap)

    def _tick(self) -> None:
        while not self._stop.wait(self._interval):
            if self._label:
                self.report()
