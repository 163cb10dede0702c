"""pilotfleet's container images, built with podman on a machine with no registry and no Docker engine.

The base image is a minimal Debian made with debootstrap (GUIDE.md section 4), tarred into the cache and
imported into podman; the images in `images/` are built on top of it. A second build with nothing changed
takes seconds: the base is keyed by the debootstrap arguments (and imported only when podman lacks it)
and podman's layer cache covers the Containerfiles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pilotfleet_serve import procs
from pilotfleet_serve.cache import cache_dir, cache_lock
from pilotfleet_serve.procs import run_checked

from pilotfleet_testbed.paths import project_root

log = logging.getLogger(__name__)

# netavark and aardvark-dns give podman networks on which containers find each other by name.
APT_PACKAGES = ("podman", "buildah", "runc", "netavark", "aardvark-dns", "debootstrap")
BUILD_TIMEOUT_S = 1800.0
# Files of the project that the Containerfiles COPY, besides the packages listed in pyproject.toml.
# The modification time of every file in the staged build context (2020-01-01; zip needs >= 1980).
CONTEXT_MTIME = 1577836800
CONTEXT_FILES = ("pyproject.toml", "README.md", "requirements/lock.txt", "images/check_pins.py")
# Where the image builds look for the build host's CA certificates, first match wins (pip in the builder
# stages must trust whatever the host trusts, e.g. an egress proxy's CA).
CA_BUNDLE_ENV = ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
DEBIAN_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# Trimmed from the debootstrapped tree: package caches and lists, documentation, translations.
BASE_TRIM = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
BASE_CONFIG = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["/bin/bash"]',
)


class ImageError(procs.StartError):
    """An image could not be built, saved or run; the message says which step and shows its output."""


def images_dir() -> Path:
    """The project's `images/` folder: Containerfiles and the podman configuration."""
    return project_root() / "images"


def project_version() -> str:
    """The project's version, from pyproject.toml (image tags and the version label)."""
    with (project_root() / "pyproject.toml").open("rb") as handle:
        return str(tomllib.load(handle)["project"]["version"])


def _package_installed(package: str) -> bool:
    query = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return query.returncode == 0 and query.stdout.strip() == "install ok installed"


