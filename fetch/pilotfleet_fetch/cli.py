"""`pilotfleet fetch`: the command line of the fetch job (contract in docs/fetch.md)."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Any

from pilotfleet_fetch.download import DownloadSettings
from pilotfleet_fetch.errors import FetchError, write_termination_message
from pilotfleet_fetch.pipeline import BACKENDS, FetchRequest, run_fetch
from pilotfleet_fetch.progress import KubeStatusReporter, LogReporter, Progress, Reporter
from pilotfleet_fetch.repository import RepositorySpec
from pilotfleet_fetch.sources import Credentials

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
DTYPES = ("auto", "float16", "bfloat16", "float32")


def _sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise argparse.ArgumentTypeError("a SHA-256 is 64 hex digits")
    return value.lower()


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `pilotfleet fetch` (also used by `python -m pilotfleet_fetch`)."""
    parser.add_argument("--source", required=True, help="https://..., s3://bucket/key[/], or hf://owner/repo")
    parser.add_argument("--dest", required=True, type=Path, help="published model repository directory")
    parser.add_argument("--sha256", type=_sha256, help="expected SHA-256 of the file at --source")
    parser.add_argument("--revision", help="Hugging Face revision (pin a commit)")
    parser.add_argument("--backend", choices=BACKENDS, default="fastertransformer")
    parser.add_argument("--tp", type=_positive, default=1, help="tensor-parallel size (GPUs per replica)")
    parser.add_argument("--model-name", default="fastertransformer", help="Triton model name")
    parser.add_argument("--serve-path", type=Path, help="where Triton sees --dest (default: --dest)")
    parser.add_argument("--max-seq-len", type=_positive, default=2048)
    parser.add_argument("--decoupled", action="store_true", help="write a decoupled (streaming) model")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="torch dtype of the python backend's model"
    )
    parser.add_argument(
        "--tokenizer-model",
        help="also write a Triton model of this name serving tokenizer.json (routes' triton://NAME)",
    )
    parser.add_argument(
        "--tokenizer", help="URL or hf://owner/repo of tokenizer files to place beside the model"
    )
    parser.add_argument("--tokenizer-sha256", type=_sha256)
    parser.add_argument("--concurrency", type=_positive, default=4, help="parallel ranges for large files")
    parser.add_argument("--stall-timeout", type=float, default=60.0, help="seconds without a byte = stalled")
    parser.add_argument("--retries", type=int, default=8, help="failed attempts in a row before giving up")


def register(subparsers: Any) -> None:
    """Add `pilotfleet fetch` to the `pilotfleet` command's subparsers."""
    parser = subparsers.add_parser(
        "fetch",
        help="download, verify and publish model weights (the operator's fetch job)",
        description=__doc__,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def _reporters() -> list[Reporter]:
    reporters: list[Reporter] = [LogReporter()]
    name, namespace = os.environ.get("PILOTFLEET_MODEL_NAME"), os.environ.get("PILOTFLEET_MODEL_NAMESPACE")
    if name and namespace:
        try:
            reporters.append(KubeStatusReporter.from_environment(name, namespace))
        except Exception as exc:  # no cluster credentials: progress still goes to the log
            log.warning("cannot report progress to CodeCompletionModel %s/%s: %s", namespace, name, exc)
    return reporters


def run(args: argparse.Namespace) -> int:
    """Run one fetch; return 0, or the failure's exit code after writing the termination message."""
    dest = args.dest.absolute()
    request = FetchRequest(
        source=args.source,
        dest=dest,
        sha256=args.sha256,
        revision=args.revision,
        backend=args.backend,
        repository=RepositorySpec(
            model_name=args.model_name,
            tp=args.tp,
            serve_path=args.serve_path or dest,
            max_seq_len=args.max_seq_len,
            decoupled=args.decoupled,
            dtype=args.dtype,
            tokenizer_model=args.tokenizer_model,
        ),
        tokenizer=args.tokenizer,
        tokenizer_sha256=args.tokenizer_sha256,
    )
    settings = DownloadSettings(
        concurrency=args.concurrency, stall_timeout=args.stall_timeout, retries=args.retries
    )
    try:
        with Progress(_reporters()) as progress:
            result = run_fetch(request, Credentials.from_env(os.environ), settings, progress)
    except FetchError as exc:
        log.error("fetch failed: %s: %s", exc.reason, exc)
        termination_log = Path(os.environ.get("PILOTFLEET_TERMINATION_LOG", "/dev/termination-log"))
        write_termination_message(termination_log, exc)
        return exc.exit_code
    verb = "reused" if result.reused else "published"
    log.info("%s %s (%d bytes downloaded by this run)", verb, result.dest, result.transferred)
    return 0
