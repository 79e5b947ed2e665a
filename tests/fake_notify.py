"""FakeNotify: a stand-in for systemd's notify socket ($NOTIFY_SOCKET), for in-process tests.

    with FakeNotify(tmp_path / "notify") as fake:
        monkeypatch.setenv("NOTIFY_SOCKET", fake.path)
        ...
        fake.wait_for("READY=1")
        assert fake.messages.count("STOPPING=1") == 1

A thread reads every datagram (with the fds passed along it, as systemd does for BARRIER=1) and
records it in `messages` (one string per datagram). Received fds are closed right away, like
systemd does after processing a message, unless `hold_fds` is set: then they are kept in `held`
until `release()` — a systemd that has not yet got round to the message.
"""
from __future__ import annotations

import array
import os
import socket
import threading
from pathlib import Path


class FakeNotify:
    def __init__(self, path: str | os.PathLike[str], hold_fds: bool = False) -> None:
        self.path = os.fspath(path)
        self.hold_fds = hold_fds
        self.messages: list[str] = []
        self.held: list[int] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._thread = threading.Thread(target=self._read, name="fake-notify", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd_size = array.array("i").itemsize
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(65536, socket.CMSG_SPACE(16 * fd_size))
            except OSError:
                return
            if not data and not ancillary:   # shut down by close()
                return
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[: len(payload) - len(payload) % fd_size]).tolist()
            with self._cond:
                self.messages.append(data.decode())
                if self.hold_fds:
                    self.held += fds
                else:
                    for fd in fds:
                        os.close(fd)
                self._cond.notify_all()

    def lines(self) -> list[str]:
        """Every KEY=VALUE line received so far, in order."""
        with self._cond:
            return [line for m in self.messages for line in m.split("\n")]

    def wait_for(self, needle: str, timeout: float = 30.0, count: int = 1) -> list[str]:
        """Wait until `count` datagrams contain `needle`; returns the messages so far."""
        with self._cond:
            ok = self._cond.wait_for(lambda: sum(needle in m for m in self.messages) >= count, timeout)
            assert ok, f"no {needle!r} from the daemon within {timeout} s; got {self.messages}"
            return list(self.messages)

    def release(self) -> None:
        """Close the held fds (systemd has processed the messages they came with)."""
        with self._cond:
            for fd in self.held:
                os.close(fd)
            self.held.clear()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes the reading thread
        except OSError:
            pass
        self._thread.join(5)
        self._sock.close()
        self.release()
        Path(self.path).unlink(missing_ok=True)

    def __enter__(self) -> "FakeNotify":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
