"""The operator's settings: typed, read from `PILOTFLEET_OPERATOR_*` environment variables once at startup."""

from __future__ import annotations

import importlib.metadata
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pilotfleet_operator.models import Backend


def parse_capability(text: str) -> tuple[int, int]:
    """Parse a compute capability such as "8.6" into (8, 6)."""
    major, _, minor = text.strip().partition(".")
    if not major.isdigit() or not minor.isdigit():
        raise ValueError(f"compute capability {text!r} is not major.minor")
    return int(major), int(minor)


class CapabilityRange(tuple[tuple[int, int], tuple[int, int]]):
    """An inclusive compute-capability range, e.g. 7.0-8.6."""

    @classmethod
    def parse(cls, text: str) -> CapabilityRange:
        """Parse "7.0-8.6"."""
        low, sep, high = text.partition("-")
        if not sep:
            raise ValueError(f"compute capability range {text!r} is not low-high")
        bounds = parse_capability(low), parse_capability(high)
        if bounds[0] > bounds[1]:
            raise ValueError(f"compute capability range {text!r} is empty")
        return cls(bounds)


def local_image(name: str, tag_suffix: str = "") -> str:
    """The reference `make images` gives our image `name` at this package's version (docs/images.md)."""
    return f"localhost/{name}:{importlib.metadata.version('pilotfleet')}{tag_suffix}"


class Settings(BaseSettings):
    """Operator settings; every field is `PILOTFLEET_OPERATOR_<FIELD>` in the environment."""

    model_config = SettingsConfigDict(env_prefix="PILOTFLEET_OPERATOR_", frozen=True)

    namespace: str = "pilotfleet"
    """Namespace of the operator; the route table ConfigMap lives here."""
    watch_namespaces: list[str] = []
    """Namespaces whose models the operator serves (JSON list); every namespace when empty."""
    leader_election: bool = False
    """Reconcile only while holding the Lease `lease_name` in `namespace` (needed with several replicas)."""
    lease_name: str = "pilotfleet-operator"
    """Name of the coordination.k8s.io Lease the replicas compete for."""
    pod_name: str = ""
    """This replica's identity as a Lease holder; the host name when empty."""
    lease_duration_s: int = Field(default=15, ge=2)
    """Seconds a Lease stays valid without renewal (how long a dead leader blocks a successor)."""
    renew_deadline_s: int = Field(default=10, ge=2)
    """Seconds the leader keeps retrying to renew before it gives up leading."""
    retry_period_s: int = Field(default=2, ge=1)
    """Seconds between Lease attempts."""
    fastertransformer_image: str = "moyix/triton_with_ft:22.09"
    """Triton image with the FasterTransformer backend: FauxPilot's, built elsewhere, not by `make images`."""
    fastertransformer_compute_capability: str = "7.0-8.6"
    """Compute capabilities the FT image has kernels for (it was built for sm_70..sm_86)."""
    python_image: str = Field(default_factory=lambda: local_image("pilotfleet-triton-cpu", "-torch"))
    """Triton image with the Python backend, torch and our Hugging Face model (`pilotfleet_serve.hf_model`):
    the torch variant of `pilotfleet images build --with-torch`."""
    python_compute_capability: str = "7.0-9.0"
    """Compute capabilities the Python-backend image supports."""
    fetch_image: str = Field(default_factory=lambda: local_image("pilotfleet"))
    """Image that runs `pilotfleet fetch` in the weights Job; the chart passes its own (the operator's)."""
    shm_size: str = "2Gi"
    """Size of /dev/shm of Triton pods (NCCL between tensor-parallel GPUs and the Python backend use it)."""
    cluster_domain: str = ""
    """Appended to Service host names in the route table when set (e.g. `cluster.local`)."""
    retry_delay: float = Field(default=5.0, gt=0)
    """Seconds before a reconcile that failed on an API error is tried again (a converging model moves on
    with its children's watch events, not by polling)."""
    fetch_backoff_limit: int = Field(default=4, ge=0)
    """Pod retries of a weights fetch Job after transient failures (Stalled, Unreachable); permanent ones
    (NotFound, ChecksumMismatch, ...) fail the Job at once."""
    fetch_node_selector: dict[str, str] = {}
    """Node labels the fetch Job's pods require (JSON object), e.g. a CPU pool near the object store."""
    fetch_tolerations: list[dict[str, Any]] = []
    """Tolerations of the fetch Job's pods (JSON list of Kubernetes tolerations)."""

    @field_validator("fastertransformer_compute_capability", "python_compute_capability")
    @classmethod
    def _valid_range(cls, value: str) -> str:
        CapabilityRange.parse(value)
        return value

    def image_for(self, backend: Backend) -> str:
        """The default Triton image of a backend."""
        return self.fastertransformer_image if backend is Backend.FASTERTRANSFORMER else self.python_image

    def capability_range_for(self, backend: Backend) -> CapabilityRange:
        """The compute-capability range of the default image of a backend."""
        text = (
            self.fastertransformer_compute_capability
            if backend is Backend.FASTERTRANSFORMER
            else self.python_compute_capability
        )
        return CapabilityRange.parse(text)
