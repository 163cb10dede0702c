"""pilotfleet's container images, built with podman and run the way a cluster runs them.

The proxy container answers completions through the Triton container on a podman network, with the model
repository, weights and route table mounted as the operator and the chart mount them; the operator
container reconciles against the testbed's API server; `pilotfleet fetch` in the container writes into a
mounted volume.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pilotfleet_fetch.repository import write_tokenizer_model
from pilotfleet_fetch.testkit import WeightsServer, make_archive, make_ft_checkpoint, sha256_of
from pilotfleet_operator import builders, crd, naming
from pilotfleet_operator.apply import CRDS, JOBS, MODELS, PVCS, Kube
from pilotfleet_operator.models import CodeCompletionModel
from pilotfleet_operator.settings import Settings
from pilotfleet_proxy.routes import ModelRoute, RouteTable
from pilotfleet_proxy.tokenizer import Tokenizer
from pilotfleet_testbed import images
from pilotfleet_testbed.kube import Cluster
from pilotfleet_testbed.paths import project_root
from pilotfleet_testbed.polling import wait_for
from pilotfleet_testbed.pytest_proxy import echo_completion
from pilotfleet_testbed.tokenizers import END_OF_TEXT_ID
from pilotfleet_testbed.triton import build_model_repository

pytestmark = pytest.mark.testbed

MAX_PILOTFLEET_IMAGE_BYTES = 400 * 1000 * 1000
# The uid:gid both images run as (Containerfile USER).
IMAGE_USER = (10001, 10001)
PROXY_PORT = 8080
ROUTES_MOUNT = "/etc/pilotfleet"


@pytest.fixture(scope="session")
def podman() -> images.Podman:
    """podman as it runs here, installed from apt when missing."""
    return images.ensure_podman()


@pytest.fixture(scope="session")
def built_images(podman: images.Podman) -> dict[str, images.BuiltImage]:
    """Both images, built (or found in podman's layer cache), by name."""
    built = images.build_images(images.DEFAULT_IMAGES, podman)
    return {spec.name: image for spec, image in zip(images.DEFAULT_IMAGES, built, strict=True)}


@pytest.fixture
def containers(podman: images.Podman) -> Iterator[images.Containers]:
    """Containers and networks of one test, all removed afterwards."""
    started = images.Containers(podman, prefix="pilotfleet-test")
    try:
        yield started
    finally:
        started.remove_all()


def _wait(condition: Callable[[], Any], what: str, timeout: float, logs: Callable[[], str]) -> Any:
    """Poll until `condition` returns something truthy; fail with `logs()` when time runs out."""
    try:
        return wait_for(condition, what, timeout)
    except TimeoutError as exc:
        pytest.fail(f"{exc}; logs:\n{logs()[-4000:]}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _example(name: str, namespace: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((project_root() / "examples" / name).read_text())
    body["metadata"].update(namespace=namespace, uid="00000000-0000-0000-0000-000000000001")
    return body


def test_pilotfleet_image_is_small_pinned_non_root_and_runs_read_only(
    podman: images.Podman, built_images: dict[str, images.BuiltImage], containers: images.Containers
) -> None:
    image = built_images["pilotfleet"]
    version = images.project_version()
    assert image.ref == f"localhost/pilotfleet:{version}"
    assert image.size_bytes < MAX_PILOTFLEET_IMAGE_BYTES, f"{image.ref} is {image.size_mb:.0f} MB"
    labels = podman.image_labels(image.ref)
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.title"] == "pilotfleet"

    # The operator, the proxy and the fetch job are all in the one command, runnable as a non-root user
    # on a read-only root filesystem.
    done = containers.run("help", image.ref, ["--help"], ["--read-only"])
    assert done.returncode == 0, done.stdout
    choices = re.search(r"\{([\w,-]+)\}", done.stdout)
    assert choices, done.stdout
    missing = {"operator", "proxy", "fetch"} - set(choices.group(1).split(","))
    assert not missing, f"`pilotfleet` lacks subcommands {sorted(missing)}:\n{done.stdout}"

    probe = (
        "import os, importlib.util, shutil; "
        "print(os.getuid(), os.getgid()); "
        "print(*[t for t in ('gcc', 'cc', 'c++', 'g++', 'clang', 'make', 'ld', 'as') if shutil.which(t)]); "
        "print(importlib.util.find_spec('pip') is not None)"
    )
    done = containers.run("probe", image.ref, ["-c", probe], ["--read-only", "--entrypoint", "python"])
    assert done.returncode == 0, done.stdout
    uid_gid, compilers, has_pip = done.stdout.splitlines()
    assert tuple(int(n) for n in uid_gid.split()) == IMAGE_USER
    assert compilers == "", f"compilers in the final image: {compilers}"
    assert has_pip == "False"


def _weights_volume(model: CodeCompletionModel, tokenizer_json: Path, dest: Path) -> Path:
    """The weights volume as the fetch job leaves it: a model repository in the model's weights folder.

    It holds the echo models (FT's tensor interface) and the tokenizer model that `pilotfleet fetch`
    writes, serving the tokenizer.json stored beside them.
    """
    repository = dest / Path(builders.weights_dir(model)).relative_to(builders.WEIGHTS_MOUNT)
    build_model_repository(repository)
    (repository / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    write_tokenizer_model(
        repository, builders.TOKENIZER_MODEL, Path(builders.weights_dir(model)) / "tokenizer.json"
    )
    # The image's user reads the volume, as the pod's fsGroup would allow.
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


def test_proxy_container_answers_through_triton_container(
    built_images: dict[str, images.BuiltImage],
    containers: images.Containers,
    gpt2_tokenizer: Path,
    gpt2: Tokenizer,
    tmp_path: Path,
) -> None:
    settings = Settings()
    model = CodeCompletionModel.from_body(_example("codegen-350m-mono.yaml", "team-a"))
    network = containers.network()
    weights = _weights_volume(model, gpt2_tokenizer, tmp_path / "weights")

    # Triton runs the operator's command line, with the weights volume where the pod mounts it.
    pod = builders.deployment_for_model(model, settings)["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in pod["volumeMounts"]}
    triton = containers.start(
        "triton",
        built_images["pilotfleet-triton-cpu"].ref,
        [*pod["command"], *pod["args"]],
        [
            "--network",
            network,
            "--read-only",
            "--volume",
            f"{weights}:{mounts['weights']}:ro",
            "--publish",
            f"127.0.0.1::{builders.HTTP_PORT}",
        ],
    )
    triton_http = containers.host_port(triton, builders.HTTP_PORT)
    _wait(
        lambda: _http_ok(f"http://127.0.0.1:{triton_http}/v2/health/ready"),
        "the Triton container to be ready",
        90,
        lambda: containers.logs(triton),
    )

    routes_dir = tmp_path / "routes"
    routes_dir.mkdir()
    route = ModelRoute(
        name="echo",
        aliases=("copilot-codex",),
        triton_model="ft-echo",
        streaming_model="ft-echo-stream",
        endpoints=(f"{triton}:{builders.GRPC_PORT}",),
        tokenizer=f"triton://{builders.TOKENIZER_MODEL}",
        default_max_tokens=16,
        end_id=END_OF_TEXT_ID,
    )
    (routes_dir / "routes.yaml").write_text(RouteTable(models=(route,)).to_yaml())
    routes_dir.chmod(0o755)
    (routes_dir / "routes.yaml").chmod(0o644)
    proxy = containers.start(
        "proxy",
        built_images["pilotfleet"].ref,
        ["proxy", "--routes", f"{ROUTES_MOUNT}/routes.yaml", "--port", str(PROXY_PORT)],
        [
            "--network",
            network,
            "--read-only",
            "--volume",
            f"{routes_dir}:{ROUTES_MOUNT}:ro",
            "--publish",
            f"127.0.0.1::{PROXY_PORT}",
        ],
    )
    base_url = f"http://127.0.0.1:{containers.host_port(proxy, PROXY_PORT)}"
    _wait(lambda: _http_ok(f"{base_url}/readyz"), "the proxy to be ready", 60, lambda: containers.logs(proxy))

    prompt = "def add(a, b):\n    return"
    expected = echo_completion(gpt2, gpt2.encode(prompt), 8)
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        unary = client.post("/v1/completions", json={"model": "echo", "prompt": prompt, "max_tokens": 8})
        assert unary.status_code == 200, unary.text
        assert unary.json()["choices"][0]["text"] == expected

        # A Copilot client streams from the engine URL.
        body = {"prompt": prompt, "max_tokens": 8, "stream": True, "n": 1}
        with client.stream("POST", "/v1/engines/copilot-codex/completions", json=body) as stream:
            assert stream.status_code == 200
            events = [line[len("data: ") :] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(c["text"] for e in events[:-1] for c in json.loads(e)["choices"])
    assert streamed == expected


def _install_crd(kube: Kube) -> None:
    kube.apply(crd.crd())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        obj = kube.get(CRDS, None, naming.CRD_NAME) or {}
        conditions = (obj.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return
        time.sleep(0.2)
    pytest.fail("the CodeCompletionModel CRD was not Established in 30s")


def test_operator_container_reconciles_against_the_api_server(
    built_images: dict[str, images.BuiltImage],
    containers: images.Containers,
    kube_cluster: Cluster,
    k8s_api: Any,
    k8s_namespace: str,
    tmp_path: Path,
) -> None:
    kube = Kube(k8s_api)
    _install_crd(kube)
    # The kubeconfig as a mounted Secret would give it: a read-only file the container's user can read.
    config_dir = tmp_path / "kubeconfig"
    config_dir.mkdir(mode=0o755)
    (config_dir / "config").write_bytes(kube_cluster.kubeconfig.read_bytes())
    (config_dir / "config").chmod(0o644)
    operator = containers.start(
        "operator",
        built_images["pilotfleet"].ref,
        ["operator"],
        [
            "--network",
            "host",
            "--read-only",
            "--volume",
            f"{config_dir}:/etc/pilotfleet/kubeconfig:ro",
            "--env",
            "KUBECONFIG=/etc/pilotfleet/kubeconfig/config",
            "--env",
            f"PILOTFLEET_OPERATOR_NAMESPACE={k8s_namespace}",
            "--env",
            f"PILOTFLEET_OPERATOR_WATCH_NAMESPACES={json.dumps([k8s_namespace])}",
        ],
    )
    body = _example("codegen-350m-mono.yaml", k8s_namespace)
    del body["metadata"]["uid"]
    kube.request("POST", MODELS.path(k8s_namespace), body=body)
    name = body["metadata"]["name"]

    def reconciled() -> bool:
        model = kube.get(MODELS, k8s_namespace, name) or {}
        status = model.get("status") or {}
        return bool(
            status.get("conditions")
            and kube.get(PVCS, k8s_namespace, naming.pvc_name(name))
            and kube.list(JOBS, k8s_namespace)
        )

    def logs() -> str:
        return containers.logs(operator)

    _wait(reconciled, "the operator container to create the weights PVC, Job and status", 90, logs)
    job = kube.list(JOBS, k8s_namespace)[0]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["pilotfleet"]

    # Deleting the model needs the operator's finalizer handled: the container does it.
    kube.delete(MODELS, k8s_namespace, name)
    _wait(lambda: kube.get(MODELS, k8s_namespace, name) is None, "the model to be deleted", 60, logs)
    assert containers.running(operator), logs()
    assert containers.stop(operator) == 0, logs()


def test_fetch_in_container_writes_into_a_mounted_volume(
    built_images: dict[str, images.BuiltImage], containers: images.Containers, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    make_ft_checkpoint(source / "fastertransformer" / "1", tp=1)
    archive = make_archive(source, tmp_path / "codegen.tar.zst", "codegen-1gpu")
    volume = tmp_path / "volume"
    volume.mkdir()
    # The pod's fsGroup makes the volume writable for the image's user; here it owns it.
    volume.chmod(0o770)
    os.chown(volume, *IMAGE_USER)
    with WeightsServer() as server:
        url = server.publish("codegen.tar.zst", archive)
        done = containers.run(
            "fetch",
            built_images["pilotfleet"].ref,
            ["fetch", "--source", url, "--sha256", sha256_of(archive), "--dest", "/models/codegen"],
            ["--network", "host", "--read-only", "--volume", f"{volume}:/models"],
        )
    assert done.returncode == 0, done.stdout
    published = volume / "codegen"
    manifest = json.loads((published / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_of(archive)
    assert (published / "fastertransformer" / "config.pbtxt").is_file()
    assert (published / "fastertransformer" / "1" / "1-gpu" / "config.ini").is_file()
    assert (published.stat().st_uid, published.stat().st_gid) == IMAGE_USER
