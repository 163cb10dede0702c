"""`pilotfleet images build|save`: pilotfleet's container images, built and saved with podman."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def run_build(args: argparse.Namespace) -> int:
    """Build the images and print their references and sizes."""
    from pilotfleet_testbed import images

    wanted = list(images.DEFAULT_IMAGES)
    if args.with_torch:
        wanted.append(images.TRITON_CPU_TORCH)
    built = images.build_images(wanted)
    width = max(len(image.ref) for image in built)
    lines = [f"{'IMAGE':<{width}}  {'SIZE':>8}  BUILD"]
    lines += [
        f"{image.ref:<{width}}  {image.size_mb:>5.0f} MB  {image.build_seconds:.1f}s" for image in built
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def run_save(args: argparse.Namespace) -> int:
    """Save the images (by default the ones `images build` makes) as tar files in a folder."""
    from pilotfleet_testbed import images

    refs = args.image or [image.ref(images.project_version()) for image in images.DEFAULT_IMAGES]
    for path in images.save_images(Path(args.dest), refs, images.ensure_podman()):
        sys.stdout.write(f"{path}\n")
    return 0


def register(subparsers: Any) -> None:
    """Add `images build` and `images save` to the `pilotfleet` command line."""
    parser = subparsers.add_parser("images", help="build and save pilotfleet's container images (podman)")
    sub = parser.add_subparsers(dest="images_command", required=True)
    build = sub.add_parser(
        "build", help="build pilotfleet and pilotfleet-triton-cpu (cached: seconds when nothing changed)"
    )
    build.add_argument(
        "--with-torch",
        action="store_true",
        help="also build pilotfleet-triton-cpu:<version>-torch for Hugging Face models (several GB)",
    )
    build.set_defaults(func=run_build)
    save = sub.add_parser("save", help="write images as tar files for an air-gapped registry (podman save)")
    save.add_argument("dest", help="folder for the tar files")
    save.add_argument(
        "--image", action="append", help="image reference to save (repeatable; default: both images)"
    )
    save.set_defaults(func=run_save)


def main(argv: list[str] | None = None) -> int:
    """Run `images ...` on its own, for callers that do not go through the `pilotfleet` command."""
    parser = argparse.ArgumentParser(prog="pilotfleet", description=__doc__)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
