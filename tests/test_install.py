"""`e2vd install` / `e2vd uninstall`: offline into a scratch root (no root needed), and for real
as root inside a throw-away systemd (tests/sdbox.py)."""
from __future__ import annotations

import os
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

import sdbox
from e2vd import install
from e2vd.vocabulary import ExitCode

ROOT = Path(__file__).resolve().parent.parent
PY = str(Path(sys.executable))          # the venv's python, as the operator would run it
ENV = {"PYTHONPATH": str(ROOT)}         # e2vd from this checkout (pip may not have installed it)


def _install(root: Path, **opts: str) -> list[str]:
    lines: list[str] = []
    install.install(install.Options(**opts), root=root, say=lines.append)
    return lines


def test_offline_install_writes_units_config_and_enables(tmp_path: Path) -> None:
    out = _install(tmp_path, group="speech", warmup_calendar="Mon..Sat 07:30", warmup_until="17:15")
    units = tmp_path / "etc/systemd/system"
    assert sorted(p.name for p in units.glob("e2vd*")) == sorted(install.UNITS)
    assert "SocketGroup=speech" in (units / "e2vd.socket").read_text()
    assert "OnCalendar=Mon..Sat 07:30" in (units / "e2vd-warmup.timer").read_text()
    warm = (units / "e2vd-warmup.service").read_text()
    assert "warmup --until 17:15\n" in warm and "SupplementaryGroups=speech" in warm
    assert (units / "sockets.target.wants/e2vd.socket").is_symlink()
    assert (units / "timers.target.wants/e2vd-warmup.timer").is_symlink()
    assert tomllib.loads((tmp_path / "etc/e2vd/e2vd.toml").read_text()) == {}, "defaults are comments"
    assert any(line.startswith("wrote default") for line in out)


def test_install_is_idempotent_and_never_overwrites_the_config(tmp_path: Path) -> None:
    _install(tmp_path)
    config = tmp_path / "etc/e2vd/e2vd.toml"
    config.write_text('model = "/srv/models/e2v"\n')
    before = {p: p.read_bytes() for p in (tmp_path / "etc/systemd/system").rglob("*") if p.is_file()}
    out = _install(tmp_path)
    assert config.read_text() == 'model = "/srv/models/e2v"\n'
    assert {p: p.read_bytes() for p in before} == before
    assert [l for l in out if l.startswith(("wrote", "unchanged"))] == \
        [f"unchanged {tmp_path}/etc/systemd/system/{u}" for u in install.UNITS]


def test_install_refuses_a_settings_file_the_daemon_would_refuse_before_changing_anything(tmp_path: Path) -> None:
    """An existing /etc/e2vd/e2vd.toml is checked as the daemon will read it: a typo stops the
    install (exit 2) with the file, the key and the fix, and nothing is written."""
    config = tmp_path / "etc/e2vd/e2vd.toml"
    config.parent.mkdir(parents=True)
    config.write_text("idle_timeot = 30\n")
    with pytest.raises(install.InstallUsageError) as info:
        _install(tmp_path)
    message = str(info.value)
    assert info.value.exit_code == ExitCode.USAGE
    assert f"{config}: unknown key 'idle_timeot' (did you mean 'idle_timeout'?)" in message
    assert "e2vd check-config" in message and "nothing was changed" in message
    assert not (tmp_path / "etc/systemd").exists()
    config.write_text("idle_timeout = 30\n")
    _install(tmp_path)
    assert (tmp_path / "etc/systemd/system/e2vd.service").is_file()


def test_default_config_shows_every_setting_with_the_default_of_settings(tmp_path: Path) -> None:
    """The default /etc/e2vd/e2vd.toml takes its values from e2vd.config.Settings: uncommenting
    every line gives exactly the defaults, and no setting is missing from it."""
    from e2vd.config import FIELDS, Settings, load_settings

    text = install.default_config()
    assert tomllib.loads(text) == {}, "defaults are comments"
    shown = [line[2:].split("  #")[0] for line in text.splitlines()
             if line.startswith("# ") and " = " in line.split("#")[1]]
    assert sorted(line.split(" = ")[0] for line in shown) == sorted(FIELDS)
    uncommented = tmp_path / "all.toml"
    uncommented.write_text("\n".join(shown) + "\n")
    assert load_settings(env={}, config_path=str(uncommented)) == Settings()


def test_default_config_with_a_model_sets_that_line_only() -> None:
    text = install.default_config('/srv/models/e2v "quoted"')
    assert tomllib.loads(text) == {"model": '/srv/models/e2v "quoted"'}
    assert text.replace('model = "/srv/models/e2v \\"quoted\\""', f"# model = \"{install.Settings.model}\"") \
        == install.default_config()


