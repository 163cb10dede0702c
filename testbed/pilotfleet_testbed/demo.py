"""`pilotfleet testbed demo`: bring the testbed up and show each of its real parts at work."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import yaml
from pilotfleet_serve import procs

from pilotfleet_testbed import chart, kube, operator_proc, paths, stack

log = logging.getLogger(__name__)

# Where the demo installs the chart, as a platform engineer would, and where its models live.
CHART_NAMESPACE = "pilotfleet-system"
CHART_RELEASE = "pilotfleet"
MODELS_NAMESPACE = "team-a"
EXAMPLES = ("codegen-350m-mono.yaml", "tiny-starcoder-python.yaml")
# The API the operator serves (pilotfleet_operator.naming; not imported: the testbed does not depend on it).
CRD_NAME = "codecompletionmodels.pilotfleet.dev"
ROUTES_CONFIGMAP = "pilotfleet-routes"

# Three one-GPU pods that need compute capability >= 7.0: the scheduler must keep them off P40/CPU nodes.
_GPU_DEPLOYMENT = textwrap.dedent(
    """\
    apiVersion: apps/v1
    kind: Deployment
    metadata: {name: gpu-demo, namespace: default}
    spec:
      replicas: 3
      selector: {matchLabels: {app: gpu-demo}}
      template:
        metadata: {labels: {app: gpu-demo}}
        spec:
          tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
          affinity:
            nodeAffinity:
              requiredDuringSchedulingIgnoredDuringExecution:
                nodeSelectorTerms:
                - matchExpressions:
                  - {key: nvidia.com/gpu.compute.major, operator: Gt, values: ["6"]}
          containers:
          - name: triton
            image: pilotfleet-triton-cpu:demo
            resources: {limits: {nvidia.com/gpu: 1}}
    """
)


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _kubectl(running: stack.Running, *args: str, stdin: str | None = None) -> str:
    env = dict(os.environ, KUBECONFIG=running.kubeconfig)
    proc = subprocess.run(
        [running.kubectl, *args], input=stdin, env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise procs.StartError(f"kubectl {' '.join(args)} failed:\n{proc.stderr.strip()}")
    return proc.stdout


def _show_gpu_placement(running: stack.Running) -> None:
    _banner("kubectl get nodes (simulated by KWOK, with GPU Feature Discovery labels)")
    print(
        _kubectl(
            running,
            "get",
            "nodes",
            "-L",
            "nvidia.com/gpu.product,nvidia.com/gpu.compute.major,nvidia.com/gpu.compute.minor,nvidia.com/gpu.count",
        )
    )
    _banner("a Deployment asking for 1 GPU of compute capability >= 7.0, 3 replicas")
    print(_kubectl(running, "apply", "-f", "-", stdin=_GPU_DEPLOYMENT).strip())
    _kubectl(running, "rollout", "status", "deployment/gpu-demo", "--timeout=60s")
    print(_kubectl(running, "get", "pods", "-l", "app=gpu-demo", "-o", "wide"))


def _show_triton(running: stack.Running) -> None:
    _banner(f"Triton on CPU at {running.triton_grpc}: an FT-shaped request to ft-echo")
    prompt = np.array([[464, 2068, 7586, 21831]], dtype=np.uint32)
    inputs = []
    for name, value in (
        ("input_ids", prompt),
        ("input_lengths", np.array([[prompt.shape[1]]], dtype=np.uint32)),
        ("request_output_len", np.array([[6]], dtype=np.uint32)),
    ):
        tensor = grpcclient.InferInput(name, list(value.shape), "UINT32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(running.triton_grpc)
    began = time.perf_counter()
    result = client.infer("ft-echo", inputs)
    elapsed_ms = (time.perf_counter() - began) * 1000
    output = result.as_numpy("output_ids")
    assert output is not None
    print(f"input_ids  {prompt[0].tolist()}")
    print(f"output_ids {output[0, 0].tolist()}   ({elapsed_ms:.1f} ms)")
    client.close()


def _operator_kubeconfig(running: stack.Running, dest: Path) -> Path:
    """Write a kubeconfig for the chart's operator ServiceAccount (a `kubectl create token` token)."""
    selector = f"app.kubernetes.io/instance={CHART_RELEASE},app.kubernetes.io/component=operator"
    account = _kubectl(
        running, "get", "serviceaccounts", "-n", CHART_NAMESPACE, "-l", selector, "-o", "name"
    ).strip()
    if not account.startswith("serviceaccount/") or "\n" in account:
        raise procs.StartError(f"expected one operator ServiceAccount in {CHART_NAMESPACE}, got {account!r}")
    name = account.removeprefix("serviceaccount/")
    token = _kubectl(running, "create", "token", name, "-n", CHART_NAMESPACE, "--duration=1h").strip()
    admin = yaml.safe_load(Path(running.kubeconfig).read_text())
    ca_pem = base64.b64decode(admin["clusters"][0]["cluster"]["certificate-authority-data"])
    dest.write_text(yaml.safe_dump(kube.kubeconfig_for(running.api_url, ca_pem, token)))
    dest.chmod(0o600)
    print(f"operator identity: system:serviceaccount:{CHART_NAMESPACE}:{name} (kubeconfig {dest})")
    return dest


