"""`pilotfleet testbed build|up|status|down|demo`: the local testbed from the command line."""

from __future__ import annotations

import argparse
import logging
import sys

from pilotfleet_serve import procs

from pilotfleet_testbed import demo, paths, stack

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `testbed` command and its subcommands."""
    parser = subparsers.add_parser(
        "testbed",
        help="the local testbed: Kubernetes + KWOK GPU nodes, CPU Triton, helm/kubectl, Copilot LS",
    )
    sub = parser.add_subparsers(dest="testbed_command", required=True)
    sub.add_parser("build", help="build or fetch every part (cached by version)").set_defaults(func=_build)
    sub.add_parser("up", help="start the testbed and leave it running").set_defaults(func=_up)
    sub.add_parser("status", help="show what runs").set_defaults(func=_status)
    sub.add_parser("down", help="stop everything `up` started").set_defaults(func=_down)
    demo_parser = sub.add_parser("demo", help="start the testbed, show each part working, stop it")
    demo_parser.add_argument("--keep", action="store_true", help="leave the testbed running afterwards")
    demo_parser.set_defaults(func=_demo)


def _print_timings(timings: stack.Timings) -> None:
    for name, seconds in timings.seconds.items():
        print(f"  {name:<34} {seconds:8.2f} s")


def _build(_args: argparse.Namespace) -> int:
    timings = stack.Timings()
    parts = stack.build(timings)
    print("testbed parts ready:")
    _print_timings(timings)
    print(f"  helm {parts.tools.helm}\n  kubectl {parts.tools.kubectl}")
    return 0


def _up(_args: argparse.Namespace) -> int:
    timings = stack.Timings()
    try:
        running = stack.up(paths.state_dir(), timings)
    except procs.StartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _print_timings(timings)
    print(
        f"testbed up. Use it with:\n  export KUBECONFIG={running.kubeconfig}\n"
        f"  {running.kubectl} get nodes\n  Triton gRPC: {running.triton_grpc}\n"
        "Stop it with: pilotfleet testbed down"
    )
    return 0


def _status(_args: argparse.Namespace) -> int:
    report = stack.status(paths.state_dir())
    for name, value in report.items():
        print(f"{name:<24} {value}")
    return 0 if "NOT RUNNING" not in report.values() else 1


def _down(_args: argparse.Namespace) -> int:
    if stack.down(paths.state_dir()):
        print("testbed stopped")
    else:
        print("nothing to stop: the testbed is not up")
    return 0


def _demo(args: argparse.Namespace) -> int:
    return demo.run(keep=args.keep)
