"""pytest fixture for the local Job runner (registered in tests/conftest.py).

`job_runner` is one `JobRunner` for the whole session, on the session's `kube_cluster`: pods that select
its node and tolerate its taint (`job_runner.node_selector`, `job_runner.tolerations`) really run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pilotfleet_testbed.job_runner import JobRunner
from pilotfleet_testbed.kube import Cluster


@pytest.fixture(scope="session")
def job_runner(kube_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobRunner]:
    """A started JobRunner; its processes, node and Lease are gone after the session."""
    runner = JobRunner(kube_cluster, tmp_path_factory.mktemp("job-runner"))
    try:
        runner.start()
        yield runner
    finally:
        runner.stop()
