"""/embed and /verify through HTTP on real faces (lfw-dev), with the shipped default model."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.decisions import far_threshold
from service.faces import probe_image
from tests.helpers import lfw_pairs, photo

pytestmark = pytest.mark.data


def _embed(client, *images: bytes, **params):
    r = client.post("/embed", files=[("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)],
                    params=params)
    assert r.status_code == 200, r.text
    return r.json()


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_embed_answers_the_contract(client, lfw):
    body = _embed(client, photo(lfw, "Abel_Pacheco"))
    card = client.app.state.faces.card
    assert body["model"] == {"name": "faceset-dlib-magface", "version": card.version, "embedding_size": 128}
    (face,) = body["results"][0]["faces"]
    assert set(face) == {"bbox", "landmarks", "detection_score", "embedding", "magnitude", "quality"}
    x1, y1, x2, y2 = face["bbox"]
    assert 0 <= x1 < x2 <= 150 and 0 <= y1 < y2 <= 150
    assert len(face["landmarks"]) == 5 and face["landmarks"][0][0] < face["landmarks"][1][0]  # left eye left of right
    assert abs(np.linalg.norm(face["embedding"]) - 1) < 1e-5
    assert face["magnitude"] > 10 and 0 <= face["quality"] <= 1 and face["detection_score"] > 0.9


def test_same_person_matches_and_different_people_do_not(client, data_dir, lfw):
    correct, total = 0, 0
    for same in (True, False):
        for a, i, b, j in lfw_pairs(data_dir, same, 10):
            r = client.post("/verify", files={"a": photo(lfw, a, i), "b": photo(lfw, b, j)}, params={"far": 1e-2})
            assert r.status_code == 200, r.text
            verdict = r.json()
            assert verdict["far"] == 1e-2 and verdict["match"] == (verdict["similarity"] >= verdict["threshold"])
            correct += verdict["match"] == same
            total += 1
    assert correct >= 19, f"{correct}/{total} pairs decided correctly at FAR 1e-2"


def test_verify_default_far_is_the_cards_threshold(client, data_dir, lfw):
    a, i, b, j = lfw_pairs(data_dir, False, 1)[0]
    verdict = client.post("/verify", files={"a": photo(lfw, a, i), "b": photo(lfw, b, j)}).json()
    card = client.app.state.faces.card
    lower = min(verdict["a"]["quality"], verdict["b"]["quality"])  # the pair's quality band decides
    assert verdict["far"] == 1e-3 and verdict["threshold"] == far_threshold(card, 1e-3, lower)[1]
    assert verdict["match"] is False and verdict["a"]["source"] == "image" and verdict["a"]["faces_found"] == 1


def test_batch_request_equals_single_requests(client, lfw):
    names = ["Abel_Pacheco", "Akhmed_Zakayev", "Amber_Tamblyn", "Anders_Fogh_Rasmussen"]
    images = [photo(lfw, n) for n in names]
    batch = _embed(client, *images)["results"]
    for data, together in zip(images, batch):
        alone = _embed(client, data)["results"][0]
        assert len(alone["faces"]) == len(together["faces"]) >= 1
        for fa, fb in zip(alone["faces"], together["faces"]):
            assert np.dot(fa["embedding"], fb["embedding"]) > 1 - 1e-4
            assert fa["bbox"] == fb["bbox"] and abs(fa["magnitude"] - fb["magnitude"]) < 1e-3 * fa["magnitude"]


def test_json_base64_equals_multipart(client, lfw):
    data = photo(lfw, "Abel_Pacheco")
    multipart = _embed(client, data)["results"][0]["faces"][0]
    r = client.post("/embed", json={"images": [{"data": base64.b64encode(data).decode()},
                                                {"data": "data:image/jpeg;base64," + base64.b64encode(data).decode()}]})
    assert r.status_code == 200, r.text
    for result in r.json()["results"]:
        assert np.dot(result["faces"][0]["embedding"], multipart["embedding"]) > 1 - 1e-4


def test_verify_takes_embeddings_and_mixed_sides(client, data_dir, lfw):
    a, i, b, j = lfw_pairs(data_dir, True, 1)[0]
    emb_a = _embed(client, photo(lfw, a, i))["results"][0]["faces"][0]["embedding"]
    with_images = client.post("/verify", files={"a": photo(lfw, a, i), "b": photo(lfw, b, j)}).json()
    mixed = client.post("/verify", json={"a": {"embedding": [3 * v for v in emb_a]},  # any scale
                                          "b": {"data": base64.b64encode(photo(lfw, b, j)).decode()}}).json()
    assert abs(mixed["similarity"] - with_images["similarity"]) < 1e-4
    assert mixed["a"] == {"source": "embedding", "bbox": None, "quality": None, "faces_found": None}
    form = client.post("/verify", files={"b": photo(lfw, b, j)}, data={"a": str(emb_a)}).json()
    assert abs(form["similarity"] - with_images["similarity"]) < 1e-4


def test_no_face_is_an_empty_list_for_embed_and_422_for_verify(client, lfw):
    blank = _png(probe_image())
    body = _embed(client, blank, photo(lfw, "Abel_Pacheco"))
    assert body["results"][0]["faces"] == [] and len(body["results"][1]["faces"]) == 1
    r = client.post("/verify", files={"a": photo(lfw, "Abel_Pacheco"), "b": blank})
    assert r.status_code == 422 and r.json()["error"] == {"code": "no_face", "message": "image b: no face found"}


def test_options_limit_faces_size_and_quality(client, lfw):
    data = photo(lfw, "Abel_Pacheco")
    face = _embed(client, data)["results"][0]["faces"][0]
    side = min(face["bbox"][2] - face["bbox"][0], face["bbox"][3] - face["bbox"][1])
    assert _embed(client, data, min_face_size=side + 1)["results"][0]["faces"] == []
    assert len(_embed(client, data, min_face_size=side - 1)["results"][0]["faces"]) == 1
    assert _embed(client, data, min_quality=min(1.0, face["quality"] + 1e-3))["results"][0]["faces"] == []
    assert len(_embed(client, data, min_quality=face["quality"] - 1e-3)["results"][0]["faces"]) == 1


def test_max_faces_keeps_the_largest(client, lfw):
    a, b = (np.asarray(Image.open(io.BytesIO(photo(lfw, n))).convert("RGB")) for n in ("Abel_Pacheco", "Amber_Tamblyn"))
    small = np.asarray(Image.fromarray(b).resize((100, 100)))  # LFW photos are 150 × 150
    canvas = np.full((200, 300, 3), 128, np.uint8)
    canvas[25:175, :150] = a
    canvas[50:150, 180:280] = small
    both = _embed(client, _png(canvas))["results"][0]["faces"]
    assert len(both) == 2 and both[0]["bbox"][2] <= 160 and both[1]["bbox"][0] >= 170  # largest first
    (largest,) = _embed(client, _png(canvas), max_faces=1)["results"][0]["faces"]
    assert largest["bbox"] == both[0]["bbox"]


def test_no_image_or_embedding_reaches_the_logs(client, lfw, caplog):
    caplog.set_level("DEBUG")
    data = photo(lfw, "Abel_Pacheco")
    face = _embed(client, data)["results"][0]["faces"][0]
    client.post("/verify", json={"a": {"embedding": face["embedding"]}, "b": {"data": base64.b64encode(data).decode()}})
    client.post("/embed", files=[("images", data[:500])])  # an error path too
    logged = caplog.text
    assert f"{face['embedding'][0]:.6f}"[:8] not in logged and base64.b64encode(data[:30]).decode() not in logged
