#!/usr/bin/env bash
# Install Debian's `chromium` for the headless web UI test (tests/serve/test_webui_browser.py).
# Runs `apt-get install chromium` only when /usr/bin/chromium is missing and we are root; otherwise it
# does nothing (the browser test then skips with a clear reason). Always exits 0 unless apt-get fails.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [[ -x "$CHROMIUM" ]]; then
    echo "install_browser: $CHROMIUM present ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown')); nothing to do"
    exit 0
fi

if [[ "$(id -u)" != "0" ]]; then
    echo "install_browser: $CHROMIUM missing and not root; skipping (install Debian 'chromium' to run the web UI browser test)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: $CHROMIUM missing and apt-get not found; skipping (install chromium by hand)"
    exit 0
fi

echo "install_browser: installing Debian chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "install_browser: installed $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
