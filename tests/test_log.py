"""e2vd.log: stderr lines for real (subprocesses), journald fields through the real handler with
an observing sender, and the native journal protocol on a socket of our own (mount namespace)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from e2vd import log
from e2vd.log import JournaldHandler, event, field_name, journal_fields, running_under_journald

ROOT = Path(__file__).resolve().parent.parent


def run_py(code: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter from the project root; stdout/stderr captured as text."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120, **kw)


# --- stderr ---------------------------------------------------------------------------------------

def test_stderr_lines_and_later_basicconfig_is_a_noop():
    proc = run_py("""
        import logging
        from e2vd.log import setup_logging, event
        setup_logging("INFO", journald=False)
        event("request", "POST /v1/recognize -> 200 happy", request_id="r-1", status=200,
              infer_ms=12.3456789, top_label="happy", code=None, note="two words", ok=True)
        logging.basicConfig(level=logging.DEBUG, format="DUP %(message)s")  # what funasr does
        logging.getLogger("funasr").info("chatter once")
        logging.getLogger("x").debug("hidden at INFO")
        logging.info("root once")
        import warnings; warnings.warn("a warning")
        print(len(logging.getLogger().handlers))
    """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert proc.stdout.strip() == "1"
    ts = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(ts + r' INFO e2vd: POST /v1/recognize -> 200 happy \(event=request request_id=r-1 '
                             r'status=200 infer_ms=12.345679 top_label=happy note="two words" ok=true\)',
                        lines[0]), lines[0]
    assert sum("chatter once" in line for line in lines) == 1
    assert re.fullmatch(ts + " INFO funasr: chatter once", lines[1])
    assert sum("root once" in line for line in lines) == 1
    assert not any("DUP" in line or "hidden" in line for line in lines)
    assert any(re.match(ts + " WARNING py.warnings: .*a warning", line) for line in lines)


def test_setup_replaces_an_earlier_basicconfig_and_is_idempotent():
    proc = run_py("""
        import logging
        logging.basicConfig(level=logging.INFO, format="EARLY %(message)s")
        from e2vd.log import setup_logging
        setup_logging("DEBUG", journald=False)
        setup_logging("debug", journald=False)
        logging.getLogger("e2vd.x").debug("once at debug")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("once at debug") == 1 and "EARLY" not in proc.stderr
    assert "DEBUG e2vd.x: once at debug" in proc.stderr


