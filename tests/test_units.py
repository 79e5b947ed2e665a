"""The systemd units: `systemd-analyze verify` is silent, the sandbox exposure is low, and the
settings the lifecycle relies on (docs/design.md, section 2) are present.  Runs without root: verify and
`security --offline` read the unit files only."""
from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from e2vd import install

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "systemd"
pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def parse(text: str) -> configparser.RawConfigParser:
    """A unit's sections as a case-sensitive parser; repeated keys keep the last value."""
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment]
    cp.read_string(text)
    return cp


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units exactly as `e2vd install` writes them for this installation, in a directory."""
    d = tmp_path_factory.mktemp("units")
    for name, text in install.render_units(install.Layout.detect(), install.Options()).items():
        (d / name).write_text(text)
    return d


def verify(paths: list[Path]) -> str:
    cp = subprocess.run(["systemd-analyze", "verify", *map(str, paths)], capture_output=True, text=True)
    return (cp.stdout + cp.stderr).strip() + ("" if cp.returncode == 0 else f"\n(exit {cp.returncode})")


def test_installed_units_verify_silently(rendered: Path) -> None:
    out = verify(sorted(rendered.iterdir()))
    assert out == "", out


def test_verify_would_report_a_broken_unit(rendered: Path, tmp_path: Path) -> None:
    broken = tmp_path / "e2vd.service"
    broken.write_text(rendered.joinpath("e2vd.service").read_text().replace("Type=notify", "Type=notfiy"))
    assert "notfiy" in verify([broken])


def test_templates_differ_from_installed_units_only_in_paths(rendered: Path) -> None:
    allowed = re.compile(r"^(ExecStart|ProtectHome|BindReadOnlyPaths|Environment=PYTHONPATH|#)")
    for name in install.UNITS:
        tpl = TEMPLATES.joinpath(name).read_text().splitlines()
        out = rendered.joinpath(name).read_text().splitlines()
        changed = set(tpl) ^ set(out)
        assert all(allowed.match(line) for line in changed), (name, changed)


def test_security_exposure_is_at_most_3(rendered: Path) -> None:
    cp = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                         str(rendered / "e2vd.service")], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for e2vd\.service: (\d+\.\d+)", cp.stdout + cp.stderr)
    assert m, cp.stdout + cp.stderr
    print(f"\nsystemd-analyze security e2vd.service: exposure {m[1]}")
    assert float(m[1]) <= 3.0


def test_socket_contract() -> None:
    s = parse(TEMPLATES.joinpath("e2vd.socket").read_text())["Socket"]
    assert s["ListenStream"] == "/run/e2vd/e2vd.sock"
    assert (s["SocketMode"], s["SocketGroup"], s["Accept"]) == ("0660", "e2vd", "no")
    assert int(s["Backlog"]) >= 128
    assert parse(TEMPLATES.joinpath("e2vd.socket").read_text())["Install"]["WantedBy"] == "sockets.target"


def test_service_contract() -> None:
    text = TEMPLATES.joinpath("e2vd.service").read_text()
    unit, svc = parse(text)["Unit"], parse(text)["Service"]
    assert svc["Type"] == "notify"
    assert svc["ExecStart"].split()[1:] == ["serve"], "the socket comes as fd 3, never as a path"
    # a start limit would put e2vd.socket into a failed state (service-start-limit-hit)
    assert unit["StartLimitIntervalSec"] == "0"
    assert svc["Restart"] == "no", "the socket restarts the daemon on demand; systemd must not loop"
    assert int(svc["TimeoutStopSec"]) > 60, "drain_timeout is 60 s by default"
    assert int(svc["TimeoutStartSec"]) >= 120
    assert "char-nvidia* rw" in re.findall(r"^DeviceAllow=(.*)$", text, re.M)
    for forbidden in ("PrivateDevices", "MemoryDenyWriteExecute"):
        assert not re.search(rf"^{forbidden}=", text, re.M), f"{forbidden} breaks GPU access or oneDNN"
    assert (svc["ProtectSystem"], svc["DynamicUser"], svc["CacheDirectory"]) == ("strict", "yes", "e2vd")
    # issue 15: the daemon never downloads, so it runs without any network
    assert svc["PrivateNetwork"] == "yes"
    assert svc["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_NETLINK"]
    assert svc["ReadOnlyPaths"] == "-%C/private/e2vd/models", "pulled models: the daemon only reads them"
    # the watchdog (issue 14): pings are sent at least every STATUS_EVERY_S (1 s) by a healthy daemon
    assert int(svc["WatchdogSec"]) >= 10 and "WatchdogSignal" not in svc, "SIGABRT: faulthandler's stacks"
    assert int(svc["TimeoutAbortSec"]) <= int(svc["TimeoutStopSec"])
    assert svc["NotifyAccess"] == "main"
    assert svc["LimitCORE"] == "0", "a core dump would write the model and clients' audio to disk"


def test_timer_and_warmup_contract() -> None:
    timer = parse(TEMPLATES.joinpath("e2vd-warmup.timer").read_text())["Timer"]
    assert timer["OnCalendar"] == "Mon..Fri 08:55"
    svc = parse(TEMPLATES.joinpath("e2vd-warmup.service").read_text())["Service"]
    assert svc["Type"] == "oneshot"
    assert svc["ExecStart"].split()[1:] == ["warmup", "--until", "18:00"]
    assert svc["SupplementaryGroups"] == "e2vd", "the warmup client must be allowed to connect"
