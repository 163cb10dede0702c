"""Triton Inference Server run by us: the `tritonserver` binary that nvidia-pytriton bundles (CPU here).

`pilotfleet serve` runs its model with it; the testbed runs its echo models with it.

GUIDE.md section 2 lists four traps of running that binary here; each is handled below where it bites:
the stub's Python comes from PATH (`server_env`), numpy >= 2 gives silent empty outputs (`check_numpy`),
the stub must load the right libpython (`server_env`), and /dev/shm regions need a unique prefix so we
can clean our own (`TritonServer`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pilotfleet_serve import procs

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
LOG_NAME = "tritonserver"
# Triton's own --exit-timeout-secs default (30 s, kept on purpose: trap 4) plus time for the stubs.
STOP_TIMEOUT_S = 40.0


@dataclass(frozen=True)
class TritonDist:
    """Where the nvidia-pytriton wheel keeps the server, its Python backend and their libraries."""

    root: Path
    libs: Path

    @property
    def server(self) -> Path:
        """The tritonserver binary."""
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        """The folder of the Python backend's shared library and `triton_python_backend_utils.py`."""
        return self.root / "backends" / "python"

    def stub(self) -> Path:
        """The Python backend stub built for the running interpreter's Python version."""
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def find_dist() -> TritonDist:
    """Locate the bundled Triton; raise StartError saying what to install when it is missing."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise procs.StartError("Triton: nvidia-pytriton is not installed; run pip install -e '.[triton]'")
    package = Path(spec.origin).parent
    dist = TritonDist(root=package / "tritonserver", libs=package.parent / "nvidia_pytriton.libs")
    for needed in (dist.server, dist.python_backend / "libtriton_python.so", dist.stub(), dist.libs):
        if not needed.exists():
            raise procs.StartError(f"Triton: {needed} is missing from the nvidia-pytriton install")
    return dist


def check_numpy() -> None:
    """Refuse numpy >= 2, which the bundled Python backend turns into silent 0-byte outputs (trap 2)."""
    version = importlib.metadata.version("numpy")
    if int(version.split(".")[0]) >= 2:
        raise procs.StartError(
            f"Triton: numpy {version} is installed in {sys.prefix}; the bundled Python backend needs numpy<2"
        )


def server_env(dist: TritonDist) -> dict[str, str]:
    """Return the environment additions under which the backend stub runs this virtual environment."""
    # Trap 1: the stub ignores PYTHONPATH and finds its Python (and so its site-packages) on PATH.
    path = os.pathsep.join([str(Path(sys.prefix) / "bin"), os.environ.get("PATH", "")])
    # Trap 3: without the running Python's lib dir first, the 3.11 stub loads the system's libpython
    # and fails inside multiprocessing; the server itself needs the wheel's bundled libraries.
    libs = [str(dist.libs), str(sysconfig.get_config_var("LIBDIR") or "")]
    if os.environ.get("LD_LIBRARY_PATH"):
        libs.append(os.environ["LD_LIBRARY_PATH"])
    return {"PATH": path, "LD_LIBRARY_PATH": os.pathsep.join(p for p in libs if p)}


def prepare_backends(dist: TritonDist, dest: Path) -> Path:
    """Lay out a backend directory whose Python backend uses the stub built for this Python version.

    The wheel keeps one stub per Python version apart from the backend; the backend expects its stub
    next to its shared library. Symlinks make that layout without copying the wheel.
    """
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    links = {
        "libtriton_python.so": dist.python_backend / "libtriton_python.so",
        "triton_python_backend_utils.py": dist.python_backend / "triton_python_backend_utils.py",
        "triton_python_backend_stub": dist.stub(),
    }
    for name, target in links.items():
        link = python / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return dest


@dataclass(frozen=True)
class TritonPorts:
    """The three ports a server listens on (127.0.0.1)."""

    http: int
    grpc: int
    metrics: int

    @classmethod
    def pick(cls) -> TritonPorts:
        """Pick three distinct free ports."""
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(procs.free_port())
        http, grpc, metrics = sorted(ports)
        return cls(http=http, grpc=grpc, metrics=metrics)


class TritonServer:
    """One tritonserver process on a model repository; (re)startable on the same ports."""

    def __init__(self, model_repo: Path, workdir: Path, ports: TritonPorts, log_verbose: int = 0) -> None:
        """Prepare (not start) a server; `start()` is the usual way to get a running one."""
        self.model_repo = model_repo
        self.workdir = workdir
        self.ports = ports
        self.log_verbose = log_verbose
        # Trap 4: a prefix of our own lets us remove exactly our /dev/shm regions after a stop or a kill.
        self.shm_prefix = f"pilotfleet-triton-{os.getpid()}-{uuid.uuid4().hex[:8]}-"
        self.dist = find_dist()
        self.backends = prepare_backends(self.dist, workdir / "backends")
        self.start_seconds = 0.0
        self._proc: procs.Process | None = None

    @classmethod
    def start(
        cls,
        model_repo: Path,
        workdir: Path,
        *,
        ports: TritonPorts | None = None,
        timeout: float = 60.0,
        log_verbose: int = 0,
    ) -> TritonServer:
        """Start a server on `model_repo` (free ports unless given); return once it and its models are ready.

        Raises StartError with the end of the server's log when it exits or is not ready in `timeout`.
        """
        check_numpy()
        workdir.mkdir(parents=True, exist_ok=True)
        server = cls(model_repo, workdir, ports or TritonPorts.pick(), log_verbose)
        server.launch(timeout)
        return server

    def argv(self) -> list[str]:
        """The server's command line."""
        return [
            str(self.dist.server),
            f"--model-repository={self.model_repo}",
            f"--backend-directory={self.backends}",
            # Our configs are complete: Triton need not ask the backend to fill them in (faster loads).
            "--disable-auto-complete-config",
            # Explicit mode with everything loaded at start: tests may unload/load models later.
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--http-address=127.0.0.1",
            f"--http-port={self.ports.http}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.ports.grpc}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.ports.metrics}",
            "--allow-cpu-metrics=true",
            "--allow-gpu-metrics=false",
            # No CUDA here: do not ask for pinned host memory.
            "--pinned-memory-pool-byte-size=0",
            f"--log-verbose={self.log_verbose}",
        ]

    def launch(self, timeout: float = 60.0) -> None:
        """Start the process on this server's ports and wait until it is ready."""
        if self.alive():
            raise RuntimeError(f"Triton already runs as pid {self.pid}")
        began = time.monotonic()
        self._proc = procs.start(LOG_NAME, self.argv(), self.workdir, env=server_env(self.dist))
        try:
            self._proc.wait_until(self.ready, timeout, "ready")
        except procs.StartError as exc:
            self.kill()
            # The log's tail is mostly Triton's option table: lead with the lines that say what failed.
            errors = self.log_errors() or "(no error lines)"
            raise procs.StartError(f"Triton failed to start:\n{errors}\n{exc}") from exc
        self.start_seconds = time.monotonic() - began
        log.info("Triton ready in %.2fs: grpc %s, http %s", self.start_seconds, self.url, self.http_url)

    def restart(self, timeout: float = 60.0) -> None:
        """Stop the server if it runs, then start it again on the same ports and repository."""
        self.stop()
        self.launch(timeout)

    def ready(self) -> bool:
        """Return True when the server says ready (all models loaded) and every port accepts connections."""
        # No proxy from the environment may stand between us and a server on 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.http_url}/v2/health/ready", timeout=1.0) as response:
                if response.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            return False
        return procs.port_open(self.ports.grpc) and procs.port_open(self.ports.metrics)

    @property
    def url(self) -> str:
        """The gRPC address, as `tritonclient.grpc` takes it."""
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        """The HTTP endpoint's base URL."""
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics URL."""
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    @property
    def grpc_port(self) -> int:
        """The gRPC port."""
        return self.ports.grpc

    @property
    def http_port(self) -> int:
        """The HTTP port."""
        return self.ports.http

    @property
    def metrics_port(self) -> int:
        """The metrics port."""
        return self.ports.metrics

    @property
    def pid(self) -> int | None:
        """The server's pid (also its process group), None before the first start."""
        return None if self._proc is None else self._proc.pid

    @property
    def log_path(self) -> Path:
        """The server's log (kept across restarts)."""
        return self.workdir / f"{LOG_NAME}.log"

    def log_errors(self) -> str:
        """Return the server log's error lines and unavailable models, the message of a failed start."""
        if not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        # Without a GPU Triton always logs this error; it is harmless.
        noise = "CudaDriverHelper has not been initialized"
        errors = [ln for ln in lines if ln.startswith("E") and noise not in ln]
        errors += [ln.strip("| ") for ln in lines if ln.startswith("|") and "UNAVAILABLE" in ln]
        return "\n".join(errors)

    def alive(self) -> bool:
        """Return True while the server process runs."""
        return self._proc is not None and self._proc.alive()

    def stop(self) -> None:
        """Shut down gracefully (SIGTERM; in-flight requests get Triton's exit timeout), then clean up."""
        if self._proc is not None:
            self._proc.stop(timeout=STOP_TIMEOUT_S)
            self._await_group_exit()
        self.remove_shm_regions()

    def kill(self) -> None:
        """SIGKILL the server and its backend stubs at once (a "backend died" test), then clean up."""
        if self._proc is not None:
            self._proc.kill()
            self._await_group_exit()
        self.remove_shm_regions()

    def group_pids(self) -> list[int]:
        """Return the live pids in the server's process group (the server and its backend stubs)."""
        if self.pid is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # exited while we looked
                continue
            # Fields after "pid (comm)": state, ppid, pgrp; comm itself may hold spaces or parentheses.
            state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
            if int(pgrp) == self.pid and state != "Z":
                found.append(int(entry.name))
        return found

    def _await_group_exit(self, timeout: float = 10.0) -> None:
        # The stubs are the server's children, not ours: SIGKILL reaches them, but they die a moment
        # later. Wait, so a restart or the shm cleanup never races a dying stub.
        deadline = time.monotonic() + timeout
        while self.group_pids():
            if time.monotonic() > deadline:
                log.warning("Triton's process group %s still has %s", self.pid, self.group_pids())
                return
            time.sleep(0.02)

    def shm_regions(self) -> list[Path]:
        """Return this server's /dev/shm regions (the Python backend's, named with our prefix)."""
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def remove_shm_regions(self) -> None:
        """Remove regions a stopped or killed server left behind."""
        for region in self.shm_regions():
            region.unlink(missing_ok=True)
            log.debug("removed %s", region)

    def __enter__(self) -> TritonServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
