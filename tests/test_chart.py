"""The Helm chart `charts/pilotfleet`: what `helm lint`, `helm template` and `helm install` show a user.

Offline tests render the chart with the pinned helm and check the manifests against the official
Kubernetes schemas (kubernetes-validate); the `testbed` tests install it into the real API server.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException
from pilotfleet_operator import naming
from pilotfleet_operator.settings import Settings
from pilotfleet_testbed import chart, images, versions
from pilotfleet_testbed.kube import Cluster

CHART = chart.chart_dir()
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VARIANTS = [pytest.param([], id="defaults")] + [
    pytest.param(["--values", path], id=path.name.removesuffix("-values.yaml")) for path in CI_VALUES
]
APP_VERSION = str(yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])
# The chart's helpers mirror the operator's naming module.
STANDARD_LABELS = (
    naming.LABEL_NAME,
    naming.LABEL_INSTANCE,
    naming.LABEL_COMPONENT,
    naming.LABEL_PART_OF,
    naming.LABEL_MANAGED_BY,
    "helm.sh/chart",
)
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CRD_NAME = naming.CRD_NAME

Manifests = list[dict[str, Any]]


def render(helm: chart.Helm, *args: str | Path, release: str = "pilotfleet") -> Manifests:
    """Return the objects `helm template` renders for the chart (CRDs included) in namespace fleet."""
    out = helm.check(
        [
            "template",
            release,
            CHART,
            "--namespace",
            "fleet",
            "--kube-version",
            versions.KUBERNETES,
            "--include-crds",
            *args,
        ]
    )
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objects: Manifests, kind: str, component: str) -> dict[str, Any]:
    """Return the single object of `kind` for `component` (operator or proxy)."""
    found = [
        o
        for o in objects
        if o["kind"] == kind and o["metadata"]["labels"].get(naming.LABEL_COMPONENT) == component
    ]
    assert len(found) == 1, (
        f"expected one {kind} for {component}, got {[o['metadata']['name'] for o in found]}"
    )
    return found[0]


def kinds(objects: Manifests) -> set[str]:
    """Return the kinds present in `objects`."""
    return {o["kind"] for o in objects}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """Return a container's env as name -> value (or valueFrom)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- offline: lint, render, schema --------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_strict(chart_helm: chart.Helm, variant: list[str | Path]) -> None:
    done = chart_helm.run(["lint", "--strict", CHART, *variant])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_objects_pass_kubernetes_schemas(chart_helm: chart.Helm, variant: list[str | Path]) -> None:
    objects = render(chart_helm, *variant)
    failures = []
    for obj in objects:
        # kubernetes-validate cannot check a CRD's structural schema or CEL rules; the API server
        # does that in test_install_on_the_api_server.
        if obj["kind"] == "CustomResourceDefinition":
            continue
        try:
            kubernetes_validate.validate(obj, versions.KUBERNETES, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.caught.absolute_path)
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.caught.message}")
    assert not failures, "\n".join(failures)
    assert {"Deployment", "Service"} <= kinds(objects)


@pytest.mark.parametrize("variant", VARIANTS)
def test_labels_and_selectors(chart_helm: chart.Helm, variant: list[str | Path]) -> None:
    objects = render(chart_helm, *variant)
    for obj in objects:
        if obj["kind"] == "CustomResourceDefinition":
            continue
        missing = [key for key in STANDARD_LABELS if key not in obj["metadata"]["labels"]]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks labels {missing}"
        assert obj["metadata"]["labels"][naming.LABEL_PART_OF] == naming.PART_OF
    proxy_pods = one(objects, "Deployment", "proxy")["spec"]["template"]["metadata"]["labels"]
    selectors = [one(objects, "Service", "proxy")["spec"]["selector"]]
    selectors += [o["spec"]["selector"]["matchLabels"] for o in objects if o["kind"] == "PodDisruptionBudget"]
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        # Selectors must survive upgrades: nothing version-dependent in them.
        assert set(selector) == {
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
        }
    for selector in selectors:
        assert selector.items() <= proxy_pods.items()


