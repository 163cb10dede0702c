"""`pilotfleet testbed demo` end to end, as a user runs it: its own testbed, the chart, the operator and two
example models, and what it prints.

The demo runs as a subprocess with its own state folder (`PILOTFLEET_TESTBED_STATE`), so it never meets a
developer's testbed in `.testbed/`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pilotfleet_testbed import nodes
from pilotfleet_testbed.leftovers import processes_mentioning

pytestmark = pytest.mark.testbed

ROOT = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 600


def sections(output: str) -> dict[str, str]:
    """The demo's output split at its `=== title` banners: {title: text under it}."""
    found = {}
    for chunk in output.split("\n=== ")[1:]:
        title, _, body = chunk.partition("\n")
        found[title] = body
    return found


def section(output: str, title_start: str) -> str:
    """The text under the one banner whose title starts with `title_start`."""
    matches = [body for title, body in sections(output).items() if title.startswith(title_start)]
    assert len(matches) == 1, f"expected one section {title_start!r} in the demo output:\n{output}"
    return matches[0]


def table(text: str, first_column: str) -> list[dict[str, str]]:
    """Rows of the kubectl tables in `text` whose header starts with `first_column` (`kubectl get a,b`
    prints one per kind), each cut at its header's column offsets: kubectl aligns cells under their
    header, and empty cells make splitting on spaces fail."""
    rows: list[dict[str, str]] = []
    header: str | None = None
    for line in text.splitlines():
        if line.startswith(first_column + " "):
            header = line
        elif not line.strip():
            header = None
        elif header is not None:
            # Columns are at least two spaces apart; a name may hold one ("NOMINATED NODE").
            columns = list(re.finditer(r"\S+(?: \S+)*", header))
            ends = [c.start() for c in columns[1:]] + [len(line)]
            cells = zip(columns, ends, strict=True)
            rows.append({column.group(): line[column.start() : end].strip() for column, end in cells})
    return rows


def node_capability() -> dict[str, tuple[int, int] | None]:
    """Compute capability of each node of the default pool (None for CPU-only nodes)."""
    found: dict[str, tuple[int, int] | None] = {}
    for node in nodes.node_pool():
        labels = node["metadata"]["labels"]
        major = labels.get("nvidia.com/gpu.compute.major")
        minor = labels.get("nvidia.com/gpu.compute.minor")
        found[node["metadata"]["name"]] = (int(major), int(minor)) if major and minor else None
    return found


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What `pilotfleet testbed demo` prints, run once with its own state folder; it must exit 0."""
    state = tmp_path_factory.mktemp("demo-state")
    env = dict(os.environ, PILOTFLEET_TESTBED_STATE=str(state))
    done = subprocess.run(
        [sys.executable, "-m", "pilotfleet_cli.main", "testbed", "demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Everything it started is stopped: no process still refers to its state folder.
    assert processes_mentioning(str(state)) == [], output
    assert not (state / "state.json").exists()
    return done.stdout


def test_demo_lists_the_simulated_gpu_nodes(demo_output: str) -> None:
    listed = table(section(demo_output, "kubectl get nodes"), "NAME")
    assert sorted(row["NAME"] for row in listed) == sorted(node_capability())
    assert {row["STATUS"] for row in listed} == {"Ready"}
    products = {row["NAME"]: row["GPU.PRODUCT"] for row in listed}
    assert products["kwok-gpu-p40-0"] == "Tesla-P40"
    assert products["kwok-cpu-0"] == ""


def test_demo_places_gpu_pods_on_compute_capability_7_or_newer_only(demo_output: str) -> None:
    capability = node_capability()
    gpu_demo = table(section(demo_output, "a Deployment asking for 1 GPU"), "NAME")
    model_pods = [
        row
        for row in table(section(demo_output, "kubectl get jobs,pods"), "NAME")
        if row["NAME"].startswith("pod/") and "-triton-" in row["NAME"]
    ]
    assert len(gpu_demo) == 3 and len(model_pods) == 2, demo_output
    for row in [*gpu_demo, *model_pods]:
        assert row["STATUS"] == "Running", row
        node_cc = capability[row["NODE"]]
        assert node_cc is not None and node_cc >= (7, 0), row


def test_demo_serves_the_examples_through_the_operator(demo_output: str) -> None:
    operator = section(demo_output, "the operator, as the chart's ServiceAccount")
    assert "operator identity: system:serviceaccount:pilotfleet-system:pilotfleet-operator" in operator
    rows = table(section(demo_output, "kubectl get ccm -A"), "NAMESPACE")
    assert [(r["NAMESPACE"], r["NAME"], r["READY"], r["PHASE"]) for r in rows] == [
        ("team-a", "codegen-350m-mono", "1/1", "Ready"),
        ("team-a", "tiny-starcoder", "1/1", "Ready"),
    ]
    jobs = [
        r for r in table(section(demo_output, "kubectl get jobs,pods"), "NAME") if r["NAME"].startswith("job")
    ]
    assert [r["STATUS"] for r in jobs] == ["Complete", "Complete"]
    # The route table is printed as it is stored: YAML, up to the blank line that ends the section.
    routes = yaml.safe_load(section(demo_output, "the route table the proxy reads").split("\n\n")[0])
    endpoints = {m["name"]: m["endpoints"] for m in routes["models"]}
    assert endpoints == {
        "codegen-350m-mono": ["codegen-350m-mono-triton.team-a.svc:8001"],
        "tiny-starcoder": ["tiny-starcoder-triton.team-a.svc:8001"],
    }
    assert demo_output.rstrip().endswith("testbed stopped")
