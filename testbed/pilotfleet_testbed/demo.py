"""`pilotfleet testbed demo`: bring the testbed up and show each of its real parts at work."""

from __future__ import annotations

import logging
import os
import subprocess
import textwrap
import time

import numpy as np
import tritonclient.grpc as grpcclient

from pilotfleet_testbed import paths, procs, stack

log = logging.getLogger(__name__)

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


def run(keep: bool = False) -> int:
    """Bring the testbed up, show the GPU placement rules and Triton at work, then stop unless `keep`."""
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
    finally:
        if keep:
            print(f"\nThe testbed keeps running: export KUBECONFIG={running.kubeconfig}")
            print("Stop it with: pilotfleet testbed down")
        else:
            stack.down(state)
            print("\ntestbed stopped")
    return 0
