"""`pilotfleet proxy`: run the proxy with uvicorn (settings from PILOTFLEET_PROXY_* plus these flags)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import uvicorn

from pilotfleet_proxy.app import create_app
from pilotfleet_proxy.settings import ProxySettings

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the `proxy` subcommand to the `pilotfleet` command's subparsers."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "proxy", help="run the Copilot/OpenAI-compatible proxy in front of Triton"
    )
    parser.add_argument(
        "--routes", type=Path, help="route table file to watch (default /etc/pilotfleet/routes.yaml)"
    )
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--access-log", action="store_true", help="log every request (costs latency)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    flags = {"routes_file": args.routes, "host": args.host, "port": args.port}
    settings = ProxySettings(**{key: value for key, value in flags.items() if value is not None})
    log.info("proxy on http://%s:%d, routes %s", settings.host, settings.port, settings.routes_file)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=args.access_log,
        log_config=None,
    )
    return 0
