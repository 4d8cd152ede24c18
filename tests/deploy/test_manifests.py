"""docker/ and k8s/ checked against the code they deploy (no Docker engine or cluster here: nothing is built).

Every FACESET_* variable they set is a real setting and validates; probes and health checks hit
routes the app has; ports, Service selectors, Redis host names and kustomize resources line up.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
K8S = [doc for path in sorted((REPO / "k8s").glob("*.yaml")) if path.name != "kustomization.yaml"
       for doc in yaml.safe_load_all(path.read_text()) if doc]
SETTINGS = {f"FACESET_{name.upper()}" for name in Settings.model_fields}
PORT = re.search(r"^EXPOSE (\d+)", DOCKERFILE, re.MULTILINE).group(1)


def _kind(kind: str, name: str) -> dict:
    return next(d for d in K8S if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.fixture(scope="module")
def routes() -> set[str]:
    return set(create_app(Settings()).openapi()["paths"])


def _dockerfile_env() -> dict[str, str]:
    block = re.search(r"^ENV (.+?)(?=^\S)", DOCKERFILE, re.MULTILINE | re.DOTALL).group(1)
    return dict(re.findall(r"(FACESET_\w+)=(\S+)", block))


def test_dockerfile_serves_the_committed_models_on_its_exposed_port(routes):
    env = _dockerfile_env()
    assert set(env) <= SETTINGS
    # the wheel carries the models (faceset_models) and the settings' defaults find them: no second copy
    assert not {"FACESET_MODEL_CARD", "FACESET_DETECTOR_DIR", "FACESET_FUSION_CARD"} & set(env)
    assert "COPY models models" in DOCKERFILE.split("\nFROM ")[1] and "/opt/faceset/models" not in DOCKERFILE
    port = PORT
    cmd = re.search(r"^CMD (\[.*\])", DOCKERFILE, re.MULTILINE).group(1)
    assert cmd == f'["faceset", "serve", "--host", "0.0.0.0", "--port", "{port}"]'
    health = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", DOCKERFILE)
    assert health.group(1) == port and health.group(2) in routes
    for image in re.findall(r"^FROM (\S+)", DOCKERFILE, re.MULTILINE):
        assert ":" in image and not image.endswith(":latest")


def test_the_image_holds_no_training_code_and_no_torch():
    """Only the base wheel's sources and the models go in; its pip commands name no extra and no torch."""
    copied = {src for line in re.findall(r"^COPY (.+)$", DOCKERFILE, re.MULTILINE)
              if not line.startswith("--from") for src in line.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "service", "engines", "models"}
    pips = re.findall(r"pip (?:install|wheel) [^&\n]*", DOCKERFILE)
    assert len(pips) == 2 and not any(word in pip for pip in pips for word in ("[", "torch", "train"))
    ignored = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert "training" in ignored  # not even in the build context


def _compose_env() -> dict[str, str]:
    """The faceset service's environment as compose resolves it with an empty shell: ${VAR:-default} is default."""
    env = COMPOSE["services"]["faceset"]["environment"]
    return {key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for key, value in env.items()}


def test_compose_brings_the_service_and_its_redis():
    services = COMPOSE["services"]
    assert set(services) == {"redis", "faceset"}
    app = services["faceset"]
    assert (REPO / "docker" / app["build"]["context"] / app["build"]["dockerfile"]).resolve() == REPO / "docker" / "Dockerfile"
    assert set(app["environment"]) <= SETTINGS
    assert urlparse(app["environment"]["FACESET_REDIS_URL"]).hostname in services
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert app["ports"] == [f"8000:{PORT}"]
    for service in services.values():
        assert "image" in service and not service["image"].endswith(":latest")


def test_compose_values_are_valid_settings(monkeypatch):
    env = _compose_env()
    assert "$" not in "".join(env.values())  # every variable has a default
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.environment == "development" and settings.api_keys == []
    assert urlparse(settings.redis_url.get_secret_value()).hostname == "redis"


def test_k8s_configmap_values_are_valid_settings(monkeypatch):
    values = {**_kind("ConfigMap", "faceset")["data"], "FACESET_API_KEYS": '["k"]'}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.environment == "production" and settings.redis_url is not None
    assert set(values) <= SETTINGS


def test_k8s_probes_ports_selectors_and_redis_line_up(routes):
    deployment = _kind("Deployment", "faceset")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == int(PORT)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe")} == {"/healthz"}
    assert {"/readyz", "/healthz", "/metrics"} <= routes
    assert pod["metadata"]["annotations"]["prometheus.io/path"] in routes
    refs = {r.get("configMapRef", {}).get("name") or r.get("secretRef", {}).get("name") for r in container["envFrom"]}
    assert refs == {"faceset", "faceset-api-keys"}
    for service in (d for d in K8S if d["kind"] == "Service"):
        target = next(d for d in K8S if d["kind"] in ("Deployment", "StatefulSet")
                      and d["metadata"]["name"] == service["metadata"]["name"])
        assert service["spec"]["selector"].items() <= target["spec"]["template"]["metadata"]["labels"].items()
    redis_host = urlparse(_kind("ConfigMap", "faceset")["data"]["FACESET_REDIS_URL"]).hostname
    assert _kind("Service", redis_host)
    secret = yaml.safe_load((REPO / "k8s" / "secret.example.yaml").read_text())
    assert set(secret["stringData"]) <= SETTINGS


def test_kustomization_lists_existing_files_and_not_the_example_secret():
    kustomization = yaml.safe_load((REPO / "k8s" / "kustomization.yaml").read_text())
    assert all((REPO / "k8s" / r).is_file() for r in kustomization["resources"])
    assert "secret.example.yaml" not in kustomization["resources"]
