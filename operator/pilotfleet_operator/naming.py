"""Names, labels and annotation keys of everything the operator creates: one place, mirrored by the chart."""

from __future__ import annotations

import hashlib
import json
from typing import Any

GROUP = "pilotfleet.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CodeCompletionModel"
PLURAL = "codecompletionmodels"
SINGULAR = "codecompletionmodel"
SHORT_NAMES = ("ccm",)
CRD_NAME = f"{PLURAL}.{GROUP}"

PART_OF = "pilotfleet"
MANAGED_BY = "pilotfleet-operator"
# The server-side apply field manager: every write of the operator is made under this name.
FIELD_MANAGER = "pilotfleet"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_MODEL = f"{GROUP}/model"

# The identity of a model's Triton repository (weights and the fetch options that lay it out): on the
# fetch Job, and on the Triton pod template, whose change rolls the pods.
ANNOTATION_WEIGHTS_HASH = f"{GROUP}/weights-hash"
# kopf keeps its handler progress and last-handled spec in annotations under our own group.
KOPF_PREFIX = GROUP
FINALIZER = f"{GROUP}/cleanup"

COMPONENT_TRITON = "triton"
COMPONENT_WEIGHTS = "weights"
COMPONENT_FETCH = "fetch"
COMPONENT_ROUTES = "routes"

ROUTES_CONFIGMAP = "pilotfleet-routes"
ROUTES_KEY = "routes.yaml"

# The longest metadata.name accepted by the CRD: the longest child name adds 19 characters
# ("-fetch-" plus a 12-character hash) and Service names stop at 63.
MAX_MODEL_NAME_LENGTH = 40


def triton_name(model: str) -> str:
    """Name of the Triton Deployment and Service of `model`."""
    return f"{model}-triton"


def fetch_service_account_name(model: str) -> str:
    """Name of the ServiceAccount, Role and RoleBinding of the fetch Jobs of `model`."""
    return f"{model}-fetch"


def pvc_name(model: str) -> str:
    """Name of the PersistentVolumeClaim holding the weights of `model`."""
    return f"{model}-weights"


def fetch_job_name(model: str, weights_hash: str) -> str:
    """Name of the weights fetch Job; a new weight source gets a new Job (a Job's pod spec is immutable)."""
    return f"{model}-fetch-{weights_hash}"


def short_hash(value: Any) -> str:
    """Return a stable 12-hex-digit hash of a JSON-serialisable value."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def selector_labels(model: str, component: str) -> dict[str, str]:
    """The labels that select one component of one model; they never change for a given object."""
    return {LABEL_NAME: PART_OF, LABEL_INSTANCE: model, LABEL_COMPONENT: component}


def labels(model: str, component: str) -> dict[str, str]:
    """All labels put on a child of `model` (selector labels plus ownership labels)."""
    return {
        **selector_labels(model, component),
        LABEL_PART_OF: PART_OF,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_MODEL: model,
    }


def component_selector(component: str) -> str:
    """Label selector matching one component of every model."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}={component}"


def children_selector(model: str) -> str:
    """Label selector (API string form) matching every namespaced child of `model`."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_MODEL}={model}"
