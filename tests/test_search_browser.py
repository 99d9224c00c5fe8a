"""The search contact sheet (``regionclip search --html``) opened from disk (file://, no server) in a real headless
Chromium driven by Playwright: every card is there, every crop decoded, the best hit first.

Needs the Debian ``chromium`` package and ``playwright`` (Python), both installed by ``.ci/install-browser.sh``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest

from _browser import ARTIFACTS, chromium, sync_api
from test_search import make_store, _regions
from regionclip.search import RegionIndex
from regionclip.search.html import contact_sheet

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(1200, 900, "--allow-file-access-from-files") as ctx:
        yield ctx


def test_contact_sheet_opens_from_disk_with_all_crops(tmp_path: Path, browser: Any) -> None:
    feats = make_store(tmp_path)
    idx = RegionIndex.build(feats, tmp_path / "idx", backend="exact")
    key, _, feat, box = _regions(feats)[7]
    hits = idx.search(feat, top_k=6)
    written = contact_sheet(hits, tmp_path / "sheet" / "hits.html", title="query: region 7")
    out = tmp_path / "mailed" / "copy.html"  # opened from another folder: nothing may be linked, all embedded
    out.parent.mkdir()
    shutil.copy(written, out)

    page = browser.new_page()
    page.goto(out.resolve().as_uri(), wait_until="load")
    cards = page.locator(".card")
    sync_api.expect(cards).to_have_count(6)
    sizes = page.locator(".card img").evaluate_all(
        "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert len(sizes) == 6 and all(c and w > 0 and h > 0 for c, w, h in sizes), sizes
    first = cards.first
    assert first.get_attribute("data-rank") == "1" and first.get_attribute("data-key") == key
    got_box = [float(v) for v in first.get_attribute("data-box").split(",")]
    assert got_box == pytest.approx(box.tolist(), abs=0.06)  # printed with 1 decimal
    assert "#1" in first.inner_text() and key in first.inner_text()
    ranks = cards.evaluate_all("cs => cs.map(c => Number(c.dataset.rank))")
    scores = cards.evaluate_all("cs => cs.map(c => Number(c.dataset.score))")
    assert ranks == [1, 2, 3, 4, 5, 6] and scores == sorted(scores, reverse=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "search_contact_sheet.png"), full_page=True)
    page.close()