@dataclass(frozen=True)
class Podman:
    """The podman command line as it works on our machines: runc, cgroupfs, our containers.conf."""

    conf: Path = field(default_factory=lambda: images_dir() / "containers.conf")

    def argv(self, *args: str) -> list[str]:
        """The full command line of `podman ARGS`."""
        return ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", *args]

    def env(self) -> dict[str, str]:
        """The environment podman runs under."""
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        """Run `podman ARGS` to its end and return its stdout; raise ImageError if it fails and `check`."""
        command = self.argv(*args)
        try:
            done = subprocess.run(
                command, env=self.env(), capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageError(f"{' '.join(command)} failed: {exc}") from exc
        if check and done.returncode != 0:
            output = (done.stderr or done.stdout)[-3000:]
            raise ImageError(f"{' '.join(command)} exited with status {done.returncode}:\n{output}")
        return done.stdout

    def run_logged(self, args: Sequence[str], log_path: Path, timeout: float = BUILD_TIMEOUT_S) -> None:
        """Run a long `podman ARGS` (a build, a save), output in `log_path`; raise ImageError if it fails."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.argv(*args)
        with log_path.open("w") as out:
            try:
                code = subprocess.run(
                    command,
                    env=self.env(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    check=False,
                ).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ImageError(f"{' '.join(command)} failed: {exc}; log {log_path}") from exc
        if code != 0:
            raise ImageError(
                f"{' '.join(command)} exited with status {code}; log {log_path}:\n"
                f"{procs.log_tail(log_path, 40)}"
            )

    def image_exists(self, ref: str) -> bool:
        """Return True when podman's storage holds `ref`."""
        return subprocess.run(self.argv("image", "exists", ref), env=self.env(), check=False).returncode == 0

    def image_size(self, ref: str) -> int:
        """The image's size in bytes, all layers included (what `podman images` shows)."""
        return int(self.run("image", "inspect", "--format", "{{.Size}}", ref).strip())

    def image_labels(self, ref: str) -> dict[str, str]:
        """The image's labels."""
        labels = json.loads(self.run("image", "inspect", "--format", "{{json .Labels}}", ref))
        return dict(labels or {})


def ensure_podman() -> Podman:
    """Install podman, buildah, runc, netavark and debootstrap from apt when missing; return the command.

    Needs root to install (CI runs as root on a fresh machine); raises ImageError saying what to install
    otherwise.
    """
    with cache_lock("apt"):
        missing = [package for package in APT_PACKAGES if not _package_installed(package)]
        if missing:
            if os.geteuid() != 0:
                raise ImageError(
                    "podman is not installed; as root run: apt-get install --no-install-recommends "
                    + " ".join(missing)
                )
            log.info("installing %s with apt-get", " ".join(missing))
            apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            for command in (
                ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            ):
                done = subprocess.run(command, env=apt_env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise ImageError(f"{' '.join(command)} failed:\n{(done.stderr or done.stdout)[-3000:]}")
    return Podman()


@dataclass(frozen=True)
class BaseSpec:
    """What the Debian base image is made of; its cache key is a hash of these fields."""

    suite: str = "bookworm"
    variant: str = "minbase"
    mirror: str = "http://deb.debian.org/debian"
    # python3-venv builds the virtual environments; libpython3.11 is what Triton's Python backend stub
    # links against; tini is the triton image's init.
    packages: tuple[str, ...] = ("python3", "python3-venv", "libpython3.11", "ca-certificates", "tini")

    def key(self) -> str:
        """A short hash of everything that shapes the base image, the trimming and image config included."""
        identity = json.dumps([self.suite, self.variant, self.mirror, self.packages, BASE_TRIM, BASE_CONFIG])
        return hashlib.sha256(identity.encode()).hexdigest()[:12]

    @property
    def ref(self) -> str:
        """The base image's reference in podman's storage."""
        return f"localhost/pilotfleet-base:{self.suite}-{self.key()}"

    def debootstrap_argv(self, target: Path) -> list[str]:
        """The debootstrap command that makes the root filesystem in `target`."""
        return [
            "debootstrap",
            f"--variant={self.variant}",
            f"--include={','.join(self.packages)}",
            self.suite,
            str(target),
            self.mirror,
        ]


def _make_rootfs_tar(spec: BaseSpec, tarball: Path) -> None:
    """Debootstrap `spec` into a scratch folder, trim it and tar it to `tarball` (written atomically)."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tarball.parent, prefix="rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        began = time.monotonic()
        log.info("debootstrap %s (%s) into %s: a minute or two", spec.suite, ", ".join(spec.packages), rootfs)
        try:
            run_checked(spec.debootstrap_argv(rootfs), timeout=BUILD_TIMEOUT_S)
        except procs.StartError as exc:
            raise ImageError(f"debootstrap failed: {exc}") from exc
        for relative in BASE_TRIM:
            target = rootfs / relative
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        partial = tarball.with_suffix(".partial")
        run_checked(
            ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."],
            timeout=BUILD_TIMEOUT_S,
        )
        partial.rename(tarball)
        log.info("base root filesystem %s ready in %.0fs", tarball, time.monotonic() - began)


def build_base_image(podman: Podman, spec: BaseSpec | None = None) -> str:
    """Return the reference of the Debian base image, debootstrapped and imported on first use only."""
    spec = spec or BaseSpec()
    if podman.image_exists(spec.ref):
        return spec.ref
    with cache_lock("images-base"):
        if podman.image_exists(spec.ref):
            return spec.ref
        tarball = cache_dir() / "images" / f"base-{spec.suite}-{spec.key()}.tar"
        if not tarball.exists():
            _make_rootfs_tar(spec, tarball)
        changes = [arg for change in BASE_CONFIG for arg in ("--change", change)]
        podman.run("import", *changes, str(tarball), spec.ref, timeout=600.0)
        log.info("imported %s as %s", tarball.name, spec.ref)
    return spec.ref


@dataclass(frozen=True)
class ImageSpec:
    """One image of pilotfleet: its name and Containerfile, plus build arguments of a variant."""

    name: str
    containerfile: str
    tag_suffix: str = ""
    build_args: tuple[tuple[str, str], ...] = ()

    def ref(self, version: str) -> str:
        """The image's reference, e.g. `localhost/pilotfleet:0.1.0`."""
        return f"localhost/{self.name}:{version}{self.tag_suffix}"


PILOTFLEET = ImageSpec("pilotfleet", "Containerfile.pilotfleet")
TRITON_CPU = ImageSpec("pilotfleet-triton-cpu", "Containerfile.triton-cpu")
# The Hugging Face backend's variant: torch from PyPI is the CUDA build, several GB (docs/images.md).
TRITON_CPU_TORCH = ImageSpec(
    "pilotfleet-triton-cpu", "Containerfile.triton-cpu", tag_suffix="-torch", build_args=(("TORCH", "1"),)
)
DEFAULT_IMAGES = (PILOTFLEET, TRITON_CPU)


@dataclass(frozen=True)
class BuiltImage:
    """An image in podman's storage, as a build left it."""

    ref: str
    size_bytes: int
    build_seconds: float

    @property
    def size_mb(self) -> float:
        """The size in MB (10^6 bytes, as podman prints it)."""
        return self.size_bytes / 1e6


def host_ca_bundle() -> Path:
    """The CA certificates this machine trusts, handed to pip inside the builder stages."""
    candidates = [os.environ.get(name, "") for name in CA_BUNDLE_ENV]
    candidates += [ssl.get_default_verify_paths().cafile or "", str(DEBIAN_CA_BUNDLE)]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ImageError(
        f"no CA certificate bundle found (looked at {', '.join(CA_BUNDLE_ENV)} and {DEBIAN_CA_BUNDLE})"
    )


def _wheel_packages(root: Path) -> list[str]:
    with (root / "pyproject.toml").open("rb") as handle:
        return list(tomllib.load(handle)["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])


@contextlib.contextmanager
def staged_context(root: Path | None = None) -> Iterator[Path]:
    """Yield a build context holding only what the Containerfiles copy (no .venv, caches or state).

    Every modification time is set to one constant: podman's COPY cache key covers them, and a fresh
    folder's times would otherwise rebuild the layers on every run although no file changed.
    """
    root = root or project_root()
    with tempfile.TemporaryDirectory(prefix="pilotfleet-context-") as scratch:
        context = Path(scratch)
        for relative in CONTEXT_FILES:
            (context / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / relative, context / relative)
        for package in _wheel_packages(root):
            shutil.copytree(
                root / package, context / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        for path in [context, *context.rglob("*")]:
            os.utime(path, (CONTEXT_MTIME, CONTEXT_MTIME), follow_symlinks=False)
        yield context


def build_image(podman: Podman, image: ImageSpec, base: str, context: Path, version: str) -> BuiltImage:
    """Build one image from the staged `context` on top of `base`; return its reference and size."""
    ref = image.ref(version)
    args = [
        "build",
        "--layers",
        "--file",
        str(images_dir() / image.containerfile),
        "--build-arg",
        f"BASE={base}",
        "--build-arg",
        f"VERSION={version}",
        "--secret",
        f"id=ca-bundle,src={host_ca_bundle()}",
        "--tag",
        ref,
    ]
    for name, value in image.build_args:
        args += ["--build-arg", f"{name}={value}"]
    log_path = cache_dir() / "images" / "logs" / f"{image.name}{image.tag_suffix}.log"
    began = time.monotonic()
    log.info("building %s (log %s)", ref, log_path)
    podman.run_logged([*args, str(context)], log_path)
    built = BuiltImage(ref=ref, size_bytes=podman.image_size(ref), build_seconds=time.monotonic() - began)
    log.info("built %s: %.0f MB in %.1fs", ref, built.size_mb, built.build_seconds)
    return built


def build_images(
    images: Sequence[ImageSpec] = DEFAULT_IMAGES, podman: Podman | None = None, version: str | None = None
) -> list[BuiltImage]:
    """Build `images` (default: pilotfleet, pilotfleet-triton-cpu); return their references and sizes."""
    podman = podman or ensure_podman()
    version = version or project_version()
    base = build_base_image(podman)
    with staged_context() as context:
        return [build_image(podman, image, base, context, version) for image in images]


def save_images(dest: Path, refs: Sequence[str], podman: Podman | None = None) -> list[Path]:
    """Write each image to `dest/<name>-<tag>.tar` (`podman save`, docker-archive: `podman load` or
    `skopeo copy docker-archive:...` push it into an air-gapped registry); return the files."""
    podman = podman or Podman()
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for ref in refs:
        name, _, tag = ref.rsplit("/", 1)[-1].partition(":")
        path = dest / f"{name}-{tag or 'latest'}.tar"
        path.unlink(missing_ok=True)
        podman.run_logged(["save", "--output", str(path), ref], cache_dir() / "images" / "logs" / "save.log")
        log.info("saved %s to %s (%.0f MB)", ref, path, path.stat().st_size / 1e6)
        written.append(path)
    return written


class Containers:
    """Containers and networks started for one test or demo; `remove_all()` removes every one of them.

    Names carry a random suffix, so several runs share one machine; ports are published on 127.0.0.1 only.
    """

    def __init__(self, podman: Podman, prefix: str = "pilotfleet") -> None:
        """Track what is started through `podman` under names beginning with `prefix`."""
        self.podman = podman
        self.prefix = f"{prefix}-{uuid.uuid4().hex[:8]}"
        self.containers: list[str] = []
        self.networks: list[str] = []

    def network(self, name: str = "net") -> str:
        """Create a podman network (containers on it resolve each other's names) and return its name."""
        full = f"{self.prefix}-{name}"
        self.podman.run("network", "create", full)
        self.networks.append(full)
        return full

    def start(self, name: str, image: str, args: Sequence[str] = (), options: Sequence[str] = ()) -> str:
        """Start a detached container (`podman run -d OPTIONS IMAGE ARGS`) and return its full name."""
        full = f"{self.prefix}-{name}"
        self.containers.append(full)
        self.podman.run("run", "--detach", "--name", full, *options, image, *args)
        return full

    def run(
        self,
        name: str,
        image: str,
        args: Sequence[str] = (),
        options: Sequence[str] = (),
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a container to its end; return its exit status and output (`remove_all()` removes it)."""
        full = self.start(name, image, args, options)
        status = self.wait(full, timeout)
        logs = self.logs(full)
        return subprocess.CompletedProcess([full], status, stdout=logs, stderr="")

    def host_port(self, container: str, port: int) -> int:
        """The 127.0.0.1 port published for the container's TCP `port`."""
        mapping = self.podman.run("port", container, f"{port}/tcp").strip().splitlines()
        if not mapping:
            raise ImageError(f"container {container} publishes no port for {port}/tcp")
        return int(mapping[0].rsplit(":", 1)[1])

    def logs(self, container: str) -> str:
        """The container's output so far (stdout and stderr)."""
        done = subprocess.run(
            self.podman.argv("logs", container),
            env=self.podman.env(),
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout + done.stderr

    def running(self, container: str) -> bool:
        """Return True while the container runs."""
        state = self.podman.run("inspect", "--format", "{{.State.Running}}", container, check=False)
        return state.strip() == "true"

    def wait(self, container: str, timeout: float) -> int:
        """Wait until the container exits and return its exit status; raise ImageError after `timeout`."""
        try:
            return int(self.podman.run("wait", container, timeout=timeout).strip())
        except ImageError as exc:
            raise ImageError(f"{exc}\nlogs of {container}:\n{self.logs(container)[-3000:]}") from exc

    def stop(self, container: str, timeout_s: int = 20) -> int:
        """Stop the container (SIGTERM, SIGKILL after `timeout_s`) and return its exit status."""
        self.podman.run("stop", "--time", str(timeout_s), container, timeout=timeout_s + 30.0)
        return self.wait(container, 30.0)

    def remove_all(self) -> None:
        """Remove every container and network started here, whatever state they are in."""
        for container in reversed(self.containers):
            self.podman.run("rm", "--force", "--time", "5", container, timeout=60.0, check=False)
        for network in reversed(self.networks):
            self.podman.run("network", "rm", "--force", network, timeout=60.0, check=False)
        self.containers.clear()
        self.networks.clear()
