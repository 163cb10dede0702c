"""pytest fixtures for the real clients: pinned helm and kubectl, and the Copilot language server."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pilotfleet_testbed.copilot import (
    CopilotLanguageServer,
    copilot_language_server,
    ensure_copilot_language_server,
)
from pilotfleet_testbed.k8s_tools import K8sTools, ensure_k8s_tools

# Starts a signed-in-or-not language server: (extra env, settings sent after `initialized`) -> client.
CopilotFactory = Callable[[Mapping[str, str], dict[str, Any]], CopilotLanguageServer]


@pytest.fixture(scope="session")
def k8s_tools() -> K8sTools:
    """helm and kubectl at the pinned versions (`.helm`, `.kubectl`; also unpacks as a tuple)."""
    return ensure_k8s_tools()


@pytest.fixture(scope="session")
def copilot_language_server_path() -> Path:
    """The pinned Copilot language server's native binary, installed from npm on first use."""
    return ensure_copilot_language_server()


@pytest.fixture
def copilot_factory(copilot_language_server_path: Path, tmp_path: Path) -> Iterator[CopilotFactory]:
    """Start initialized language servers (each in its own state folder); all stop at the test's end.

    Call it with the env that signs in and routes completions (see `copilot.sign_in_env`,
    `copilot.override_env`) and the settings to send with `workspace/didChangeConfiguration`.
    """
    with contextlib.ExitStack() as stack:
        count = 0

        def start(env: Mapping[str, str], settings: dict[str, Any]) -> CopilotLanguageServer:
            nonlocal count
            count += 1
            state = tmp_path / f"copilot-{count}"
            client = stack.enter_context(copilot_language_server(copilot_language_server_path, state, env))
            workspace = state / "workspace"
            workspace.mkdir()
            client.initialize(workspace)
            client.change_configuration(settings)
            return client

        yield start
