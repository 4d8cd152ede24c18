"""Open-set decisions (issue 12): FPIR thresholds at the gallery's size, quality floors, /verify quality bands.
Real faces, the real Redis (own key prefix), the shipped card's calibration."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image, ImageFilter

from engines.model_card import fpir_threshold
from service.app import create_app
from tests.helpers import celeba_people, drop_keys, gallery_header, make_settings

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def people(data_dir) -> list[list[bytes]]:
    """Photos of six CelebA-299 identities, eight each."""
    return celeba_people(data_dir, 20, 6)



def _quality(client, photo: bytes) -> float:
    return client.post("/embed", files=[("images", photo)]).json()["results"][0]["faces"][0]["quality"]


def _sharpest(client, photos: list[bytes]) -> bytes:
    return max(photos, key=lambda p: _quality(client, p))


def _poorest(client, photos: list[bytes]) -> bytes:
    """The degraded photo of lowest quality in which a face is still found."""
    found = [p for p in map(_degraded, photos) if client.post("/embed", files=[("images", p)]).json()["results"][0]["faces"]]
    return min(found, key=lambda p: _quality(client, p))


def _degraded(photo: bytes) -> bytes:
    """The photo shrunk to half and blurred, then brought back to its size: a face still found, poorly seen."""
    image = Image.open(io.BytesIO(photo)).convert("RGB")
    small = image.resize((image.width // 2, image.height // 2)).filter(ImageFilter.GaussianBlur(2))
    out = io.BytesIO()
    small.resize(image.size).save(out, format="JPEG")
    return out.getvalue()


def test_threshold_comes_from_the_card_and_grows_with_the_gallery(client, settings):
    card, g = client.app.state.faces.card, gallery_header(settings, "sizes")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, card.embedding_size))
    probe = {"embedding": vectors[0].tolist()}
    client.post("/gallery/v0", json={"embedding": vectors[0].tolist()}, headers=g)
    one = client.post("/gallery/search", json=probe, headers=g).json()["results"][0]
    for k in range(1, 40):
        client.post(f"/gallery/v{k}", json={"embedding": vectors[k].tolist()}, headers=g)
    forty = client.post("/gallery/search", json=probe, headers=g).json()["results"][0]
    assert (one["gallery_size"], forty["gallery_size"]) == (1, 40)
    assert one["threshold"] == pytest.approx(fpir_threshold(card, settings.default_fpir, 1))
    assert forty["threshold"] == pytest.approx(fpir_threshold(card, settings.default_fpir, 40))
    assert forty["threshold"] > one["threshold"]
    assert forty["fpir"] == pytest.approx(settings.default_fpir)
    assert forty["decision"] == "identified" and forty["identified"] == "v0" and forty["quality"] is None
    by_far = client.post("/gallery/search", json={**probe, "far": 1e-3}, headers=g).json()["results"][0]
    assert by_far["threshold"] == card.calibration.thresholds[1e-3]  # far keeps its 1:1 meaning
    assert by_far["fpir"] > 1e-3  # ... which lets in more strangers in a gallery of 40


def test_stranger_is_unknown_and_a_poor_probe_is_low_quality(client, settings, people):
    g = gallery_header(settings, "decide")
    for k in range(5):  # person 5 is never enrolled
        r = client.post(f"/gallery/p{k}", files=[("images", p) for p in people[k][:4]], headers=g)
        assert r.status_code == 200, r.text
    floor = client.app.state.faces.card.calibration.floors.probe
    stranger, known = _sharpest(client, people[5]), _sharpest(client, people[0][4:])
    poor = _poorest(client, people[0][4:])
    assert _quality(client, poor) < floor <= _quality(client, known)
    results = client.post("/gallery/search", files=[("images", p) for p in (stranger, known, poor)],
                          headers=g).json()["results"]
    assert [r["decision"] for r in results] == ["unknown", "identified", "low_quality"]
    assert [r["identified"] for r in results] == [None, "p0", None]
    assert results[2]["matches"] and results[2]["quality"] < floor  # matches still listed
    assert {r["probe_floor"] for r in results} == {floor}


def test_enrolment_below_the_floor_needs_force(client, settings, people):
    g = gallery_header(settings, "floor")
    poor = min(people[4], key=lambda p: _quality(client, p))  # a real photo, seen poorly
    assert _quality(client, poor) < client.app.state.faces.card.calibration.floors.enrolment
    refused = client.post("/gallery/weak", files=[("images", poor)], headers=g)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "low_quality"
    assert client.get("/gallery", headers=g).json()["count"] == 0
    assert client.post("/gallery/weak", files=[("images", poor)], params={"force": "true"}, headers=g).status_code == 200
    assert client.post("/gallery/weak2", files=[("images", poor)], data={"force": "true"}, headers=g).status_code == 200


@pytest.mark.parametrize("fpir", [1e-5, 0.5, 0, 1.5])
def test_fpir_out_of_range_is_422_in_every_encoding(client, settings, people, fpir):
    g = gallery_header(settings, "range")
    answers = [
        client.post("/gallery/search", json={"embedding": [1.0] * 128, "fpir": fpir}, headers=g),
        client.post("/gallery/search", files=[("images", people[0][0])], data={"fpir": str(fpir)}, headers=g),
        client.post("/gallery/search", files=[("images", people[0][0])], params={"fpir": fpir}, headers=g),
    ]
    for r in answers:
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input", r.text
        if 0 < fpir < 1:
            assert "[0.001, 0.1]" in r.json()["error"]["message"]
    both = client.post("/gallery/search", json={"embedding": [1.0] * 128, "fpir": 0.01, "far": 1e-3}, headers=g)
    assert both.status_code == 422 and "at most one" in both.json()["error"]["message"]


def test_verify_uses_the_pair_quality_band(client, people):
    card = client.app.state.faces.card
    a, b = people[2][0], people[2][1]
    r = client.post("/verify", files=[("a", a), ("b", b)]).json()
    lower = min(r["a"]["quality"], r["b"]["quality"])
    band = next(x for x in card.calibration.quality_bands if x.low <= lower < x.high or (x.high == 1 and lower == 1))
    assert r["band"] == [band.low, band.high] and r["threshold"] == band.thresholds[1e-3]
    ea, eb = (client.post("/embed", files=[("images", p)]).json()["results"][0]["faces"][0]["embedding"] for p in (a, b))
    r = client.post("/verify", json={"a": {"embedding": ea}, "b": {"embedding": eb}}).json()
    assert r["band"] is None and r["threshold"] == card.calibration.thresholds[1e-3]


def test_version_1_card_serves_far_only(tmp_path, redis_available, people):
    source = Path(__file__).resolve().parents[2] / "models" / "default"
    data = yaml.safe_load((source / "card.yaml").read_text())
    data["card_version"] = 1
    for key in ("open_set", "quality_bands", "floors"):
        data["calibration"].pop(key)
    shutil.copy(source / data["files"]["onnx"]["path"], tmp_path)
    (tmp_path / "card.yaml").write_text(yaml.safe_dump(data))
    settings = make_settings(model_card=tmp_path)
    g = {"X-Gallery": "old"}
    try:
        with TestClient(create_app(settings)) as old:
            assert old.post("/gallery/p", files=[("images", people[3][0])], headers=g).status_code == 200
            r = old.post("/gallery/search", files=[("images", people[3][1])], headers=g).json()["results"][0]
            assert r["threshold"] == data["calibration"]["thresholds"][settings.default_far]
            assert r["fpir"] is None and r["decision"] in ("identified", "unknown") and r["gallery_size"] == 1
            refused = old.post("/gallery/search", json={"embedding": [1.0] * 128, "fpir": 0.01}, headers=g)
            assert refused.status_code == 422 and "no FPIR calibration" in refused.json()["error"]["message"]
            v = old.post("/verify", files=[("a", people[3][0]), ("b", people[3][1])]).json()
            assert v["band"] is None and v["threshold"] == data["calibration"]["thresholds"][settings.default_far]
    finally:
        drop_keys(settings)


@pytest.fixture(scope="module")
def no_quality(tmp_path_factory, redis_available):
    """The default model under a card without a validated quality, as calibration leaves a model whose quality
    check fails: quality null, no bands, no floors (its ONNX a link to the shipped one)."""
    source = Path(__file__).resolve().parents[2] / "models" / "default"
    folder = tmp_path_factory.mktemp("no-quality")
    data = yaml.safe_load((source / "card.yaml").read_text())
    data["quality"], data["calibration"]["quality_bands"], data["calibration"]["floors"] = None, [], None
    (folder / data["files"]["onnx"]["path"]).symlink_to(source / data["files"]["onnx"]["path"])
    (folder / "card.yaml").write_text(yaml.safe_dump(data))
    settings = make_settings(model_card=folder)
    with TestClient(create_app(settings)) as c:
        yield c, settings
    drop_keys(settings)


def test_without_a_validated_quality_nothing_is_gated_on_it(client, no_quality, people):
    """quality null on /embed and in searches; a probe the default card answers low_quality is decided on its
    score; an enrolment below the default card's floor is taken; a caller's quality floor is a clear 422."""
    plain, settings = no_quality
    g = gallery_header(settings, "no-quality")
    floors = client.app.state.faces.card.calibration.floors
    poor = _poorest(client, people[0][4:])
    assert _quality(client, poor) < floors.probe  # the default card answers it low_quality
    (face,) = plain.post("/embed", files=[("images", poor)]).json()["results"][0]["faces"]
    assert face["quality"] is None and face["magnitude"] > 0
    weakest = min(people[4], key=lambda p: _quality(client, p))
    assert _quality(client, weakest) < floors.enrolment  # the default card refuses it without force
    for k, photos in ((0, people[0][:4]), (4, [weakest])):
        assert plain.post(f"/gallery/p{k}", files=[("images", p) for p in photos], headers=g).status_code == 200
    results = plain.post("/gallery/search", files=[("images", p) for p in (poor, people[5][0])],
                         headers=g).json()["results"]
    assert results[0]["decision"] in ("identified", "unknown") and results[1]["decision"] == "unknown"
    assert all(r["quality"] is None and r["probe_floor"] is None for r in results)  # quality gating is off
    for refused in (plain.post("/embed", files=[("images", poor)], params={"min_quality": 0.3}),
                    plain.post(f"/templates/{g['X-Gallery']}/frames", files=[("images", poor)],
                               params={"min_quality": 0.3})):
        assert refused.status_code == 422 and "quality gating is off" in refused.json()["error"]["message"]
    fused = plain.post(f"/templates/{g['X-Gallery']}/frames", files=[("images", p) for p in (poor, *people[0][:2])])
    assert fused.status_code == 200 and fused.json()["accepted"] == 3 and 0 < fused.json()["quality"] <= 1  # CAFace's own


def test_a_gallery_of_enough_identities_decides_by_its_own_calibration(redis_available):
    """From FACESET_GALLERY_CALIBRATION_MIN identities on, the FPIR threshold is the card's tail moved to the
    gallery's own vectors (engines.open_set.adapt_to_gallery), fitted once, kept in Redis so a second replica decides
    alike, and refitted only when the gallery has changed size by more than a tenth."""
    import redis

    from engines.model_card import tail_threshold
    from engines.open_set import adapt_to_gallery

    settings = make_settings(self_test_interval_s=3600, gallery_calibration_min=30)
    g = gallery_header(settings, "site")
    rng = np.random.default_rng(3)
    try:
        with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as two:
            card = one.app.state.faces.card
            vectors = rng.normal(size=(52, card.embedding_size)) + rng.normal(size=card.embedding_size)  # one "site"
            unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

            def enrol(k):
                assert one.post(f"/gallery/s{k}", json={"embedding": vectors[k].tolist()}, headers=g).status_code == 200

            def search(client):
                return client.post("/gallery/search", json={"embedding": vectors[0].tolist(), "fpir": 0.01},
                                   headers=g).json()["results"][0]

            for k in range(29):
                enrol(k)
            small = search(one)
            assert small["fpir_calibration"] == "model"
            assert small["threshold"] == pytest.approx(fpir_threshold(card, 0.01, 29))
            for k in range(29, 40):
                enrol(k)
            site = adapt_to_gallery(card.calibration.open_set, unit[:40])
            first, second = search(one), search(two)
            assert first["fpir_calibration"] == second["fpir_calibration"] == "gallery"
            assert first["threshold"] == pytest.approx(tail_threshold(site, 0.01, 40), abs=1e-6)
            assert second["threshold"] == first["threshold"]  # the replica read the same fit from Redis
            assert first["threshold"] != pytest.approx(fpir_threshold(card, 0.01, 40), abs=1e-4)
            stored = redis.Redis.from_url(settings.redis_url.get_secret_value())
            key = one.app.state.gallery.store.calibration_key(g["X-Gallery"])
            assert yaml.safe_load(stored.get(key))["identities"] == 40
            for k in range(40, 44):  # 44 is within a tenth of 40: the fit stands
                enrol(k)
            assert search(two)["threshold"] == pytest.approx(tail_threshold(site, 0.01, 44), abs=1e-6)
            for k in range(44, 52):  # 52: refitted, by whichever replica searches first
                enrol(k)
            refit = adapt_to_gallery(card.calibration.open_set, unit)
            assert search(two)["threshold"] == pytest.approx(tail_threshold(refit, 0.01, 52), abs=1e-6)
            assert yaml.safe_load(stored.get(key))["identities"] == 52
            by_far = one.post("/gallery/search", json={"embedding": vectors[0].tolist(), "far": 1e-3},
                              headers=g).json()["results"][0]
            assert by_far["fpir_calibration"] is None
    finally:
        drop_keys(settings)
