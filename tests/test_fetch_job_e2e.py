"""The operator's weights fetch, end to end on the testbed: a real `pilotfleet fetch` in the operator's Job.

The operator (kopf, in-process) runs against the real API server; its fetch Job's pod is placed by the
real scheduler on the local Job runner's node (`pilotfleet_testbed.job_runner`), which runs the Job's
exact command line as a process, with the pod's env, its ServiceAccount token and its PVC (a hostPath
PersistentVolume here). The weights come from a real HTTP server on 127.0.0.1
(`pilotfleet_fetch.testkit`), throttled so that progress can be watched while it downloads. The Triton
pods themselves run on KWOK's simulated GPU nodes, as in test_operator_live.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_operator_live as live
from pilotfleet_fetch.testkit import WeightsServer, make_archive, make_ft_checkpoint, sha256_of
from pilotfleet_operator import builders, naming
from pilotfleet_operator.apply import CONFIGMAPS, DEPLOYMENTS, JOBS, MODELS, PODS, Kube, Resource
from pilotfleet_operator.models import CodeCompletionModel
from pilotfleet_proxy.routes import RouteTable
from pilotfleet_testbed.job_runner import JobRunner
from pilotfleet_testbed.k8s_tools import ensure_k8s_tools
from pilotfleet_testbed.kube import Cluster

# The fixtures the live operator tests define, shared rather than repeated.
from test_operator_live import ccm_crd, kube  # noqa: F401

pytestmark = pytest.mark.testbed

PVS = Resource("v1", "persistentvolumes", namespaced=False)
EVENTS = Resource("v1", "events")
SUBJECT_ACCESS_REVIEWS = Resource("authorization.k8s.io/v1", "subjectaccessreviews", namespaced=False)
MiB = 1 << 20
# Slow enough to see several progress reports (every 2 s) of the ~13 MiB archive.
RATE = 2 * MiB


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FauxPilot-style FT archive (`<name>/fastertransformer/1/1-gpu/`) of about 13 MiB."""
    root = tmp_path_factory.mktemp("weights")
    make_ft_checkpoint(
        root / "src" / "fastertransformer" / "1", tp=1, layers=4, hidden=256, inter=1024, vocab=1024
    )
    return make_archive(root / "src", root / "codegen-e2e-1gpu.tar.zst", "codegen-e2e-1gpu")


@pytest.fixture
def server(archive: Path, gpt2_tokenizer: Path) -> Iterator[WeightsServer]:
    """The weights host, serving the archive and a GPT-2 tokenizer.json."""
    with WeightsServer() as srv:
        srv.publish(archive.name, archive)
        srv.publish("tokenizer.json", gpt2_tokenizer)
        yield srv


class FetchOperator(live.OperatorUnderTest):
    """The operator under test, whose waits also fail at once if the job runner died."""

    def __init__(self, namespace: str, runner: JobRunner, kube: Kube) -> None:  # noqa: F811
        super().__init__(namespace)
        self.namespace = namespace
        self.job_runner = runner
        self.kube = kube

    def describe(self) -> str:
        """The namespace's Jobs, their Events and the runner's pods: what a timeout needs explained."""
        jobs = [
            f"job {j['metadata']['name']}: {j.get('status')}" for j in self.kube.list(JOBS, self.namespace)
        ]
        events = [
            f"event {e['involvedObject'].get('name')}: {e['reason']} {e['message']}"
            for e in self.kube.list(EVENTS, self.namespace)
        ]
        return "\n".join([*jobs, *events[-15:], self.job_runner.describe()])

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
        """Like OperatorUnderTest.wait_for, checking the job runner too; a timeout shows the fetch pods."""

        def check() -> Any:
            self.job_runner.check_alive()
            return condition()

        try:
            return super().wait_for(check, what, timeout)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from exc


