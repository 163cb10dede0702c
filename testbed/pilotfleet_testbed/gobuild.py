"""Build the testbed's Go binaries (Kubernetes control plane, etcd, KWOK) from the Go module proxy.

Each build happens in a generated wrapper module under `cache_dir()/src/<name>-<version>/` and lands in
`cache_dir()/bin/<name>-<version>/`. The bin folder is filled under a temporary name and renamed into
place after a stamp file is written, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pilotfleet_serve.cache import cache_dir, cache_lock

from pilotfleet_testbed import versions

log = logging.getLogger(__name__)

STAMP = ".complete"
# Same as the `go` line of k8s.io/kubernetes' own go.mod, so the compile cache is shared with any
# wrapper module built by hand with the same flags.
WRAPPER_GO_VERSION = "1.26.0"


class BuildError(RuntimeError):
    """A Go build failed; the message holds the command and the end of its output."""


@dataclass(frozen=True)
class GoBuild:
    """What to build: a module at a version, the main packages in it, and how to stamp them."""

    name: str
    version: str
    module: str
    module_version: str
    packages: tuple[str, ...]
    ldflags: tuple[str, ...] = ()
    # Modules whose go.mod points `k8s.io/*` at ./staging need one `replace` per staging module.
    replace_staging: bool = False
    binaries: tuple[str, ...] = field(default=())

    @property
    def bin_dir(self) -> Path:
        """The folder that holds the finished binaries."""
        return cache_dir() / "bin" / f"{self.name}-{self.version}"

    @property
    def src_dir(self) -> Path:
        """The generated wrapper module."""
        return cache_dir() / "src" / f"{self.name}-{self.version}"

    def done(self) -> bool:
        """Return True when a finished, stamped build is in the cache."""
        return (self.bin_dir / STAMP).is_file()


def kubernetes_build(version: str = versions.KUBERNETES) -> GoBuild:
    """Describe the build of kube-apiserver, kube-controller-manager and kube-scheduler."""
    major, minor, _ = version.split(".")
    stamp = "k8s.io/component-base/version"
    return GoBuild(
        name="kubernetes",
        version=version,
        module="k8s.io/kubernetes",
        module_version=f"v{version}",
        packages=tuple(
            f"k8s.io/kubernetes/cmd/{cmd}"
            for cmd in ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
        ),
        # Without these the servers report v0.0.0 and Helm's kubeVersion checks fail.
        ldflags=(
            f"-X {stamp}.gitVersion=v{version}",
            f"-X {stamp}.gitMajor={major}",
            f"-X {stamp}.gitMinor={minor}",
        ),
        replace_staging=True,
        binaries=("kube-apiserver", "kube-controller-manager", "kube-scheduler"),
    )


def etcd_build(version: str = versions.ETCD) -> GoBuild:
    """Describe the build of etcd (its version is a constant in its api module, no stamping needed)."""
    return GoBuild(
        name="etcd",
        version=version,
        module="go.etcd.io/etcd/server/v3",
        module_version=f"v{version}",
        packages=("go.etcd.io/etcd/server/v3",),
        binaries=("etcd",),
    )


def kwok_build(version: str = versions.KWOK) -> GoBuild:
    """Describe the build of the `kwok` controller (kwokctl is not needed; its version is in its source)."""
    return GoBuild(
        name="kwok",
        version=version,
        module="sigs.k8s.io/kwok",
        module_version=f"v{version}",
        packages=("sigs.k8s.io/kwok/cmd/kwok",),
        binaries=("kwok",),
    )


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # Never fetch another toolchain behind the caller's back, nor ask a VCS (only the proxy is reachable).
    env.setdefault("GOTOOLCHAIN", "local")
    env.setdefault("GOFLAGS", "-buildvcs=false")
    env["GO111MODULE"] = "on"
    return env


def _go(args: Sequence[str], cwd: Path) -> str:
    """Run `go <args>` in `cwd`; return stdout, raise BuildError with the output tail on failure."""
    go = shutil.which("go")
    if go is None:
        raise BuildError("the `go` toolchain is not on PATH; install Go >= 1.26 to build the testbed")
    proc = subprocess.run([go, *args], cwd=cwd, env=_go_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise BuildError(f"`go {' '.join(args)}` failed in {cwd} (status {proc.returncode}):\n{tail}")
    return proc.stdout


def _staging_replaces(build: GoBuild, src: Path) -> list[str]:
    """Return `module=module@version` replacements for every module the main go.mod maps to ./staging."""
    info = json.loads(_go(["mod", "download", "-json", f"{build.module}@{build.module_version}"], src))
    gomod = Path(info["GoMod"]).read_text()
    staging = sorted(set(re.findall(r"^\s*(?:replace\s+)?(\S+)\s*=>\s*\./staging/", gomod, re.MULTILINE)))
    if not staging:
        raise BuildError(f"{build.module}@{build.module_version}: no ./staging replacements in its go.mod")
    # Staging modules are published as v0.<minor>.<patch> for Kubernetes v1.<minor>.<patch>.
    staged_version = "v0." + build.version.split(".", 1)[1]
    return [f"{mod}={mod}@{staged_version}" for mod in staging]


def _write_wrapper(build: GoBuild) -> Path:
    """Generate the wrapper module that requires `build.module` and imports its main packages."""
    src = build.src_dir
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    (src / "go.mod").write_text(f"module pilotfleet.dev/build/{build.name}\n\ngo {WRAPPER_GO_VERSION}\n")
    imports = "\n".join(f'\t_ "{pkg}"' for pkg in build.packages)
    # The build tag keeps this file out of every build; `go mod tidy` still sees its imports.
    (src / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n")
    edits = [f"-require={build.module}@{build.module_version}"]
    if build.replace_staging:
        edits += [f"-replace={r}" for r in _staging_replaces(build, src)]
    _go(["mod", "edit", *edits], src)
    _go(["mod", "tidy"], src)
    return src


def ensure(build: GoBuild) -> Path:
    """Return the bin folder of `build`, building it first if no finished build is cached."""
    if build.done():
        return build.bin_dir
    # Serializes builds of the same binary across processes (two pytest runs started at once).
    with cache_lock(f"{build.name}-{build.version}"):
        if build.done():
            return build.bin_dir
        log.warning(
            "building %s %s from the Go module proxy (%s); this takes minutes once, then it is cached in %s",
            build.name,
            build.version,
            " ".join(build.packages),
            build.bin_dir,
        )
        started = time.monotonic()
        src = _write_wrapper(build)
        partial = build.bin_dir.with_name(build.bin_dir.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        ldflags = " ".join(("-s", "-w", *build.ldflags))
        _go(["build", "-trimpath", "-ldflags", ldflags, "-o", f"{partial}/", *build.packages], src)
        _rename_binaries(build, partial)
        (partial / STAMP).write_text(f"{build.module}@{build.module_version}\n")
        if build.bin_dir.exists():
            shutil.rmtree(build.bin_dir)
        partial.rename(build.bin_dir)
        log.warning(
            "built %s %s in %.0fs; cached in %s",
            build.name,
            build.version,
            time.monotonic() - started,
            build.bin_dir,
        )
    return build.bin_dir


def _rename_binaries(build: GoBuild, out: Path) -> None:
    """Give each binary its expected name (`go build` names etcd's `.../server/v3` package `server`)."""
    for pkg, binary in zip(build.packages, build.binaries, strict=True):
        parts = pkg.rstrip("/").split("/")
        # Like `go build`: a trailing major-version element does not name the executable.
        produced = out / (parts[-2] if re.fullmatch(r"v\d+", parts[-1]) else parts[-1])
        if produced.name != binary and produced.exists():
            produced.rename(out / binary)
        if not (out / binary).is_file():
            raise BuildError(f"building {pkg} produced no {binary} in {out}")


def ensure_kubernetes() -> Path:
    """Return the folder with kube-apiserver, kube-controller-manager and kube-scheduler (built if needed)."""
    return ensure(kubernetes_build())


def ensure_etcd() -> Path:
    """Return the folder with the etcd binary (built if needed)."""
    return ensure(etcd_build())


def ensure_kwok() -> Path:
    """Return the folder with the kwok binary (built if needed)."""
    return ensure(kwok_build())


@dataclass(frozen=True)
class KubeBinaries:
    """Paths of every binary the Kubernetes part of the testbed runs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kwok: Path


def ensure_all() -> KubeBinaries:
    """Build (once) and return every binary the Kubernetes part of the testbed runs, smallest first."""
    etcd = ensure_etcd()
    kwok = ensure_kwok()
    kube = ensure_kubernetes()
    return KubeBinaries(
        etcd=etcd / "etcd",
        kube_apiserver=kube / "kube-apiserver",
        kube_controller_manager=kube / "kube-controller-manager",
        kube_scheduler=kube / "kube-scheduler",
        kwok=kwok / "kwok",
    )
