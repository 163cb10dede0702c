"""The `pilotfleet` console command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Each package owns its subcommands through a `register(subparsers)` function in its `cli` module.
_SUBCOMMAND_MODULES = (
    "pilotfleet_testbed.cli",
    "pilotfleet_testbed.images_cli",
    "pilotfleet_fetch.cli",
    "pilotfleet_operator.cli",
    "pilotfleet_proxy.cli",
    "pilotfleet_serve.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="pilotfleet", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
