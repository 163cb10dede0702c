"""pytest fixtures: a real CPU Triton serving our echo models (plugin `pilotfleet_testbed.pytest_triton`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pilotfleet_serve.tritonserver import TritonServer

from pilotfleet_testbed.triton import build_model_repository

TritonServerFactory = Callable[..., TritonServer]


@pytest.fixture(scope="session")
def triton_model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding the default echo models (`triton_models.config.DEFAULT_MODELS`)."""
    return build_model_repository(tmp_path_factory.mktemp("triton-models"))


@pytest.fixture(scope="session")
def triton_server(
    triton_model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """One Triton for the whole session, serving `triton_model_repository`; leave it running (no kill)."""
    server = TritonServer.start(triton_model_repository, tmp_path_factory.mktemp("triton"))
    yield server
    server.stop()


@pytest.fixture
def triton_server_factory(triton_model_repository: Path, tmp_path: Path) -> Iterator[TritonServerFactory]:
    """Start private servers (to kill, restart or give another repository); all stopped after the test.

    Call it as `factory(model_repo=None, **TritonServer.start keyword arguments)`.
    """
    started: list[TritonServer] = []

    def start(model_repo: Path | None = None, **kwargs: object) -> TritonServer:
        workdir = tmp_path / f"triton-{len(started)}"
        server = TritonServer.start(model_repo or triton_model_repository, workdir, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
