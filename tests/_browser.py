"""Headless Chromium driven by Playwright, for the browser tests (demo UI, search contact sheet).

Importing this module skips the importing test module when Chromium or Playwright is missing (CI installs both
with ``.ci/install-browser.sh`` and turns such a skip into a failure).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

CHROMIUM = os.environ.get("REGIONCLIP_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("REGIONCLIP_ARTIFACTS", Path(__file__).resolve().parent / "artifacts"))
# headless, no sandbox (root in CI), and nothing that would try to reach the network
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"chromium not found at {CHROMIUM} (apt-get install -y chromium, or run .ci/install-browser.sh)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright; "
                               "see .ci/install-browser.sh)")


@contextmanager
def chromium(width: int, height: int, *extra_args: str) -> Iterator[Any]:
    """A persistent Chromium context on a fresh profile (no state from earlier runs), removed afterwards."""
    profile = tempfile.mkdtemp(prefix="regionclip-chromium-")
    with sync_api.sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                    args=CHROMIUM_ARGS + list(extra_args),
                                                    viewport={"width": width, "height": height})
        try:
            yield ctx
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)
