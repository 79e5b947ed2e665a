"""`e2vd web`: the browser front. A small process (no torch, no funasr, no numpy) that serves the
page and forwards /v1/* to the daemon's Unix socket; socket-activated by e2vd-web.socket, it exits
after `--idle-timeout` seconds with no browser connection open (docs/design.md, the browser front).

This module is the process: its command-line options, the listening socket (from systemd, or
bound to --listen), the accept loop and the idle exit. What it serves is e2vd.web_http's; the
page e2vd.web_page's; the badge e2vd.web_status's; the forwarding e2vd.web_forward's. Importing it
is cheap (the `e2vd` parser imports it to add the subcommand).
"""
from __future__ import annotations

import argparse
import math

from e2vd.vocabulary import ExitCode

DEFAULT_IDLE_TIMEOUT = 120.0
DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_DAEMON_TIMEOUT = 300.0
DEFAULT_MAX_CONNECTIONS = 64


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= 86400):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 86400")
    return value


def _positive(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds > 0")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `e2vd web`."""
    from e2vd.config import Settings, env_name
    from e2vd.web_listen import DEFAULT_ADDRESS

    p.add_argument("--listen", default=DEFAULT_ADDRESS, metavar="ADDR:PORT",
                   help=f"bind this address when systemd passes no socket (default {DEFAULT_ADDRESS})")
    p.add_argument("--public", action="store_true",
                   help="allow a non-loopback address (every local user and, through it, other machines "
                        "reach the page and the daemon; see the README)")
    p.add_argument("--socket", default=None,
                   help=f"the daemon's socket (default ${env_name('socket')} or {Settings.socket})")
    p.add_argument("--idle-timeout", type=_seconds, default=DEFAULT_IDLE_TIMEOUT, metavar="S",
                   help=f"exit after S seconds with no connection open; 0: never (default {DEFAULT_IDLE_TIMEOUT:g})")
    p.add_argument("--request-timeout", type=_positive, default=DEFAULT_REQUEST_TIMEOUT, metavar="S",
                   help="a browser's request must arrive whole within S seconds, and a kept-open connection "
                        f"is closed after S silent seconds (default {DEFAULT_REQUEST_TIMEOUT:g})")
    p.add_argument("--daemon-timeout", type=_positive, default=DEFAULT_DAEMON_TIMEOUT, metavar="S",
                   help=f"wait S seconds for the daemon's answer, a cold start included (default {DEFAULT_DAEMON_TIMEOUT:g})")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help=f"browser connections served at once; more get 503 (default {DEFAULT_MAX_CONNECTIONS})")


def run(args: argparse.Namespace) -> ExitCode:
    """Serve until idle (exit 0) or SIGTERM/SIGINT (exit 0); ListenError (exit 2) when the
    address is not allowed or cannot be bound."""
    import os
    import selectors
    import signal
    import socket
    import time

    from e2vd import config
    from e2vd.log import event, setup_logging
    from e2vd.web_forward import Upstream
    from e2vd.web_http import Front, FrontConfig, loopback_hosts
    from e2vd.web_listen import ListenError, bind, bound_address, check_exposure, parse_address, systemd_socket
    from e2vd.web_page import page
    from e2vd.web_status import StatusSource

    setup_logging("INFO")
    if args.max_connections < 1:
        raise ListenError("--max-connections must be at least 1")
    listener = systemd_socket()
    from_systemd = listener is not None
    if listener is None:
        listener = bind(parse_address(args.listen))
    address = bound_address(listener)
    try:
        check_exposure(address, args.public)
    except ListenError:
        listener.close() if not from_systemd else listener.detach()
        raise
    settings = _daemon_settings()
    socket_path = args.socket or os.environ.get(config.env_name("socket")) or config.Settings.socket
    status = StatusSource(socket_path, {"max_body_bytes": settings.max_body_bytes, "max_seconds": settings.max_seconds},
                          state_dir=os.environ.get("STATE_DIRECTORY", "").split(":")[0] or None)
    hosts = None if args.public else loopback_hosts(address.port, str(address))
    wake = socket.socketpair()
    front = Front(FrontConfig(args.request_timeout, settings.max_body_bytes, args.max_connections, hosts),
                  Upstream(socket_path, answer_timeout=args.daemon_timeout), status, page(),
                  on_change=lambda: _poke(wake[1]))
    stop: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signum)
        _poke(wake[1])

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake[0], selectors.EVENT_READ)
    event("web_start", f"serving the page on {address.url} for the daemon on {socket_path}", pid=os.getpid(),
          address=str(address), socket=socket_path, socket_activated=from_systemd,
          idle_timeout_seconds=args.idle_timeout)
    started = time.monotonic()
    try:
        while not stop:
            idle = front.idle_since()
            timeout = None
            if idle is not None and args.idle_timeout > 0:
                timeout = idle + args.idle_timeout - time.monotonic()
                if timeout <= 0:
                    if not sel.select(0):   # the last moment: a connection in the backlog is served
                        break
                    timeout = 0
            for key, _ in sel.select(timeout):
                if key.fileobj is wake[0]:
                    try:
                        wake[0].recv(4096)
                    except BlockingIOError:
                        pass
                    continue
                _accept_all(listener, front)
    finally:
        sel.close()
        status.close()
        if from_systemd:
            listener.detach()   # the socket is e2vd-web.socket's: never shutdown(), and our fd goes with us
        else:
            listener.close()
    alive = time.monotonic() - started
    if stop:
        event("web_stopped", f"{signal.Signals(stop[0]).name}: stopping after {alive:.0f} s", signal=signal.Signals(stop[0]).name)
    else:
        event("web_idle_exit", f"no browser connection for {args.idle_timeout:g} s: exiting after {alive:.0f} s",
              alive_seconds=round(alive, 3), idle_timeout_seconds=args.idle_timeout)
    return ExitCode.OK


def _daemon_settings():
    """The daemon's settings as configured on this machine (max_body_bytes, max_seconds), read
    the way the daemon reads them but without E2VD_* variables other than E2VD_CONFIG; the
    defaults when the file cannot be read."""
    import os

    from e2vd import config

    try:
        return config.load_settings(env={k: v for k, v in os.environ.items() if k == config.CONFIG_ENV})
    except (config.ConfigError, OSError):
        return config.Settings()


def _poke(sock) -> None:
    try:
        sock.send(b"x")
    except OSError:
        pass


def _accept_all(listener, front) -> None:
    """Accept every connection waiting in the backlog and hand each to the front."""
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return   # ECONNABORTED and friends: that client is gone
        conn.setblocking(True)
        front.add(conn)