def test_install_errors_carry_their_exit_codes(tmp_path: Path) -> None:
    """Bad options are usage errors (2, nothing written); a failed system step is 1."""
    with pytest.raises(install.InstallUsageError) as bad:
        _install(tmp_path, group="Bad Group")
    assert bad.value.exit_code == ExitCode.USAGE and isinstance(bad.value, install.InstallError)
    assert install.InstallError("x").exit_code == ExitCode.FAILED
    with pytest.raises(install.InstallError) as failed:
        install._run(["false"])
    assert type(failed.value) is install.InstallError and "`false` failed (exit 1)" in str(failed.value)


def test_install_model_goes_into_a_new_config_only(tmp_path: Path, srv_model: Path) -> None:
    model = srv_model
    out = _install(tmp_path / "a", model=str(model))
    assert tomllib.loads((tmp_path / "a/etc/e2vd/e2vd.toml").read_text()) == {"model": str(model)}
    assert any(f'model = "{model}"' in line for line in out)
    config = tmp_path / "b/etc/e2vd/e2vd.toml"
    config.parent.mkdir(parents=True)
    config.write_text('model = "iic/emotion2vec_plus_large"\n')
    out = _install(tmp_path / "b", model=str(model))
    assert config.read_text() == 'model = "iic/emotion2vec_plus_large"\n', "never overwritten"
    assert any("--model not applied" in line for line in out)


@pytest.mark.parametrize("model, problem", [
    ("relative/dir/../x", "neither a ModelScope id"),
    ("/nonexistent/e2v", "no model.pt"),
    ("/root/models/e2v", "no model.pt"),
])
def test_install_rejects_a_model_the_service_cannot_use(tmp_path: Path, model: str, problem: str) -> None:
    with pytest.raises(install.InstallError, match=problem):
        _install(tmp_path, model=model)


def test_install_rejects_a_model_below_home(tmp_path: Path) -> None:
    if not os.access("/root", os.W_OK):
        pytest.skip("needs a writable /root to place a model below a home directory")
    with tempfile.TemporaryDirectory(dir="/root") as d:
        (Path(d) / "model.pt").write_bytes(b"")
        with pytest.raises(install.InstallError, match="below /root, /home or /tmp"):
            _install(tmp_path, model=d)


def test_uninstall_keeps_config_and_cache_unless_purge(tmp_path: Path) -> None:
    _install(tmp_path)
    cache = tmp_path / "var/cache/private/e2vd/models"
    cache.mkdir(parents=True)
    install.uninstall(root=tmp_path, say=lambda _l: None)
    assert not list((tmp_path / "etc/systemd/system").rglob("e2vd*"))
    assert (tmp_path / "etc/e2vd/e2vd.toml").exists() and cache.exists()
    install.uninstall(root=tmp_path, purge=True, say=lambda _l: None)
    assert not (tmp_path / "etc/e2vd").exists() and not cache.exists()


@pytest.mark.parametrize("opts, named", [({"warmup_calendar": "Mon..Fri 25:99"}, "--warmup-calendar"),
                                         ({"warmup_until": "6pm"}, "--warmup-until"),
                                         ({"warmup_until": "24:00"}, "--warmup-until"),
                                         ({"model": "-bad/name"}, "--model"),
                                         ({"group": "Bad Group"}, "--group")])
def test_bad_options_are_named(tmp_path: Path, opts: dict, named: str) -> None:
    with pytest.raises(install.InstallError, match=named):
        _install(tmp_path, **opts)
    assert not (tmp_path / "etc").exists(), "nothing is written when an option is bad"


def test_install_accepts_what_the_cli_and_engine_accept(tmp_path: Path) -> None:
    """The installer checks --warmup-until and --model with the same rules as `e2vd warmup --until`
    and the engine, so what it lets through starts, and what it refuses would fail at run time."""
    from e2vd.durations import parse_clock
    from e2vd.engine import ModelError, resolve_model

    _install(tmp_path, warmup_until="17:15:30", model="iic/emotion2vec_plus_large")
    assert parse_clock("17:15:30")
    with pytest.raises(ModelError, match="neither an absolute directory nor a ModelScope id"):
        resolve_model("-bad/name")


def test_layout_binds_python_below_home_or_tmp_and_nothing_else() -> None:
    layout = install.Layout.detect()
    hidden = install.HOME_ROOTS + install.TMP_ROOTS
    for base in (Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()):
        if any(h == base or h in base.parents for h in hidden):
            assert any(p == base or p in base.parents for p in layout.read_only_paths)
    assert all(any(h == p or h in p.parents for h in hidden) for p in layout.read_only_paths)
    units = install.render_units(layout, install.Options())
    home = any(any(h == p or h in p.parents for h in install.HOME_ROOTS) for p in layout.read_only_paths)
    expected = "ProtectHome=tmpfs" if home else "ProtectHome=yes"
    assert expected in units["e2vd.service"] and expected in units["e2vd-warmup.service"]


