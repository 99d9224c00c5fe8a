#!/usr/bin/env bash
# Browser-test dependencies (called by scripts/test.sh from the repository root): the Debian Chromium and the
# Python packages gradio + playwright. Playwright's own browser download cannot work offline, so the tests
# drive /usr/bin/chromium (tests/test_demo_browser.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="$(command -v sudo || true)"
  if [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  else
    echo "install-browser: chromium missing and not root; the browser tests will be skipped" >&2
  fi
fi
"$PIP" install -q gradio playwright
