"""The only code that talks to the Kubernetes API: reads, server-side apply, status patches, deletes.

A thin layer over `kubernetes.client.ApiClient` that works on plain dicts (the builders' output) with
paths derived from apiVersion and the plural, so every kind is handled the same way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pilotfleet_operator import naming

log = logging.getLogger(__name__)

APPLY_CONTENT_TYPE = "application/apply-patch+yaml"
MERGE_CONTENT_TYPE = "application/merge-patch+json"


class ApiError(Exception):
    """A Kubernetes API request failed; `status` is the HTTP status, the message is the API's own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Resource:
    """A resource type: apiVersion and plural name."""

    api_version: str
    plural: str
    namespaced: bool = True

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        """The API path of the collection, or of one object (and one of its subresources)."""
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if subresource:
                base += f"/{subresource}"
        return base


PVCS = Resource("v1", "persistentvolumeclaims")
CONFIGMAPS = Resource("v1", "configmaps")
SERVICES = Resource("v1", "services")
PODS = Resource("v1", "pods")
NODES = Resource("v1", "nodes", namespaced=False)
JOBS = Resource("batch/v1", "jobs")
DEPLOYMENTS = Resource("apps/v1", "deployments")
SERVICE_ACCOUNTS = Resource("v1", "serviceaccounts")
ROLES = Resource("rbac.authorization.k8s.io/v1", "roles")
ROLE_BINDINGS = Resource("rbac.authorization.k8s.io/v1", "rolebindings")
MODELS = Resource(naming.API_VERSION, naming.PLURAL)
CRDS = Resource("apiextensions.k8s.io/v1", "customresourcedefinitions", namespaced=False)
BY_KIND = {
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): CRDS,
    ("v1", "PersistentVolumeClaim"): PVCS,
    ("v1", "ConfigMap"): CONFIGMAPS,
    ("v1", "Service"): SERVICES,
    ("batch/v1", "Job"): JOBS,
    ("apps/v1", "Deployment"): DEPLOYMENTS,
    ("v1", "ServiceAccount"): SERVICE_ACCOUNTS,
    ("rbac.authorization.k8s.io/v1", "Role"): ROLES,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ROLE_BINDINGS,
}
# Children that go away when no longer wanted; the weights PVC is only ever removed with its model.
PRUNABLE = (JOBS, DEPLOYMENTS, SERVICES, CONFIGMAPS)


def resource_of(obj: Mapping[str, Any]) -> Resource:
    """The Resource of a manifest."""
    return BY_KIND[(obj["apiVersion"], obj["kind"])]


def load_client_config() -> Any:
    """Configure the `kubernetes` client from the pod's ServiceAccount, else from KUBECONFIG (or
    ~/.kube/config), as its process-wide default; return a new ApiClient using it."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # The client reads KUBECONFIG once, on import; read it now, as kubectl does.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


class Kube:
    """Dict-in, dict-out access to the API server through a `kubernetes.client.ApiClient`."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """Send one request; return the decoded JSON answer or raise ApiError."""
        method, url, headers, body, _ = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(
            method, url, header_params=headers, body=body, _request_timeout=30
        )
        data = response.read()
        if not 200 <= response.status < 300:
            try:
                message = json.loads(data).get("message", "")
            except (ValueError, AttributeError):
                message = data.decode(errors="replace") if data else response.reason
            raise ApiError(response.status, message)
        return json.loads(data) if data else {}

    def get(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        """Read one object; None when it does not exist."""
        try:
            return self.request("GET", resource.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self, resource: Resource, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        """List objects (all namespaces when `namespace` is None)."""
        query = {"labelSelector": label_selector} if label_selector else None
        items: list[dict[str, Any]] = self.request("GET", resource.path(namespace), query=query).get(
            "items", []
        )
        return items

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply `obj` as field manager `pilotfleet`, taking over conflicting fields."""
        meta = obj["metadata"]
        return self.request(
            "PATCH",
            resource_of(obj).path(meta.get("namespace"), meta["name"]),
            query={"fieldManager": naming.FIELD_MANAGER, "force": "true"},
            body=dict(obj),
            content_type=APPLY_CONTENT_TYPE,
        )

    def merge_patch(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        patch: Mapping[str, Any],
        subresource: str = "",
    ) -> dict[str, Any]:
        """JSON merge patch of an object or one of its subresources (e.g. `status`)."""
        return self.request(
            "PATCH",
            resource.path(namespace, name, subresource or None),
            query={"fieldManager": naming.FIELD_MANAGER},
            body=dict(patch),
            content_type=MERGE_CONTENT_TYPE,
        )

    def delete(self, resource: Resource, namespace: str | None, name: str) -> bool:
        """Delete an object and, in the background, what it owns; False when it was already gone."""
        try:
            self.request("DELETE", resource.path(namespace, name), body={"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True


def apply_all(kube: Kube, objects: Iterable[Mapping[str, Any]]) -> None:
    """Apply each object in order."""
    for obj in objects:
        kube.apply(obj)
        log.debug("applied %s %s/%s", obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])


def prune(kube: Kube, namespace: str, model: str, wanted: Iterable[Mapping[str, Any]]) -> list[str]:
    """Delete the model's labelled children that are not in `wanted`; return "Kind/name" of each deleted."""
    keep = {(resource_of(obj), obj["metadata"]["name"]) for obj in wanted}
    deleted = []
    for resource in PRUNABLE:
        for obj in kube.list(resource, namespace, naming.children_selector(model)):
            name = obj["metadata"]["name"]
            if (resource, name) not in keep and kube.delete(resource, namespace, name):
                deleted.append(f"{obj.get('kind', resource.plural)}/{name}")
    if deleted:
        log.info("pruned children of %s/%s: %s", namespace, model, ", ".join(deleted))
    return deleted
