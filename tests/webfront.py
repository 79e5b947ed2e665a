"""Helpers for the browser front's tests: `e2vd web` in a subprocess, handed its listening TCP
socket the way systemd does (fd 3, LISTEN_FDS=1, LISTEN_PID = its pid), and a daemon behind
`systemd-socket-activate`, so a test can see whether anything woke it.

    with ActivatedDaemon(tmp / "e2vd.sock", tiny_model) as d, FrontProcess(d.socket, tmp) as f:
        urlopen(f.url)                      # the page
        assert not d.started                # nothing woke the daemon
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from daemon_proc import ROOT, DaemonProcess

# Put the socket on fd 3, set LISTEN_PID to our own pid and exec the front (same pid), as systemd does.
EXEC_WITH_FD3 = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.argv[2], sys.argv[2:])
"""


def cmdline(pid: int) -> list[str]:
    """The argv of process `pid` ([] when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def peak_rss_kib(pid: int) -> int:
    """VmHWM of process `pid` in KiB: the most resident memory it ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


class FrontProcess:
    """`python -m e2vd web` on a fresh 127.0.0.1 port; its stderr goes to `log_path`."""

    def __init__(self, daemon_socket: str | os.PathLike[str], workdir: Path, *, idle_timeout: float = 600,
                 request_timeout: float = 30, daemon_timeout: float = 120, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1") -> None:
        self.daemon_socket = str(daemon_socket)
        self.args = ["--socket", self.daemon_socket, "--idle-timeout", str(idle_timeout),
                     "--request-timeout", str(request_timeout), "--daemon-timeout", str(daemon_timeout), *(extra or [])]
        self.env = dict(env or {})
        self.log_path = workdir / f"front-{time.monotonic_ns()}.log"
        self.host = host
        self.listener: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        assert self.listener is not None
        return self.listener.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> "FrontProcess":
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((self.host, 0))
        self.listener.listen(128)
        self.spawn()
        return self

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start a front on the (already listening) socket: what systemd does on a connection."""
        assert self.listener is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("E2VD_", "LISTEN_", "NOTIFY_SOCKET",
                                                                           "JOURNAL_STREAM", "STATE_DIRECTORY"))}
        env["E2VD_CONFIG"] = os.devnull
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(self.env)
        fd = self.listener.fileno()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", EXEC_WITH_FD3, str(fd), sys.executable, "-m", "e2vd",
                                      "web", *self.args], cwd=ROOT, env=env, pass_fds=(fd,),
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self.proc

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
                timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: (status, lower-cased headers, raw body)."""
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: bytes | None = None, **kw: Any) -> tuple[int, Any]:
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data)

    def raw(self, data: bytes, timeout: float = 30) -> socket.socket:
        """A fresh connection with `data` sent on it (read the answer with daemon_proc.read_response)."""
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        s.sendall(data)
        return s

    def stop(self) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return None if self.proc is None else self.proc.returncode

    def close(self) -> None:
        self.stop()
        if self.listener is not None:
            self.listener.close()

    def __enter__(self) -> "FrontProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class ActivatedDaemon:
    """`systemd-socket-activate -l SOCKET python -m e2vd serve ...`: nothing runs until the first
    connection, which exec()s the daemon in the same process (`started` tells)."""

    def __init__(self, socket_path: Path, model: Path, **settings: object) -> None:
        self.socket = socket_path
        self.helper = DaemonProcess(socket_path.with_name("unused-" + socket_path.name), model, **settings)
        self.log_path = socket_path.with_name(socket_path.name + ".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ActivatedDaemon":
        env = self.helper.environment()
        passed = [a for k, v in env.items() if k.startswith("E2VD_") or k == "PYTHONPATH" for a in ("-E", f"{k}={v}")]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["systemd-socket-activate", "-l", str(self.socket), *passed,
                                      *self.helper.command()], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        return self

    @property
    def started(self) -> bool:
        """Whether a connection has started the daemon (the activator exec()ed it)."""
        assert self.proc is not None
        argv = cmdline(self.proc.pid)
        return bool(argv) and not argv[0].endswith("systemd-socket-activate")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ActivatedDaemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def chromium_unavailable() -> str | None:
    """Why a headless Chromium cannot be driven here, or None."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return "Debian's chromium and chromium-driver are not installed (scripts/test.sh installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


def start_chromium(profile: Path, downloads: Path, fake_audio: Path | None = None, size: str = "1100,900"):
    """A headless Chromium driven by selenium through Debian's chromium-driver, with a fresh
    profile, downloads into `downloads`, and the fake microphone playing `fake_audio` (a WAV).
    Flags for a closed network and a root user (--no-sandbox)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--disable-default-apps", "--disable-extensions",
                 "--password-store=basic", f"--user-data-dir={profile}", f"--window-size={size}",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                 *([f"--use-file-for-fake-audio-capture={fake_audio}"] if fake_audio else [])):
        opts.add_argument(flag)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_page_load_timeout(60)
    return driver
