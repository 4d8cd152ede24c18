"""The CPU image and compose, built from a clean tree and run: hardened as deployed, real faces through HTTP.

Needs a Docker engine (.ci/run installs and starts one); no registry: the images build on the local base
docker/local-base.sh makes, and Redis is Debian's redis-server in tests/deploy/redis.Dockerfile.
"""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
import uuid

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.deploy.containers import ENV, container, docker, network, published, wait_ready
from tests.helpers import drop_keys, free_port, make_settings, photo

pytestmark = [pytest.mark.slow, pytest.mark.data]

HARDENED = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp")
FACE = "Abel_Pacheco"
MB = 1_000_000


@pytest.fixture(scope="module")
def lfw(data_dir):
    return data_dir / "lfw-dev" / "images"


@pytest.fixture(scope="module")
def checkout_embedding(lfw, redis_host) -> np.ndarray:
    """The face's embedding from the checkout's own service, in process: what every container must answer."""
    settings = make_settings(self_test_interval_s=3600)
    try:
        with TestClient(create_app(settings)) as client:
            return _embedding(client.post("/embed", files=[("images", ("a.jpg", photo(lfw, FACE), "image/jpeg"))]))
    finally:
        drop_keys(settings)


@pytest.fixture(scope="module")
def redis_host() -> None:
    import redis

    from tests.helpers import REDIS_URL

    redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()  # the checkout's app needs the machine's Redis


