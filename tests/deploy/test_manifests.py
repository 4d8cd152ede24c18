"""docker/ and k8s/ read against the code they deploy, and the Kubernetes manifests as a cluster would judge them.

Every FACESET_* variable they set is a real setting and validates; probes and health checks hit routes the app
has. The overlays are rendered by kustomize (`kubectl kustomize`), validated in strict mode against the API's
schemas (kubernetes-validate) and checked against the Pod Security "restricted" level (pod_security.py).
The images and compose are built and run in test_containers.py.
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings
from tests.deploy.pod_security import violations

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = {name: (DOCKER / name).read_text() for name in ("Dockerfile", "Dockerfile.gpu")}
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SETTINGS = {f"FACESET_{name.upper()}" for name in Settings.model_fields}
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # the oldest we claim and the newest known
GRACEFUL_S = int(re.search(r"timeout_graceful_shutdown=(\d+)", (REPO / "service" / "cli.py").read_text()).group(1))
DIGEST = re.compile(r"^[\w.:/-]+@sha256:[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def routes() -> set[str]:
    return set(create_app(Settings()).openapi()["paths"])


# ---- images -------------------------------------------------------------------------------------------------

def _env(dockerfile: str) -> dict[str, str]:
    blocks = re.findall(r"^ENV (.+?)(?=^\S)", dockerfile, re.MULTILINE | re.DOTALL)
    return dict(re.findall(r"(FACESET_\w+)=(\S+)", "".join(blocks)))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_serve_the_packaged_models_on_their_exposed_port_as_uid_10001(name, routes):
    text = DOCKERFILES[name]
    env = _env(text)
    assert env and set(env) <= SETTINGS
    # the wheel carries the models (faceset_models) and the settings' defaults find them: no second copy
    assert not {"FACESET_MODEL_CARD", "FACESET_DETECTOR_DIR", "FACESET_FUSION_CARD"} & set(env)
    port = re.search(r"^EXPOSE (\d+)", text, re.MULTILINE).group(1)
    cmd = re.search(r"^CMD (\[.*\])", text, re.MULTILINE).group(1)
    assert cmd == f'["faceset", "serve", "--host", "0.0.0.0", "--port", "{port}"]'
    health = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", text)
    assert health.group(1) == port and health.group(2) in routes
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)  # numeric: runAsNonRoot can verify it
    assert re.search(r"groupadd .*--gid 10001", text) and re.search(r"useradd .*--uid 10001 --gid 10001", text)
    assert all(f"org.opencontainers.image.{k}=" in text for k in ("title", "version", "revision", "licenses"))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_base_image_is_a_build_argument_pinned_by_digest(name):
    text = DOCKERFILES[name]
    default = re.search(r"^ARG BASE=(\S+)$", text, re.MULTILINE).group(1)
    assert DIGEST.match(default) and default.startswith("python:3.11-slim")
    assert re.findall(r"^FROM (\S+)", text, re.MULTILINE) == ["${BASE}", "${BASE}"]  # build stage, final stage
    # the final stage takes the build stage's result only: no wheel or source copy survives in a layer
    final = text.split("\nFROM ")[2]
    assert re.findall(r"^COPY (.+)$", final, re.MULTILINE) == ["--from=build /opt/faceset /opt/faceset"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_images_build_from_the_serving_sources_and_pinned_constraints_only(name):
    text = DOCKERFILES[name]
    copied = {src for line in re.findall(r"^COPY (.+)$", text, re.MULTILINE)
              if not line.startswith("--from") for src in line.split()[:-1]}
    sources = {"pyproject.toml", "README.md", "service", "engines", "models", "constraints/cpu.txt"}
    if name.endswith("gpu"):  # the GPU stack, every pin agreeing with cpu.txt's (checked below)
        assert copied == sources | {"constraints/gpu.txt"}
        assert "pip install -r /src/constraints/gpu.txt -c /src/constraints/cpu.txt" in text
    else:
        assert copied == sources and "pip install --no-deps -r /src/constraints/cpu.txt" in text
    assert "pip install --no-deps /src" in text
    assert not re.search(r"torch|training", " ".join(re.findall(r"pip install [^\n]*", text)))
    ignored = (DOCKER / f"{name}.dockerignore").read_text().split()
    assert {"training", ".venv", ".git"} <= set(ignored)  # not even in the build context


def test_the_cpu_constraints_pin_every_requirement_of_the_base_distribution_within_its_range():
    pins = _pins(REPO / "constraints" / "cpu.txt")
    for dependency in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(dependency)
        assert requirement.specifier.contains(pins[_normal(requirement.name)]), dependency
    assert not {"torch", "faceset", "faceset-train", "pip"} & set(pins)
    gpu = _pins(REPO / "constraints" / "gpu.txt")
    assert {k: v for k, v in gpu.items() if pins.get(k, v) != v} == {}  # one version of each shared package


def _pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {_normal(n): v for n, v in (line.split("==") for line in lines if line)}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- compose ------------------------------------------------------------------------------------------------

def _compose_env(service: dict) -> dict[str, str]:
    """The environment as compose resolves it with an empty shell: ${VAR:-default} is default."""
    return {key: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for key, value in service["environment"].items()}


def test_compose_brings_the_service_its_redis_and_a_gpu_profile_with_the_device():
    services = COMPOSE["services"]
    assert set(services) == {"redis", "faceset", "faceset-gpu"}
    assert "name" not in COMPOSE  # Compose v1 refuses a top-level name
    assert "profiles" not in services["faceset"] and "profiles" not in services["redis"]  # a plain `up` runs them
    gpu = services["faceset-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name in ("faceset", "faceset-gpu"):
        app = services[name]
        assert (DOCKER / app["build"]["context"] / app["build"]["dockerfile"]).is_file()
        assert app["depends_on"]["redis"]["condition"] == "service_healthy"
        assert urlparse(_compose_env(app)["FACESET_REDIS_URL"]).hostname in services


def test_compose_publishes_on_loopback_unless_api_keys_are_given():
    assert not any("ports" in s for s in COMPOSE["services"].values())  # only the two files below publish
    override = yaml.safe_load((DOCKER / "compose.override.yaml").read_text())["services"]
    public = yaml.safe_load((DOCKER / "compose.public.yaml").read_text())["services"]
    assert set(override) == set(public) == {"faceset", "faceset-gpu"}
    for name in override:
        (port,) = override[name]["ports"]
        assert port.startswith("127.0.0.1:")
        env = public[name]["environment"]
        assert env["FACESET_ENVIRONMENT"] == "production"  # the service refuses to start without keys
        assert re.fullmatch(r"\$\{FACESET_API_KEYS:\?.+\}", env["FACESET_API_KEYS"])  # compose refuses too


def test_compose_services_are_hardened_and_redis_needs_a_password_and_keeps_an_append_only_file():
    services = COMPOSE["services"]
    for name, service in services.items():
        assert service["read_only"] and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"] and service["mem_limit"], name
        assert re.fullmatch(r"\d+:\d+", service["user"]) and not service["user"].startswith("0:"), name
    assert {services[n]["user"] for n in ("faceset", "faceset-gpu")} == {"10001:10001"}
    redis = services["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert '--requirepass "$$REDISCLI_AUTH"' in command
    assert redis["environment"]["REDISCLI_AUTH"].startswith("${FACESET_REDIS_PASSWORD:?")
    assert "redis-data:/data" in redis["volumes"]
    redis_image = re.fullmatch(r"\$\{FACESET_REDIS_IMAGE:-(.+)\}", redis["image"]).group(1)
    k8s_redis = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text())["images"][0]
    assert DIGEST.match(redis_image) and redis_image.endswith(k8s_redis["digest"])  # one Redis, pinned alike
    for name in ("faceset", "faceset-gpu"):
        assert _compose_env(services[name])["FACESET_REDIS_URL"] == "redis://:${FACESET_REDIS_PASSWORD}@redis:6379/0"


def test_compose_values_are_valid_settings(monkeypatch):
    env = _compose_env(COMPOSE["services"]["faceset"])
    env["FACESET_REDIS_URL"] = env["FACESET_REDIS_URL"].replace("${FACESET_REDIS_PASSWORD}", "0a1b")
    assert "$" not in "".join(env.values()) and set(env) <= SETTINGS
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.environment == "development" and settings.api_keys == []
    assert settings.engine_threads == COMPOSE["services"]["faceset"]["cpus"]


# ---- Kubernetes ---------------------------------------------------------------------------------------------

def _kustomize(folder: Path) -> subprocess.CompletedProcess:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (kustomize built in) is needed to render k8s/"
    return subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def k8s(tmp_path_factory) -> Path:
    """A copy of k8s/ with base/secrets.env made from the example, as a user does before applying."""
    root = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(REPO / "k8s", root, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(root / "base" / "secrets.env.example", root / "base" / "secrets.env")
    return root


@pytest.fixture(scope="module")
def rendered(k8s) -> dict[str, list[dict]]:
    out = {}
    for overlay in ("cpu", "gpu"):
        done = _kustomize(k8s / "overlays" / overlay)
        assert done.returncode == 0, done.stderr
        out[overlay] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return out


def _one(docs: list[dict], kind: str, name: str) -> dict:
    """The one document of that kind and name (a generated Secret's name carries kustomize's hash suffix)."""
    (doc,) = [d for d in docs if d["kind"] == kind and re.fullmatch(rf"{name}(-[a-z0-9]{{10}})?", d["metadata"]["name"])]
    return doc


def _pods(docs: list[dict]) -> list[dict]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def test_k8s_overlays_render_and_pass_strict_schema_validation(rendered):
    for overlay, docs in rendered.items():
        kinds = {d["kind"] for d in docs}
        assert {"Namespace", "Deployment", "StatefulSet", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                "NetworkPolicy", "Secret", "ConfigMap", "Service"} <= kinds, overlay
        for doc in docs:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)  # raises on any unknown or invalid field
            assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "faceset"


def test_rendering_fails_without_the_secret_file_instead_of_pods_waiting_on_a_missing_secret(k8s, tmp_path):
    bare = tmp_path / "k8s"
    shutil.copytree(k8s, bare, ignore=shutil.ignore_patterns("secrets.env"))
    done = _kustomize(bare / "overlays" / "cpu")
    assert done.returncode != 0 and "secrets.env" in done.stderr


def test_rendered_pods_pass_pod_security_restricted_in_a_namespace_that_enforces_it(rendered):
    for docs in rendered.values():
        labels = _one(docs, "Namespace", "faceset")["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        for pod in _pods(docs):
            assert violations(pod) == []
            assert pod["automountServiceAccountToken"] is False
            assert all(c["securityContext"]["readOnlyRootFilesystem"] for c in pod["containers"])


def test_the_pod_security_check_finds_each_loosened_rule(rendered):
    pod = copy.deepcopy(_one(rendered["cpu"], "Deployment", "faceset")["spec"]["template"]["spec"])
    container = pod["containers"][0]
    container["securityContext"] |= {"allowPrivilegeEscalation": True, "capabilities": {"add": ["SYS_ADMIN"]},
                                     "runAsNonRoot": False}
    pod["securityContext"] |= {"seccompProfile": {"type": "Unconfined"}, "runAsNonRoot": False}
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    pod["hostNetwork"] = True
    found = " | ".join(violations(pod))
    for rule in ("allowPrivilegeEscalation", "drop ALL", "SYS_ADMIN", "Unconfined", "runAsNonRoot", "hostPath",
                 "hostNetwork"):
        assert rule in found, (rule, found)


def test_images_are_set_by_digest_through_the_kustomizations(rendered):
    for overlay, docs in rendered.items():
        for pod in _pods(docs):
            for c in pod["containers"]:
                assert DIGEST.match(c["image"]), (overlay, c["image"])
        entries = yaml.safe_load((REPO / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())["images"]
        assert [e["name"] for e in entries] == ["faceset"] and entries[0]["digest"].startswith("sha256:")
    assert "faceset-gpu@" in _one(rendered["gpu"], "Deployment", "faceset")["spec"]["template"]["spec"][
        "containers"][0]["image"]


def test_k8s_probes_ports_selectors_and_redis_line_up(rendered, routes):
    docs = rendered["cpu"]
    pod = _one(docs, "Deployment", "faceset")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    port = re.search(r"^EXPOSE (\d+)", DOCKERFILES["Dockerfile"], re.MULTILINE).group(1)
    assert container["ports"][0]["containerPort"] == int(port)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {container[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe")} == {"/healthz"}
    assert {"/readyz", "/healthz", "/metrics"} <= routes and pod["metadata"]["annotations"]["prometheus.io/path"] in routes
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for service in (d for d in docs if d["kind"] == "Service"):
        assert any(service["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
                   for w in workloads), service["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    url = urlparse(env["FACESET_REDIS_URL"]["value"])
    assert url.password == "$(REDIS_PASSWORD)" and list(env).index("REDIS_PASSWORD") < list(env).index("FACESET_REDIS_URL")
    assert _one(docs, "Service", url.hostname)["spec"].get("clusterIP") != "None"


def test_k8s_settings_from_the_configmap_and_secret_are_valid(rendered, k8s, monkeypatch):
    docs = rendered["cpu"]
    secret = dict(line.split("=", 1) for line in (k8s / "base" / "secrets.env").read_text().splitlines()
                  if line and not line.startswith("#"))
    values = {**_one(docs, "ConfigMap", "faceset")["data"], "FACESET_API_KEYS": secret["FACESET_API_KEYS"],
              "FACESET_REDIS_URL": f"redis://:{secret['REDIS_PASSWORD']}@redis:6379/0"}
    assert set(values) <= SETTINGS
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.environment == "production" and settings.api_keys


def test_the_engine_threads_match_the_cpu_request_and_shutdown_fits_the_grace_period(rendered):
    for overlay, docs in rendered.items():
        pod = _one(docs, "Deployment", "faceset")["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        threads = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}.get(
            "FACESET_ENGINE_THREADS", _one(docs, "ConfigMap", "faceset")["data"]["FACESET_ENGINE_THREADS"])
        cpu = int(container["resources"]["requests"]["cpu"])
        # on the CPU the recognition pool gets the request; with a GPU one thread feeds it
        assert int(threads) == (1 if overlay == "gpu" else cpu), overlay
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep" and pod["terminationGracePeriodSeconds"] > int(sleep[1]) + GRACEFUL_S
    gpu = _one(rendered["gpu"], "Deployment", "faceset")["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_redis_is_a_stateful_set_behind_a_headless_service_with_auth_a_memory_cap_and_a_startup_probe(rendered):
    docs = rendered["cpu"]
    redis = _one(docs, "StatefulSet", "redis")
    assert _one(docs, "Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = " ".join(container["args"])
    assert "--appendonly yes" in args and "--maxmemory-policy noeviction" in args
    assert "--requirepass $(REDIS_PASSWORD)" in args and "secretKeyRef" in str(container["env"])
    maxmemory = int(re.search(r"--maxmemory (\d+)mb", args).group(1))
    assert maxmemory * 2**20 < 2**30 and container["resources"]["limits"]["memory"] == "1Gi"
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)


def test_scaling_disruption_spread_and_network_policies(rendered):
    docs = rendered["cpu"]
    hpa = _one(docs, "HorizontalPodAutoscaler", "faceset")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "faceset" and hpa["metrics"][0]["resource"]["name"] == "cpu"
    for name in ("faceset", "redis"):
        pdb = _one(docs, "PodDisruptionBudget", name)["spec"]
        workload = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name)
        assert pdb["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
    spread = _one(docs, "Deployment", "faceset")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert _one(docs, "NetworkPolicy", "default-deny-ingress")["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    (rule,) = _one(docs, "NetworkPolicy", "redis")["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "faceset"}}}]


def test_the_in_flight_component_scales_on_a_gauge_the_service_exports(k8s):
    overlay = k8s / "overlays" / "cpu-inflight"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../cpu"],
         "components": ["../../components/inflight-hpa"]}))
    done = _kustomize(overlay)
    assert done.returncode == 0, done.stderr
    hpa = _one([d for d in yaml.safe_load_all(done.stdout) if d], "HorizontalPodAutoscaler", "faceset")
    kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    gauges = {m.name for m in Metrics().registry.collect() if m.type == "gauge"}
    assert names == {"faceset_requests_in_flight"} and names <= gauges
