"""FACESET_FUSION_CARD=none turns fusion off explicitly; gallery enrolment says which fusion made an identity."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.helpers import celeba_people, drop_keys, gallery_header, make_settings

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def photos(data_dir) -> list[bytes]:
    return celeba_people(data_dir, 0, 1, photos=3)[0]


def test_none_in_any_case_means_no_fusion_model(monkeypatch):
    monkeypatch.setenv("FACESET_FUSION_CARD", "None")
    assert Settings().fusion_card is None
    assert Settings(fusion_card="none").fusion_card is None
    assert Settings(fusion_card="models/none").fusion_card is not None  # a path is a path


def test_fusion_off_by_setting(redis_available, photos):
    settings = make_settings(fusion_card="none")
    g = gallery_header(settings, "off")
    try:
        with TestClient(create_app(settings)) as client:
            for off in (client.get("/templates/anyone"),
                        client.post("/templates/anyone/frames", files=[("images", photos[0])])):
                assert off.status_code == 503, off.text
                assert "fusion is off by setting (FACESET_FUSION_CARD=none)" in off.json()["error"]["message"]
            enrolled = client.post("/gallery/p", files=[("images", p) for p in photos[:2]], headers=g)
            assert enrolled.status_code == 200 and enrolled.json()["fusion"] == "mean", enrolled.text
            assert client.get("/gallery/p", headers=g).json()["fusion"] == "mean"
    finally:
        drop_keys(settings)


def test_enrolment_says_caface_where_it_fused(client, settings, photos):
    g = gallery_header(settings, "fusion-used")
    enrolled = client.post("/gallery/p", files=[("images", p) for p in photos[:2]], headers=g).json()
    assert enrolled["fusion"] == "caface" and enrolled["photos"] == 2
    assert client.get("/gallery/p", headers=g).json()["fusion"] == "caface"
