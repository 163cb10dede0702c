"""`pilotfleet serve`: Triton + the proxy on this machine, with a real default model."""

from __future__ import annotations

import argparse
from typing import Any

from pilotfleet_serve.serve import BUILTIN_MODELS, run_forever, run_once


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand to the `pilotfleet` command's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve", help="run a complete fleet on this machine: Triton and the proxy, with a default model"
    )
    parser.add_argument("--model", choices=sorted(BUILTIN_MODELS), default="smollm2", help="model to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address the proxy listens on")
    parser.add_argument("--port", type=int, default=8000, help="port the proxy listens on")
    parser.add_argument(
        "--once",
        metavar="PROMPT",
        help="print one completion of PROMPT through the proxy, then stop everything and exit",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens to generate with --once")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C, or answer one prompt with --once."""
    if args.once is not None:
        return run_once(args.model, args.once, args.max_tokens)
    return run_forever(args.model, args.host, args.port)
