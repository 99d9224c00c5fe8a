"""End-to-end test of the web demo in a real headless Chromium driven by Playwright.

Needs the Debian ``chromium`` package and ``playwright`` (Python) - ``.ci/install-browser.sh`` installs both;
Playwright's own browser download cannot work offline, so the system Chromium is used. Screenshots are written to
``$REGIONCLIP_ARTIFACTS`` (default ``tests/artifacts/``).
"""
from __future__ import annotations

import re
from typing import Any, Iterator

import pytest

from _browser import ARTIFACTS, chromium, sync_api
from test_demo import demo_image, free_port, name_embeddings, tiny_model

TIMEOUT_MS = 120_000  # generous: 2 shared CPU cores

pytest.importorskip("gradio", reason="gradio not installed (pip install 'regionclip[demo]')")


@pytest.fixture(scope="module")
def app_url() -> Iterator[str]:
    from regionclip.demo import build_demo, launch_demo

    demo = build_demo(tiny_model(), name_embeddings)
    url = launch_demo(demo, port=free_port(), block=False, quiet=True)
    try:
        yield url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(1400, 1100) as ctx:
        yield ctx


def _open_with_image(browser: Any, url: str) -> Any:
    """A new tab on the demo with the bundled demo image loaded into the editor."""
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="networkidle")
    page.locator("#rc-image input[type=file]").set_input_files(str(demo_image()))
    # the editor shows its canvas toolbar once the image is in; before that a click would send no image
    sync_api.expect(page.locator("#rc-image")).not_to_contain_text("Upload an image", timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)
    return page


def _toasts(page: Any) -> str:
    return " | ".join(page.locator(".toast-body").all_inner_texts())


def test_upload_vocabulary_detect_shows_image_table_and_json(browser: Any, app_url: str) -> None:
    page = _open_with_image(browser, app_url)
    page.locator("#rc-vocab textarea").fill("potted plant, sink, bottle")
    page.locator("#rc-run").click()
    expect = sync_api.expect
    expect(page.locator("#rc-status")).to_contain_text("detection", timeout=TIMEOUT_MS)
    assert "Error" not in _toasts(page), _toasts(page)
    annotated = page.locator("#rc-annotated img")
    expect(annotated).to_be_visible()
    # the annotated image really loaded (not a broken link): natural size of the 1920x1080 demo image
    assert annotated.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [1920, 1080]
    table = page.locator("#rc-table")
    expect(table).to_contain_text("score")
    expect(table).to_contain_text(re.compile(r"potted plant|sink|bottle"))  # a detected class of the vocabulary
    # the results JSON download link serves the detections shown in the table
    link = page.locator("#rc-json a").first
    href = link.get_attribute("href")
    assert href and href.endswith("regionclip_results.json"), href
    data = page.request.get(href).json()
    assert [c["name"] for c in data["categories"]] == ["potted plant", "sink", "bottle"]
    assert data["annotations"] and data["annotations"][0]["category_name"] in ("potted plant", "sink", "bottle")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "demo_browser_rpn.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.close()


def test_drawn_box_is_classified_and_errors_show_in_page(browser: Any, app_url: str) -> None:
    page = _open_with_image(browser, app_url)
    expect = sync_api.expect
    # empty vocabulary -> an error message in the page, not a stack trace; the app keeps working afterwards
    page.locator("#rc-vocab textarea").fill(" , ")
    page.locator("#rc-run").click()
    expect(page.locator(".toast-body").first).to_contain_text("vocabulary is empty", timeout=TIMEOUT_MS)
    assert "Traceback" not in page.content()

    # draw one stroke around a region with the brush (active after upload), then classify only that box
    page.locator("#rc-regions").get_by_label("My boxes (drawn or typed)").check()
    page.locator("#rc-vocab textarea").fill("plant, window")
    canvas = page.locator("#rc-image canvas").first
    bb = canvas.bounding_box()
    assert bb is not None
    x0, y0 = bb["x"] + bb["width"] * 0.35, bb["y"] + bb["height"] * 0.3
    x1, y1 = bb["x"] + bb["width"] * 0.6, bb["y"] + bb["height"] * 0.6
    page.mouse.move(x0, y0)
    page.mouse.down()
    for x, y in [(x1, y0), (x1, y1), (x0, y1), (x0, y0)]:
        page.mouse.move(x, y, steps=8)
    page.mouse.up()
    page.wait_for_timeout(1000)
    page.locator("#rc-run").click()
    expect(page.locator("#rc-status")).to_contain_text("from 1 user box,", timeout=TIMEOUT_MS)
    expect(page.locator("#rc-table")).to_contain_text(re.compile(r"plant|window"))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo_browser_drawn_box.png"), full_page=True)
    page.close()
