"""One exception type per way a fetch fails, each with the reason code the operator shows to users."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger(__name__)


class FetchError(Exception):
    """Base of every fetch failure; `reason` is the CamelCase code, `exit_code` the process status."""

    reason: ClassVar[str] = "FetchFailed"
    exit_code: ClassVar[int] = 1
    # Permanent failures clear the staging area; transient ones keep partial downloads for a resume.
    permanent: ClassVar[bool] = True

    def __init_subclass__(cls, *, exit_code: int, permanent: bool = True, **kwargs: Any) -> None:
        """Declare a failure: its reason code is its class name, its exit status and permanence as given."""
        super().__init_subclass__(**kwargs)
        cls.reason = cls.__name__
        cls.exit_code = exit_code
        cls.permanent = permanent


class NotFound(FetchError, exit_code=10):
    """The source (URL, S3 key, Hugging Face repo, revision or file) does not exist."""


class Unauthorized(FetchError, exit_code=11):
    """The server refused our credentials (401/403)."""


class ChecksumMismatch(FetchError, exit_code=12):
    """The downloaded bytes do not hash to the expected digest."""


class DiskFull(FetchError, exit_code=13):
    """The destination volume has no room for the download or the extracted files."""


class BadArchive(FetchError, exit_code=14):
    """The archive is truncated, corrupt, or holds a member that would escape the target directory."""


class MissingShard(FetchError, exit_code=15):
    """Checkpoint files needed for the requested tensor-parallel size are missing or the wrong size."""


class Stalled(FetchError, exit_code=16, permanent=False):
    """No bytes arrived within the stall timeout, too many times in a row."""


class BadCheckpoint(FetchError, exit_code=17):
    """Checkpoint metadata (config.ini, config.json, a safetensors header) is unreadable or inconsistent."""


class Unreachable(FetchError, exit_code=18, permanent=False):
    """Connection errors or server errors (5xx), too many times in a row."""


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
