"""The web console in a real browser: Debian's Chromium driven by Playwright against the live service on loopback
(API keys on), uploading real photos. One server, one browser, one page for the module; the checks run in order.

Screenshots go to runs/console/ (ignored by git); the path is printed. Playwright never downloads a browser here:
it is pointed at /usr/bin/chromium (.ci/run installs Debian's package where it is missing).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, celeba_people, drop_keys, lfw_pairs, live_server, make_settings

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
KEY = "console-browser-key-123"
SHOTS = REPO / "runs" / "console"
WAIT_MS = 60_000  # a photo's round trip on 2 busy cores is about a second; leave room


@pytest.fixture(scope="module")
def playwright_api():
    """Playwright's sync API, or a skip saying what is missing (before the server starts for nothing)."""
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    return sync_playwright


def _camera_file(photo: Path, out: Path, frames: int = 10) -> Path:
    """A Y4M video of one real photo, which Chromium's fake capture device plays (looped) as the webcam."""
    img = Image.open(photo).convert("RGB")
    img = img.resize((img.width // 2 * 2, img.height // 2 * 2))
    y, cb, cr = img.convert("YCbCr").split()
    half = (img.width // 2, img.height // 2)
    planes = y.tobytes() + cb.resize(half).tobytes() + cr.resize(half).tobytes()
    out.write_bytes(f"YUV4MPEG2 W{img.width} H{img.height} F10:1 Ip A1:1 C420jpeg\n".encode()
                    + b"".join(b"FRAME\n" + planes for _ in range(frames)))
    return out


@pytest.fixture(scope="module")
def server(playwright_api, redis_available, tmp_path_factory):
    # faces under 40 px are left out (default 20): a small face the detector finds can be shown as too small
    settings = make_settings(api_keys=[KEY], state_dir=tmp_path_factory.mktemp("state"), self_test_interval_s=3600,
                             min_face_size=40)
    with live_server(settings) as (url, _):
        yield url
    drop_keys(settings)


@pytest.fixture(scope="module")
def page(playwright_api, server, lfw, data_dir, tmp_path_factory):
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    print(f"\nconsole screenshots: {SHOTS}")
    name, i, _, _ = lfw_pairs(data_dir, True, 1)[0]  # the webcam shows a real face
    camera = _camera_file(_lfw(lfw, name, i), tmp_path_factory.mktemp("camera") / "face.y4m")
    with playwright_api() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox",  # CI runs as root
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={camera}"])
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        context.set_default_timeout(WAIT_MS)
        pg = context.new_page()
        pg.problems = []  # console errors and failed scripts: a CSP refusal or a JS error shows here
        pg.on("console", lambda m: m.type == "error" and pg.problems.append(m.text))
        pg.on("pageerror", lambda e: pg.problems.append(str(e)))
        pg.goto(server)
        pg.wait_for_selector("body[data-ready=true]")
        yield pg
        browser.close()


def _lfw(lfw: Path, name: str, n: int) -> Path:
    return lfw / f"{name}_{n:04d}.jpg"


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_every_control_is_labelled_and_the_tabs_answer_the_keyboard(page):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, button, meter')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.outerHTML)""")
    assert unlabelled == []
    page.get_by_role("tab", name="Faces").focus()
    page.keyboard.press("ArrowRight")
    assert page.get_by_role("tab", name="Verify").get_attribute("aria-selected") == "true"
    assert page.locator("#panel-verify").is_visible() and not page.locator("#panel-faces").is_visible()
    page.keyboard.press("ArrowLeft")
    assert page.locator("#panel-faces").is_visible()


def test_without_the_key_the_services_error_is_shown_with_its_code(page, lfw):
    page.set_input_files("#faces-input", str(next(lfw.glob("*.jpg"))))
    error = page.locator("#faces-results .error")
    error.wait_for()
    assert re.search(r"unauthorized: missing X-API-Key header \(HTTP 401\)", error.inner_text())
    page.fill("#api-key", KEY)
    page.click("text=Use key")
    assert page.evaluate("() => sessionStorage.getItem('faceset.apiKey')") == KEY
    assert page.evaluate("() => localStorage.length") == 0 and page.context.cookies() == []  # the tab's session only


def test_faces_are_boxed_with_landmarks_and_quality_and_a_photo_without_one_says_so(page, lfw, data_dir, tmp_path):
    name, i, _, _ = lfw_pairs(data_dir, True, 1)[0]
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((240, 320, 3), 128, np.uint8)).save(blank)  # a grey wall: no face
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not an image")  # not an image format: 415
    original = Image.open(_lfw(lfw, name, i))
    small = tmp_path / "small.png"
    original.resize((original.width * 3 // 10, original.height * 3 // 10), Image.LANCZOS).save(small)
    blurred = tmp_path / "blurred.png"  # the same face at a sixth of its resolution, shown at the original size
    original.resize((original.width // 6, original.height // 6), Image.LANCZOS).resize(original.size).save(blurred)
    page.set_input_files("#faces-input", [str(_lfw(lfw, name, i)), str(blank), str(broken), str(small), str(blurred)])
    cards = page.locator("#faces-results article")
    page.locator("#faces-results article:not([aria-busy])").nth(4).wait_for()  # all five answered
    face = cards.nth(0)
    assert face.locator("svg rect").count() >= 1
    assert face.locator("svg path.lm").count() == 5 * face.locator("svg rect").count()  # five landmarks a face
    assert re.search(r"Face 1\s+quality \d\.\d{3}", face.locator(".faces li").first.inner_text())
    face.locator(".faces li").first.hover()
    tip = face.locator(".faces li .tip").first
    assert tip.is_visible() and re.search(r"magnitude \d+\.\d+ · detection score [01]\.\d{3}", tip.inner_text())
    assert "No face found in this photo." in cards.nth(1).inner_text()
    assert re.search(r"unsupported_media_type: .+ \(HTTP 415\)", cards.nth(2).locator(".error").inner_text())
    assert re.search(r"Too small: \d+ px across; the service leaves out faces under 40 px", cards.nth(3).inner_text())
    assert re.search(r"Too poor: quality 0\.\d{3} is below the model's probe floor 0\.\d{3}", cards.nth(4).inner_text())
    _shot(page, "faces")


def _verify(page, a: Path, b: Path, far: str | None = None) -> str:
    page.set_input_files("#verify-a", str(a))
    page.set_input_files("#verify-b", str(b))
    if far is not None:
        page.select_option("#verify-far", far)
    page.click("#verify-run")
    decision = page.locator("#verify-result .decision")
    decision.wait_for()
    return decision.inner_text()


def test_verify_says_match_for_one_person_and_no_match_for_two(page, lfw, data_dir):
    _tab(page, "Verify")
    options = page.locator("#verify-far option")
    assert options.count() >= 1 and page.input_value("#verify-far") == "0.001"  # the service's default FAR
    same = lfw_pairs(data_dir, True, 1)[0]
    assert _verify(page, _lfw(lfw, *same[:2]), _lfw(lfw, *same[2:]), "0.01") == "Match: the same person"
    assert "at FAR 1e-2" in page.inner_text("#verify-result")
    assert page.locator("#verify-a-view svg rect").count() == 1  # the compared face is boxed
    _shot(page, "verify")
    other = lfw_pairs(data_dir, False, 1)[0]
    assert _verify(page, _lfw(lfw, *other[:2]), _lfw(lfw, *other[2:])) == "No match: different people"


def _frames(page) -> int:
    return int(page.inner_text("#template-frames"))


def _wait_frames(page, above: int) -> int:
    """The frame count once the page shows more than `above` (Playwright's wait, not a sleep)."""
    page.locator("#template-frames").filter(has_text=re.compile(r"^\d+$")).wait_for()
    page.wait_for_function(f"() => Number(document.getElementById('template-frames').textContent) > {above}")
    return _frames(page)


def _files(tmp_path: Path, photos: list[bytes], tag: str) -> list[str]:
    paths = []
    for k, data in enumerate(photos):
        paths.append(tmp_path / f"{tag}-{k}.jpg")
        paths[-1].write_bytes(data)
    return [str(p) for p in paths]


def test_a_templates_frame_count_grows_from_photos_and_the_webcam_and_a_retry_is_not_counted(page, data_dir, tmp_path):
    (person,) = celeba_people(data_dir, 0, 1)
    first, second = _files(tmp_path, person[:3], "first"), _files(tmp_path, person[3:6], "second")
    _tab(page, "Templates")
    page.fill("#template-id", "console-template")
    page.set_input_files("#template-photos", first)
    after_first = _wait_frames(page, 0)
    page.set_input_files("#template-photos", second)
    after_second = _wait_frames(page, after_first)
    assert re.fullmatch(r"\d\.\d{3}", page.inner_text("#template-quality"))
    assert page.locator("#template-history li").count() == 2
    page.set_input_files("#template-photos", first)  # the same photos again: the same frame ids
    page.locator("#template-rejected li", has_text="duplicate_frame_id").nth(len(first) - 1).wait_for()
    assert _frames(page) == after_second
    page.click("#camera-start")
    after_camera = _wait_frames(page, after_second)  # the fake webcam plays a real face
    page.click("#camera-stop")
    assert after_camera > after_second and "Webcam off after" in page.inner_text("#camera-note")
    _shot(page, "templates")


def _enrol(page, identity: str, photos: list[str] | None = None, add: bool = False, template: str = "",
           force: bool = False) -> str:
    page.fill("#enrol-id", identity)
    page.set_checked("#enrol-force", force)
    page.fill("#enrol-template", template)
    if photos:
        page.set_input_files("#enrol-photos", photos)
    page.locator("#enrol-result").evaluate("e => e.replaceChildren()")
    page.click("#enrol-add" if add else "#enrol-run")
    said = page.locator("#enrol-result", has_text=identity).or_(page.locator("#panel-gallery [data-error]:visible"))
    said.wait_for()
    return said.inner_text()


def _search(page, photo: str) -> str:
    page.locator("#search-result").evaluate("e => e.replaceChildren()")
    page.set_input_files("#search-photo", photo)
    decision = page.locator("#search-result .decision")
    decision.wait_for()
    return decision.inner_text()


def test_an_enrolled_person_is_found_a_stranger_is_not_and_a_wrong_match_can_be_marked(page, lfw, data_dir,
                                                                                       tmp_path):
    a, b = celeba_people(data_dir, 1, 2)
    stranger = _lfw(lfw, *lfw_pairs(data_dir, False, 1)[0][2:])  # an LFW person: not in CelebA
    a_files, b_files = _files(tmp_path, a, "a"), _files(tmp_path, b, "b")
    _tab(page, "Gallery")
    assert re.search(r"Enrolled person-a: fused from 3 photos", _enrol(page, "person-a", a_files[:3]))
    assert re.search(r"Added to person-a: fused from 4 photos", _enrol(page, "person-a", a_files[3:4], add=True,
                                                                              force=True))  # whatever its quality
    _enrol(page, "person-b", b_files[:3])
    assert re.search(r"fused from \d+ photos", _enrol(page, "from-template", template="console-template"))
    assert page.inner_text("#gallery-info").startswith("3 identities")
    assert _search(page, a_files[6]) == "Identified: person-a"
    assert re.search(r"Threshold \d\.\d{3} \(FPIR 0\.\d{4} at this gallery's size\); 3 identities searched",
                     page.inner_text("#search-result"))
    assert page.locator("#search-result tbody tr").first.locator("td").first.inner_text() == "person-a"
    _shot(page, "gallery")
    assert _search(page, str(stranger)).startswith("Unknown")
    wrong = page.locator("#search-result tbody tr").first.locator("td").first.inner_text()
    page.get_by_role("button", name=f"Not this person: {wrong}").click()
    recorded = page.locator("#search-result [role=status]")
    recorded.wait_for()
    assert recorded.inner_text().startswith(f"Recorded: this probe is not {wrong} (1 negative)")
    page.fill("#enrol-id", "person-b")
    page.click("#identity-delete")
    page.locator("#enrol-result", has_text="Deleted person-b").wait_for()
    page.locator("#gallery-info", has_text="2 identities").wait_for()


def test_status_shows_the_model_readiness_and_live_figures(page):
    _tab(page, "Status")
    model = page.locator("#status-model")
    model.filter(has_text="faceset").wait_for()
    assert re.search(r"Calibrated FARs\s+1e-4 \(1 in 10,000\), 1e-3", model.inner_text())
    page.locator("#status-ready li.ok", has_text="ready").first.wait_for()
    figures = page.locator("#status-metrics")
    figures.filter(has_text=re.compile(r"Face requests/s\s*\d+\.\d\d")).wait_for()  # the second poll, 5 s on
    text = figures.inner_text()
    assert re.search(r"p99 latency\s+\d+ ms", text) and re.search(r"Batch size\s+mean \d+\.\d\d over \d+ batches", text)
    _shot(page, "status")


def test_every_tab_fits_a_phone_and_nothing_was_refused(page):
    page.set_viewport_size({"width": 390, "height": 844})
    for name in ("Faces", "Verify", "Templates", "Gallery", "Status"):
        _tab(page, name)
        width = page.evaluate("() => document.documentElement.scrollWidth")
        wide = page.evaluate("""() => [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 391)
            .map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right)).slice(0, 8)""")
        assert width <= 390, (name, width, wide)
    _tab(page, "Gallery")
    _shot(page, "phone-gallery")
    # the page's own failures (a CSP refusal, a script error); the services' 4xx answers above were the point
    assert [p for p in page.problems if not re.search(r"status of 4\d\d", p)] == []
