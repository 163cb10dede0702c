"""`python -m pilotfleet_fetch ...`: the fetch job as a plain process, same options as `pilotfleet fetch`."""

from __future__ import annotations

import argparse
import logging
import sys

from pilotfleet_fetch.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    """Parse the fetch options and run one fetch."""
    parser = argparse.ArgumentParser(prog="pilotfleet-fetch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
