"""The Kubernetes manifests (deploy/k8s) validate against the Kubernetes schemas in strict mode (an
unknown or misspelled field fails), as files and as kustomize renders them, and say what the service
needs: its probes, a grace period longer than a request, the replica id, the shared store, fitted memory.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common import config
from tests import ROOT

K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = kubernetes_validate.latest_version()
"""The newest Kubernetes the pinned kubernetes-validate has schemas of."""
NOT_MANIFESTS = {"kustomization.yaml", "config.yaml"}
PATCH_SUFFIX = "-patch.yaml"  # an overlay's JSON patches: fragments, validated once applied (rendered)
KUSTOMIZATIONS = [K8S / "base", *sorted((K8S / "overlays").iterdir())]
MEASURED_RSS_BYTES = 3.1e9
"""2 workers with every model loaded, RSS summed over processes (docs/performance.md)."""


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_MANIFESTS and not p.name.endswith(PATCH_SUFFIX))


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def render(folder: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize folder`` (or ``kustomize build``): the resources an apply would send. Without
    either the test fails: `make tools` installs Debian's kubernetes-client (kubectl 1.20, kustomize
    v2.0.3 built in), the oldest kustomize the overlays are written for."""
    if shutil.which("kubectl"):
        argv = ["kubectl", "kustomize", str(folder)]
    elif shutil.which("kustomize"):
        argv = ["kustomize", "build", str(folder)]
    else:
        pytest.fail("neither kubectl nor kustomize is installed, so the kustomizations cannot be rendered: "
                    "`make tools` installs Debian's kubernetes-client")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return documents(done.stdout)


def by_kind(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["kind"]: r for r in resources}


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates(path: Path) -> None:
    for resource in documents(path.read_text()):
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_rendered_kustomization_validates(folder: Path) -> None:
    rendered = render(folder)
    assert {r["kind"] for r in rendered} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                             "PodDisruptionBudget", "ConfigMap"}
    for resource in rendered:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_strict_validation_refuses_a_misspelled_field() -> None:
    deployment = copy.deepcopy(by_kind(documents((K8S / "base" / "deployment.yaml").read_text()))["Deployment"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.fixture(scope="module")
def production() -> dict[str, dict[str, Any]]:
    return by_kind(render(K8S / "overlays" / "production"))


def test_the_pods_probe_terminate_and_identify_as_the_service_needs(production: dict[str, dict[str, Any]]) -> None:
    deployment = production["Deployment"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert ports == {"http": 3000, "grpc": config.load().grpc.port}

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    timeout_s = config.load(K8S / "base" / "config.yaml").service.timeout_s
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(pre_stop[1]) + timeout_s

    env = {e["name"]: e for e in container["env"]}
    assert env["BUNDLE_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    secret_keys = set(by_kind(documents((K8S / "secret.example.yaml").read_text()))["Secret"]["stringData"])
    for name in ("BUNDLE_STORE_URL", "BUNDLE_ADMIN_TOKEN", "BUNDLE_FEEDBACK_TOKEN"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "bundle-secrets" and ref["key"] in secret_keys
    assert not env["BUNDLE_STORE_URL"]["valueFrom"]["secretKeyRef"].get("optional", False)

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["http"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith("registry.")


def test_memory_is_fitted_to_the_measured_rss(production: dict[str, dict[str, Any]]) -> None:
    resources = production["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    gib = {"Gi": 2**30, "Mi": 2**20}

    def size(quantity: str) -> float:
        return float(quantity[:-2]) * gib[quantity[-2:]]

    requested, limit = size(resources["requests"]["memory"]), size(resources["limits"]["memory"])
    assert 0.9 * MEASURED_RSS_BYTES <= requested <= limit <= 2 * MEASURED_RSS_BYTES
    assert int(resources["requests"]["cpu"]) == config.load(K8S / "base" / "config.yaml").service.worker_count()


def test_config_map_serves_what_the_image_holds(production: dict[str, dict[str, Any]]) -> None:
    """The image packs the models the repository's config.yaml names (bentofile.yaml): the mounted
    configuration is valid and names no other, and the pods read it."""
    mounted = config.load(K8S / "base" / "config.yaml")
    assert set(mounted.model_tags()) <= set(config.load().model_tags())
    config_map = production["ConfigMap"]
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == yaml.safe_load((K8S / "base" / "config.yaml").read_text())
    pod = production["Deployment"]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("configMap", {}).get("name") == config_map["metadata"]["name"])
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["BUNDLE_CONFIG"] == f"{mount['mountPath']}/config.yaml"


def test_service_budget_and_autoscaler_select_the_pods(production: dict[str, dict[str, Any]]) -> None:
    deployment = production["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        spec = production[kind]["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        assert selector.items() <= labels.items(), kind
    target = production["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert production["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2
    assert production["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert {r["metadata"].get("namespace") for r in production.values()} == {"bundle"}