def test_default_install_objects(chart_helm: chart.Helm) -> None:
    objects = render(chart_helm)
    operator = one(objects, "Deployment", "operator")
    proxy = one(objects, "Deployment", "proxy")
    assert operator["metadata"]["name"] == "pilotfleet-operator"
    assert proxy["metadata"]["name"] == "pilotfleet-proxy"

    # One operator, never two at once without leader election.
    assert operator["spec"]["replicas"] == 1
    assert operator["spec"]["strategy"] == {"type": "Recreate"}
    assert "Role" not in kinds(objects)
    op_container = operator["spec"]["template"]["spec"]["containers"][0]
    assert op_container["image"] == f"localhost/pilotfleet:{APP_VERSION}"
    assert op_container["imagePullPolicy"] == "IfNotPresent"
    assert op_container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    # kopf serves the probe endpoint because the command asks it to, on the port the probes call.
    health_port = next(p["containerPort"] for p in op_container["ports"] if p["name"] == "health")
    assert op_container["command"] == [
        "pilotfleet",
        "operator",
        "--liveness",
        f"http://0.0.0.0:{health_port}/healthz",
    ]
    verbose = one(render(chart_helm, "--set", "operator.verbose=true"), "Deployment", "operator")
    assert verbose["spec"]["template"]["spec"]["containers"][0]["command"][:3] == [
        "pilotfleet",
        "--verbose",
        "operator",
    ]
    assert env_of(op_container)["PILOTFLEET_OPERATOR_LEADER_ELECTION"] == "false"
    sa = operator["spec"]["template"]["spec"]["serviceAccountName"]
    binding = next(o for o in objects if o["kind"] == "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "fleet"}]

    # The proxy: HPA owns its replicas; it mounts the operator's route table and no API token.
    pod = proxy["spec"]["template"]["spec"]
    assert "replicas" not in proxy["spec"]
    hpa = one(objects, "HorizontalPodAutoscaler", "proxy")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "pilotfleet-proxy",
    }
    assert hpa["spec"]["minReplicas"] >= 2
    assert pod["automountServiceAccountToken"] is False
    proxy_sa = pod["serviceAccountName"]
    assert all(s["name"] != proxy_sa for o in objects if "Binding" in o["kind"] for s in o["subjects"])
    container = pod["containers"][0]
    assert container["command"][:2] == ["pilotfleet", "proxy"]
    assert container["command"][2:4] == ["--routes", "/etc/pilotfleet/routes.yaml"]
    # The route-table contract (docs/architecture.md): the operator's ConfigMap, in its own namespace.
    routes_volume = next(v for v in pod["volumes"] if v["name"] == "routes")
    assert routes_volume["configMap"]["name"] == naming.ROUTES_CONFIGMAP
    assert env_of(op_container)["PILOTFLEET_OPERATOR_NAMESPACE"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}
    }
    mount = next(m for m in container["volumeMounts"] if m["name"] == "routes")
    assert mount == {"name": "routes", "mountPath": "/etc/pilotfleet", "readOnly": True}
    service = one(objects, "Service", "proxy")
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    assert "Ingress" not in kinds(objects)


