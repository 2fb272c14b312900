"""The Kubernetes manifests: each overlay rendered by kustomize (kubectl's), every document
validated strictly (unknown fields are errors) against the API schemas of the oldest and
newest Kubernetes versions kubernetes-validate knows, offline; then what a schema cannot
see: the ServiceMonitor (a CRD, whose schema is not available offline) is checked against
the Service and the pods it must match, and the Deployment against the service's settings
and drain timing."""

from __future__ import annotations

import shutil
import subprocess
from functools import cache
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dlserve.settings import PREFIX, Settings
from tests.conftest import ROOT

OVERLAYS = ("cpu", "gpu")
# Kubernetes 1.25 is the oldest the validator ships schemas for.
VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def one(overlay: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in rendered(overlay) if d["kind"] == kind]
    return doc


def container(overlay: str) -> dict[str, Any]:
    (c,) = one(overlay, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(overlay: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(overlay)["env"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_every_kind(overlay: str) -> None:
    kinds = sorted(d["kind"] for d in rendered(overlay))
    assert kinds == sorted(
        [
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "ServiceMonitor",
            "NetworkPolicy",
        ]
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_validates_strictly(overlay: str, version: str) -> None:
    for doc in rendered(overlay):
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue  # no schema offline: test_the_servicemonitor_matches_the_service
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_is_strict() -> None:
    """A misspelt field fails (so the test above can fail)."""
    deployment = yaml.safe_load(yaml.safe_dump(one("cpu", "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_servicemonitor_matches_the_service(overlay: str) -> None:
    monitor, service = one(overlay, "ServiceMonitor"), one(overlay, "Service")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    pod_labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["accelerator"] == overlay
    assert set(monitor["spec"]["podTargetLabels"]) <= pod_labels.keys()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_selector_picks_the_pods(overlay: str) -> None:
    pod_labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    selectors = [
        one(overlay, "Service")["spec"]["selector"],
        one(overlay, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(overlay, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        one(overlay, "Deployment")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector and selector.items() <= pod_labels.items(), selector
    target = one(overlay, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "dlserve")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_runs_as_the_service_expects(overlay: str) -> None:
    deployment = one(overlay, "Deployment")
    pod, c = deployment["spec"]["template"]["spec"], container(overlay)
    settings = env(overlay)
    known = {PREFIX + name.upper() for name in Settings.model_fields}
    assert {n for n in settings if n.startswith(PREFIX)} <= known, (
        "a DLSERVE_ name that the service does not read"
    )
    # Workers follow the CPU request.
    assert settings["DLSERVE_WORKERS"] == {
        "resourceFieldRef": {"containerName": "dlserve", "resource": "requests.cpu", "divisor": "1"}
    }
    assert {"requests", "limits"} <= c["resources"].keys()
    # The drain ends before Kubernetes kills the pod.
    drain = float(settings["DLSERVE_DRAIN_TIMEOUT_S"])
    assert float(settings["DLSERVE_DRAIN_DELAY_S"]) < drain < pod["terminationGracePeriodSeconds"]
    # Probes.
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    # Non-root, read-only, and the one writable folder the image needs.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts
    assert c["image"] == f"dlserve:{overlay}"


def test_the_gpu_overlay_asks_for_a_gpu_and_caches_tensorrt_engines() -> None:
    c, pod = container("gpu"), one("gpu", "Deployment")["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    settings = env("gpu")
    assert settings["DLSERVE_PROVIDERS"].split(",")[0] == "tensorrt"
    assert settings["DLSERVE_TRT_CACHE_DIR"] in {m["mountPath"] for m in c["volumeMounts"]}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600
    cpu = container("cpu")
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert env("cpu")["DLSERVE_PROVIDERS"] == "cpu"