@pytest.mark.slow
def test_funasr_automodel_logs_once(tiny_model):
    """Real funasr: building an AutoModel (it calls logging.basicConfig) after setup_logging
    leaves one root handler and prints each record once."""
    proc = run_py(f"""
        import logging
        from e2vd.log import setup_logging, adopt_library_loggers
        setup_logging("INFO", journald=False)
        from funasr import AutoModel
        AutoModel(model={str(tiny_model)!r}, disable_update=True, device="cpu")
        adopt_library_loggers()
        logging.getLogger("modelscope").info("modelscope marker")
        logging.getLogger("funasr").info("funasr marker")
        print("handlers", len(logging.getLogger().handlers), len(logging.getLogger("modelscope").handlers))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "handlers 1 0" in proc.stdout
    assert proc.stderr.count("modelscope marker") == 1 and proc.stderr.count("funasr marker") == 1
    assert re.search(r"INFO modelscope: modelscope marker", proc.stderr)
    logged = [line for line in proc.stderr.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert len(logged) == len(set(logged)), "a log line was printed twice"


CONTROLS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")   # every control character but "\n"


def test_stderr_escapes_control_characters_from_clients():
    """ESC, BEL, CSI (U+009B) and DEL from a request path never reach the terminal raw; a "\n"
    in a field cannot start a forged line; the message keeps its own line breaks."""
    proc = run_py(r"""
        import logging
        from e2vd.log import setup_logging, event
        setup_logging("INFO", journald=False)
        path = "/v1/\x1b[31mred\x07\x9b2J\x7f"
        event("request", f"GET {path} -> 404 not_found", path=path, note="a\nb\tc", status=404)
        try:
            raise ValueError(f"bad {path}")
        except ValueError:
            logging.getLogger("e2vd").exception("two\nlines")
    """)
    assert proc.returncode == 0, proc.stderr
    assert not CONTROLS.search(proc.stderr), repr(proc.stderr)
    first, *rest = proc.stderr.splitlines()
    assert first.endswith(r"e2vd: GET /v1/\x1b[31mred\x07\x9b2J\x7f -> 404 not_found (event=request "
                          r'path="/v1/\x1b[31mred\x07\x9b2J\x7f" note="a\nb\tc" status=404)'), first
    assert rest[0].endswith("ERROR e2vd: two") and rest[1] == "lines"
    assert rest[-1] == r"ValueError: bad /v1/\x1b[31mred\x07\x9b2J\x7f"


def test_bad_level():
    with pytest.raises(ValueError, match="LOUD.*DEBUG, INFO"):
        log.setup_logging("LOUD", journald=False)


# --- journald detection ---------------------------------------------------------------------------

def test_running_under_journald_compares_stderr_inode(tmp_path):
    with open(tmp_path / "stream", "w") as f, open(tmp_path / "other", "w") as g:
        st = os.fstat(f.fileno())
        good = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert running_under_journald(good, f.fileno())
        assert not running_under_journald(good, g.fileno())
        assert not running_under_journald({}, f.fileno())
        assert not running_under_journald({"JOURNAL_STREAM": "garbage"}, f.fileno())
        assert not running_under_journald({"INVOCATION_ID": "abc"}, f.fileno())


def test_auto_detection_picks_journald_when_stderr_is_the_stream(tmp_path):
    err = tmp_path / "stderr"
    code = """
        import logging
        from e2vd.log import setup_logging
        setup_logging()
        print(type(logging.getLogger().handlers[0]).__name__)
    """
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = {k: v for k, v in os.environ.items() if k != "INVOCATION_ID"}
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                              stderr=f, stdout=subprocess.PIPE, text=True, timeout=60)
    assert proc.stdout.strip() == "JournaldHandler", err.read_text()
    other = run_py(code, env={"JOURNAL_STREAM": "1:2"})
    assert other.stdout.strip() == "StreamHandler"


# --- journald fields ------------------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, message: str, **fields) -> None:
        self.calls.append((message, fields))


@pytest.fixture
def journal_logger():
    """The "e2vd" logger wired to a JournaldHandler whose sender records what it is given."""
    recorder = Recorder()
    handler = JournaldHandler(sender=recorder)
    logger = logging.getLogger("e2vd")
    old = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield recorder
    logger.removeHandler(handler)
    logger.setLevel(old[0])
    logger.propagate = old[1]


def test_event_fields_reach_the_journal_sender(journal_logger):
    event("model_loaded", "model loaded on cpu in 1.5 s", load_seconds=1.53333333, memory_bytes=1234,
          device="cpu", quantized=False, skipped=None, **{"weird-name": "x"})
    [(message, fields)] = journal_logger.calls
    assert message == "model loaded on cpu in 1.5 s"
    assert fields["E2VD_EVENT"] == "model_loaded"
    assert fields["E2VD_LOAD_SECONDS"] == "1.533333"
    assert fields["E2VD_MEMORY_BYTES"] == "1234"
    assert fields["E2VD_DEVICE"] == "cpu"
    assert fields["E2VD_QUANTIZED"] == "false"
    assert fields["E2VD_WEIRD_NAME"] == "x"
    assert "E2VD_SKIPPED" not in fields
    assert fields["PRIORITY"] == "6" and fields["SYSLOG_IDENTIFIER"] == "e2vd" and fields["LOGGER"] == "e2vd"
    assert fields["CODE_FUNC"] == "test_event_fields_reach_the_journal_sender"  # the caller, not event()
    assert fields["CODE_FILE"] == __file__ and isinstance(fields["CODE_LINE"], int)
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]*", k) for k in fields)


def test_journal_fields_keep_the_raw_bytes(journal_logger):
    path = "/v1/\x1b[31mred\x07\x9b"
    event("request", f"GET {path} -> 404", path=path)
    [(message, fields)] = journal_logger.calls
    assert message == f"GET {path} -> 404" and fields["E2VD_PATH"] == path


def test_levels_and_exceptions(journal_logger):
    logger = logging.getLogger("e2vd.sub")
    logger.propagate = True
    event("request", "POST /v1/recognize -> 500", logging.WARNING, status=500, code="internal")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("e2vd").exception("worker failed")
    logging.getLogger("e2vd").debug("plain debug")
    (m1, f1), (m2, f2), (m3, f3) = journal_logger.calls
    assert f1["PRIORITY"] == "4" and f1["E2VD_STATUS"] == "500" and f1["E2VD_CODE"] == "internal"
    assert f2["PRIORITY"] == "3" and "RuntimeError: boom" in f2["EXCEPTION_TEXT"]
    assert m2.startswith("worker failed\nTraceback") and "E2VD_EVENT" not in f2
    assert f3["PRIORITY"] == "7" and m3 == "plain debug"


def test_fields_are_accepted_by_systemd_python_send():
    """The real systemd.journal.send takes our keyword set (no journald socket here: it is dropped)."""
    journal = pytest.importorskip("systemd.journal")
    record = logging.LogRecord("e2vd", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    record.e2vd_event = "start"
    record.e2vd_fields = {"pid": 1}
    fields = journal_fields(record)
    message = fields.pop("MESSAGE")
    fields["CODE_LINE"] = int(fields["CODE_LINE"])
    journal.send(message, **fields)
    assert message == "hello x" and fields["E2VD_PID"] == "1"


def test_field_name():
    assert field_name("queue_ms") == "E2VD_QUEUE_MS"
    assert field_name("client-uid") == "E2VD_CLIENT_UID"


def test_documented_events_use_valid_names():
    for name, fields in log.EVENT_FIELDS.items():
        assert re.fullmatch(r"[a-z_]+", name)
        for f in fields:
            assert re.fullmatch(r"E2VD_[A-Z0-9_]+", field_name(f))
            assert f in log.__doc__, f


NATIVE_READER = r"""
import json, logging, os, socket, struct, sys
os.makedirs("/run/systemd/journal", exist_ok=True)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/run/systemd/journal/socket")
sock.settimeout(10)
from e2vd.log import setup_logging, event
setup_logging("INFO", journald=True)
event("request", "POST /v1/recognize -> 200 happy", request_id="abc", queue_ms=0.5, top_label="happy")
logging.getLogger("e2vd").error("two\nlines")
entries = []
for _ in range(2):
    data = sock.recv(1 << 20)
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1); i = nl + 1
        else:  # binary-safe form: NAME\n<u64 little-endian length><value>\n
            k = line; (n,) = struct.unpack_from("<Q", data, nl + 1)
            v = data[nl + 9:nl + 9 + n]; i = nl + 10 + n
        fields[k.decode()] = v.decode()
    entries.append(fields)
