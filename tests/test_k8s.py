"""The Kubernetes manifests: each overlay rendered by kustomize (kubectl's), every document
validated strictly (unknown fields are errors) against the API schemas of the oldest and
newest Kubernetes versions kubernetes-validate knows, offline, and KEDA's ScaledObject
against the schema of the KEDA release vendored in deploy/k8s/keda; then what a schema
cannot see: the ServiceMonitor (a CRD whose schema is not available offline) is checked
against the Service and the pods it must match, the Deployment against the service's
settings and drain timing, and the autoscalers against each other and against what KEDA's
admission webhook refuses. tests/test_monitoring.py evaluates the autoscalers' queries
against a real Prometheus scraping a real server under load."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from dlserve.settings import PREFIX, Settings
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
# Each overlay and how it scales: `cpu` on CPU use (the base's HorizontalPodAutoscaler),
# `keda` on demand through KEDA's ScaledObject, `adapter` on demand through a
# HorizontalPodAutoscaler on prometheus-adapter's custom metric.
SCALING = {
    "cpu": "cpu",
    "cpu-keda": "keda",
    "cpu-prometheus-adapter": "adapter",
    "gpu": "keda",
    "gpu-prometheus-adapter": "adapter",
}
OVERLAYS = tuple(SCALING)
# Kubernetes 1.25 is the oldest the validator ships schemas for.
VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
SCALEDOBJECT = ("keda.sh/v1alpha1", "ScaledObject")
KEDA_CRD = K8S / "keda" / "keda.sh_scaledobjects.yaml"
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
DEMAND_METRIC = "dlserve_requests_in_flight"
# The Prometheus scaler's metadata keys, from KEDA v2.20.2's pkg/scalers/prometheus_scaler.go
# (its `keda:"name=..."` tags): a misspelt key is ignored by KEDA, not refused.
PROMETHEUS_TRIGGER_KEYS = {
    "serverAddress",
    "query",
    "queryParameters",
    "threshold",
    "activationThreshold",
    "namespace",
    "customHeaders",
    "ignoreNullValues",
    "unsafeSsl",
    "awsRegion",
    "timeout",
    "identityOwner",
}


def render(kustomization: Path) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(
        [kubectl, "kustomize", str(kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    return render(K8S / "overlays" / overlay)


@cache
def scaled_to_zero() -> tuple[dict[str, Any], ...]:
    """overlays/gpu with components/keda-scale-to-zero, composed as docs/autoscaling.md
    shows: an overlay of one's own (here in a temporary folder)."""
    with tempfile.TemporaryDirectory() as folder:
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / "overlays" / "gpu", folder)],
            "components": [os.path.relpath(K8S / "components" / "keda-scale-to-zero", folder)],
        }
        (Path(folder) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return render(Path(folder))


def one(overlay: str, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in rendered(overlay) if d["kind"] == kind]
    return doc


def accelerator(overlay: str) -> str:
    return overlay.split("-")[0]


def container(overlay: str) -> dict[str, Any]:
    (c,) = one(overlay, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(overlay: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(overlay)["env"]}


def scaler(overlay: str) -> dict[str, Any]:
    """The overlay's autoscaler: its ScaledObject or its HorizontalPodAutoscaler."""
    kind = "ScaledObject" if SCALING[overlay] == "keda" else "HorizontalPodAutoscaler"
    return one(overlay, kind)


def demand_trigger(scaled_object: dict[str, Any]) -> dict[str, Any]:
    """The ScaledObject's trigger on the pods' requests in hand."""
    (trigger,) = [
        t for t in scaled_object["spec"]["triggers"] if DEMAND_METRIC in t["metadata"]["query"]
    ]
    return trigger


def adapter_rule() -> dict[str, Any]:
    """prometheus-adapter's rule for the demand metric (deploy/k8s/prometheus-adapter)."""
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI schema as JSON Schema that refuses fields it does not name, as the
    API server's strict field validation does (kubectl's default since 1.27), except where
    the CRD keeps unknown fields (x-kubernetes-preserve-unknown-fields)."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {name: strict(s) for name, s in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    return out


@cache
def scaledobject_schema() -> dict[str, Any]:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    assert crd["spec"]["names"]["kind"] == "ScaledObject"
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return strict(served["schema"]["openAPIV3Schema"])


def validate_scaledobject(doc: dict[str, Any], version: str) -> None:
    """Against KEDA's schema, strictly; its metadata as every object's (ObjectMeta, through
    an object whose schema is that and nothing else that could fail); and the CRD's one
    CEL rule, which JSON Schema cannot say."""
    jsonschema.Draft202012Validator(scaledobject_schema()).validate(doc)
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
        version,
        strict=True,
    )
    spec = doc["spec"]
    if "minReplicaCount" in spec:
        assert spec["minReplicaCount"] <= spec.get("maxReplicaCount", 100), (
            "minReplicaCount must be less than or equal to maxReplicaCount"
        )


