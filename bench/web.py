#!/usr/bin/env python3
"""The browser front's two budgets (issue 9): first byte of the page after a cold connect, and
peak memory.

cold: `systemd-socket-activate -l 127.0.0.1:PORT python -m e2vd web` listens as e2vd-web.socket
      does; the timer starts at connect(), the request goes out at once, and stops at the first
      byte of the answer: the front's process start, imports and the page, as a browser opening
      the page of an idle front waits for them. A fresh activator per start; median and max.
peak RSS: one front (started the same way) serves the page, 200 badge polls, a 40 MB upload and a
      40 MB answer through a stand-in daemon on a Unix socket (it reads the body in pieces and
      answers 40 MB of JSON); VmHWM of the front's process after all of it.
Also prints the warm page's round trip (median of 200, kept-open connection) for comparison.

    .venv/bin/python bench/web.py [--starts 15] [--mib 40]
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def activator(port: int, daemon_socket: str) -> subprocess.Popen:
    """`e2vd web` behind systemd-socket-activate on `port`; returns once the port listens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2VD_", "LISTEN_"))}
    env.update(PYTHONPATH=str(ROOT), E2VD_CONFIG=os.devnull)
    proc = subprocess.Popen(["systemd-socket-activate", "-l", f"{HOST}:{port}", "-E", "PYTHONPATH", "-E", "E2VD_CONFIG",
                             sys.executable, "-m", "e2vd", "web", "--socket", daemon_socket, "--idle-timeout", "600"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
        if out.strip():
            return proc
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("systemd-socket-activate did not listen")


def first_byte_s(port: int) -> float:
    """Seconds from connect() to the first byte of GET / (a cold front starts in between)."""
    request = f"GET / HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.sendall(request)
        first = s.recv(1)
        took = time.perf_counter() - t0
        assert first == b"H"
        while s.recv(65536):
            pass
    return took


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Sink:
    """A stand-in daemon: reads each request's body in pieces, answers `answer` bytes of JSON."""

    def __init__(self, path: str, answer: int) -> None:
        self.path, self.answer = path, answer
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                head, body = buf.split(b"\r\n\r\n", 1)
                length = next((int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")), 0)
                got = len(body)
                while got < length:
                    got += len(conn.recv(1 << 16))
                payload = b'{"pad": "' + b"x" * (self.answer - 11) + b'"}'
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                             "Connection: close\r\n\r\n".encode())
                for i in range(0, len(payload), 1 << 20):
                    conn.sendall(payload[i:i + (1 << 20)])


def vmhwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=15, help="cold starts to time")
    ap.add_argument("--mib", type=int, default=40, help="MiB sent each way for the memory figure")
    args = ap.parse_args()
    if shutil.which("systemd-socket-activate") is None:
        print("needs systemd-socket-activate (apt-get install systemd)", file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="e2vd-bench-web-")
    sink = Sink(os.path.join(tmp, "d.sock"), args.mib * 2**20)

    cold = []
    for _ in range(args.starts):
        port = free_port()
        proc = activator(port, sink.path)
        cold.append(first_byte_s(port))
        stop(proc)
    cold.sort()

    port = free_port()
    proc = activator(port, sink.path)
    first_byte_s(port)                       # starts it
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    warm = []
    for _ in range(200):
        t0 = time.perf_counter()
        conn.request("GET", "/")
        conn.getresponse().read()
        warm.append(time.perf_counter() - t0)
        conn.request("GET", "/web/status")
        conn.getresponse().read()
    size = args.mib * 2**20
    conn.putrequest("POST", "/v1/recognize")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    block = os.urandom(1 << 20)
    for _ in range(args.mib):
        conn.send(block)
    resp = conn.getresponse()
    got = 0
    while piece := resp.read(1 << 20):
        got += len(piece)
    assert resp.status == 200 and got == size, (resp.status, got)
    conn.close()
    peak = vmhwm_mib(proc.pid)
    stop(proc)
    shutil.rmtree(tmp, ignore_errors=True)

    load = os.getloadavg()[0]
    print(f"e2vd web, {os.cpu_count()} CPU cores, load average {load:.2f}")
    print(f"first byte of the page after a cold connect (process start included), {len(cold)} starts: "
          f"median {1000 * statistics.median(cold):.0f} ms, max {1000 * cold[-1]:.0f} ms  (goal <= 500 ms)")
    print(f"warm page round trip, kept-open connection, 200 requests: median {1000 * statistics.median(warm):.2f} ms")
    print(f"peak RSS of the front after the page, 200 badge polls, {args.mib} MiB up and {args.mib} MiB down: "
          f"{peak:.1f} MiB  (goal <= 60 MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