def test_default_images_are_what_make_images_builds(
    chart_helm: chart.Helm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #5: the chart deploys the image `make images` builds, and hands it to the operator for its
    fetch Jobs; the operator's own defaults are the same images, so a bare `pilotfleet operator` agrees."""
    version = images.project_version()
    built = images.PILOTFLEET.ref(version)
    assert version == APP_VERSION
    objects = render(chart_helm)
    operator = one(objects, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]
    proxy = one(objects, "Deployment", "proxy")["spec"]["template"]["spec"]["containers"][0]
    assert (operator["image"], operator["imagePullPolicy"]) == (built, "IfNotPresent")
    assert (proxy["image"], proxy["imagePullPolicy"]) == (built, "IfNotPresent")
    assert env_of(operator)["PILOTFLEET_OPERATOR_FETCH_IMAGE"] == built

    for name in ("PILOTFLEET_OPERATOR_FETCH_IMAGE", "PILOTFLEET_OPERATOR_PYTHON_IMAGE"):
        monkeypatch.delenv(name, raising=False)
    defaults = Settings()
    assert defaults.fetch_image == env_of(operator)["PILOTFLEET_OPERATOR_FETCH_IMAGE"]
    # The Python backend's default runs our Hugging Face model: the torch variant of the Triton image.
    assert defaults.python_image == images.TRITON_CPU_TORCH.ref(version)

    # Another registry and tag: the fetch Jobs follow the chart's image.
    moved = render(
        chart_helm, "--set", "image.repository=registry.internal/pilotfleet", "--set", "image.tag=9.9"
    )
    moved_operator = one(moved, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]
    assert moved_operator["image"] == "registry.internal/pilotfleet:9.9"
    assert env_of(moved_operator)["PILOTFLEET_OPERATOR_FETCH_IMAGE"] == "registry.internal/pilotfleet:9.9"


@pytest.mark.parametrize("variant", VARIANTS)
def test_containers_run_locked_down(chart_helm: chart.Helm, variant: list[str | Path]) -> None:
    for deployment in (o for o in render(chart_helm, *variant) if o["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            what = f"{deployment['metadata']['name']}/{container['name']}"
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, what
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, what
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], what
            assert container["resources"]["requests"], what
            assert {"livenessProbe", "readinessProbe"} <= set(container), what


def test_more_than_one_operator_elects_a_leader(chart_helm: chart.Helm) -> None:
    objects = render(chart_helm, "--set", "operator.replicas=2")
    operator = one(objects, "Deployment", "operator")
    assert operator["spec"]["replicas"] == 2
    assert "strategy" not in operator["spec"]
    env = env_of(operator["spec"]["template"]["spec"]["containers"][0])
    assert env["PILOTFLEET_OPERATOR_LEADER_ELECTION"] == "true"
    role = one(objects, "Role", "operator")
    lease_rules = [r for r in role["rules"] if r["resources"] == ["leases"]]
    assert {"create", "get", "update"} <= {verb for r in lease_rules for verb in r["verbs"]}
    # Everything but create is limited to the Lease the operator is told to use.
    assert [r["resourceNames"] for r in lease_rules if "update" in r["verbs"]] == [
        [env["PILOTFLEET_OPERATOR_LEASE_NAME"]]
    ]
    binding = one(objects, "RoleBinding", "operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_watch_namespaces_limit_the_operator_to_them(chart_helm: chart.Helm) -> None:
    cluster_wide = render(chart_helm)
    limited = render(chart_helm, "--set", "operator.watchNamespaces={team-a,team-b}")
    env = env_of(one(limited, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0])
    assert env["PILOTFLEET_OPERATOR_WATCH_NAMESPACES"] == '["team-a","team-b"]'

    def model_bindings(objects: Manifests) -> list[tuple[str, str | None]]:
        return sorted(
            (o["kind"], o["metadata"].get("namespace"))
            for o in objects
            if o["kind"] in {"ClusterRoleBinding", "RoleBinding"} and o["roleRef"]["name"].endswith("-models")
        )

    assert model_bindings(cluster_wide) == [("ClusterRoleBinding", None)]
    # The release namespace too: the route table ConfigMap lives there.
    assert model_bindings(limited) == [
        ("RoleBinding", "fleet"),
        ("RoleBinding", "team-a"),
        ("RoleBinding", "team-b"),
    ]
    # Reading nodes and CRDs stays cluster-wide: the GPU checks and kopf need it either way.
    cluster_rules = [
        r
        for o in limited
        if o["kind"] == "ClusterRole" and not o["metadata"]["name"].endswith("-models")
        for r in o["rules"]
    ]
    assert {res for r in cluster_rules for res in r["resources"]} == {
        "customresourcedefinitions",
        "namespaces",
        "nodes",
    }
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in cluster_rules)


def test_fixed_proxy_replicas_without_autoscaling(chart_helm: chart.Helm) -> None:
    objects = render(chart_helm, "--set", "proxy.autoscaling.enabled=false", "--set", "proxy.replicas=3")
    assert one(objects, "Deployment", "proxy")["spec"]["replicas"] == 3
    assert "HorizontalPodAutoscaler" not in kinds(objects)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--set", "fullnameOverride=" + "f" * 63], id="fullnameOverride-63"),
        pytest.param([], id="release-53"),
    ],
)
def test_names_fit_dns_labels(chart_helm: chart.Helm, args: list[str]) -> None:
    # 53 characters is the longest release name helm accepts.
    objects = render(chart_helm, *args, release="r" * 53)
    # The CRD's name is fixed by its group and plural.
    names = [
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
        for o in objects
        if o["kind"] != "CustomResourceDefinition"
    ]
    for kind, _, name in names:
        assert len(name) <= 63 and DNS_LABEL.match(name), f"{kind} name {name!r} is not a DNS label"
    assert len(names) == len(set(names)), f"name clash: {sorted(names)}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--set-string", "proxy.replicas=two"],
            "at '/proxy/replicas': got string, want integer",
            id="string-replicas",
        ),
        pytest.param(
            ["--set", "proxy.replicaz=2"],
            "at '/proxy': additional properties 'replicaz' not allowed",
            id="unknown-key",
        ),
        pytest.param(["--set", "image.pullPolicy=Sometimes"], "at '/image/pullPolicy'", id="bad-enum"),
        pytest.param(
            ["--set", "proxy.ingress.enabled=true", "--set", "proxy.ingress.host="],
            "at '/proxy/ingress/host'",
            id="ingress-without-host",
        ),
    ],
)
def test_schema_rejects_bad_values(chart_helm: chart.Helm, args: list[str], message: str) -> None:
    done = chart_helm.run(["template", "pilotfleet", CHART, *args])
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr, done.stderr
    assert message in done.stderr, done.stderr