def validate(doc: dict[str, Any], version: str) -> None:
    if (doc["apiVersion"], doc["kind"]) == SCALEDOBJECT:
        validate_scaledobject(doc, version)
    elif (doc["apiVersion"], doc["kind"]) not in CRDS:
        kubernetes_validate.validate(doc, version, strict=True)
    # else no schema offline: test_the_servicemonitor_matches_the_service


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_every_kind(overlay: str) -> None:
    """One autoscaler each: KEDA refuses a ScaledObject whose Deployment another
    HorizontalPodAutoscaler scales, and two autoscalers would fight."""
    kinds = sorted(d["kind"] for d in rendered(overlay))
    assert kinds == sorted(
        [
            "Deployment",
            "Service",
            scaler(overlay)["kind"],
            "PodDisruptionBudget",
            "ServiceMonitor",
            "NetworkPolicy",
        ]
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", [*OVERLAYS, "gpu + keda-scale-to-zero"])
def test_every_document_validates_strictly(overlay: str, version: str) -> None:
    docs = scaled_to_zero() if overlay == "gpu + keda-scale-to-zero" else rendered(overlay)
    for doc in docs:
        validate(doc, version)


def test_the_validation_is_strict() -> None:
    """A misspelt field fails, in a Kubernetes kind and in KEDA's (so the test above can
    fail), and so does a trigger's number that is not a string (KEDA's metadata is a map of
    strings)."""
    deployment = yaml.safe_load(yaml.safe_dump(one("cpu", "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)
    for path, key, value in [
        ((), "minReplicas", 1),
        (("advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown"), "window", 1),
        (("triggers", 0, "metadata"), "threshold", 16),
    ]:
        scaled = yaml.safe_load(yaml.safe_dump(one("gpu", "ScaledObject")))
        where = scaled["spec"]
        for step in path:
            where = where[step]
        where[key] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_scaledobject(scaled, VERSIONS[-1])
    misnamed = yaml.safe_load(yaml.safe_dump(one("gpu", "ScaledObject")))
    misnamed["metadata"]["label"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="label"):
        validate_scaledobject(misnamed, VERSIONS[-1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_servicemonitor_matches_the_service(overlay: str) -> None:
    monitor, service = one(overlay, "ServiceMonitor"), one(overlay, "Service")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    pod_labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["accelerator"] == accelerator(overlay)
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
    target = scaler(overlay)["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        "apps/v1",
        "Deployment",
        "dlserve",
    )


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
    assert c["image"] == f"dlserve:{accelerator(overlay)}"


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


def test_gpu_scales_on_demand_and_cpu_on_cpu_use_by_default() -> None:
    """The issue's defaults: on a GPU node the CPU idles while the GPU's queue grows."""
    gpu = one("gpu", "ScaledObject")
    assert demand_trigger(gpu)["type"] == "prometheus"
    assert not [d for d in rendered("gpu") if d["kind"] == "HorizontalPodAutoscaler"]
    (metric,) = one("cpu", "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if SCALING[o] != "cpu"])
def test_every_demand_scaler_reads_the_demand_with_one_target(overlay: str) -> None:
    """KEDA's trigger and the adapter's HorizontalPodAutoscaler: the same metric, the same
    target per pod (docs/autoscaling.md), the same bounds as the CPU autoscaler they replace
    (GPU: one GPU a pod, 1 to 4), replicas = ceil(value / target) (AverageValue)."""
    target = float(demand_trigger(one("cpu-keda", "ScaledObject"))["metadata"]["threshold"])
    bounds = {"cpu": (2, 10), "gpu": (1, 4)}[accelerator(overlay)]
    spec = scaler(overlay)["spec"]
    if SCALING[overlay] == "keda":
        trigger = demand_trigger(scaler(overlay))
        assert trigger.get("metricType", "AverageValue") == "AverageValue"
        assert float(trigger["metadata"]["threshold"]) == target
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == bounds
        assert spec["fallback"]["replicas"] == bounds[0]
    else:
        (metric,) = spec["metrics"]
        assert metric["type"] == "Pods"
        assert metric["pods"]["metric"]["name"] == adapter_rule()["name"]["as"] == DEMAND_METRIC
        assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": f"{target:g}"}
        assert (spec["minReplicas"], spec["maxReplicas"]) == bounds
    cpu = one("cpu", "HorizontalPodAutoscaler")["spec"]
    assert (cpu["minReplicas"], cpu["maxReplicas"]) == (2, 10)


def test_the_adapter_rule_serves_the_demand_metric_per_pod() -> None:
    rule = adapter_rule()
    assert rule["seriesQuery"].startswith(DEMAND_METRIC + "{")
    assert rule["resources"]["overrides"] == {
        "namespace": {"resource": "namespace"},
        "pod": {"resource": "pod"},
    }
    assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if SCALING[o] == "keda"])
def test_kedas_admission_webhook_would_accept_the_scaledobject(overlay: str) -> None:
    """What KEDA v2.20.2's webhook checks (apis/keda/v1alpha1/scaledobject_webhook.go) that a
    schema cannot: unique trigger names, a fallback with an AverageValue trigger, no other
    HorizontalPodAutoscaler on the Deployment (or one it takes over, by name), each
    Prometheus trigger's metadata known to the scaler, its threshold a number."""
    for docs in (rendered(overlay), scaled_to_zero()):
        (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
        spec = scaled["spec"]
        names = [t["name"] for t in spec["triggers"]]
        assert len(names) == len(set(names)), names
        assert any(t.get("metricType", "AverageValue") == "AverageValue" for t in spec["triggers"])
        hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
        assert not hpas, "KEDA refuses a ScaledObject whose Deployment an HPA already scales"
        # Taking over overlays/cpu's HorizontalPodAutoscaler when moving to KEDA:
        assert scaled["metadata"]["annotations"] == {
            "scaledobject.keda.sh/transfer-hpa-ownership": "true"
        }
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["name"] == "dlserve"
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            metadata = trigger["metadata"]
            assert metadata.keys() <= PROMETHEUS_TRIGGER_KEYS, metadata.keys()
            assert {"serverAddress", "query", "threshold"} <= metadata.keys()
            float(metadata["threshold"])


def test_scale_to_zero_wakes_on_the_ingress_and_sizes_on_demand() -> None:
    """components/keda-scale-to-zero: no pod after the cool-down; the ingress trigger only
    activates (its threshold is never reached), the demand trigger still sizes."""
    (scaled,) = [d for d in scaled_to_zero() if d["kind"] == "ScaledObject"]
    spec = scaled["spec"]
    assert spec["minReplicaCount"] == 0 and spec["cooldownPeriod"] > 0
    assert spec["fallback"]["replicas"] >= 1
    wake = [t for t in spec["triggers"] if t is not demand_trigger(scaled)]
    (ingress,) = wake
    assert float(ingress["metadata"]["activationThreshold"]) == 0
    assert float(ingress["metadata"]["threshold"]) >= 1e6
    assert demand_trigger(scaled) == demand_trigger(one("gpu", "ScaledObject"))


def test_the_vendored_keda_crd_is_the_release_named_beside_it() -> None:
    readme = (K8S / "keda" / "README.md").read_text()
    assert "v2.20.2" in readme
    digest = hashlib.sha256(KEDA_CRD.read_bytes()).hexdigest()
    assert digest in readme, "the vendored CRD changed: name its release and sha256 in README"