def _embedding(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (face,) = response.json()["results"][0]["faces"]
    return np.asarray(face["embedding"])


def _embed_over_http(url: str, lfw) -> np.ndarray:
    return _embedding(httpx.post(f"{url}/embed", files=[("images", ("a.jpg", photo(lfw, FACE), "image/jpeg"))],
                                 timeout=60))


def _inspect(ref: str) -> dict:
    return json.loads(docker("inspect", ref).stdout)[0]


def test_the_cpu_image_holds_the_service_and_its_models_only_in_one_layer_over_the_base(cpu_image, base_image):
    image = _inspect(cpu_image)["Config"]
    assert image["User"] == "10001:10001" and image["Healthcheck"]["Test"][0] == "CMD"
    labels = image["Labels"]
    assert {"title", "version", "revision", "licenses", "base.name"} <= {k.removeprefix("org.opencontainers.image.") for k in labels}
    assert labels["org.opencontainers.image.base.name"] == base_image
    probe = ("import importlib.util as u; print(sorted(m for m in ('torch', 'training', 'pip', 'scipy', 'onnx', "
             "'onnxruntime', 'faiss', 'cv2', 'faceset_models', 'service') if u.find_spec(m)))")
    found = docker("run", "--rm", *HARDENED, cpu_image, "python3", "-c", probe).stdout.strip()
    assert found == str(sorted(["onnxruntime", "faiss", "cv2", "faceset_models", "service"]))
    assert "redis-server" not in docker("run", "--rm", cpu_image, "sh", "-c", "command -v redis-server || true").stdout
    # multi-stage: above the base, one layer carries the venv; every other one is metadata or a few files
    base_layers = len(_inspect(base_image)["RootFS"]["Layers"])
    history = [json.loads(line) for line in docker("history", "--no-trunc", "--human=false", "--format",
                                                   "{{json .}}", cpu_image).stdout.splitlines()]
    ours = [int(h["Size"]) for h in history[: len(history) - base_layers]]
    assert sum(s > MB for s in ours) == 1, ours
    size = int(_inspect(cpu_image)["Size"])
    print(f"\n{cpu_image}: {size / MB:.0f} MB ({int(_inspect(base_image)['Size']) / MB:.0f} MB base)")


def test_the_cpu_image_serves_real_faces_read_only_without_capabilities(cpu_image, redis_image, lfw,
                                                                       checkout_embedding):
    password = secrets.token_hex(16)
    with network() as net, \
            container("--network", net, "--name", f"redis-{net}", *HARDENED, redis_image,
                      "redis-server", "--save", "", "--requirepass", password), \
            container("--network", net, *HARDENED, "-p", "127.0.0.1::8000",
                      "-e", f"FACESET_REDIS_URL=redis://:{password}@redis-{net}:6379/0",
                      "-e", "FACESET_ENGINE_THREADS=1", cpu_image) as faceset:
        url = f"http://{published(faceset)}"
        ready = wait_ready(url, faceset)
        assert ready["ready"] and ready["checks"]["model"]["detail"].endswith("runs on the CPU")
        cosine = float(np.dot(_embed_over_http(url, lfw), checkout_embedding))
        assert cosine > 0.9999, cosine  # the same model, preprocessing and runtime as the checkout
        config = _inspect(faceset)["HostConfig"]
        assert config["ReadonlyRootfs"] and config["CapDrop"] == ["ALL"]
        assert docker("exec", faceset, "id", "-u").stdout.strip() == "10001"
        _until_healthy(faceset)


def _until_healthy(cid: str, timeout_s: float = 90) -> None:
    """The image's HEALTHCHECK passes (first run after its 15 s interval)."""
    deadline = time.monotonic() + timeout_s
    while (status := _inspect(cid)["State"]["Health"]["Status"]) != "healthy" and time.monotonic() < deadline:
        assert status != "unhealthy", _inspect(cid)["State"]["Health"]["Log"][-1]
        time.sleep(2)
    assert status == "healthy"


def _composes() -> list[list[str]]:
    """Compose v2 (the docker plugin) and v1 (docker-compose), those installed."""
    found = []
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        found.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        found.append(["docker-compose"])
    return found


def test_compose_without_api_keys_publishes_on_loopback_only_and_serves_real_faces(tree, cpu_image, redis_image, lfw,
                                                                                  checkout_embedding):
    composes = _composes()
    assert composes, "neither `docker compose` nor docker-compose is installed (.ci/run installs docker-compose)"
    for compose in composes:
        _compose_up_embed_down(compose, tree / "docker", cpu_image, redis_image, lfw, checkout_embedding)


def _compose_up_embed_down(compose, folder, cpu_image, redis_image, lfw, expected) -> None:
    project = f"fstest{uuid.uuid4().hex[:8]}"
    env = {**ENV, "FACESET_REDIS_PASSWORD": secrets.token_hex(16), "FACESET_IMAGE": cpu_image,
           "FACESET_REDIS_IMAGE": redis_image, "FACESET_PORT": str(free_port())}

    def run(*args, timeout=300):
        done = subprocess.run([*compose, "-p", project, *args], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{compose} {args}: {done.stderr[-3000:]}"
        return done.stdout

    try:
        run("up", "-d", "--no-build")
        faceset, redis = (run("ps", "-q", name).strip() for name in ("faceset", "redis"))
        assert sorted(run("ps", "-q").split()) == sorted([faceset, redis])  # the gpu profile's service stays down
        assert published(faceset) == f"127.0.0.1:{env['FACESET_PORT']}"
        url = f"http://{published(faceset)}"
        assert wait_ready(url, faceset)["ready"]
        assert float(np.dot(_embed_over_http(url, lfw), expected)) > 0.9999
        for cid in (faceset, redis):
            config = _inspect(cid)["HostConfig"]
            assert config["ReadonlyRootfs"] and config["CapDrop"] == ["ALL"] and config["Memory"] > 0
            assert "no-new-privileges:true" in config["SecurityOpt"]
        refused = docker("exec", redis, "env", "-u", "REDISCLI_AUTH", "redis-cli", "ping").stdout
        assert "NOAUTH" in refused  # a password is required
        for name, value in {"appendonly": "yes", "maxmemory-policy": "noeviction"}.items():
            assert docker("exec", redis, "redis-cli", "config", "get", name).stdout.split() == [name, value]
    finally:
        run("down", "-v", "--remove-orphans")
    left = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}").stdout
    assert not left.strip(), left


def test_compose_refuses_to_publish_on_every_interface_without_api_keys(tree):
    composes = _composes()
    assert composes
    env = {k: v for k, v in ENV.items() if k != "FACESET_API_KEYS"} | {"FACESET_REDIS_PASSWORD": "ab"}
    files = ["-f", "compose.yaml", "-f", "compose.public.yaml", "config"]
    for compose in composes:
        refused = subprocess.run([*compose, *files], cwd=tree / "docker", env=env, capture_output=True, text=True)
        assert refused.returncode != 0 and "FACESET_API_KEYS" in refused.stderr
        keyed = subprocess.run([*compose, *files], cwd=tree / "docker", env=env | {"FACESET_API_KEYS": '["k"]'},
                               capture_output=True, text=True)
        assert keyed.returncode == 0, keyed.stderr
        assert "production" in keyed.stdout and "127.0.0.1" not in keyed.stdout
