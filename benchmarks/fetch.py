"""Download throughput of the `pilotfleet fetch` engine vs curl: same local server, same disk.

Prints a table (median of --repeat runs, ratio against curl measured in the same run):
- a 2 GiB file from the unthrottled local server: curl, pilotfleet with 1 range, pilotfleet with 4 ranges
  (pilotfleet also computes the SHA-256 and keeps the resume state; curl does neither);
- a file from a server that limits each connection (as CDNs and object stores do): curl vs 4 ranges.

Usage: python benchmarks/fetch.py [--size-gib 2] [--repeat 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pilotfleet_fetch.download import DownloadSettings, download
from pilotfleet_fetch.progress import Progress
from pilotfleet_fetch.sources import RemoteFile
from pilotfleet_fetch.testkit import WeightsServer

log = logging.getLogger("benchmarks.fetch")
MiB = 1 << 20


def make_file(path: Path, size: int) -> None:
    """Random-looking bytes (one random block repeated: content does not matter to HTTP)."""
    block = os.urandom(64 * MiB)
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, len(block))
            fh.write(block[:n])
            left -= n


def client(url: str, out: Path, concurrency: int) -> None:
    """Child process: one download with the fetch engine; prints its JSON result."""
    with Progress([]) as progress:
        progress.begin(url, None)
        got = download(
            RemoteFile(url=url, path=out.name), out, DownloadSettings(concurrency=concurrency), progress
        )
    print(json.dumps({"sha256": got.sha256, "size": got.size}))


def timed(argv: list[str], out: Path) -> float:
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


def measure(label: str, argv: list[str], out: Path, repeat: int) -> tuple[str, float]:
    runs = [timed(argv, out) for _ in range(repeat)]
    log.info("%s: %s", label, ", ".join(f"{r:.2f}s" for r in runs))
    return label, statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--throttled-mib", type=int, default=512, help="file size for the throttled rows")
    parser.add_argument("--rate-mib", type=float, default=100.0, help="per-connection limit, MiB/s")
    parser.add_argument("--dir", type=Path, help="where files go (default: a temp dir on the same disk)")
    parser.add_argument("--client", nargs=3, metavar=("URL", "OUT", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args.client[0], Path(args.client[1]), int(args.client[2]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    me = [sys.executable, str(Path(__file__).resolve()), "--client"]
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="fetch-bench-") as tmp:
        work = Path(tmp)
        size = int(args.size_gib * (1 << 30))
        small = args.throttled_mib * MiB
        make_file(work / "big.bin", size)
        make_file(work / "small.bin", small)
        out = work / "out.bin"
        rows: list[tuple[str, int, list[tuple[str, float]]]] = []
        with WeightsServer() as srv:
            url = srv.publish("big.bin", work / "big.bin")
            rows.append(
                (
                    f"{args.size_gib:g} GiB, local server",
                    size,
                    [
                        measure("curl", ["curl", "-sSf", "-o", str(out), url], out, args.repeat),
                        measure("pilotfleet, 1 range", [*me, url, str(out), "1"], out, args.repeat),
                        measure("pilotfleet, 4 ranges", [*me, url, str(out), "4"], out, args.repeat),
                    ],
                )
            )
            srv.faults.rate = args.rate_mib * MiB
            url = srv.publish("small.bin", work / "small.bin")
            rows.append(
                (
                    f"{args.throttled_mib} MiB, {args.rate_mib:g} MiB/s per connection",
                    small,
                    [
                        measure("curl", ["curl", "-sSf", "-o", str(out), url], out, args.repeat),
                        measure("pilotfleet, 4 ranges", [*me, url, str(out), "4"], out, args.repeat),
                    ],
                )
            )
    print(f"\n| case | client | seconds (median of {args.repeat}) | MiB/s | vs curl |")
    print("| --- | --- | ---: | ---: | ---: |")
    for case, nbytes, results in rows:
        base = results[0][1]
        for label, seconds in results:
            print(
                f"| {case} | {label} | {seconds:.2f} | {nbytes / MiB / seconds:.0f} | {base / seconds:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