def _leaf_keys_without_docs(values_yaml: str) -> list[str]:
    """Return `path.to.key` of every leaf value in values.yaml not preceded by a `# --` comment.

    A key documented with `# --` covers everything below it (a documented default block, such as
    `resources`); an undocumented key with nothing after its colon only groups keys that must be
    documented themselves.
    """
    undocumented = []
    stack: list[tuple[int, str, bool]] = []
    comment: list[str] = []
    for line in values_yaml.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not match:
            if not stripped:
                comment = []
            continue
        indent, key, rest = len(match[1]), match[2], match[3].strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = any(c.startswith("# --") for c in comment)
        if rest and not documented and not any(doc for _, _, doc in stack):
            undocumented.append(".".join([k for _, k, _ in stack] + [key]))
        stack.append((indent, key, documented))
        comment = []
    return undocumented


def test_every_value_is_documented() -> None:
    values_yaml = (CHART / "values.yaml").read_text()
    assert _leaf_keys_without_docs("a:\n  # -- doc\n  b: 1\n  c: 2\n") == ["a.c"]
    assert _leaf_keys_without_docs(values_yaml) == []


def test_notes_without_ingress_tell_how_to_port_forward(chart_helm: chart.Helm) -> None:
    out = chart_helm.check(["install", "pilotfleet", CHART, "--namespace", "fleet", "--dry-run=client"])
    notes = out.split("NOTES:\n", 1)[1]
    assert "kubectl -n fleet port-forward service/pilotfleet-proxy 8080:80" in notes
    assert '"debug.overrideProxyUrl": "http://localhost:8080"' in notes
    assert '"debug.overrideEngine": "codegen"' in notes


def test_proxy_token_comes_from_a_secret(chart_helm: chart.Helm) -> None:
    args = ["--set", "proxy.auth.existingSecret=fleet-token", "--set", "proxy.auth.secretKey=shared"]
    proxy = one(render(chart_helm, *args), "Deployment", "proxy")
    env = env_of(proxy["spec"]["template"]["spec"]["containers"][0])
    assert env["PILOTFLEET_PROXY_AUTH_TOKEN"] == {"secretKeyRef": {"name": "fleet-token", "key": "shared"}}
    out = chart_helm.check(
        ["install", "pilotfleet", CHART, "--namespace", "fleet", "--dry-run=client", *args]
    )
    assert "get secret fleet-token -o jsonpath='{.data.shared}'" in out
    assert 'api_key=os.environ["PILOTFLEET_TOKEN"]' in out


