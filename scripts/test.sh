#!/usr/bin/env bash
# Set up everything the tests need on a fresh Debian machine (apt + a venv in .venv), then run them.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s libsystemd-dev >/dev/null 2>&1 || ! command -v curl >/dev/null || ! command -v systemd-socket-activate >/dev/null; then
    apt-get install -y --no-install-recommends libsystemd-dev pkg-config curl systemd >/dev/null
fi
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
