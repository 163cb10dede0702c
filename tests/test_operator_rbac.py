"""The chart's RBAC is enough: the live operator scenarios, run by `pilotfleet operator` logged in as the
Helm chart's operator ServiceAccount instead of the cluster admin.

The chart is installed into the testbed with its default values (`chart_release`), so the operator watches
every namespace as the chart deploys it; its token comes from the TokenRequest API, as a pod's would. The
operator runs as a local process because no image runs on KWOK's simulated nodes. The scenarios are the
ones of test_operator_live.py, imported and run unchanged with this module's `operator` fixture.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_operator_live as live
from pilotfleet_operator.apply import Kube
from pilotfleet_serve import procs
from pilotfleet_testbed import chart, operator_proc

# The scenarios ask for these fixtures by name; importing them makes them visible in this module.
from test_operator_live import ccm_crd, kube, volumes  # noqa: F401

pytestmark = pytest.mark.testbed

# create -> Ready on matching GPUs, NoSuitableGPU condition + Event, spec change -> rolling update,
# restart mid-change, delete keeping the PVC: every write and watch the operator makes.
SCENARIOS: tuple[Callable[..., None], ...] = (
    live.test_examples_become_ready_on_matching_gpus,
    live.test_no_suitable_gpu_is_refused_with_condition_and_event,
    live.test_spec_change_rolls_restart_converges_delete_keeps_pvc,
)


class ServiceAccountOperator(live.OperatorUnderTest):
    """`pilotfleet operator` as a local process with the chart ServiceAccount's kubeconfig."""

    def __init__(self, kubeconfig: Path, namespace: str, log_dir: Path) -> None:
        super().__init__(namespace)
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_dir = log_dir
        self.process: procs.Process | None = None

    @property
    def log_path(self) -> Path:
        """The operator's log, appended to across restarts."""
        return self.log_dir / "operator.log"

    def start(self) -> None:
        """Start the process; returns once kopf answers its liveness probe."""
        self.process = operator_proc.start_operator(self.kubeconfig, self.namespace, self.log_dir)

    @property
    def running(self) -> bool:
        """True between `start()` and `stop()`."""
        return self.process is not None

    def stop(self) -> None:
        """Stop the process, checking that it ended on its own after SIGTERM (exit status 0)."""
        process, self.process = self.process, None
        if process is not None:
            process.stop(timeout=20.0)
            assert process.popen.returncode == 0, procs.log_tail(self.log_path, 60)

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
        """Like `live.wait_for`, but fail at once, with the log, if the operator has exited."""

        def check() -> Any:
            if self.process is None or not self.process.alive():
                raise AssertionError(
                    f"the operator exited while waiting for {what}:\n{procs.log_tail(self.log_path, 60)}"
                )
            return condition()

        return live.wait_for(check, what, timeout)


@pytest.fixture
def operator(
    chart_release: chart.ChartRelease,
    operator_kubeconfig: Path,
    k8s_namespace: str,
    kube: Kube,  # noqa: F811
    ccm_crd: None,  # noqa: F811
    tmp_path: Path,
) -> Iterator[ServiceAccountOperator]:
    """The operator as the chart's ServiceAccount, publishing routes in the test namespace (where the
    scenarios read them); its models are deleted, by it, before it stops."""
    handle = ServiceAccountOperator(operator_kubeconfig, k8s_namespace, tmp_path / "operator")
    with live.operating(handle, kube, k8s_namespace):
        yield handle


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_scenario_as_chart_service_account(
    scenario: Callable[..., None], operator: ServiceAccountOperator, request: pytest.FixtureRequest
) -> None:
    scenario(**{name: request.getfixturevalue(name) for name in inspect.signature(scenario).parameters})
    # The scenario passing is not enough: kopf logs and retries a refused request instead of failing.
    assert operator_proc.refused_requests(operator.log_path) == []
