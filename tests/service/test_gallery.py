"""1:N gallery through HTTP: real faces, the real Redis as the source of truth, FAISS per replica."""
from __future__ import annotations

import base64

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.faces import probe_image
from tests.helpers import celeba_people, gallery_header

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def people(data_dir) -> list[list[bytes]]:
    """Photos of five CelebA identities, eight each."""
    return celeba_people(data_dir, 10, 5)



def _enrol(client, headers, identity, photos):
    r = client.post(f"/gallery/{identity}", files=[("images", p) for p in photos], headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _search(client, headers, photos, **params):
    r = client.post("/gallery/search", files=[("images", p) for p in photos], headers=headers, params=params)
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_enrolled_people_are_identified_and_strangers_are_not(client, settings, people):
    g = gallery_header(settings, "identify")
    for k in range(4):  # person 4 stays a stranger
        assert _enrol(client, g, f"p{k}", people[k][:4])["count"] == k + 1
    results = _search(client, g, [people[k][5] for k in range(5)], top_k=3, far=1e-3)  # a 1:1 threshold
    card = client.app.state.faces.card
    assert all(r["threshold"] == card.calibration.thresholds[1e-3] for r in results)
    assert [r["identified"] for r in results[:4]] == ["p0", "p1", "p2", "p3"]
    assert results[4]["identified"] is None
    for r in results:
        sims = [m["similarity"] for m in r["matches"]]
        assert len(sims) == 3 and sims == sorted(sims, reverse=True)
    assert client.get("/gallery", headers=g).json()["count"] == 4


def test_reenrolment_replaces_and_deletion_erases(client, settings, people):
    g = gallery_header(settings, "replace")
    _enrol(client, g, "x", people[0][:3])
    _enrol(client, g, "y", people[1][:3])
    assert _search(client, g, [people[0][6]], far=1e-2)[0]["identified"] == "x"
    assert _enrol(client, g, "x", people[2][:3])["count"] == 2  # x is now person 2
    assert _search(client, g, [people[2][6]], far=1e-2)[0]["identified"] == "x"
    assert _search(client, g, [people[0][6]], far=1e-2)[0]["identified"] is None
    assert client.delete("/gallery/x", headers=g).json() == {"id": "x", "deleted": True}
    assert client.delete("/gallery/x", headers=g).status_code == 404
    assert [m["id"] for m in _search(client, g, [people[2][6]])[0]["matches"]] == ["y"]


def test_galleries_are_separate(client, settings, people):
    a, b = gallery_header(settings, "ga"), gallery_header(settings, "gb")
    _enrol(client, a, "only-in-a", people[3][:2])
    assert client.get("/gallery", headers=b).json()["count"] == 0
    assert _search(client, b, [people[3][5]])[0]["matches"] == []


def test_enrol_by_embedding_and_by_template(client, settings, people):
    g = gallery_header(settings, "sources")
    face = client.post("/embed", files=[("images", people[1][0])]).json()["results"][0]["faces"][0]
    assert client.post("/gallery/by-embedding", json={"embedding": face["embedding"]}, headers=g).status_code == 200
    query = client.post("/gallery/search", json={"embedding": face["embedding"]}, headers=g).json()["results"][0]
    assert query["identified"] == "by-embedding" and query["matches"][0]["similarity"] == pytest.approx(1, abs=1e-5)
    if client.app.state.templates is None:
        pytest.skip("templates are off")
    tid = f"{settings.key_prefix.strip(':')}.gallery-template"
    client.post(f"/templates/{tid}/frames", files=[("images", p) for p in people[4][:5]])
    r = client.post("/gallery/by-template", json={"template_id": tid}, headers=g)
    assert r.status_code == 200, r.text
    assert _search(client, g, [people[4][6]], far=1e-2)[0]["identified"] == "by-template"
    assert client.post("/gallery/z", json={"template_id": "no-such-template"}, headers=g).status_code == 404


def test_bad_gallery_requests(client, settings, people):
    g = gallery_header(settings, "errors")
    import io

    from PIL import Image

    blank = io.BytesIO()
    Image.fromarray(probe_image()).save(blank, format="PNG")
    no_face = client.post("/gallery/a", files=[("images", people[0][0]), ("images", blank.getvalue())], headers=g)
    assert no_face.status_code == 422 and no_face.json()["error"]["code"] == "no_face"
    assert client.post("/gallery/a", json={"embedding": [1.0] * 3}, headers=g).status_code == 422
    assert client.post("/gallery/a", json={"embedding": [1.0] * 128, "template_id": "t"}, headers=g).status_code == 422
    assert client.post("/gallery/search", json={"embedding": [1.0] * 128}, params={"far": 1e-9}, headers=g).status_code == 422
    assert client.post("/gallery/search", json={"top_k": 3}, headers=g).status_code == 422
    assert client.post("/gallery/search", headers=g, json={"embedding": [1.0] * 128, "images": []}).status_code == 422
    reserved = client.post("/gallery/search", files=[("images", people[0][0])], headers=g)
    assert reserved.status_code == 200  # the search route, never an enrolment called "search"
    assert client.get("/gallery", headers={"X-Gallery": "bad name!"}).status_code == 422
    face_none = client.post("/gallery/search", files=[("images", blank.getvalue())], params={"far": 1e-3},
                            headers=g).json()["results"][0]
    threshold_at_far = client.app.state.faces.card.calibration.thresholds[1e-3]
    assert face_none | {"fpir": None, "gallery_size": None} == {"matches": [], "identified": None, "threshold": threshold_at_far,
                                                               "decision": "unknown", "fpir": None, "gallery_size": None,
                                                               "quality": None,
                                                               "probe_floor": client.app.state.faces.card.calibration.floors.probe,
                                                               "fpir_calibration": None}  # decided by FAR


def test_replicas_follow_each_other_through_redis(settings, people, client):
    """Two replicas, one Redis: writes on either are seen by searches on the other, also after the log is trimmed."""
    g = gallery_header(settings, "replicas")
    emb = [client.post("/embed", files=[("images", p[0])]).json()["results"][0]["faces"][0]["embedding"] for p in people]
    with TestClient(create_app(settings)) as other:
        client.post("/gallery/r0", json={"embedding": emb[0]}, headers=g)
        assert other.post("/gallery/search", json={"embedding": emb[0]}, headers=g).json()["results"][0]["identified"] == "r0"
        other.post("/gallery/r1", json={"embedding": emb[1]}, headers=g)
        other.delete("/gallery/r0", headers=g)
        assert client.get("/gallery", headers=g).json()["count"] == 1
        # the log trimmed past what `client` applied: it must notice and reload from the hash
        for k in (2, 3, 4):
            other.post(f"/gallery/r{k}", json={"embedding": emb[k]}, headers=g)
        store = other.app.state.gallery.store
        r = redis.Redis.from_url(settings.redis_url.get_secret_value())
        r.xtrim(store.keys(g["X-Gallery"])[1], maxlen=1)
        assert client.get("/gallery", headers=g).json()["count"] == 4
        found = client.post("/gallery/search", json={"embedding": emb[3]}, headers=g).json()["results"][0]
        assert found["identified"] == "r3"
        assert {m["id"] for m in client.post("/gallery/search", json={"embedding": emb[3], "top_k": 10},
                                             headers=g).json()["results"][0]["matches"]} == {"r1", "r2", "r3", "r4"}


def test_json_and_multipart_queries_agree(client, settings, people):
    g = gallery_header(settings, "forms")
    _enrol(client, g, "p", people[0][:2])
    multipart = _search(client, g, [people[0][3]])[0]
    as_json = client.post("/gallery/search", json={"images": [{"data": base64.b64encode(people[0][3]).decode()}]},
                          headers=g).json()["results"][0]
    assert np.isclose(multipart["matches"][0]["similarity"], as_json["matches"][0]["similarity"], atol=1e-5)
