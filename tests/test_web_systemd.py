"""The browser page under a real systemd (issue 9), through tests/sdbox.py: `e2vd install --web`
puts e2vd-web.socket on a loopback port; opening the page in headless Chromium (on this host:
the box shares its network) activates e2vd-web.service and nothing else, its badge asks systemd
over D-Bus as the front's dynamic user; Recognize activates e2vd.service through the front (a
dynamic user in group e2vd, PrivateNetwork=yes); the daemon then exits idle while the page stays
open and keeps polling its badge, and the front exits idle once the page is gone.

The test also makes the README's screenshot of the page with a result: it is written to
$E2VD_TEST_SCREENSHOT when that is set (docs/web-page.png in the repository), else to the
test's temporary directory.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

import sdbox
from conftest import standin_dir, wav_clip
from webfront import chromium_unavailable, start_chromium

pytestmark = [pytest.mark.systemd, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
PY = str(Path(sys.executable))
ENV = {"PYTHONPATH": str(ROOT)}
MODEL = "/srv/e2vd-models/tiny"
LOAD_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, cond: Callable[[], object], timeout: float) -> object:
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for: {what}")
        time.sleep(0.2)
    return value


def show(box: sdbox.Box, unit: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", unit, "-p", "ActiveState,SubState,Result,MainPID,NRestarts"]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def box():
    reason = sdbox.unavailable_reason() or chromium_unavailable()
    if reason:
        pytest.skip(f"no throw-away systemd or no browser: {reason}")
    b = sdbox.Box.start(f"e2vd-web-{os.getpid()}", binds_ro=[f"{standin_dir('tiny')}:{MODEL}"])
    try:
        yield b
    finally:
        b.stop()


def test_the_page_wakes_only_the_front_recognize_wakes_the_daemon_and_both_exit_idle(box, tmp_path):
    port = free_port()
    out = box.run([PY, "-m", "e2vd", "install", "--no-pull", "--web", f"127.0.0.1:{port}"], env=ENV).stdout
    assert f"http://127.0.0.1:{port}/" in out
    box.run(["systemctl", "stop", "e2vd.service"])
    # short timeouts, so that both idle exits come within the test's patience
    box.write("/etc/e2vd/e2vd.toml", "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                             {"model": MODEL, "device": "cpu", "idle_timeout": 4,
                                              "connection_timeout": 5}.items()))
    exec_start = next(l for l in (box.root / "etc/systemd/system/e2vd-web.service").read_text().splitlines()
                      if l.startswith("ExecStart="))
    box.write("/etc/systemd/system/e2vd-web.service.d/test.conf",
              f"[Service]\nExecStart=\n{exec_start} --idle-timeout 3 --request-timeout 4\n")
    box.run(["systemctl", "daemon-reload"])
    assert show(box, "e2vd-web.socket")["ActiveState"] == "active"
    assert show(box, "e2vd-web.service")["ActiveState"] == "inactive"
    assert show(box, "e2vd.service")["ActiveState"] == "inactive"

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = start_chromium(tmp_path / "profile", downloads)
    try:
        url = f"http://127.0.0.1:{port}/"
        driver.get(url)                                  # the web socket starts the front ...
        badge = wait_for("the badge to say asleep", lambda: "asleep" in driver.find_element("id", "badge-text").text
                         and driver.find_element("id", "badge-text").text, 60)
        assert show(box, "e2vd-web.service")["ActiveState"] == "active"
        time.sleep(3.5)                                  # ... and a few badge polls later, still
        assert show(box, "e2vd.service")["ActiveState"] == "inactive", "the page woke the daemon"
        print(f"\nbadge before Recognize: {badge!r}")

        clip = tmp_path / "speech.wav"
        clip.write_bytes(wav_clip(2.5, seed=21))
        driver.find_element("id", "file").send_keys(str(clip))
        driver.find_element("id", "embedding").click()
        t0 = time.monotonic()
        driver.find_element("id", "go").click()          # Recognize starts e2vd.service through the front
        top = wait_for("the result", lambda: driver.find_element("id", "top-label").text
                       or driver.find_element("id", "message").text == "" and None, LOAD_S)
        print(f"cold Recognize through the front: {time.monotonic() - t0:.1f} s, top label {top!r}")
        assert driver.find_element("id", "message").text == ""
        assert show(box, "e2vd.service")["ActiveState"] == "active"
        wait_for("the badge to say ready", lambda: "ready on cpu" in driver.find_element("id", "badge-text").text, 30)
        time.sleep(0.3)
        shot = Path(os.environ.get("E2VD_TEST_SCREENSHOT") or tmp_path / "web-page.png")
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")

        # the daemon exits idle although the page stays open and keeps polling its badge
        t1 = time.monotonic()
        wait_for("e2vd.service to exit idle", lambda: show(box, "e2vd.service")["ActiveState"] == "inactive", 90)
        assert show(box, "e2vd.service")["Result"] == "success"
        print(f"e2vd.service idle exit {time.monotonic() - t1:.1f} s after the result, the page still open")
        wait_for("the badge to say asleep again", lambda: "asleep" in driver.find_element("id", "badge-text").text, 30)
        assert show(box, "e2vd-web.service")["ActiveState"] == "active", "the open page keeps its front"

        driver.get("about:blank")                        # the page is gone: the front exits idle
        t2 = time.monotonic()
        wait_for("e2vd-web.service to exit idle", lambda: show(box, "e2vd-web.service")["ActiveState"] == "inactive", 60)
        print(f"e2vd-web.service idle exit {time.monotonic() - t2:.1f} s after the page was closed")
    finally:
        driver.quit()
    st = show(box, "e2vd-web.service")
    assert (st["Result"], st["NRestarts"]) == ("success", "0")
    assert show(box, "e2vd-web.socket")["ActiveState"] == "active"
    journal = box.run(["journalctl", "--no-pager", "-u", "e2vd-web.service", "-o", "verbose"]).stdout
    for ev in ("web_start", "web_request", "web_idle_exit"):
        assert f"E2VD_EVENT={ev}\n" in journal, ev
    assert "E2VD_SOCKET_ACTIVATED=true" in journal
    assert show(box, "e2vd.service")["ActiveState"] == "inactive"
