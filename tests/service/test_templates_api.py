"""CAFace templates through HTTP, with the real fusion model, the real Redis and real faces (celeba-299)."""
from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image, ImageFilter

from engines.fusion import FusionModel
from service.faces import probe_image

REPO = Path(__file__).resolve().parents[2]
FUSION = REPO / "models" / "caface"

pytestmark = [pytest.mark.data,
              pytest.mark.skipif(not (FUSION / "card.yaml").exists(), reason=f"no fusion model at {FUSION}")]


@pytest.fixture(scope="module")
def people(data_dir) -> list[list[bytes]]:
    """Photos of three CelebA identities, twelve each."""
    root = data_dir / "celeba-299"
    folders = sorted(p for p in root.iterdir() if p.is_dir())[:3]
    return [[f.read_bytes() for f in sorted(d.glob("*.jpg"))[:12]] for d in folders]


@pytest.fixture(scope="module")
def frames(client, people) -> list[dict]:
    """Person 0's photos as precomputed frames (unit embedding, magnitude, style) from /embed."""
    r = client.post("/embed", params={"include_style": True, "max_faces": 1},
                    files=[("images", p) for p in people[0]])
    assert r.status_code == 200, r.text
    faces = [res["faces"][0] for res in r.json()["results"] if res["faces"]]
    assert len(faces) >= 10
    return [{"embedding": f["embedding"], "magnitude": f["magnitude"], "style": f["style"]} for f in faces]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tid(settings, name: str) -> str:
    return f"{settings.key_prefix.strip(':')}.{name}"


def test_order_and_batching_do_not_change_the_template(client, settings, frames):
    fusion = FusionModel.load(FUSION)
    raw = np.array([np.asarray(f["embedding"]) * f["magnitude"] for f in frames])
    style = np.array([f["style"] for f in frames])
    all_at_once = fusion.fuse(raw, style).embedding
    rng = np.random.default_rng(0)
    fused = []
    for t in range(3):
        order = rng.permutation(len(frames))
        for part in np.array_split(order, [2, 5] if t == 0 else ([1] if t == 1 else [3, 4, 8])):
            r = client.post(f"/templates/{_tid(settings, f'order{t}')}/frames",
                            json={"frames": [frames[i] for i in part]})
            assert r.status_code == 200 and r.json()["accepted"] == len(part), r.text
        got = client.get(f"/templates/{_tid(settings, f'order{t}')}").json()
        assert got["frames"] == len(frames)
        fused.append(np.asarray(got["embedding"]))
    for e in fused:
        assert abs(np.linalg.norm(e) - 1) < 1e-5
        assert float(e @ all_at_once) >= 0.99999
        assert float(e @ fused[0]) >= 0.99999


def test_images_and_precomputed_frames_agree(client, settings, people, frames):
    by_image = client.post(f"/templates/{_tid(settings, 'img')}/frames", files=[("images", p) for p in people[0][:4]])
    assert by_image.status_code == 200 and by_image.json()["accepted"] == 4, by_image.text
    by_embedding = client.post(f"/templates/{_tid(settings, 'emb')}/frames", json={"frames": frames[:4]})
    a = np.asarray(client.get(f"/templates/{_tid(settings, 'img')}").json()["embedding"])
    b = np.asarray(client.get(f"/templates/{_tid(settings, 'emb')}").json()["embedding"])
    assert by_embedding.json()["quality"] == pytest.approx(by_image.json()["quality"], abs=1e-4)
    assert float(a @ b) > 0.9999


def test_a_template_verifies_its_person_not_others(client, settings, people):
    tid = _tid(settings, "verify")
    assert client.post(f"/templates/{tid}/frames", files=[("images", p) for p in people[1][:8]]).json()["accepted"] == 8
    template = client.get(f"/templates/{tid}").json()["embedding"]

    def similarity(photo: bytes) -> float:
        return client.post("/verify", json={"a": {"embedding": template}, "b": {"data": _b64(photo)}}).json()["similarity"]

    same = [similarity(p) for p in people[1][8:12]]
    other = [similarity(p) for p in people[2][:4]]
    assert min(same) > max(other)