def test_proxy_behind_ingress_knows_its_public_url(chart_helm: chart.Helm) -> None:
    args = ["--set", "proxy.ingress.enabled=true", "--set", "proxy.ingress.host=copilot.acme.test"]
    tls = ["--set", "proxy.ingress.tls.enabled=true"]

    def proxy_env(*values: str) -> dict[str, Any]:
        proxy = one(render(chart_helm, *args, *values), "Deployment", "proxy")
        return env_of(proxy["spec"]["template"]["spec"]["containers"][0])

    # The Copilot token sends editors back to the URL they signed in at, scheme included.
    assert proxy_env()["PILOTFLEET_PROXY_PUBLIC_URL"] == "http://copilot.acme.test"
    assert proxy_env(*tls)["PILOTFLEET_PROXY_PUBLIC_URL"] == "https://copilot.acme.test"
    out = chart_helm.check(
        ["install", "pilotfleet", CHART, "--namespace", "fleet", "--dry-run=client", *args, *tls]
    )
    assert "GITHUB_SERVER_URL=https://copilot.acme.test GITHUB_API_URL=https://copilot.acme.test" in out


def test_chart_crd_is_the_generated_crd() -> None:
    chart_crds = sorted((CHART / "crds").glob("*.yaml"))
    assert chart_crds, (
        "charts/pilotfleet/crds/ holds no CRD: it is generated with the one in crds/ by `pilotfleet crds`"
    )
    project_crds = Path(CHART.parents[1] / "crds")
    for path in chart_crds:
        twin = project_crds / path.name
        assert twin.is_file(), f"{path.name} is in the chart but not in crds/"
        assert path.read_text() == twin.read_text(), f"{path} differs from {twin}: run `pilotfleet crds`"
    assert {yaml.safe_load(p.read_text())["metadata"]["name"] for p in chart_crds} == {CRD_NAME}


# --- on the testbed's real API server -------------------------------------------------------------


@pytest.fixture
def installed(
    kube_cluster: Cluster, k8s_namespace: str, chart_helm: chart.Helm
) -> Iterator[chart.ChartRelease]:
    """The chart installed with a TLS Ingress in a fresh namespace (release name unique per test, as
    its ClusterRole is cluster-wide); uninstalled afterwards."""
    values = {
        "proxy": {"ingress": {"enabled": True, "host": "copilot.acme.test", "tls": {"enabled": True}}},
        "operator": {"replicas": 2},
    }
    release = chart.install(chart_helm, kube_cluster.kubeconfig, f"pf-{k8s_namespace}", k8s_namespace, values)
    try:
        yield release
    finally:
        chart.uninstall(chart_helm, kube_cluster.kubeconfig, release)


@pytest.mark.testbed
def test_install_on_the_api_server(
    kube_cluster: Cluster, k8s_api: Any, installed: chart.ChartRelease
) -> None:
    namespace, release = installed.namespace, installed.name
    selector = f"app.kubernetes.io/instance={release}"
    # Typed as Any: the client's models mark every field Optional, and these objects were just created.
    core: Any = client.CoreV1Api(k8s_api)
    apps: Any = client.AppsV1Api(k8s_api)
    autoscaling: Any = client.AutoscalingV2Api(k8s_api)
    policy: Any = client.PolicyV1Api(k8s_api)
    networking: Any = client.NetworkingV1Api(k8s_api)
    rbac: Any = client.RbacAuthorizationV1Api(k8s_api)
    extensions: Any = client.ApiextensionsV1Api(k8s_api)

    accounts = {
        sa.metadata.name
        for sa in core.list_namespaced_service_account(namespace, label_selector=selector).items
    }
    assert accounts == {f"{release}-pilotfleet-operator", f"{release}-pilotfleet-proxy"}
    # `helm install --wait` returned, so the simulated nodes run every replica the chart asked for.
    operator = apps.read_namespaced_deployment(f"{release}-pilotfleet-operator", namespace)
    assert (operator.status.ready_replicas, operator.spec.replicas) == (2, 2)

    # The chart leaves the proxy's replica count to the HPA, whose controller raises it to minReplicas.
    def proxy_scaled_up() -> bool:
        proxy = apps.read_namespaced_deployment(f"{release}-pilotfleet-proxy", namespace)
        return (proxy.spec.replicas, proxy.status.ready_replicas) == (2, 2)

    kube_cluster.wait_for(proxy_scaled_up, "the HPA to scale the proxy to minReplicas (2)", timeout=60)
    services = core.list_namespaced_service(namespace, label_selector=selector).items
    assert [s.metadata.name for s in services] == [f"{release}-pilotfleet-proxy"]
    hpas = autoscaling.list_namespaced_horizontal_pod_autoscaler(namespace).items
    assert [h.spec.scale_target_ref.name for h in hpas] == [f"{release}-pilotfleet-proxy"]
    pdbs = policy.list_namespaced_pod_disruption_budget(namespace).items
    assert [p.metadata.name for p in pdbs] == [f"{release}-pilotfleet-proxy"]
    ingresses = networking.list_namespaced_ingress(namespace).items
    assert [rule.host for i in ingresses for rule in i.spec.rules] == ["copilot.acme.test"]
    leases_role = rbac.read_namespaced_role(f"{release}-pilotfleet-operator", namespace)
    assert leases_role.rules[0].resources == ["leases"]

    try:
        crd = extensions.read_custom_resource_definition(CRD_NAME)
    except ApiException as exc:
        pytest.fail(
            f"helm install did not create the CRD {CRD_NAME} (is charts/pilotfleet/crds/ filled?): "
            f"{exc.status} {exc.reason}"
        )
    conditions = {c.type: c.status for c in crd.status.conditions or []}
    assert conditions.get("Established") == "True", conditions

    assert '"debug.overrideProxyUrl": "https://copilot.acme.test"' in installed.notes
    assert 'base_url="https://copilot.acme.test/v1"' in installed.notes