def test_a_checkout_in_tmp_is_bound_without_opening_home() -> None:
    layout = install.Layout("/tmp/ci/.venv/bin/e2vd", (Path("/tmp/ci"),))
    service = install.render_units(layout, install.Options())["e2vd.service"]
    assert "ProtectHome=yes\n" in service and "BindReadOnlyPaths=/tmp/ci\n" in service


# --------------------------------------------------------------- for real, in a box
@pytest.fixture(scope="module")
def box():
    reason = sdbox.unavailable_reason()
    if reason:
        pytest.skip(f"no throw-away systemd: {reason}")
    b = sdbox.Box.start(f"inst-{os.getpid()}")
    try:
        yield b
    finally:
        b.stop()


@pytest.mark.systemd
def test_install_and_uninstall_in_a_real_systemd(box: sdbox.Box) -> None:
    e2vd = [PY, "-m", "e2vd"]
    out = box.run(e2vd + ["install", "--no-start", "--no-pull"], env=ENV).stdout
    assert "created system group e2vd" in out
    assert box.run(["systemctl", "is-enabled", "e2vd.socket", "e2vd-warmup.timer"]).stdout.split() == ["enabled"] * 2
    assert box.run(["systemctl", "is-active", "e2vd.socket"], check=False).stdout.strip() == "inactive"

    out = box.run(e2vd + ["install", "--no-pull"], env=ENV).stdout
    assert box.run(["systemctl", "is-active", "e2vd.socket", "e2vd-warmup.timer"]).stdout.split() == ["active"] * 2
    assert box.run(["stat", "-c", "%a %U %G %F", "/run/e2vd/e2vd.sock"]).stdout.strip() == "660 root e2vd socket"
    assert box.run(["systemctl", "is-active", "e2vd.service"], check=False).stdout.strip() == "inactive"
    assert box.run(["systemctl", "is-enabled", "e2vd.socket"]).stdout.strip() == "enabled"

    security = box.run(["systemd-analyze", "security", "e2vd.service", "--no-pager"]).stdout
    exposure = float(security.rsplit("Overall exposure level for e2vd.service:", 1)[1].split()[0])
    print(f"\nsystemd-analyze security e2vd.service (installed, live manager): exposure {exposure}")
    assert exposure <= 3.0

    again = box.run(e2vd + ["install", "--no-pull"], env=ENV).stdout
    assert "created" not in again and again.count("unchanged") == 4 and "kept existing" in again

    regroup = box.run(e2vd + ["install", "--group", "speech", "--no-pull"], env=ENV).stdout
    assert "restarted e2vd.socket" in regroup
    assert box.run(["stat", "-c", "%G", "/run/e2vd/e2vd.sock"]).stdout.strip() == "speech"
    box.run(e2vd + ["install", "--no-pull"], env=ENV)

    box.run(e2vd + ["uninstall"], env=ENV)
    assert not box.root.joinpath("run/e2vd/e2vd.sock").exists()
    assert box.run(["systemctl", "is-enabled", "e2vd.socket"], check=False).returncode != 0
    assert box.root.joinpath("etc/e2vd/e2vd.toml").exists()
    assert box.run(["getent", "group", "e2vd"], check=False).returncode == 0

    box.run(e2vd + ["uninstall", "--purge"], env=ENV)
    assert not box.root.joinpath("etc/e2vd").exists()
    assert box.run(["getent", "group", "e2vd"], check=False).returncode == 2


@pytest.mark.systemd
def test_checked_in_units_verify_silently_where_e2vd_is_in_usr_local(box: sdbox.Box) -> None:
    """The files in systemd/ exactly as committed, where `pip install e2vd` put the script in
    /usr/local/bin (here a wrapper in the box's throw-away overlay)."""
    box.write("/usr/local/bin/e2vd", f"#!/bin/sh\nPYTHONPATH={ROOT} exec {PY} -m e2vd \"$@\"\n", 0o755)
    box.run(["mkdir", "-p", "/var/tmp/units"])
    for name in install.UNITS:
        box.write(f"/var/tmp/units/{name}", (ROOT / "systemd" / name).read_text())
    cp = box.run(["systemd-analyze", "verify", *(f"/var/tmp/units/{n}" for n in install.UNITS)], check=False)
    assert (cp.returncode, cp.stdout + cp.stderr) == (0, "")