def test_rejected_frames_are_reported_with_index_and_reason(client, settings, people):
    tid = _tid(settings, "rejects")
    blank = io.BytesIO()
    Image.fromarray(probe_image()).save(blank, format="PNG")
    files = [("images", people[0][0]), ("images", blank.getvalue()), ("images", b"GIF89a" + b"\0" * 20),
             ("images", people[0][0][:200]), ("images", people[0][1])]
    r = client.post(f"/templates/{tid}/frames", files=files, data={"frame_ids": ["a", "b", "c", "d", "e"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["accepted"] == 2 and body["frames"] == 2
    assert body["rejected"] == [{"index": 1, "reason": "no_face"}, {"index": 2, "reason": "unsupported_media_type"},
                                {"index": 3, "reason": "undecodable_image"}]
    retry = client.post(f"/templates/{tid}/frames", files=[("images", people[0][1]), ("images", people[0][2])],
                        data={"frame_ids": ["e", "f"]}).json()
    assert retry["accepted"] == 1 and retry["frames"] == 3
    assert retry["rejected"] == [{"index": 0, "reason": "duplicate_frame_id"}]
    strict = client.post(f"/templates/{tid}/frames", params={"min_quality": 1.0}, files=[("images", people[0][3])]).json()
    assert strict["rejected"] == [{"index": 0, "reason": "low_quality"}] and strict["frames"] == 3


def test_quality_grows_with_a_good_frame(client, settings, people):
    tid = _tid(settings, "quality")
    photo = Image.open(io.BytesIO(people[0][5])).convert("RGB")
    poor = [_jpeg(photo.filter(ImageFilter.GaussianBlur(r))) for r in (3, 4, 5)]
    low = client.post(f"/templates/{tid}/frames", files=[("images", p) for p in poor]).json()
    assert low["accepted"] >= 2, low
    high = client.post(f"/templates/{tid}/frames", files=[("images", people[0][6])]).json()
    assert high["quality"] > low["quality"]


def test_concurrent_writers_through_the_api_lose_nothing(client, settings, frames):
    tid = _tid(settings, "concurrent")
    errors = []

    def writer(w: int) -> None:
        for k in range(0, 25, 5):
            batch = [dict(frames[(w + k + j) % len(frames)], frame_id=f"w{w}-{k + j}") for j in range(5)]
            for attempt in range(2):  # every call retried once: the retry must count nothing
                r = client.post(f"/templates/{tid}/frames", json={"frames": batch})
                if r.status_code != 200 or r.json()["accepted"] != (5 if attempt == 0 else 0):
                    errors.append(r.text)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    assert client.get(f"/templates/{tid}").json()["frames"] == 200
    templates = client.app.state.templates
    store = templates.store
    blob = redis.Redis.from_url(settings.redis_url.get_secret_value()).hget(store.keys(tid)[0], "sum")
    counts = templates.fusion.memory_from_vector(np.frombuffer(blob, "<f8")).counts
    assert counts.sum() == pytest.approx(200, abs=1e-3)  # each frame's assignment sums to 1 (in float32)


def test_unknown_and_deleted_templates_are_404(client, settings, frames):
    tid = _tid(settings, "gone")
    assert client.get(f"/templates/{tid}").status_code == 404
    assert client.delete(f"/templates/{tid}").status_code == 404
    client.post(f"/templates/{tid}/frames", json={"frames": frames[:2]})
    brief = client.get(f"/templates/{tid}", params={"embedding": False}).json()
    assert brief["frames"] == 2 and brief["embedding"] is None and 0 < brief["quality"] <= 1
    assert client.delete(f"/templates/{tid}").json() == {"id": tid, "deleted": True}
    r = client.get(f"/templates/{tid}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    client_redis = redis.Redis.from_url(settings.redis_url.get_secret_value())
    assert not list(client_redis.scan_iter(match=f"*{tid}*"))
    malformed = client.get("/templates/bad id!")  # not an id at all (the contract's 404 is for unknown ids)
    assert malformed.status_code == 422 and malformed.json()["error"]["code"] == "invalid_input"


def test_frames_that_overflow_the_fusion_model_are_refused_and_not_stored(client, settings, frames):
    """Found by schemathesis (tests/service/test_fuzz.py): finite but extreme style values overflowed in
    float32, the NaN memory was stored and the answer was a 500."""
    tid = _tid(settings, "overflow")
    huge = dict(frames[0], style=[1.7976931348623157e308, -1.7976931348623157e308] * (len(frames[0]["style"]) // 2))
    r = client.post(f"/templates/{tid}/frames", json={"frames": [frames[1], huge]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input" and "frames[1]" in r.text
    assert client.get(f"/templates/{tid}").status_code == 404
