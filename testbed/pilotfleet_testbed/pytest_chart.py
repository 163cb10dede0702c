"""pytest fixtures for the Helm chart on the testbed (registered in tests/conftest.py).

`chart_release` installs the chart once per session into the session cluster; `operator_kubeconfig` is
a kubeconfig that acts as the chart's operator ServiceAccount, so operator tests prove that the chart's
RBAC is enough (instead of running as cluster admin).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pilotfleet_testbed import chart
from pilotfleet_testbed.kube import Cluster

# The namespace a platform engineer would pick; the session cluster is private to one test run.
CHART_NAMESPACE = "pilotfleet-system"
CHART_RELEASE = "pilotfleet"


@pytest.fixture(scope="session")
def chart_helm(tmp_path_factory: pytest.TempPathFactory) -> chart.Helm:
    """The pinned helm, with its config/cache/data in a session temporary folder."""
    return chart.Helm.pinned(tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="session")
def chart_release(kube_cluster: Cluster, chart_helm: chart.Helm) -> Iterator[chart.ChartRelease]:
    """The chart installed with its default values as release `pilotfleet` in `pilotfleet-system`
    (created for it); uninstalled, and the namespace deleted, at the end of the session."""
    from kubernetes import client

    api = kube_cluster.api_client()
    core: Any = client.CoreV1Api(api)
    try:
        core.create_namespace(body={"metadata": {"name": CHART_NAMESPACE}})
        release = chart.install(chart_helm, kube_cluster.kubeconfig, CHART_RELEASE, CHART_NAMESPACE)
        try:
            yield release
        finally:
            chart.uninstall(chart_helm, kube_cluster.kubeconfig, release)
    finally:
        core.delete_namespace(CHART_NAMESPACE)
        api.close()


@pytest.fixture(scope="session")
def operator_kubeconfig(
    kube_cluster: Cluster, chart_release: chart.ChartRelease, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A kubeconfig authenticated as the chart's operator ServiceAccount (a TokenRequest token).

    The operator should run in namespace `chart_release.namespace` (where its route-table ConfigMap
    and Lease live) when it uses this kubeconfig.
    """
    account = chart.service_account_of(kube_cluster, chart_release, "operator")
    dest = tmp_path_factory.mktemp("operator-sa") / "kubeconfig"
    return chart.serviceaccount_kubeconfig(kube_cluster, chart_release.namespace, account, dest)
