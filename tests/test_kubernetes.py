"""deploy/kubernetes: valid objects, clean of policy findings, and in agreement with the gateway's settings.

The objects are rendered as ``kubectl apply -k`` would (tests/kustomize.py;
checked against kustomize itself where it is installed), validated against
the Kubernetes OpenAPI schemas bundled by kubernetes-validate (offline,
strict: an unknown field is an error), and linted by checkov, which
``make test`` installs in a virtualenv of its own (.venv/checkov: its many
pinned dependencies stay out of the project's). Without checkov the lint is
skipped, except in CI (env ``CI`` set), where its absence is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.app import STREAM_ROUTE, create_app
from gateway.config import Settings, load_settings
from tests.kustomize import Manifest, canonical, kustomize_command, render, render_with_kustomize
from tests.replicas import REPO

KUBERNETES = REPO / "deploy" / "kubernetes"
VARIANTS = {"base": KUBERNETES / "base", "sidecar": KUBERNETES / "sidecar"}
KUBERNETES_VERSION = "1.30.0"  # the oldest with the preStop `sleep` action the Deployment uses
CHECKOV = REPO / ".venv" / "checkov" / "bin" / "checkov"
# Findings accepted on purpose, each with its reason (docs/OPERATIONS.md, "Kubernetes").
CHECKOV_SKIPS = {
    # The image is named by tag, set per release with kustomize's `images:`; pinning a digest is
    # the operator's choice of registry and release process, not something the repository can know.
    "CKV_K8S_43": "image by digest",
    # The Redis URL carries its password and the gateway reads it from GATEWAY_REDIS_URL only.
    "CKV_K8S_35": "secret as an environment variable",
}
# In the sidecar variant the pod, and so its network policy, is the backend's: adding one here
# would shut off the backend's own traffic (docs/OPERATIONS.md, "Kubernetes: as a sidecar").
CHECKOV_SKIPS_SIDECAR = {**CHECKOV_SKIPS, "CKV2_K8S_6": "no NetworkPolicy of the backend's pod"}
# What the grace period must cover besides the preStop pause and server.shutdown_grace_s
# (docs/OPERATIONS.md, "Shutdown"): exit within 2 s, plus 0.5 s per thousand streams ended,
# for as many streams as one process admits (server.max_streams_per_process).
EXIT_MARGIN_S = 2.0
STREAM_END_S_PER_THOUSAND = 0.5
# Measured memory (docs/PERFORMANCE.md): a process after start-up, and each open follow stream.
PROCESS_MIB = 136
STREAM_KIB = 26


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request) -> tuple[str, list[Manifest]]:
    return request.param, render(VARIANTS[request.param])


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def gateway_pod(objects: list[Manifest]) -> tuple[Manifest, dict[str, Any]]:
    """The pod template and container that run the gateway (its image is candle-gateway)."""
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]
        for container in pod["spec"]["containers"]:
            if container["image"].split("/")[-1].startswith("candle-gateway:"):
                return pod, container
    raise AssertionError("no container runs the candle-gateway image")


def settings_of(container: dict[str, Any]) -> Settings:
    """The gateway's settings as this container's environment makes them (secrets stand in)."""
    env = {
        e["name"]: e.get("value", "redis://secret.invalid:6379/0" if e["name"].endswith("_URL") else "secret")
        for e in container["env"]
    }
    return load_settings(environ=env)


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def test_loader_renders_what_kustomize_renders(variant):
    name, objects = variant
    if kustomize_command() is None:
        pytest.skip("neither kustomize nor kubectl is installed: the loader's render is used alone")
    assert canonical(objects) == canonical(render_with_kustomize(VARIANTS[name]))


def test_every_object_is_valid_against_the_kubernetes_schemas(variant):
    _, objects = variant
    assert {o["kind"] for o in objects} >= {"Deployment", "Service", "Ingress"}
    for manifest in objects:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_the_base_has_every_object_an_operator_needs():
    kinds = sorted(o["kind"] for o in render(VARIANTS["base"]))
    assert kinds == sorted(
        [
            "Deployment",
            "Service",
            "Ingress",
            "ServiceAccount",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
        ]
    )


def test_a_broken_manifest_is_refused_by_the_schemas():
    """The validation can fail: a probe port given as a list is not a Deployment."""
    deployment = of_kind(render(VARIANTS["base"]), "Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8080]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_probes_ports_and_grace_agree_with_the_gateways_settings(variant):
    _, objects = variant
    pod, container = gateway_pod(objects)
    settings = settings_of(container)
    routes = {r.canonical: r for r in create_app(settings).router.resources()}

    assert settings.server.host == "0.0.0.0"  # reachable from the kubelet and the ingress
    public = next(p for p in container["ports"] if p["containerPort"] == settings.server.port)
    metrics_port = next(p for p in container["ports"] if p["containerPort"] == settings.metrics.port)
    assert settings.metrics.port != 0 and "metrics" in metrics_port["name"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(settings.metrics.port)

    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in routes, f"{probe['path']} is no route of the gateway"
        assert port_number(container, probe["port"]) == settings.server.port
    assert public["name"] == probes["readinessProbe"]["port"]
    # Readiness gives up later than a new stream waits for Redis, so a short outage is ridden out.
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] > settings.redis.outage_wait_s

    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = (
        pre_stop_s
        + settings.server.shutdown_grace_s
        + EXIT_MARGIN_S
        + STREAM_END_S_PER_THOUSAND * settings.server.max_streams_per_process / 1000
    )
    assert settings.server.max_streams_per_process > 0  # 0 would be no cap: no bound for the grace
    assert pod["spec"]["terminationGracePeriodSeconds"] >= needed
    assert settings.server.workers == 1  # the requests and limits are one process's (docs/OPERATIONS.md)


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_the_base_requests_the_memory_its_stream_cap_needs():
    """The request holds a full process (max_streams_per_process open streams), at the measured cost."""
    _, container = gateway_pod(render(VARIANTS["base"]))
    settings = settings_of(container)
    needed = PROCESS_MIB + STREAM_KIB * settings.server.max_streams_per_process / 1024
    assert mebibytes(container["resources"]["requests"]["memory"]) >= needed
    assert mebibytes(container["resources"]["limits"]["memory"]) >= 1.5 * needed
    assert container["resources"]["requests"]["cpu"] == container["resources"]["limits"]["cpu"] == "1"


def test_the_ingress_routes_the_stream_endpoint_to_the_public_port_only(variant):
    _, objects = variant
    _, container = gateway_pod(objects)
    settings = settings_of(container)
    (ingress,) = of_kind(objects, "Ingress")
    paths = [p for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert [p["path"] for p in paths] == ["/api/sse/"]
    assert STREAM_ROUTE.startswith(paths[0]["path"])
    backend = paths[0]["backend"]["service"]
    service = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"] == backend["name"])
    port = next(p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"])
    assert port_number(container, port["targetPort"]) == settings.server.port
    assert port_number(container, port["targetPort"]) != settings.metrics.port


def test_both_ingresses_carry_the_same_annotations():
    annotations = [of_kind(render(path), "Ingress")[0]["metadata"]["annotations"] for path in VARIANTS.values()]
    assert annotations[0] == annotations[1]
    assert annotations[0]["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    # Above the ping interval: an idle stream is never timed out by the ingress.
    assert int(annotations[0]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > Settings().server.ping_interval_s


def test_the_pod_runs_locked_down(variant):
    _, objects = variant
    pod, container = gateway_pod(objects)
    context = {**pod["spec"].get("securityContext", {}), **container["securityContext"]}
    assert context["runAsNonRoot"] is True and context["runAsUser"] >= 10000
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_autoscaler_budget_and_service_select_the_gateways_pods():
    objects = render(VARIANTS["base"])
    pod, _ = gateway_pod(objects)
    labels = pod["metadata"]["labels"]
    (deployment,) = of_kind(objects, "Deployment")
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    (budget,) = of_kind(objects, "PodDisruptionBudget")
    (service,) = of_kind(objects, "Service")
    (account,) = of_kind(objects, "ServiceAccount")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2  # a drained pod's clients need another to resume on
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    for selector in (budget["spec"]["selector"]["matchLabels"], service["spec"]["selector"]):
        assert selector.items() <= labels.items()
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert "iam.gke.io/gcp-service-account" in account["metadata"]["annotations"]


def checkov_findings(objects: list[Manifest], tmp_path: Path, skips: dict[str, str]) -> list[dict[str, Any]]:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(objects))
    result = subprocess.run(
        [
            str(CHECKOV),
            "--file",
            str(rendered),
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--skip-check",
            ",".join(skips),
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    assert result.returncode in (0, 1), result.stderr[-2000:]
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    assert any(r.get("summary", {}).get("passed", 0) > 20 for r in reports), result.stdout[-2000:]
    return [failure for r in reports for failure in r.get("results", {}).get("failed_checks", [])]


def test_manifests_pass_the_policy_linter(variant, tmp_path):
    if not CHECKOV.exists():
        if os.environ.get("CI"):
            raise RuntimeError("checkov is not installed; `make test` installs it into .venv/checkov")
        pytest.skip("checkov is not installed (make test installs it)")
    name, objects = variant
    failed = checkov_findings(objects, tmp_path, CHECKOV_SKIPS_SIDECAR if name == "sidecar" else CHECKOV_SKIPS)
    assert not failed, "\n".join(f"{f['check_id']} {f['check_name']} ({f['resource']})" for f in failed)
