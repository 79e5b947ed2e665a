"""e2vd.unit_record: systemd's record of e2vd's units in words, from `systemctl show` text and
journal entries as journalctl prints them (the real thing runs in tests/test_systemd_failures.py)."""
from __future__ import annotations

import json
import subprocess

from e2vd import cli
from e2vd.unit_record import (how_it_ended, last_error, parse_systemctl_show, service_trouble,
                              unreachable_reason)

SOCK = "/run/e2vd/e2vd.sock"
FAILED = (
    "Id=e2vd.service\nLoadState=loaded\nActiveState=failed\nSubState=failed\nResult=exit-code\n"
    "ExecMainCode=1\nExecMainStatus=203\nMainPID=0\nInvocationID=abc123\n\n"
    "Id=e2vd.socket\nLoadState=loaded\nActiveState=failed\nSubState=failed\nResult=trigger-limit-hit\n"
    f"Listen={SOCK} (Stream)\n")


def test_how_a_unit_ended_in_words():
    units = parse_systemctl_show(FAILED)
    assert how_it_ended(units["e2vd.service"]) == "exit-code: its process exited with an error (exit status 203)"
    assert how_it_ended(units["e2vd.socket"]).startswith("trigger-limit-hit: its service failed each time")
    killed = parse_systemctl_show("Id=e2vd.service\nResult=watchdog\nExecMainCode=2\nExecMainStatus=6\n")
    assert how_it_ended(killed["e2vd.service"]) == ("watchdog: its watchdog ended it (a stuck inference past "
                                                    "inference_timeout, or the daemon stopped answering systemd) "
                                                    "(SIGABRT)")


def test_a_failed_socket_is_explained_with_the_services_last_error_and_the_fix():
    units = parse_systemctl_show(FAILED)
    text = unreachable_reason(units, SOCK, lambda unit: "Failed to locate executable /opt/e2vd/bin/e2vd")
    assert text.startswith("e2vd.socket has failed, trigger-limit-hit: ")
    assert "e2vd.service: last run failed, exit-code: its process exited with an error (exit status 203)" in text
    assert "its last error: 'Failed to locate executable /opt/e2vd/bin/e2vd'" in text
    assert text.endswith("`sudo systemctl reset-failed e2vd.socket e2vd.service && sudo systemctl start e2vd.socket`")
    assert "e2vd check-config" in text


def test_nothing_to_say_when_the_socket_listens_is_elsewhere_or_is_not_installed():
    units = parse_systemctl_show(FAILED)
    assert unreachable_reason(units, "/tmp/other.sock", lambda u: None) is None
    listening = parse_systemctl_show(f"Id=e2vd.socket\nLoadState=loaded\nActiveState=active\nSubState=listening\n"
                                     f"Listen={SOCK} (Stream)\n")
    assert unreachable_reason(listening, SOCK, lambda u: None) is None
    assert unreachable_reason(parse_systemctl_show("Id=e2vd.socket\nLoadState=not-found\n"), SOCK) is None
    stopped = parse_systemctl_show(f"Id=e2vd.socket\nLoadState=loaded\nActiveState=inactive\nSubState=dead\n"
                                   f"Result=success\nListen={SOCK} (Stream)\n")
    assert unreachable_reason(stopped, SOCK, lambda u: None) == (
        f"e2vd.socket is inactive (dead), so nothing listens on {SOCK}; start it: "
        "`sudo systemctl enable --now e2vd.socket`")


def journal(*entries: dict) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], 0, "\n".join(json.dumps(e) for e in entries) + "\n", "")


def test_last_error_skips_systemds_job_line_and_escapes_control_characters():
    svc = parse_systemctl_show(FAILED)["e2vd.service"]
    seen: list[list[str]] = []

    def run(cmd, **kw):
        seen.append(cmd)
        return journal({"MESSAGE": "e2vd: bad \x1b[31m thing\nsecond line", "PRIORITY": "3"},
                       {"MESSAGE": "Failed to start e2vd.service.", "JOB_RESULT": "failed", "PRIORITY": "3"})

    assert last_error(svc, run) == "e2vd: bad \\x1b[31m thing second line"
    assert seen[0][-3:] == ["_SYSTEMD_INVOCATION_ID=abc123", "+", "INVOCATION_ID=abc123"]   # its last run only
    assert last_error(svc, lambda cmd, **kw: journal({"MESSAGE": list(b"caf\xe9 x"), "PRIORITY": "3"})) == "caf\ufffd x"
    assert last_error(svc, lambda cmd, **kw: journal({"MESSAGE": "x" * 1000})).endswith("…")
    assert last_error(svc, lambda cmd, **kw: journal()) is None


def test_status_lines_name_the_failure_and_what_to_run():
    text = "\n".join(cli._describe_units(parse_systemctl_show(FAILED), lambda unit: "the last error"))
    assert ("e2vd.service: failed (failed), last run failed, exit-code: its process exited with an error "
            "(exit status 203); its last error: 'the last error'") in text
    assert f"e2vd.socket: failed (failed) on {SOCK} (Stream), trigger-limit-hit: " in text
    assert "sudo systemctl reset-failed e2vd.socket e2vd.service && sudo systemctl start e2vd.socket" in text
    assert service_trouble(parse_systemctl_show(FAILED)["e2vd.service"], None).endswith("see `journalctl -u e2vd`")
