#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine (apt + a venv in .venv), then run them.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s libsystemd-dev >/dev/null 2>&1 || ! command -v curl >/dev/null || ! command -v systemd-socket-activate >/dev/null \
        || ! dpkg -s systemd-journal-remote >/dev/null 2>&1 || ! command -v chromedriver >/dev/null \
        || ! dpkg -s chromium dbus >/dev/null 2>&1; then
    # systemd-journal-remote writes the journal files tests/test_report.py reads back; chromium and
    # chromium-driver run the browser page's tests (tests/test_web_browser.py), headless; dbus lets
    # the page's front (a dynamic user) ask systemd about e2vd.service in tests/test_web_systemd.py
    pkgs=(libsystemd-dev pkg-config curl systemd systemd-journal-remote chromium chromium-driver dbus)
    # a stale package list names versions the mirror no longer has: refresh it and try once more
    apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${pkgs[@]}" >/dev/null; }
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
