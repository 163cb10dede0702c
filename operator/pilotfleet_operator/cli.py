"""`pilotfleet operator` (run the operator) and `pilotfleet crds` (regenerate the CRD YAML)."""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def crd_directories(root: Path) -> list[Path]:
    """Where the CRD YAML lives: `crds/` and the Helm chart's `crds/`."""
    return [root / "crds", root / "charts" / "pilotfleet" / "crds"]


def run_crds(args: argparse.Namespace) -> int:
    """Write the CRD YAML generated from the models."""
    from pilotfleet_operator.crd import write_crds

    for path in write_crds(crd_directories(Path(args.root))):
        log.info("wrote %s", path)
    return 0


def run_operator(args: argparse.Namespace) -> int:
    """Run the kopf operator until interrupted (or, with leader election, until the Lease is lost)."""
    import threading

    import kopf

    from pilotfleet_operator.leader import run_as_leader
    from pilotfleet_operator.settings import Settings

    # Importing the module registers its handlers with kopf's default registry.
    importlib.import_module("pilotfleet_operator.handlers")
    settings = Settings()
    namespaces = settings.watch_namespaces
    log.info("pilotfleet operator watching %s", ", ".join(namespaces) if namespaces else "all namespaces")

    def work(stop: threading.Event | None) -> None:
        kopf.run(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
            liveness_endpoint=args.liveness,
            stop_flag=stop,
        )

    if settings.leader_election:
        return run_as_leader(settings, work, args.liveness)
    work(None)
    return 0


def register(subparsers: Any) -> None:
    """Add the operator's subcommands to the `pilotfleet` command line."""
    op = subparsers.add_parser("operator", help="run the CodeCompletionModel operator (kopf)")
    op.add_argument(
        "--liveness",
        default=None,
        help="serve kopf's liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz",
    )
    op.set_defaults(func=run_operator)
    crds = subparsers.add_parser("crds", help="write the CRD YAML generated from the API models")
    crds.add_argument("--root", default=".", help="project root holding crds/ and charts/ (default: .)")
    crds.set_defaults(func=run_crds)