print(json.dumps(entries))
"""


def test_native_journal_protocol_on_our_own_socket():
    """systemd-python's real sd_journal_send path, received on a journal socket we bind in a
    private mount namespace (tmpfs over /run/systemd): no systemd is started."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not Path("/run/systemd").is_dir():
        pytest.skip("needs root, unshare(1) and /run/systemd to mount over")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces unavailable: {probe.stderr.decode().strip()}")
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs tmpfs /run/systemd && exec "$0" -c "$1"', sys.executable, NATIVE_READER],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = json.loads(proc.stdout)
    assert first["MESSAGE"] == "POST /v1/recognize -> 200 happy"
    assert first["E2VD_EVENT"] == "request" and first["E2VD_REQUEST_ID"] == "abc"
    assert first["E2VD_QUEUE_MS"] == "0.5" and first["E2VD_TOP_LABEL"] == "happy"
    assert first["PRIORITY"] == "6" and first["SYSLOG_IDENTIFIER"] == "e2vd"
    assert second["MESSAGE"] == "two\nlines" and second["PRIORITY"] == "3"
    assert proc.stderr == ""  # nothing went to stderr


def test_readme_journal_table_lists_every_documented_field():
    """The README's journal table is what operators query by: every field of every documented
    event must appear in that event's row."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) >= 4 and cells[1].startswith("`") and "E2VD_" not in cells[1]:
            for name in re.findall(r"`([a-z_]+)`", cells[1]):
                rows[name] = cells[2]
    for name, fields in log.EVENT_FIELDS.items():
        assert name in rows, f"README journal table has no row for {name}"
        for f in fields:
            assert f"`{f.upper()}`" in rows[name], f"README row {name} lacks {f.upper()}"
