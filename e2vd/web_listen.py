"""Where the browser front (`e2vd web`) listens: ADDR:PORT parsing, the loopback rule, and the
listening TCP socket, passed by systemd (e2vd-web.socket) or bound by the front itself.

A TCP port is reachable by every local user, which bypasses the daemon socket's group; so the
front listens on a loopback address unless it is told `--public` (`e2vd install --web-public`),
whichever way its socket came. Stdlib only: the front must stay small (docs/design.md).
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

from e2vd.vocabulary import ExitCode

DEFAULT_ADDRESS = "127.0.0.1:7860"
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_FIRST_FD = 3   # SD_LISTEN_FDS_START


class ListenError(ValueError):
    """The front cannot listen where it was asked; the message says why and what to do."""

    exit_code = ExitCode.USAGE


@dataclass(frozen=True)
class Address:
    """A TCP listening address: `host` is an IP address literal (IPv6 without brackets), `port`
    1..65535 (0 only for a socket bound by the front itself: the kernel picks one)."""

    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    @property
    def loopback(self) -> bool:
        """Whether only this machine can connect (127.0.0.0/8 or ::1)."""
        return ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        """As systemd's ListenStream= and a URL write it: 127.0.0.1:7860, [::1]:7860."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The page's URL (a wildcard address is shown as localhost)."""
        unspecified = ipaddress.ip_address(self.host).is_unspecified
        return f"http://{'localhost' if unspecified else str(self).rsplit(':', 1)[0]}:{self.port}/"


def parse_address(text: str, allow_port_zero: bool = False) -> Address:
    """`ADDR:PORT` (IPv4, or IPv6 in brackets: `[::1]:7860`) as an Address; a bare port means
    127.0.0.1. ListenError names what is wrong. Host names are refused: what a name resolves
    to can change, and the loopback rule must hold for the address actually bound."""
    text = text.strip()
    if text.isdigit():
        text = f"127.0.0.1:{text}"
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ListenError(f"{text!r} is not ADDR:PORT; give e.g. {DEFAULT_ADDRESS} or [::1]:7860")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:7860")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ListenError(f"{host!r} in {text!r} is not an IP address; give one such as 127.0.0.1 "
                          "(host names are not accepted: the loopback check needs the address)") from None
    if not (port.isascii() and port.isdigit()) or not (0 if allow_port_zero else 1) <= int(port) <= 65535:
        raise ListenError(f"port {port!r} in {text!r} is not a TCP port (1 to 65535)")
    return Address(str(ip), int(port))


def check_exposure(address: Address, public: bool) -> None:
    """ListenError unless `address` is loopback or `public` allows every address."""
    if not address.loopback and not public:
        raise ListenError(
            f"{address} is reachable from other machines, and a TCP port is open to every local user "
            "(it bypasses the e2vd group that guards the daemon's socket); listen on 127.0.0.1 or [::1], "
            "or pass --public (e2vd install --web-public) if that is what you want")


def systemd_socket() -> socket.socket | None:
    """The listening TCP socket systemd passed (LISTEN_PID = this process, LISTEN_FDS >= 1, the
    first fd that is a listening AF_INET/AF_INET6 stream socket), or None without one. The
    variables are removed from the environment either way, so no child inherits them. The socket
    belongs to e2vd-web.socket: the front only ever closes its own fd, never shutdown()s it."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    for name in _LISTEN_VARS:
        os.environ.pop(name, None)
    if pid.strip() != str(os.getpid()) or not count.isdigit():
        return None
    for fd in range(_FIRST_FD, _FIRST_FD + int(count)):
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            return sock
        sock.detach()   # not ours to close
    raise ListenError(f"systemd passed {count} fd(s) but none is a listening TCP socket; "
                      f"e2vd-web.socket must use ListenStream=ADDR:PORT (e.g. {DEFAULT_ADDRESS})")


def bound_address(sock: socket.socket) -> Address:
    """The address a listening socket is bound to."""
    host, port = sock.getsockname()[:2]
    return Address(str(ipaddress.ip_address(host.split("%", 1)[0])), int(port))


def bind(address: Address, backlog: int = 128) -> socket.socket:
    """A listening socket bound to `address` (SO_REUSEADDR); ListenError when that fails."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}; choose another --listen "
                          "address, or stop what holds that port") from None
    return sock