def weights_volume(namespace: str, claim: str) -> dict[str, Any]:
    """A PersistentVolume pre-bound to a model's weights claim: the testbed has no storage provisioner
    (KWOK's pods never mount it; "Retain" because no deleter exists for it either)."""
    name = f"{namespace}-{claim}"[:63]
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "100Gi"},
            "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": f"/tmp/pilotfleet-pv/{name}"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }


def _install_chart(running: stack.Running, state: Path) -> None:
    _banner(f"helm install {CHART_RELEASE} charts/pilotfleet --namespace {CHART_NAMESPACE} (pinned helm)")
    _kubectl(running, "create", "namespace", CHART_NAMESPACE)
    helm = chart.Helm(binary=Path(running.helm), home=state / "helm")
    began = time.monotonic()
    release = chart.install(helm, Path(running.kubeconfig), CHART_RELEASE, CHART_NAMESPACE)
    print(f"installed in {time.monotonic() - began:.1f} s; NOTES.txt begins:")
    print(textwrap.indent("\n".join(release.notes.strip().splitlines()[:2]), "  "))
    _kubectl(running, "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s")
    print(_kubectl(running, "get", "deployments,serviceaccounts", "-n", CHART_NAMESPACE))


def _start_operator(running: stack.Running, state: Path) -> None:
    _banner("the operator, as the chart's ServiceAccount")
    print(
        "No image runs on KWOK's simulated nodes: the chart's operator pod above is simulated and does\n"
        "nothing. The operator runs here as a local process (`pilotfleet operator`), logged in with the\n"
        "chart's operator ServiceAccount token, so it has exactly the chart's RBAC."
    )
    kubeconfig = _operator_kubeconfig(running, state / "operator-kubeconfig")
    began = time.monotonic()
    process = operator_proc.start_operator(kubeconfig, CHART_NAMESPACE, state / "operator")
    running.operator_pid = process.pid
    running.save(state)
    seconds = time.monotonic() - began
    print(f"operator up in {seconds:.1f} s, watching all namespaces (log {process.log_path})")


def _serve_examples(running: stack.Running) -> None:
    _banner(f"kubectl apply -n {MODELS_NAMESPACE} -f examples/{{{','.join(EXAMPLES)}}}")
    print(
        "The weights PVC binds to a pre-provisioned PersistentVolume (no storage provisioner here), and\n"
        "KWOK completes the fetch Job's pod: no weights are downloaded in the demo."
    )
    _kubectl(running, "create", "namespace", MODELS_NAMESPACE)
    for example in EXAMPLES:
        path = paths.project_root() / "examples" / example
        claim = f"{yaml.safe_load(path.read_text())['metadata']['name']}-weights"
        _kubectl(running, "apply", "-f", "-", stdin=yaml.safe_dump(weights_volume(MODELS_NAMESPACE, claim)))
        print(_kubectl(running, "apply", "-n", MODELS_NAMESPACE, "-f", str(path)).strip())
    began = time.monotonic()
    ready = ("--for=condition=Ready", "--timeout=120s")
    _kubectl(running, "wait", "ccm", "--all", "-n", MODELS_NAMESPACE, *ready)
    print(f"all Ready {time.monotonic() - began:.1f} s after apply")
    _banner("kubectl get ccm -A")
    print(_kubectl(running, "get", "ccm", "-A"))
    _banner(f"kubectl get jobs,pods -n {MODELS_NAMESPACE} -o wide (Triton pods on GPU nodes, simulated)")
    print(_kubectl(running, "get", "jobs,pods", "-n", MODELS_NAMESPACE, "-o", "wide"))
    _banner(f"the route table the proxy reads: configmap/{ROUTES_CONFIGMAP} in {CHART_NAMESPACE}")
    print(
        _kubectl(
            running,
            "get",
            "configmap",
            ROUTES_CONFIGMAP,
            "-n",
            CHART_NAMESPACE,
            "-o",
            "jsonpath={.data.routes\\.yaml}",
        )
    )


def run(keep: bool = False) -> int:
    """Bring the testbed up, show the GPU placement rules and Triton at work, install the chart, run the
    operator and serve two example models; then stop everything unless `keep`."""
    state = paths.state_dir()
    timings = stack.Timings()
    if stack.Running.load(state) is not None:
        stack.down(state)
    _banner("starting the testbed (first run builds Kubernetes, etcd and KWOK from Go modules)")
    running = stack.up(state, timings)
    for name, seconds in timings.seconds.items():
        print(f"  {name:<34} {seconds:8.2f} s")
    try:
        _show_gpu_placement(running)
        _show_triton(running)
        _install_chart(running, state)
        _start_operator(running, state)
        _serve_examples(running)
    finally:
        if keep:
            print(f"\nThe testbed keeps running: export KUBECONFIG={running.kubeconfig}")
            print("Stop it with: pilotfleet testbed down")
        else:
            stack.down(state)
            print("\ntestbed stopped")
    return 0
