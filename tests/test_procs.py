"""Stopping recorded process groups: `pilotfleet testbed down` must never stop a stranger."""

from __future__ import annotations

from pathlib import Path

from pilotfleet_serve import procs


def test_stop_group_leaves_a_reused_pid_alone_and_stops_its_own(tmp_path: Path) -> None:
    sleeper = procs.start("sleeper", ["sleep", "60"], tmp_path)
    try:
        # A stale record: the pid now belongs to something else than the component it names.
        procs.stop_group(sleeper.pid, "kube-apiserver")
        assert sleeper.alive()
        assert procs.group_running(sleeper.pid)

        procs.stop_group(sleeper.pid, "sleep")
        sleeper.popen.wait(timeout=10)
        assert not sleeper.alive()
        assert not procs.group_running(sleeper.pid)
    finally:
        sleeper.stop()
