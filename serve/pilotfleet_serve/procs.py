"""Start, watch and stop child processes: one place for logs, readiness and cleanup.

`pilotfleet serve` runs its Triton with these; the testbed runs all of its parts with them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class StartError(RuntimeError):
    """A part (Triton, a testbed component) could not start; the message says which and shows its log."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Return True when something accepts TCP connections on host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def log_tail(path: Path, lines: int = 30) -> str:
    """Return the last lines of a log file, or a note that it is empty."""
    if not path.exists():
        return "(no log)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


@dataclass
class Process:
    """A child process we started, with its own log file and process group."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        return self.popen.pid

    def alive(self) -> bool:
        """Return True while the process runs."""
        return self.popen.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `ready` until it returns True; raise StartError if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise StartError(
                    f"{self.name} exited with status {self.popen.returncode} before {what}; "
                    f"log {self.log_path}:\n{log_tail(self.log_path)}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise StartError(
            f"{self.name} not {what} after {timeout:.0f}s; log {self.log_path}:\n{log_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process group: SIGTERM, then SIGKILL after `timeout` seconds."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %.0fs; killing it", self.name, timeout)
        # Children of the leader (e.g. Triton's backend stubs) may outlive it: kill what is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()

    def kill(self) -> None:
        """SIGKILL the whole process group at once, with no chance to shut down (a crash), and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()


def start(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    pipe_stdio: bool = False,
) -> Process:
    """Start `argv` in its own process group, its output appended to `<log_dir>/<name>.log`.

    With `pipe_stdio`, stdin and stdout are pipes (`popen.stdin`/`popen.stdout`) for a protocol spoken over
    stdio, such as LSP, and only stderr goes to the log.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with log_path.open("ab") as out:
        try:
            popen = subprocess.Popen(
                [str(a) for a in argv],
                stdout=subprocess.PIPE if pipe_stdio else out,
                stderr=out if pipe_stdio else subprocess.STDOUT,
                stdin=subprocess.PIPE if pipe_stdio else subprocess.DEVNULL,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise StartError(f"{name}: cannot run {argv[0]}: {exc}") from exc
    log.debug("started %s pid %d: %s", name, popen.pid, " ".join(str(a) for a in argv))
    return Process(name=name, popen=popen, log_path=log_path)


def stop_group(pid: int, command: str, timeout: float = 10.0) -> None:
    """Terminate the group led by `pid` (started by an earlier command, not our child), then SIGKILL.

    The pid comes from a record that may be stale (the testbed died, the machine rebooted, the pid was
    reused), so the group is signalled only while one of its processes still runs `command`.
    """
    if not any(command in argv for argv in _group_commands(pid)):
        log.info("not stopping process group %d: none of it runs %s any more", pid, command)
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_running(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _group_members(pgid: int) -> list[Path]:
    """The /proc folders of the live (not zombie) processes of group `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            members.append(stat.parent)
    return members


def _group_commands(pgid: int) -> list[str]:
    """The command lines of the live processes of group `pgid`."""
    commands = []
    for member in _group_members(pgid):
        with contextlib.suppress(OSError):
            commands.append((member / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return commands


def group_running(pgid: int) -> bool:
    """Return True while a process of group `pgid` still runs (zombies do not count).

    `killpg(pgid, 0)` is not enough: an orphan's zombie lingers until init reaps it (about 2 s here).
    """
    return bool(_group_members(pgid))


def run_checked(argv: Sequence[str | os.PathLike[str]], timeout: float = 60.0) -> str:
    """Run a short command to its end and return its stdout; raise StartError with its output if it fails."""
    command = " ".join(str(a) for a in argv)
    try:
        done = subprocess.run(
            [str(a) for a in argv], check=True, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.CalledProcessError as exc:
        output = (exc.stderr or exc.stdout or "")[-3000:]
        raise StartError(f"{command} exited with status {exc.returncode}:\n{output}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StartError(f"{command} failed: {exc}") from exc
    return done.stdout
