#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine (apt + a venv in .venv), then run them.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s libsystemd-dev >/dev/null 2>&1 || ! command -v curl >/dev/null || ! command -v systemd-socket-activate >/dev/null \
        || ! dpkg -s systemd-journal-remote >/dev/null 2>&1; then
    # systemd-journal-remote writes the journal files tests/test_report.py reads back
    apt-get install -y --no-install-recommends libsystemd-dev pkg-config curl systemd systemd-journal-remote >/dev/null
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
