"""The browser page's units for `e2vd install --web [ADDR:PORT] [--web-public]`: checking the
address and writing it, the socket's group and --public into e2vd-web.socket and
e2vd-web.service (e2vd.install writes the paths, as for the daemon's units).

A TCP port is reachable by every local user, which bypasses the e2vd group that guards the
daemon's socket; a non-loopback address is refused unless --web-public is given too.
"""
from __future__ import annotations

import re

from e2vd.web_listen import Address, ListenError, check_exposure, parse_address

WEB_UNITS = ("e2vd-web.socket", "e2vd-web.service")
WEB_SOCKET = "e2vd-web.socket"


def check(web: str, public: bool) -> Address:
    """The address of `--web ADDR:PORT`; ListenError (its message names the fix) when it is not
    one, or not loopback without `public`."""
    address = parse_address(web)
    check_exposure(address, public)
    return address


def render(units: dict[str, str], address: Address, public: bool, group: str) -> dict[str, str]:
    """The two web units' text: ListenStream= of `address`, SupplementaryGroups= of the daemon
    socket's `group`, and `--public` on ExecStart= when asked for. Other units pass unchanged."""
    out = dict(units)
    out["e2vd-web.socket"] = _set(out["e2vd-web.socket"], "ListenStream", str(address))
    service = _set(out["e2vd-web.service"], "SupplementaryGroups", group)
    if public:
        service = re.sub(r"^(ExecStart=\S+( -m e2vd)? web)\b", r"\1 --public", service, count=1, flags=re.M)
    out["e2vd-web.service"] = service
    return out


def _set(text: str, key: str, value: str) -> str:
    pattern = re.compile(rf"^{re.escape(key)}=.*$", re.M)
    if len(pattern.findall(text)) != 1:
        raise ListenError(f"a web unit template must have exactly one {key}= line; the systemd/ files are damaged")
    return pattern.sub(lambda _m: f"{key}={value}", text)
