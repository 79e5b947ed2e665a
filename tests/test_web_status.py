"""The page's badge (e2vd.web_status) from systemd's answers as `systemctl show` prints them, and
from systemd's file-system state where D-Bus refuses a dynamic user: every state, the expected
start time learnt and kept across fronts, and the daemon asked only while its process exists."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from e2vd.cli import parse_systemctl_show
from e2vd.web_status import Badge, StatusSource, unit_running


def show_text(active: str = "inactive", sub: str = "dead", pid: int = 0, result: str = "success",
              start_us: int = 0, ready_us: int = 0, socket: str = "active", loaded: str = "loaded") -> str:
    return (f"Id=e2vd.service\nLoadState={loaded}\nActiveState={active}\nSubState={sub}\nMainPID={pid}\n"
            f"StatusText=\nResult={result}\nExecMainStartTimestampMonotonic={start_us}\n"
            f"ActiveEnterTimestampMonotonic={ready_us}\n\n"
            f"Id=e2vd.socket\nLoadState=loaded\nActiveState={socket}\nSubState=listening\n"
            "Listen=/run/e2vd/e2vd.sock (Stream)\n")


class FakeDaemon:
    def __init__(self, doc: dict[str, Any] | None) -> None:
        self.doc, self.asked, self.closed = doc, 0, 0

    def ask(self) -> dict[str, Any] | None:
        self.asked += 1
        return self.doc

    def close(self) -> None:
        self.closed += 1


def source(tmp_path: Path, text: str | None, doc: dict[str, Any] | None = None, now: float = 100.0,
           running: bool | None = None, booted: bool = True) -> tuple[StatusSource, FakeDaemon]:
    src = StatusSource(str(tmp_path / "e2vd.sock"), {"max_body_bytes": 10}, state_dir=str(tmp_path),
                       show=lambda: parse_systemctl_show(text) if text is not None else "Failed to connect to bus",
                       clock=lambda: now, running=lambda unit: running, booted=lambda: booted)
    fake = FakeDaemon(doc)
    src.daemon = fake  # type: ignore[assignment]
    return src, fake


def test_asleep_never_asks_the_daemon(tmp_path):
    src, daemon = source(tmp_path, show_text())
    badge = src.badge()
    assert (badge.state, daemon.asked) == ("asleep", 0) and badge.limits == {"max_body_bytes": 10}
    src, _ = source(tmp_path, show_text(active="failed", result="exit-code"))
    assert src.badge().state == "asleep" and "exit-code" in src.badge().text


def test_starting_with_the_elapsed_time_and_what_the_last_start_took(tmp_path):
    src, _ = source(tmp_path, show_text(active="active", sub="running", pid=7, start_us=10_000_000, ready_us=14_500_000),
                    doc={"state": "ready", "device": "cuda:0", "idle_exit_in_s": 42.0})
    badge = src.badge()
    assert (badge.state, badge.device, badge.idle_exit_in_s, badge.expected_load_s) == ("ready", "cuda:0", 42.0, 4.5)
    # a new front (a new process) knows it from the state directory
    src, _ = source(tmp_path, show_text(active="activating", sub="start", pid=8, start_us=97_000_000, ready_us=14_500_000),
                    doc={"state": "loading"})
    badge = src.badge()
    assert (badge.state, badge.elapsed_s, badge.expected_load_s) == ("starting", 3.0, 4.5)


@pytest.mark.parametrize("doc, state, needle", [
    ({"state": "ready", "device": "cpu", "keep_warm_deadline": 4e9}, "warm", "warm until"),
    ({"state": "unavailable", "error": "model.pt is broken"}, "unavailable", "model.pt is broken"),
    ({"state": "stopping"}, "stopping", "stopping"),
    (None, "ready", "could not be read"),
])
def test_what_a_running_daemon_says(tmp_path, doc, state, needle):
    src, _ = source(tmp_path, show_text(active="active", sub="running", pid=7), doc=doc)
    badge = src.badge()
    assert badge.state == state and needle in badge.text, badge


def test_socket_down_not_installed_and_no_systemd(tmp_path):
    assert source(tmp_path, show_text(socket="failed"))[0].badge().state == "down"
    assert source(tmp_path, show_text(loaded="not-found"))[0].badge().state == "not_installed"
    src, daemon = source(tmp_path, None, running=None, booted=False)
    assert (src.badge().state, daemon.asked) == ("unknown", 0)


def test_without_dbus_the_cgroup_and_the_socket_file_tell(tmp_path):
    src, daemon = source(tmp_path, None, running=False)
    assert src.badge().state == "down"                     # no socket file
    (tmp_path / "e2vd.sock").touch()
    src, daemon = source(tmp_path, None, running=False)
    assert (src.badge().state, daemon.asked) == ("asleep", 0)
    src, daemon = source(tmp_path, None, running=True, doc={"state": "loading", "uptime_s": 2.5})
    assert (src.badge().state, src.badge().elapsed_s) == ("starting", 2.5)
    src, daemon = source(tmp_path, None, running=True, doc={"state": "ready", "device": "cpu", "load_seconds": 3.21})
    assert (src.badge().state, src.badge().expected_load_s) == ("ready", 3.2)


def test_one_look_serves_many_tabs(tmp_path):
    calls = []
    src = StatusSource(str(tmp_path / "s"), show=lambda: calls.append(1) or parse_systemctl_show(show_text()),
                       clock=lambda: 5.0)
    assert all(isinstance(src.badge(), Badge) for _ in range(5)) and len(calls) == 1


def test_unit_running_reads_the_cgroup(tmp_path):
    unit = tmp_path / "system.slice" / "e2vd.service"
    unit.mkdir(parents=True)
    (unit / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    assert unit_running("e2vd.service", (tmp_path,)) is True
    (unit / "cgroup.events").write_text("populated 0\nfrozen 0\n")
    assert unit_running("e2vd.service", (tmp_path,)) is False
    assert unit_running("other.service", (tmp_path,)) is False
    assert unit_running("e2vd.service", (tmp_path / "none",)) is None
