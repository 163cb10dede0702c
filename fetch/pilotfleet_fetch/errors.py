"""One exception type per way a fetch fails, each with the reason code the operator shows to users."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import ClassVar

log = logging.getLogger(__name__)


class FetchError(Exception):
    """Base of every fetch failure; `reason` is the CamelCase code, `exit_code` the process status."""

    reason: ClassVar[str] = "FetchFailed"
    exit_code: ClassVar[int] = 1
    # Permanent failures clear the staging area; transient ones keep partial downloads for a resume.
    permanent: ClassVar[bool] = True


class NotFound(FetchError):
    """The source (URL, S3 key, Hugging Face repo, revision or file) does not exist."""

    reason = "NotFound"
    exit_code = 10


class Unauthorized(FetchError):
    """The server refused our credentials (401/403)."""

    reason = "Unauthorized"
    exit_code = 11


class ChecksumMismatch(FetchError):
    """The downloaded bytes do not hash to the expected digest."""

    reason = "ChecksumMismatch"
    exit_code = 12


class DiskFull(FetchError):
    """The destination volume has no room for the download or the extracted files."""

    reason = "DiskFull"
    exit_code = 13


class BadArchive(FetchError):
    """The archive is truncated, corrupt, or holds a member that would escape the target directory."""

    reason = "BadArchive"
    exit_code = 14


class MissingShard(FetchError):
    """Checkpoint files needed for the requested tensor-parallel size are missing or the wrong size."""

    reason = "MissingShard"
    exit_code = 15


class Stalled(FetchError):
    """No bytes arrived within the stall timeout, too many times in a row."""

    reason = "Stalled"
    exit_code = 16
    permanent = False


class BadCheckpoint(FetchError):
    """Checkpoint metadata (config.ini, config.json, a safetensors header) is unreadable or inconsistent."""

    reason = "BadCheckpoint"
    exit_code = 17


class Unreachable(FetchError):
    """Connection errors or server errors (5xx), too many times in a row."""

    reason = "Unreachable"
    exit_code = 18
    permanent = False


# argparse's exit status for a bad command line: as permanent as any failure above.
USAGE_EXIT_CODE = 2

ALL_ERRORS: tuple[type[FetchError], ...] = (
    NotFound,
    Unauthorized,
    ChecksumMismatch,
    DiskFull,
    BadArchive,
    MissingShard,
    Stalled,
    BadCheckpoint,
    Unreachable,
)


def write_termination_message(path: Path, error: FetchError) -> bool:
    """Write `{"reason", "message"}` to the pod's termination log if that file exists; return True if written.

    The kubelet creates the file in a pod; outside one we never create it (as root, `/dev` is writable).
    """
    if not path.exists():
        return False
    line = json.dumps({"reason": error.reason, "message": str(error)[:3500]})
    try:
        path.write_text(line + "\n")
    except OSError as exc:
        log.warning("cannot write termination message to %s: %s", path, exc)
        return False
    return True
