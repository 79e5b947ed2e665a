"""`e2vd pull` against a stand-in hub on localhost (tests/fake_hub.py) serving the tiny stand-in
model: a full pull, a resume after a cut connection, a hash mismatch refused, the hub down, and
the pulled directory used by the engine with no network."""
from __future__ import annotations

import io
import shutil
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fake_hub import FakeHub  # noqa: E402

from e2vd import pull  # noqa: E402

MODEL = "iic/emotion2vec_plus_large"
REV = "v2.0.5"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub(tiny_model: Path):
    h = FakeHub.from_dir(MODEL, REV, tiny_model).start()
    yield h
    h.stop()


def run_pull(hub: FakeHub, cache: Path) -> tuple[pull.PullResult, str]:
    out = io.StringIO()
    result = pull.pull(MODEL, REV, cache, out=out, endpoint=hub.endpoint, tty=False)
    return result, out.getvalue()


def test_full_pull_places_verified_files_with_modes(hub: FakeHub, tiny_model: Path, tmp_path: Path) -> None:
    result, text = run_pull(hub, tmp_path)
    final = tmp_path / "models" / MODEL / REV
    assert result.directory == final and pull.is_complete(final)
    assert result.fetched_bytes == result.total_bytes == sum(len(b) for b in hub.files.values())
    for rel, data in hub.files.items():
        assert (final / rel).read_bytes() == data
        assert stat.S_IMODE((final / rel).stat().st_mode) == 0o644
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert not pull.partial_dir(tmp_path, MODEL, REV).exists()
    manifest = pull.Manifest.read(final / pull.MARKER)
    assert manifest.verified == "size+sha256" and set(manifest.files) == set(hub.files)
    assert "model.pt" in text and "ETA" in text and "/s" in text
    print("\n" + text)
    # a second pull is a no-op without the network
    hub.requests.clear()
    again, _ = run_pull(hub, tmp_path)
    assert again.already_present and hub.requests == []


def test_resume_after_the_connection_is_cut(hub: FakeHub, tmp_path: Path) -> None:
    size = len(hub.files["model.pt"])
    hub.cut_after["model.pt"] = size // 2
    with pytest.raises(pull.PullError, match="continues where it stopped"):
        run_pull(hub, tmp_path)
    final = tmp_path / "models" / MODEL / REV
    assert not final.exists(), "a partial pull must never look like a model"
    part = pull.partial_dir(tmp_path, MODEL, REV) / "model.pt.part"
    assert part.stat().st_size == size // 2
    hub.requests.clear()
    result, _ = run_pull(hub, tmp_path)
    assert pull.is_complete(final) and (final / "model.pt").read_bytes() == hub.files["model.pt"]
    assert result.fetched_bytes < result.total_bytes, "the second run fetched only the rest"
    assert result.fetched_bytes <= size - size // 2 + sum(len(b) for k, b in hub.files.items() if k != "model.pt")


