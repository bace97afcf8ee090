"""The viewer in a real headless browser: Debian's Chromium driven by Playwright.

Uploads files as a user would, waits for every model's answer, checks what renders
(probability bars, overlays, "not served" for models the store lacks, the status of a
rejected file) and saves screenshots under ``build/test-artifacts/``. Chromium comes
from the OS packages (``make browser`` installs it); Playwright never downloads one.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from PIL import Image

from cxrserve.synthetic.dicomwrite import to_dicom
from cxrserve.synthetic.phantoms import render, sample_spec
from cxrserve.tools.ui.config import UIConfig
from cxrserve.tools.ui.server import make_server
from cxrserve.tools.ui.views import views

FAMILY_VIEWS = [v for v in views() if not v.composes]  # cards; the composed study fills them
STUDY_VIEW = next((v.name for v in views() if v.composes), None)

pytestmark = [pytest.mark.serve, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "build" / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Every model answers within this (CPU workers, first request warms them up).
RESULTS_TIMEOUT_MS = 300_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Chromium from the OS packages is not installed: run `make browser`")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def viewer(served):
    server = make_server(UIConfig(port=0, inference=served.inference, management=served.management,
                                  key_file=served.workdir / "key_file.json"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def study_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("viewer-files")
    now = render(sample_spec(4242, label="covid19", height=448, width=384, min_extent=2))
    before = render(sample_spec(4243, label="covid19", height=448, width=384, min_extent=2))
    files = {"study": folder / "study.png", "prior": folder / "prior.jpg", "dicom": folder / "study.dcm",
             "garbage": folder / "notes.txt"}
    Image.fromarray(now.image).save(files["study"])
    Image.fromarray(before.image).save(files["prior"], quality=92)
    files["dicom"].write_bytes(to_dicom(now.image, view_position="PA", body_part="CHEST", transfer_syntax="rle"))
    files["garbage"].write_text("Patient is a 63-year-old with cough.\n" * 20)
    return files


def open_page(browser, viewer, served):
    page = browser.new_page(viewport={"width": 1500, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(viewer.secret_url)  # as a user opens the printed URL: it sets the cookie, then redirects
    assert page.url == viewer.url  # the secret left the address bar
    page.wait_for_selector(".card[data-state='idle']")
    return page, errors


def analyse(page, image: Path, prior: Path | None = None, labels: str = "") -> None:
    page.set_input_files("#image-file", str(image))
    if prior is not None:
        page.set_input_files("#prior-file", str(prior))
    if labels:
        page.fill("#labels", labels)
    page.evaluate("delete document.body.dataset.analysed")
    page.click("#analyse")
    page.wait_for_selector("body[data-analysed='true']", timeout=RESULTS_TIMEOUT_MS)


def card_state(page, name: str) -> str:
    return page.get_attribute(f"#card-{name}", "data-state")


def image_loaded(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


def test_upload_shows_every_model_with_its_overlay(browser, viewer, served, study_files):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page, errors = open_page(browser, viewer, served)
    analyse(page, study_files["study"], prior=study_files["prior"])
    page.screenshot(path=str(ARTIFACTS / "ui-viewer.png"), full_page=True)
    if STUDY_VIEW in served.models:  # one request answered every card
        assert page.get_attribute("body", "data-requests") == STUDY_VIEW
    for view in FAMILY_VIEWS:
        expected = "done" if view.name in served.models or STUDY_VIEW in served.models else "not-served"
        assert card_state(page, view.name) == expected, (view.name, page.inner_text(f"#card-{view.name}"))
    assert "cxr-zeroshot" in served.models
    assert page.locator("#card-cxr-zeroshot .bar").count() == 14
    pictures = {"cxr-triage": "heatmap", "cxr-lungseg": "overlay", "cxr-severity": "saliency",
                "cxr-mortality": "overlay"}
    for name, picture in pictures.items():
        if name in served.models or STUDY_VIEW in served.models:
            assert image_loaded(page, f"#card-{name} img[data-picture='{picture}']"), name
    if "cxr-triage" in served.models:
        assert "lung box" in page.inner_text("#card-cxr-triage")
    if "cxr-pxs" in served.models:
        assert page.get_attribute("#card-cxr-pxs [data-direction]", "data-direction") in ("worse", "better", "stable")
        assert "pool percentile" in page.inner_text("#card-cxr-pxs")
    for view in FAMILY_VIEWS:
        if view.name not in served.models and STUDY_VIEW not in served.models:
            assert "not served" in page.inner_text(f"#card-{view.name}")
    assert image_loaded(page, "#preview-image")
    assert errors == []
    page.close()


def test_dicom_and_custom_findings(browser, viewer, served, study_files):
    page, errors = open_page(browser, viewer, served)
    analyse(page, study_files["dicom"], labels="Pneumothorax, ground-glass opacities")
    page.screenshot(path=str(ARTIFACTS / "ui-viewer-dicom.png"), full_page=True)
    assert "no browser preview" in page.inner_text("#preview-caption")
    assert card_state(page, "cxr-zeroshot") == "done"
    bars = page.locator("#card-cxr-zeroshot .bar")
    assert sorted(bars.nth(i).get_attribute("data-label") for i in range(bars.count())) == [
        "Pneumothorax", "ground-glass opacities"]
    assert "dicom" in page.inner_text("#card-cxr-zeroshot")
    assert errors == []
    page.close()


def test_without_the_secret_the_page_says_where_to_get_it(browser, viewer):
    page = browser.new_page()
    response = page.goto(viewer.url)
    assert response.status == 401 and "printed" in page.inner_text("body")
    assert page.locator("#analyse").count() == 0
    page.close()


def test_rejected_file_shows_its_status_and_message(browser, viewer, served, study_files):
    page, errors = open_page(browser, viewer, served)
    analyse(page, study_files["garbage"])
    page.screenshot(path=str(ARTIFACTS / "ui-viewer-rejected.png"), full_page=True)
    for name in served.models:
        if name in {v.name for v in FAMILY_VIEWS}:
            assert card_state(page, name) == "error", name
            text = page.inner_text(f"#card-{name}")
            assert "415" in text and "DICOM, PNG or JPEG" in text, text
    assert errors == []
    page.close()
