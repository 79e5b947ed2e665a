"""The browser page's units and `e2vd install --web` (issue 9), without root: the rendered units
verify, e2vd-web.service's sandbox exposure is at most 2.0 (printed), the front runs as a dynamic
user in the socket's group with no network of its own, the address rules (loopback only unless
--web-public), and an offline install into a scratch root."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_units import parse

from e2vd import install
from e2vd.web_install import WEB_UNITS
from e2vd.web_listen import ListenError, parse_address

ROOT = Path(__file__).resolve().parent.parent
analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All units as `e2vd install --web` writes them for this installation."""
    d = tmp_path_factory.mktemp("units")
    for name, text in install.render_units(install.Layout.detect(), install.Options(web="127.0.0.1:7860")).items():
        (d / name).write_text(text)
    return d


@analyze
def test_web_units_verify_silently(rendered: Path) -> None:
    cp = subprocess.run(["systemd-analyze", "verify", *(str(rendered / u) for u in sorted(p.name for p in rendered.iterdir()))],
                        capture_output=True, text=True)
    assert (cp.stdout + cp.stderr).strip() == "" and cp.returncode == 0, cp.stdout + cp.stderr


@analyze
def test_web_service_exposure_is_at_most_2(rendered: Path) -> None:
    cp = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(rendered / "e2vd-web.service")],
                        capture_output=True, text=True)
    m = re.search(r"Overall exposure level for e2vd-web\.service: (\d+\.\d+)", cp.stdout + cp.stderr)
    assert m, cp.stdout + cp.stderr
    print(f"\nsystemd-analyze security e2vd-web.service: exposure {m[1]}")
    assert float(m[1]) <= 2.0


def test_the_front_is_a_dynamic_user_in_the_sockets_group_without_a_network(rendered: Path) -> None:
    svc = parse((rendered / "e2vd-web.service").read_text())["Service"]
    assert svc["ExecStart"].split()[-1] == "web" and svc["ExecStart"].startswith("/")
    assert (svc["DynamicUser"], svc["SupplementaryGroups"], svc["PrivateNetwork"]) == ("yes", "e2vd", "yes")
    assert svc["RestrictAddressFamilies"] == "AF_UNIX", "the listening socket comes from systemd"
    assert svc["Restart"] == "no"
    sock = parse((rendered / "e2vd-web.socket").read_text())
    assert (sock["Socket"]["ListenStream"], sock["Socket"]["Accept"]) == ("127.0.0.1:7860", "no")
    assert sock["Install"]["WantedBy"] == "sockets.target"


def test_install_without_web_writes_no_web_units() -> None:
    units = install.render_units(install.Layout.detect(), install.Options())
    assert not set(WEB_UNITS) & set(units)


def test_address_group_and_public_are_written() -> None:
    units = install.render_units(install.Layout.detect(),
                                 install.Options(group="speech", web="[::1]:8080"))
    assert "ListenStream=[::1]:8080" in units["e2vd-web.socket"]
    assert "SupplementaryGroups=speech" in units["e2vd-web.service"]
    assert not re.search(r"^ExecStart=.* --public", units["e2vd-web.service"], re.M)
    public = install.render_units(install.Layout.detect(), install.Options(web="0.0.0.0:7860", web_public=True))
    assert re.search(r"^ExecStart=\S+( -m e2vd)? web --public$", public["e2vd-web.service"], re.M)


@pytest.mark.parametrize("web, public, needle", [
    ("0.0.0.0:7860", False, "--public"),
    ("192.0.2.7:7860", False, "every local user"),
    ("localhost:7860", False, "not an IP address"),
    ("127.0.0.1:99999", False, "not a TCP port"),
    ("::1:7860", False, "brackets"),
    (None, True, "--web-public goes with --web"),
])
def test_bad_or_exposed_addresses_are_refused(web: str | None, public: bool, needle: str) -> None:
    with pytest.raises(install.InstallUsageError, match=re.escape(needle)):
        install.validate(install.Options(web=web, web_public=public))


def test_addresses_parse_as_systemd_writes_them() -> None:
    assert str(parse_address("7860")) == "127.0.0.1:7860"
    assert str(parse_address("[::1]:7860")) == "[::1]:7860" and parse_address("[::1]:7860").loopback
    assert parse_address("127.0.0.2:80").loopback and not parse_address("0.0.0.0:80").loopback
    assert parse_address("0.0.0.0:7860").url == "http://localhost:7860/"
    with pytest.raises(ListenError):
        parse_address("7860:")


@analyze
def test_offline_install_with_web_enables_the_page_socket(tmp_path: Path) -> None:
    lines: list[str] = []
    install.install(install.Options(web="127.0.0.1:7861"), root=tmp_path, say=lines.append)
    units = tmp_path / "etc/systemd/system"
    assert {p.name for p in units.glob("e2vd*")} == set(install.UNITS) | set(WEB_UNITS)
    assert (units / "sockets.target.wants/e2vd-web.socket").is_symlink()
    assert "ListenStream=127.0.0.1:7861" in (units / "e2vd-web.socket").read_text()
    install.uninstall(root=tmp_path, say=lines.append)
    assert not list(units.glob("e2vd*")) and not (units / "sockets.target.wants/e2vd-web.socket").exists()