@pytest.fixture
def operator(
    kube_cluster: Cluster,
    job_runner: JobRunner,
    k8s_namespace: str,
    kube: Kube,  # noqa: F811
    ccm_crd: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[FetchOperator]:
    """The operator, its fetch Jobs placed on the job runner by the fetch node settings."""
    live.set_operator_env(monkeypatch, kube_cluster, k8s_namespace)
    monkeypatch.setenv("PILOTFLEET_OPERATOR_FETCH_NODE_SELECTOR", json.dumps(job_runner.node_selector))
    monkeypatch.setenv("PILOTFLEET_OPERATOR_FETCH_TOLERATIONS", json.dumps(job_runner.tolerations))
    with live.operating(FetchOperator(k8s_namespace, job_runner, kube), kube, k8s_namespace) as handle:
        yield handle


@pytest.fixture
def volume(kube: Kube, k8s_namespace: str, tmp_path: Path) -> Iterator[Callable[[str], Path]]:  # noqa: F811
    """A hostPath PersistentVolume pre-bound to a model's weights claim; returns its local folder."""
    created: list[str] = []

    def provide(model: str) -> Path:
        path = tmp_path / "pv" / model
        path.mkdir(parents=True)
        created.append(live.create_pre_bound_volume(kube, k8s_namespace, model, ["ReadWriteOnce"], str(path)))
        return path

    yield provide
    for name in created:
        kube.delete(PVS, None, name)


def model_body(name: str, server: WeightsServer, archive: Path, sha256: str) -> dict[str, Any]:
    """The codegen-350m-mono example, its weights and tokenizer served by the local server."""
    body = live.example("codegen-350m-mono.yaml")
    body["metadata"] = {"name": name}
    body["spec"]["engine"] = name
    body["spec"]["aliases"] = []
    body["spec"]["weights"] = {
        "url": server.url(archive.name),
        "sha256": sha256,
        "tokenizer": server.url("tokenizer.json"),
    }
    return body


def kubectl_get_ccm(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    """`kubectl get ccm NAME` as a user sees it: {column header: value}."""
    kubectl = ensure_k8s_tools().kubectl
    proc = subprocess.run(
        [str(kubectl), "--kubeconfig", str(cluster.kubeconfig), "get", "ccm", name, "-n", namespace],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    header, row = proc.stdout.splitlines()
    return dict(zip(header.split(), row.split(), strict=True))


def allowed(kube: Kube, namespace: str, user: str, verb: str, name: str, subresource: str = "") -> bool:  # noqa: F811
    """Whether `user` may `verb` the CodeCompletionModel `name` (a SubjectAccessReview, as the admin)."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ],
            "resourceAttributes": {
                "namespace": namespace,
                "verb": verb,
                "group": naming.GROUP,
                "resource": naming.PLURAL,
                "subresource": subresource,
                "name": name,
            },
        },
    }
    answer = kube.request("POST", SUBJECT_ACCESS_REVIEWS.path(), body=review)
    return bool(answer["status"].get("allowed"))


def test_fetch_job_downloads_reports_progress_and_the_model_becomes_ready(
    kube_cluster: Cluster,
    kube: Kube,  # noqa: F811
    k8s_namespace: str,
    job_runner: JobRunner,
    operator: FetchOperator,
    server: WeightsServer,
    archive: Path,
    gpt2_tokenizer: Path,
    volume: Callable[[str], Path],
) -> None:
    name = "codegen-e2e"
    local = volume(name)
    server.faults.rate = RATE
    started = time.monotonic()
    live.create_model(kube, k8s_namespace, model_body(name, server, archive, sha256_of(archive)))

    # While the Job downloads, its progress is in the model's status, patched by the Job's own identity.
    def downloading() -> dict[str, Any] | None:
        fetch = ((kube.get(MODELS, k8s_namespace, name) or {}).get("status") or {}).get("fetch") or {}
        done, total = fetch.get("bytesDone") or 0, fetch.get("bytesTotal")
        return fetch if total and 0 < done < total else None

    seen = operator.wait_for(downloading, "download progress in status.fetch", timeout=60)
    # The archive, then the tokenizer.json (counted once its download starts).
    everything = archive.stat().st_size + gpt2_tokenizer.stat().st_size
    assert seen["bytesTotal"] in (archive.stat().st_size, everything)
    assert seen["bytesPerSecond"] > 0 and seen["etaSeconds"] > 0
    assert seen["progress"].endswith("%") and 0 <= int(seen["progress"][:-1]) < 100
    # `kubectl get ccm` shows it (the Fetched printer column): a percentage while running.
    assert kubectl_get_ccm(kube_cluster, k8s_namespace, name)["FETCHED"].endswith("%")
    model = kube.get(MODELS, k8s_namespace, name) or {}
    assert model["status"]["phase"] == "Fetching"
    assert live.condition(model, "WeightsReady")["reason"] == "Fetching"

    def ready() -> dict[str, Any] | None:
        obj = kube.get(MODELS, k8s_namespace, name) or {}
        return obj if live.condition(obj, "Ready").get("status") == "True" else None

    model = operator.wait_for(ready, "the model to be Ready", timeout=90)
    elapsed = time.monotonic() - started
    assert elapsed > everything / RATE * 0.8, "the download was not throttled: progress not real"
    weights = live.condition(model, "WeightsReady")
    assert (weights["status"], weights["reason"]) == ("True", "Fetched")
    fetch = model["status"]["fetch"]
    assert fetch["bytesDone"] == fetch["bytesTotal"] == everything
    assert fetch["progress"] == "100%"
    columns = kubectl_get_ccm(kube_cluster, k8s_namespace, name)
    assert (columns["PHASE"], columns["READY"], columns["FETCHED"]) == ("Ready", "1/1", "100%")

    # The Job's pod really ran here, as the Job's own ServiceAccount, and the bytes came from the server.
    digest = builders.weights_hash(CodeCompletionModel.from_body(model))
    job = kube.get(JOBS, k8s_namespace, naming.fetch_job_name(name, digest)) or {}
    assert job["status"].get("succeeded") == 1
    pods = kube.list(PODS, k8s_namespace, f"batch.kubernetes.io/job-name={job['metadata']['name']}")
    assert [p["spec"]["nodeName"] for p in pods] == [job_runner.node_name]
    assert pods[0]["spec"]["serviceAccountName"] == naming.fetch_service_account_name(name)
    assert pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    # Every byte once, plus the one byte of the fetch job's Range probe.
    assert server.sent(archive.name) == archive.stat().st_size + 1
    log_text = job_runner.pod_log(k8s_namespace, pods[0]["metadata"]["name"]).read_text()
    assert "could not patch" not in log_text, log_text

    # The published folder is the Triton repository the Deployment serves: config from config.ini and the
    # spec, written by the fetch job alone; the tokenizer model beside it.
    published = local / digest
    config = (published / "fastertransformer" / "config.pbtxt").read_text()
    assert 'key: "tensor_para_size" value: { string_value: "1" }' in config
    assert 'key: "max_seq_len" value: { string_value: "2048" }' in config
    assert 'key: "decoder_layers" value: { string_value: "4" }' in config
    # The job saw the volume at /weights; the runner maps that path to the PV's folder.
    checkpoint = published / "fastertransformer" / "1" / "1-gpu"
    assert f'key: "model_checkpoint_path" value: {{ string_value: "{checkpoint}" }}' in config
    assert (checkpoint / "config.ini").is_file()
    tokenizer_config = (published / builders.TOKENIZER_MODEL / "config.pbtxt").read_text()
    assert f"{published}/fastertransformer/1/tokenizer/tokenizer.json" in tokenizer_config
    assert (published / "fastertransformer" / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((published / "manifest.json").read_text())["sha256"] == sha256_of(archive)
    deployment = kube.get(DEPLOYMENTS, k8s_namespace, naming.triton_name(name)) or {}
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--model-repository=/weights/{digest}" in args

    # Least privilege: the Job's identity may patch its own model's status and nothing else.
    user = f"system:serviceaccount:{k8s_namespace}:{naming.fetch_service_account_name(name)}"
    assert allowed(kube, k8s_namespace, user, "patch", name, "status")
    assert not allowed(kube, k8s_namespace, user, "patch", "another-model", "status")
    assert not allowed(kube, k8s_namespace, user, "get", name)
    assert not allowed(kube, k8s_namespace, user, "patch", name)


def test_wrong_checksum_fails_with_reason_and_warning_and_publishes_nothing(
    kube: Kube,  # noqa: F811
    k8s_namespace: str,
    job_runner: JobRunner,
    operator: FetchOperator,
    server: WeightsServer,
    archive: Path,
    volume: Callable[[str], Path],
) -> None:
    name = "codegen-badsum"
    local = volume(name)
    live.create_model(kube, k8s_namespace, model_body(name, server, archive, "0" * 64))

    def failed() -> dict[str, Any] | None:
        obj = kube.get(MODELS, k8s_namespace, name) or {}
        return obj if live.condition(obj, "WeightsReady").get("reason") == "ChecksumMismatch" else None

    model = operator.wait_for(failed, "WeightsReady=False/ChecksumMismatch", timeout=90)
    weights = live.condition(model, "WeightsReady")
    assert weights["status"] == "False"
    assert sha256_of(archive) in weights["message"] and "0" * 64 in weights["message"]
    assert model["status"]["phase"] == "Failed"
    ready = live.condition(model, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ChecksumMismatch")
    events = live.wait_for(
        lambda: [
            e
            for e in kube.list(EVENTS, k8s_namespace)
            if e["involvedObject"].get("name") == name and e["reason"] == "ChecksumMismatch"
        ],
        "the ChecksumMismatch Event",
        timeout=30,
    )
    assert events[0]["type"] == "Warning"
    # Permanent: one attempt, no retries (podFailurePolicy FailJob on the fetch job's exit code 12).
    jobs = kube.list(JOBS, k8s_namespace, naming.children_selector(name))
    assert len(jobs) == 1 and jobs[0]["status"].get("failed") == 1
    # Nothing published: no repository folder, no staging left, no Triton, no endpoint in the routes.
    assert list(local.iterdir()) == []
    assert kube.get(DEPLOYMENTS, k8s_namespace, naming.triton_name(name)) is None
    routes = kube.get(CONFIGMAPS, k8s_namespace, naming.ROUTES_CONFIGMAP) or {}
    route = RouteTable.from_yaml(routes["data"][naming.ROUTES_KEY]).lookup(name)
    assert route is not None and route.endpoints == ()
    # And it stays that way: the next reconciles keep the model failed, not Ready.
    time.sleep(2)
    again = kube.get(MODELS, k8s_namespace, name) or {}
    assert live.condition(again, "Ready")["status"] == "False"
    assert live.condition(again, "WeightsReady")["reason"] == "ChecksumMismatch"