def _allowed(
    api: Any, verb: str, resource: str, namespace: str = "", group: str = "", subresource: str = ""
) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {
            "resourceAttributes": {
                "verb": verb,
                "resource": resource,
                "namespace": namespace,
                "group": group,
                "subresource": subresource,
            }
        },
    }
    authorization: Any = client.AuthorizationV1Api(api)
    answer = authorization.create_self_subject_access_review(body=review)
    return bool(answer.status.allowed)


@pytest.mark.testbed
def test_operator_service_account_has_least_privilege(
    kube_cluster: Cluster, chart_release: chart.ChartRelease, operator_kubeconfig: Path, k8s_namespace: str
) -> None:
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(operator_kubeconfig))
    try:
        # Who the token says it is: the chart's ServiceAccount, not an admin.
        authentication: Any = client.AuthenticationV1Api(api)
        review = authentication.create_self_subject_review(
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        )
        username = review.status.user_info.username
        assert username.startswith(f"system:serviceaccount:{chart_release.namespace}:")

        model_ns = k8s_namespace
        granted = [
            ("watch", "codecompletionmodels", "", "pilotfleet.dev", ""),
            ("patch", "codecompletionmodels", model_ns, "pilotfleet.dev", "status"),
            ("create", "deployments", model_ns, "apps", ""),
            ("patch", "services", model_ns, "", ""),
            ("create", "persistentvolumeclaims", model_ns, "", ""),
            ("delete", "jobs", model_ns, "batch", ""),
            ("patch", "configmaps", chart_release.namespace, "", ""),
            ("list", "nodes", "", "", ""),
            ("create", "events", model_ns, "", ""),
            # Each fetch Job's own identity (ServiceAccount + Role + RoleBinding, built per model).
            ("create", "serviceaccounts", model_ns, "", ""),
            ("patch", "roles", model_ns, "rbac.authorization.k8s.io", ""),
            ("create", "rolebindings", model_ns, "rbac.authorization.k8s.io", ""),
        ]
        denied = [
            ("get", "secrets", model_ns, "", ""),
            ("create", "pods", model_ns, "", ""),
            ("delete", "nodes", "", "", ""),
            ("delete", "namespaces", "", "", ""),
            ("create", "clusterrolebindings", "", "rbac.authorization.k8s.io", ""),
            ("delete", "customresourcedefinitions", "", "apiextensions.k8s.io", ""),
        ]
        assert [g for g in granted if not _allowed(api, *g)] == []
        assert [d for d in denied if _allowed(api, *d)] == []
        # A real call with the token, beyond the access reviews.
        client.AppsV1Api(api).list_deployment_for_all_namespaces(limit=1)
        with pytest.raises(ApiException) as refused:
            client.CoreV1Api(api).list_namespaced_secret(model_ns)
        assert refused.value.status == 403
    finally:
        api.close()