def test_a_file_whose_bytes_do_not_match_the_published_hash_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    hub.corrupt.add("model.pt")
    with pytest.raises(pull.PullError, match="does not match the hub's") as err:
        run_pull(hub, tmp_path)
    print("\n" + str(err.value))
    staging = pull.partial_dir(tmp_path, MODEL, REV)
    assert not (tmp_path / "models" / MODEL / REV).exists()
    assert not (staging / "model.pt").exists() and not (staging / "model.pt.part").exists()
    hub.corrupt.clear()
    run_pull(hub, tmp_path)
    assert pull.is_complete(tmp_path / "models" / MODEL / REV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_down_fails_with_a_clear_message_and_exit_status_1(tmp_path: Path) -> None:
    env = dict(os.environ, MODELSCOPE_DOMAIN=f"http://127.0.0.1:{free_port()}")
    env.pop("MODELSCOPE_ENDPOINT", None)
    cp = subprocess.run([sys.executable, "-m", "e2vd", "pull", MODEL, "--cache-dir", str(tmp_path)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    print("\n" + cp.stderr)
    assert cp.returncode == 1, cp.stderr
    assert "cannot reach the ModelScope hub" in cp.stderr and "Traceback" not in cp.stderr
    assert not (tmp_path / "models" / MODEL / REV).exists()


def test_endpoint_from_the_environment() -> None:
    assert pull.hub_endpoint({}) == "https://www.modelscope.cn"
    assert pull.hub_endpoint({"MODELSCOPE_DOMAIN": "mirror.example:8080"}) == "https://mirror.example:8080"
    assert pull.hub_endpoint({"MODELSCOPE_DOMAIN": "http://127.0.0.1:9/"}) == "http://127.0.0.1:9"
    assert pull.hub_endpoint({"MODELSCOPE_ENDPOINT": "http://a", "MODELSCOPE_DOMAIN": "b"}) == "http://a"


def test_progress_plain_lines_and_terminal_line() -> None:
    t = [0.0]
    out = io.StringIO()
    p = pull.Progress(4 << 20, out, tty=False, every_s=1.0, clock=lambda: t[0])
    p.name = "model.pt"
    t[0] = 2.0
    p.add(2 << 20)
    assert out.getvalue() == "model.pt  2.0 MiB / 4.0 MiB (50 %)  1.0 MiB/s  ETA 0:02\n"
    tty = io.StringIO()
    q = pull.Progress(100, tty, tty=True, every_s=0.0, clock=lambda: t[0])
    q.add(10)
    assert tty.getvalue().startswith("\r\033[K") and "\n" not in tty.getvalue()


# -- the daemon never downloads ----------------------------------------------------------------

def unshare_works() -> bool:
    """Whether this process may run a command in a network namespace of its own (root)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--net", "--", "true"], capture_output=True).returncode == 0


def test_engine_refuses_an_id_not_pulled_and_names_the_command(tmp_path: Path) -> None:
    from e2vd.engine import ModelError, resolve_model

    with pytest.raises(ModelError, match=f"has not been pulled.*run: sudo e2vd pull {MODEL}"):
        resolve_model(MODEL, cache_dir=str(tmp_path))
    pull.partial_dir(tmp_path, MODEL, REV).mkdir(parents=True)
    with pytest.raises(ModelError, match="a pull was started and not finished"):
        resolve_model(MODEL, cache_dir=str(tmp_path))


def test_daemon_answers_model_unavailable_naming_the_pull_command(tmp_path: Path) -> None:
    from daemon_proc import DaemonProcess

    env = {"MODELSCOPE_DOMAIN": "http://127.0.0.1:9"}   # were it to download, it would fail
    with DaemonProcess(tmp_path / "e2vd.sock", MODEL, env=env, cache_dir=tmp_path / "cache",
                       unavailable_grace=60) as d:
        deadline = time.monotonic() + 120                   # the load fails at once; a busy CPU is slow
        while (answer := d.request("GET", "/v1/health"))[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, _, body = answer
        print(f"\n{status} {body}")
        assert status == 503 and body["error"]["code"] == "model_unavailable"
        assert f"run: sudo e2vd pull {MODEL}" in body["error"]["message"]


@pytest.mark.skipif(not unshare_works(), reason="needs unshare --net (root)")
def test_daemon_loads_the_pulled_model_with_no_network(hub: FakeHub, tmp_path: Path, wav_bytes: bytes) -> None:
    from daemon_proc import DaemonProcess

    cache = tmp_path / "cache"
    run_pull(hub, cache)
    hub.stop()

    class Offline(DaemonProcess):
        def command(self) -> list[str]:   # a network namespace with only a loopback that is down
            return ["unshare", "--net", "--", *super().command()]

    with Offline(tmp_path / "e2vd.sock", MODEL, wait_ready=True, cache_dir=cache,
                 env={"MODELSCOPE_DOMAIN": hub.endpoint}) as d:
        status, _, body = d.request("POST", "/v1/recognize", wav_bytes,
                                    headers={"Content-Type": "audio/wav"})
        assert status == 200, body
        assert body["model"] == MODEL and sum(body["scores"]) == pytest.approx(1.0, abs=1e-4)


# -- e2vd models -------------------------------------------------------------------------------

def test_models_lists_the_cache_and_prune_keeps_only_the_configured_model(
        hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from e2vd.cli import main

    cache = tmp_path / "cache"
    run_pull(hub, cache)
    old = cache / "models" / MODEL / "v2.0.4"                 # an older daemon's download
    old.mkdir(parents=True)
    (old / "model.pt").write_bytes(b"x" * 10)
    (old / pull.MARKER).write_text(f"{MODEL} v2.0.4\n")
    other = pull.partial_dir(cache, "iic/emotion2vec_plus_base", REV)
    other.mkdir(parents=True)
    monkeypatch.setenv("E2VD_CONFIG", os.devnull)
    monkeypatch.setenv("E2VD_MODEL", MODEL)
    assert main(["models", "--cache-dir", str(cache)]) == 0
    table = capsys.readouterr().out
    print("\n" + table)
    rows = {tuple(line.split()[:2]): line.split()[-2:] for line in table.splitlines()[1:]}
    assert rows == {(MODEL, REV): ["verified", "yes"], (MODEL, "v2.0.4"): ["unverified", "no"],
                    ("iic/emotion2vec_plus_base", REV): ["incomplete", "no"]}
    assert main(["models", "--prune", "--cache-dir", str(cache)]) == 0
    assert not old.exists() and not other.exists() and pull.is_complete(cache / "models" / MODEL / REV)
    assert not (cache / "models" / "iic" / "emotion2vec_plus_base").exists()


def test_pull_of_a_local_directory_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from e2vd.cli import main

    monkeypatch.setenv("E2VD_CONFIG", os.devnull)
    assert main(["pull", str(tmp_path), "--cache-dir", str(tmp_path)]) == 2
    assert "nothing to pull" in capsys.readouterr().err


# -- e2vd install pulls before it enables the socket ---------------------------------------------

def write_config(path: Path, model: str, cache: Path) -> Path:
    path.write_text(f'model = "{model}"\ncache_dir = "{cache}"\n')
    return path


def test_install_pull_fetches_the_configured_model(hub: FakeHub, tmp_path: Path, tiny_model: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from e2vd.pull_cli import pull_configured

    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.endpoint)
    for name in list(os.environ):
        if name.startswith("E2VD_"):
            monkeypatch.delenv(name)
    cache = tmp_path / "cache"
    result = pull_configured(write_config(tmp_path / "e2vd.toml", MODEL, cache), out=io.StringIO())
    assert result is not None and pull.is_complete(cache / "models" / MODEL / REV)
    assert pull_configured(write_config(tmp_path / "local.toml", str(tiny_model), cache)) is None
    hub.stop()
    with pytest.raises(pull.PullError, match="not enabled.*--no-pull"):
        pull_configured(write_config(tmp_path / "other.toml", "iic/emotion2vec_plus_base", cache),
                        out=io.StringIO())


@pytest.mark.parametrize("pull_first", [True, False])
def test_install_pulls_before_enabling_the_socket_unless_no_pull(monkeypatch: pytest.MonkeyPatch,
                                                                 pull_first: bool) -> None:
    from e2vd import install, pull_cli

    steps: list[str] = []
    monkeypatch.setattr(install, "_write", lambda path, text, mode=0o644: True)
    monkeypatch.setattr(install, "validate", lambda options: None)
    monkeypatch.setattr(install, "_group_exists", lambda name: True)
    monkeypatch.setattr(install, "check_config", lambda path, model=True: None)
    monkeypatch.setattr(install, "CONFIG_PATH", Path("nonexistent/e2vd.toml"))
    monkeypatch.setattr(install, "_run", lambda argv: steps.append(" ".join(argv[:2])))
    monkeypatch.setattr(install.subprocess, "run",
                        lambda argv, **kw: subprocess.CompletedProcess(argv, 1))
    monkeypatch.setattr(pull_cli, "pull_configured", lambda config, out=None: steps.append("pull"))
    install.install(install.Options(pull=pull_first), say=lambda _l: None)
    assert steps == (["pull"] if pull_first else []) + ["systemctl daemon-reload", "systemctl enable"]


# -- for real: e2vd install pulls, the service runs without network --------------------------------

@pytest.mark.systemd
def test_install_pulls_and_the_service_serves_it_with_no_network(hub: FakeHub) -> None:
    """In a throw-away systemd (tests/sdbox.py): `e2vd install` pulls the configured id from the
    stand-in hub into /var/cache/e2vd (root, 0755/0644), the hub goes away, and e2vd.service
    (DynamicUser, PrivateNetwork=yes) loads the pulled copy and answers over the socket; its only
    network interface is lo, and the models directory is mounted read-only for it (systemd hands
    the cache's files to the dynamic user at each start, so the mode alone would not do)."""
    import sdbox
    from conftest import wav_clip

    from e2vd.client import Client

    reason = sdbox.unavailable_reason()
    if reason:
        pytest.skip(f"no throw-away systemd: {reason}")
    e2vd = [sys.executable, "-m", "e2vd"]
    box = sdbox.Box.start(f"e2vd-pull-{os.getpid()}")
    try:
        box.write("/etc/e2vd/e2vd.toml", f'model = "{MODEL}"\ndevice = "cpu"\nidle_timeout = 60\n')
        out = box.run(e2vd + ["install"], env={"PYTHONPATH": str(ROOT), "MODELSCOPE_ENDPOINT": hub.endpoint})
        assert f"model pulled: /var/cache/e2vd/models/{MODEL}/{REV}" in out.stdout, out.stdout + out.stderr
        listing = box.sh(f"cd /var/cache/e2vd/models/{MODEL} && stat -c '%a %U %n' {REV} {REV}/*").stdout
        print("\n" + out.stderr + listing)
        assert listing.split("\n")[0] == f"755 root {REV}"
        hub.stop()
        with Client(f"/proc/{box.init}/root/run/e2vd/e2vd.sock", timeout=180) as c:
            result = c.recognize(wav_clip(1.0))
        assert sum(result.scores) == pytest.approx(1.0, abs=1e-4)
        after = box.sh(f"ls -ld /var/cache/e2vd; stat -L -c '%a %U %n' /var/cache/e2vd/models/{MODEL}/{REV}/model.pt").stdout
        print("after the service's start:\n" + after)
        assert after.splitlines()[-1].startswith("644 "), "only the owner may write the model"
        pid = box.run(["systemctl", "show", "-p", "MainPID", "--value", "e2vd.service"]).stdout.strip()
        interfaces = [line.split(":")[0].strip() for line in
                      box.run(["cat", f"/proc/{pid}/net/dev"]).stdout.splitlines()[2:]]
        assert interfaces == ["lo"], interfaces
        mounts = box.run(["cat", f"/proc/{pid}/mountinfo"]).stdout.splitlines()
        models_mount = [m.split() for m in mounts if m.split()[4] == "/var/cache/private/e2vd/models"]
        print("the daemon's mount of the models: " + " ".join(models_mount[-1][4:6]))
        assert models_mount and "ro" in models_mount[-1][5].split(","), "the daemon may not change a pulled model"
        models = box.run(e2vd + ["models"], env={"PYTHONPATH": str(ROOT)}).stdout
        print(models)
        assert f"{MODEL}" in models and "verified" in models
    finally:
        box.stop()


def test_a_second_pull_of_the_same_model_is_refused_while_one_runs(hub: FakeHub, tmp_path: Path) -> None:
    lock = pull.partial_dir(tmp_path, MODEL, REV).with_name(f".{REV}.lock")
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', "
                               "flush=True); sys.stdin.read()", str(lock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(pull.PullError, match="another `e2vd pull .*` is running"):
            run_pull(hub, tmp_path)
    finally:
        holder.stdin.close()
        holder.wait(30)
    run_pull(hub, tmp_path)
    assert pull.is_complete(tmp_path / "models" / MODEL / REV)


def test_modes_let_every_user_read_even_under_a_strict_umask(hub: FakeHub, tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        run_pull(hub, tmp_path)
    finally:
        os.umask(old)
    final = tmp_path / "models" / MODEL / REV
    for d in (final, final.parent, final.parent.parent, tmp_path / "models"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    assert {stat.S_IMODE(p.stat().st_mode) for p in final.iterdir()} == {0o644}


def test_pull_into_a_cache_it_cannot_write_says_sudo(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from e2vd.cli import main

    monkeypatch.setenv("E2VD_CONFIG", os.devnull)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", hub.endpoint)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "models"))

    monkeypatch.setattr(Path, "mkdir", denied)
    assert main(["pull", MODEL, "--cache-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"run: sudo e2vd pull {MODEL}" in err and "Traceback" not in err


def test_the_pull_command_prints_progress_lines_and_a_summary(hub: FakeHub, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2VD_", "MODELSCOPE_"))}
    env.update(E2VD_CONFIG=os.devnull, MODELSCOPE_ENDPOINT=hub.endpoint)
    argv = [sys.executable, "-m", "e2vd", "pull", MODEL, "--cache-dir", str(tmp_path)]
    cp = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    print("\n" + cp.stderr + cp.stdout)
    assert cp.returncode == 0, cp.stderr
    assert "\r" not in cp.stderr and "model.pt" in cp.stderr and "ETA" in cp.stderr
    assert cp.stdout.startswith(f"pulled {MODEL} (revision {REV}): 4 files") and "verified (size + SHA-256)" in cp.stdout
    again = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert again.returncode == 0 and "already pulled and verified" in again.stdout


def test_models_in_a_cache_it_cannot_read_says_sudo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from e2vd import pull_cli
    from e2vd.cli import main

    def denied(cache: Path) -> list:
        raise PermissionError(13, "Permission denied", "/var/cache/private")

    monkeypatch.setenv("E2VD_CONFIG", os.devnull)
    monkeypatch.setattr(pull_cli, "scan", denied)
    assert main(["models", "--prune", "--cache-dir", str(tmp_path)]) == 1
    assert "run: sudo e2vd models --prune" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[1, 2]", '{"model": 1}', "\xff\xfe garbage"])
def test_a_hostile_marker_is_read_as_unverified_never_a_crash(tmp_path, text):
    """The marker lies in a model directory: nesting deep enough for RecursionError, JSON of the
    wrong shape, bytes that are not UTF-8 — all read as an old-style, unverified marker."""
    marker = tmp_path / pull.MARKER
    marker.write_bytes(text.encode("latin-1"))
    assert pull.Manifest.read(marker).verified is None
