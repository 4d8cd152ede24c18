"""The web console's serving side: GET / and its static files (open, local, complete) and GET /model.

What the page does in a browser is tests/service/test_console_browser.py.
"""
from __future__ import annotations

import re
import tomllib

import pytest
from fastapi.testclient import TestClient

from engines.model_card import ModelCard
from service.app import create_app
from service.routes.console import STATIC
from tests.helpers import REPO, drop_keys, make_settings

KEY = "console-key-123"
# what a page or module names: src/href attributes, ES module imports, CSS url()
REFERENCE = re.compile(r"""(?:src|href)="([^"]+)"|from\s+"([^"]+)"|import\s+"([^"]+)"|url\(([^)]+)\)""")


@pytest.fixture(scope="module")
def keyed(redis_available, tmp_path_factory):
    settings = make_settings(api_keys=[KEY], state_dir=tmp_path_factory.mktemp("state"), self_test_interval_s=3600)
    with TestClient(create_app(settings)) as c:
        yield c
    drop_keys(settings)


def _references(text: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in REFERENCE.finditer(text)]


def test_the_console_page_and_every_file_it_loads_are_served_without_a_key(keyed):
    page = keyed.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]  # the browser loads nothing foreign
    assert keyed.post("/embed", files={"images": ("a.jpg", b"x")}).status_code == 401  # while the API needs the key
    seen, queue = set(), [("", page.text)]
    while queue:  # every file the page names, and every file those name (relative to the one naming it)
        base, text = queue.pop()
        for ref in _references(text):
            url = f"{base}{ref.removeprefix('./')}" if not ref.startswith("/") else ref
            if url in seen:
                continue
            seen.add(url)
            served = keyed.get(f"/{url}")
            assert served.status_code == 200, url
            if url.endswith((".js", ".css")):
                queue.append((url.rsplit("/", 1)[0] + "/", served.text))
    modules = {f"console/{p.relative_to(STATIC).as_posix()}" for p in STATIC.rglob("*.js")}
    assert modules <= seen, sorted(modules - seen)  # no module left unreachable from the page


def test_the_static_files_name_no_other_host(keyed):
    for path in STATIC.rglob("*"):
        if path.is_file():
            text = path.read_text()
            foreign = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)
                       if not u.startswith("http://www.w3.org/2000/svg")]  # the SVG namespace is a name, not a load
            assert not foreign, (path.name, foreign)


def test_model_gives_the_cards_calibrated_fars_and_floors_without_a_key(keyed):
    served = keyed.get("/model")
    assert served.status_code == 200, served.text
    body = served.json()
    settings = keyed.app.state.settings
    card = ModelCard.load(settings.model_card)
    assert (body["name"], body["version"], body["embedding_size"]) == (card.name, card.version, card.embedding_size)
    assert body["fars"] == sorted(card.calibration.thresholds)
    assert body["default_far"] == settings.default_far and settings.default_far in body["fars"]
    assert body["fpir_range"] == card.calibration.open_set.fpir_range
    assert body["probe_floor"] == card.calibration.floors.probe
    assert body["enrolment_floor"] == card.calibration.floors.enrolment
    assert body["min_face_size"] == settings.min_face_size and body["templates"] is None


def test_openapi_documents_model_but_not_the_console(keyed):
    paths = keyed.get("/openapi.json").json()["paths"]
    assert paths["/model"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ServedModel")
    assert "/" not in paths and not [p for p in paths if p.startswith("/console")]


def test_the_package_data_takes_every_static_file():
    """pyproject.toml's package data for service/ names every file of service/static (the wheel's content itself
    is read in tests/deploy/test_packaging.py)."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    taken = {p for pattern in patterns for p in STATIC.parent.glob(pattern) if p.is_file()}
    assert taken == {p for p in STATIC.rglob("*") if p.is_file()}
