"""pytest fixtures for the Kubernetes part of the testbed (registered in tests/conftest.py).

`kube_cluster` is one real control plane plus the default simulated node pool for the whole session;
`k8s_namespace` is a fresh namespace per test, deleted afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pilotfleet_testbed import gobuild, nodes
from pilotfleet_testbed.kube import Cluster


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A started Cluster with the default node pool; binaries are built on first use (minutes, once)."""
    binaries = gobuild.ensure_all()
    cluster = Cluster.start(tmp_path_factory.mktemp("kube"), binaries)
    try:
        api = cluster.api_client()
        try:
            nodes.create_nodes(api, nodes.node_pool())
        finally:
            api.close()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def k8s_api(kube_cluster: Cluster) -> Iterator[Any]:
    """A `kubernetes.client.ApiClient` for the session cluster, as the admin; closed after the test."""
    api = kube_cluster.api_client()
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def k8s_namespace(kube_cluster: Cluster, k8s_api: Any) -> Iterator[str]:
    """The name of a fresh namespace in the session cluster; deleted (without waiting) after the test."""
    from kubernetes import client

    # Any: a plain manifest goes where the client's type hints ask for a V1Namespace.
    core: Any = client.CoreV1Api(k8s_api)
    created = core.create_namespace(body={"metadata": {"generateName": "test-"}})
    name: str = created.metadata.name
    # The controller manager creates the namespace's default ServiceAccount; pods need it to be admitted.
    try:
        kube_cluster.wait_for(
            lambda: bool(
                core.list_namespaced_service_account(name, field_selector="metadata.name=default").items
            ),
            what=f"the default ServiceAccount in namespace {name}",
        )
        yield name
    finally:
        core.delete_namespace(name)
