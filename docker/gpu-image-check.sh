#!/usr/bin/env bash
# The GPU image built and run where there is no GPU (CI here, when time allows; not in the default test run):
# builds docker/Dockerfile.gpu from HEAD on the local base (docker/local-base.sh), prints its build time and
# size, runs it hardened (read-only, no capabilities) against a Redis without --gpus, and checks that it
# serves a real face on the CPU with /readyz saying why not CUDA (durations: benchmarks/RESULTS.md, Containers).
#   docker/gpu-image-check.sh            (FACESET_DATA_DIR: the face data, default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${BASE:-faceset-base:bookworm}" TAG="${TAG:-faceset-test:gpu}" REDIS="faceset-test-redis:bookworm"
FACE="${FACESET_DATA_DIR:-../shared/data}/lfw-dev/images/Abel_Pacheco_0001.jpg"
export DOCKER_BUILDKIT=0  # Debian's docker.io has no buildx plugin
TREE="$(mktemp -d)" NET="faceset-gpu-check-$$" PASSWORD="$(openssl rand -hex 16)"
cleanup() { docker rm -f -v "$NET-redis" "$NET-app" >/dev/null 2>&1 || true; docker network rm "$NET" >/dev/null 2>&1 || true; rm -rf "$TREE"; }
trap cleanup EXIT
docker/local-base.sh "$BASE"
git archive HEAD pyproject.toml README.md service engines models constraints docker tests/deploy | tar -x -C "$TREE"
start=$(date +%s)
docker build -q -f "$TREE/docker/Dockerfile.gpu" --build-arg BASE="$BASE" -t "$TAG" "$TREE" >/dev/null
docker build -q -f "$TREE/tests/deploy/redis.Dockerfile" --build-arg BASE="$BASE" -t "$REDIS" "$TREE" >/dev/null
echo "$TAG built in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}')"
HARDENED=(--read-only --cap-drop ALL --security-opt no-new-privileges --tmpfs /tmp)
docker network create "$NET" >/dev/null
docker run -d --name "$NET-redis" --network "$NET" "${HARDENED[@]}" "$REDIS" redis-server --save '' --requirepass "$PASSWORD" >/dev/null
docker run -d --name "$NET-app" --network "$NET" "${HARDENED[@]}" -p 127.0.0.1::8000 \
  -e FACESET_REDIS_URL="redis://:$PASSWORD@$NET-redis:6379/0" "$TAG" >/dev/null
URL="http://$(docker port "$NET-app" 8000/tcp | head -1)"
for _ in $(seq 180); do
  curl -sf "$URL/readyz" -o /tmp/$NET.ready && break
  [ "$(docker inspect -f '{{.State.Running}}' "$NET-app")" = true ] || break
  sleep 1
done
[ -s /tmp/$NET.ready ] || { docker logs --tail 40 "$NET-app"; echo "FAIL: not ready" >&2; exit 1; }
python3 - "$URL" "$FACE" "/tmp/$NET.ready" <<'PY'
import json, subprocess, sys
url, face, ready = sys.argv[1:]
detail = json.load(open(ready))["checks"]["model"]["detail"]
print("readyz model:", detail)
assert "runs on the CPU, not CUDA: no NVIDIA GPU visible" in detail, detail
body = json.loads(subprocess.run(["curl", "-sf", "-F", f"images=@{face}", f"{url}/embed"], check=True,
                                 capture_output=True).stdout)
(found,) = body["results"][0]["faces"]
assert len(found["embedding"]) == body["model"]["embedding_size"]
print("embed: one face,", body["model"]["embedding_size"], "dimensions; OK")
PY
rm -f /tmp/$NET.ready
