"""e2vd.client: transport and error mapping against a real Unix-socket HTTP server (unix_http_server),
and the real daemon (`e2vd serve` with the tiny stand-in) for results end to end."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from e2vd import Client
from e2vd.client import (BodyLimit, ClientError, DaemonDied, DaemonTimeout, DaemonUnreachable, InputError, Recognition,
                         body_limit, connect_unix, read_audio_file, read_audio_stream)
from e2vd import protocol
from e2vd.vocabulary import ExitCode
from raw_peer import RawPeer, http_answer, json_answer
from unix_http_server import LABELS, TinyDaemon


# -- transport, against the small server ------------------------------------------------------

def test_recognize_sends_file_bytes_and_returns_typed_result(wav_file: Path) -> None:
    with TinyDaemon() as d, Client(d.socket) as c:
        r = c.recognize(wav_file)
        assert isinstance(r, Recognition)
        assert r.labels == LABELS and len(r.scores) == 9
        assert r.top.label == "happy" and r.top.score == pytest.approx(0.84)
        assert r.duration_s == wav_file.stat().st_size  # the server echoes the body length
        assert r.embedding is None and r.model == "tiny-test"
        assert r.timing_ms == {"queue": 0.1, "infer": 1.0}
        assert r.ranked()[0].label == "happy"
        method, path, query, _ = d.requests[-1]
        assert (method, path, query) == ("POST", "/v1/recognize", {"granularity": "utterance", "embedding": "0"})


def test_recognize_bytes_and_embedding_as_numpy(wav_bytes: bytes) -> None:
    with TinyDaemon() as d, Client(d.socket) as c:
        u = c.recognize(wav_bytes, embedding=True)
        f = c.recognize(bytearray(wav_bytes), granularity="frame", embedding=True)
    assert u.duration_s == len(wav_bytes)
    assert isinstance(u.embedding, np.ndarray) and u.embedding.dtype == np.float32 and u.embedding.shape == (4,)
    assert f.embedding.shape == (3, 4)
    assert "embedding" in u.to_dict() and "embedding" not in u.to_dict(embedding=False)


def test_calls_reuse_one_connection(wav_bytes: bytes) -> None:
    with TinyDaemon() as d, Client(d.socket) as c:
        c.health()
        for _ in range(5):
            c.recognize(wav_bytes)
        c.status()
        c.warmup(60)
        assert d.connections == 1 and c.connections_opened == 1
        assert len(d.requests) == 8


def test_reconnects_when_daemon_closed_the_connection(wav_bytes: bytes) -> None:
    with TinyDaemon(mode="close_after") as d, Client(d.socket) as c:
        for _ in range(3):
            assert c.recognize(wav_bytes).duration_s == len(wav_bytes)
        # Each answer is followed by a silent close; every later call found the old connection dead.
        assert d.connections == 3
        assert [r[1] for r in d.requests] == ["/v1/recognize"] * 3  # nothing was sent twice to a live daemon


def test_a_daemon_that_dies_mid_request_is_reported_and_never_sent_the_request_again(wav_bytes: bytes) -> None:
    """The daemon read the whole request on a fresh connection, then closed it without a byte of
    answer (its watchdog ended a stuck inference, or it crashed): DaemonDied, exit 5, not resent
    (the same request could end the next daemon the same way)."""
    with TinyDaemon(mode="hangup") as d, Client(d.socket) as c:
        with pytest.raises(DaemonDied, match="died mid-request") as info:
            c.recognize(wav_bytes)
        assert info.value.exit_code == ExitCode.SERVER and "journalctl -u e2vd" in info.value.message
        assert len(d.requests) == 1


def test_a_kept_alive_connection_closed_without_answer_is_retried_once_on_a_fresh_one(wav_bytes: bytes) -> None:
    """On a reused connection the close may be the daemon's idle close racing our request: sent
    once more on a fresh connection; closed again there, the daemon died mid-request."""
    with TinyDaemon() as d, Client(d.socket) as c:
        assert c.health()["status"] == "ready"
        d.mode = "hangup"
        with pytest.raises(DaemonDied):
            c.recognize(wav_bytes)
        assert [r[1] for r in d.requests] == ["/v1/health", "/v1/recognize", "/v1/recognize"]


def test_non_idempotent_request_is_not_resent() -> None:
    with TinyDaemon() as d, Client(d.socket) as c:
        assert c.health()["status"] == "ready"
        d.mode = "hangup"
        with pytest.raises(DaemonUnreachable, match="closed the connection without answering"):
            c._request("POST", "/v1/warmup", b"", idempotent=False)
        assert len(d.requests) == 2


def test_timeout_is_reported_as_daemon_timeout() -> None:
    with TinyDaemon(mode="silent", silence_s=2.0) as d, Client(d.socket, timeout=0.3) as c:
        with pytest.raises(DaemonTimeout, match="no answer .* within 0.3 s"):
            c.health()


def test_daemon_errors_become_client_errors() -> None:
    with TinyDaemon() as d, Client(d.socket) as c:
        with pytest.raises(ClientError) as bad:
            c.recognize(b"not audio at all")
        assert (bad.value.status, bad.value.code, bad.value.rejected) == (400, "bad_audio", True)
        assert "cannot decode" in bad.value.message
        with pytest.raises(ClientError) as busy:
            c.recognize(b"busy")
        assert (busy.value.status, busy.value.code, busy.value.retry_after) == (503, "busy", 1.0)
        with pytest.raises(ClientError) as boom:
            c.recognize(b"boom")
        assert boom.value.code == "internal" and not boom.value.rejected
        with pytest.raises(ClientError) as nf:
            c._request("GET", "/nope", None, idempotent=True)
        assert nf.value.status == 404
        assert c.health() == {"status": "ready"}  # the connection is still usable
        assert d.connections == 1


def test_missing_socket_says_how_to_start_it() -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="e2vd-t-"), "none.sock")
    with pytest.raises(DaemonUnreachable) as e:
        Client(path).health()
    assert "systemctl enable --now e2vd.socket" in str(e.value) and path in str(e.value)


def test_refused_socket_says_nothing_listens() -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="e2vd-t-"), "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)  # bound but never listening: connect() is refused, like a daemon that died
    try:
        with pytest.raises(DaemonUnreachable, match="nothing listens") as e:
            Client(path).status()
        assert "systemctl enable --now e2vd.socket" in str(e.value)
    finally:
        s.close()


def _full_backlog(path: str) -> tuple[socket.socket, socket.socket]:
    """A listener that accepts nothing, with its backlog already full: (listener, queued client)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)  # Linux queues one connection beyond the backlog: 0 leaves room for one
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued.connect(path)
    return listener, queued


def test_connect_waits_in_a_full_backlog_like_during_a_cold_start() -> None:
    """While a socket-activated daemon loads its model, systemd's backlog can fill up: a client
    with a timeout must wait for room, not fail at once with EAGAIN (a non-blocking connect)."""
    path = os.path.join(tempfile.mkdtemp(prefix="e2vd-t-"), "full.sock")
    listener, queued = _full_backlog(path)
    accepted: list[socket.socket] = []
    room = threading.Event()

    def make_room() -> None:
        time.sleep(0.3)
        room.set()                 # from here on the connect may go through, not before
        accepted.append(listener.accept()[0])

    helper = threading.Thread(target=make_room)
    helper.start()
    try:
        start = time.monotonic()
        sock = connect_unix(path, timeout=30)
        # Read before anything else waits: a connect that did not wait for room returns within
        # microseconds, long before the helper's 0.3 s sleep ends and it sets `room`.
        made_room_first = room.is_set()
        waited = time.monotonic() - start
        assert made_room_first, f"the connection went through after {waited:.3f} s, before the listener made room"
        assert waited >= 0.25 and sock.gettimeout() == 30
        sock.close()
    finally:
        helper.join()
        for s in (queued, listener, *accepted):
            s.close()


def test_backlog_full_past_the_timeout_is_a_timeout() -> None:
    path = os.path.join(tempfile.mkdtemp(prefix="e2vd-t-"), "stuck.sock")
    listener, queued = _full_backlog(path)
    try:
        start = time.monotonic()
        with pytest.raises(DaemonTimeout, match="backlog is full") as e:
            Client(path, timeout=0.3).health()
        assert time.monotonic() - start >= 0.25   # it waited, rather than failing at once
        assert "journalctl -u e2vd" in str(e.value)
    finally:
        queued.close()
        listener.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
def test_permission_denied_names_the_group() -> None:
    with TinyDaemon() as d:
        os.chmod(d.socket, 0o660)
        os.chmod(os.path.dirname(d.socket), 0o755)
        code = ("import sys; sys.path.insert(0, sys.argv[2]); from e2vd.client import Client, DaemonUnreachable\n"
                "try: Client(sys.argv[1]).health()\n"
                "except DaemonUnreachable as e: print(e); sys.exit(3)\n")
        root = str(Path(__file__).resolve().parent.parent)
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                               sys.executable, "-c", code, d.socket, root],
                              capture_output=True, text=True, timeout=60)
    if proc.returncode not in (3,) and "Permission denied" in proc.stderr and "python" in proc.stderr.lower():
        pytest.skip(f"user nobody cannot run this interpreter here: {proc.stderr[-200:]}")
    assert proc.returncode == 3, proc.stderr
    assert "permission denied" in proc.stdout and "usermod -aG e2vd" in proc.stdout


def test_default_socket_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2VD_SOCKET", "/tmp/somewhere.sock")
    assert Client().socket == "/tmp/somewhere.sock"
    monkeypatch.delenv("E2VD_SOCKET")
    assert Client().socket == "/run/e2vd/e2vd.sock"
    assert Client("/x.sock").socket == "/x.sock"


# -- reading audio with a bound (issue 7, item 3) --------------------------------------------

def test_read_audio_file_reads_at_most_the_limit(tmp_path: Path) -> None:
    limit = BodyLimit(1000, "a test")
    exact, over = tmp_path / "exact.wav", tmp_path / "over.wav"
    exact.write_bytes(b"x" * 1000)
    over.write_bytes(b"x" * 1001)
    assert read_audio_file(exact, limit) == b"x" * 1000
    with pytest.raises(InputError) as e:
        read_audio_file(over, limit)
    assert e.value.code == "too_large" and "larger than 1000 bytes" in e.value.message
    assert "nothing was sent" in e.value.message and "a test" in e.value.message
    # /proc files are regular but report size 0: the read itself must stop at limit + 1 bytes.
    environ = Path(f"/proc/{os.getpid()}/environ")
    assert environ.stat().st_size == 0 and len(environ.read_bytes()) > 10
    with pytest.raises(InputError, match="larger than 10 bytes"):
        read_audio_file(environ, BodyLimit(10, "a test"))


def test_read_audio_file_refuses_fifos_and_devices_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody will ever write to it: opening it for reading would block forever
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device"), (tmp_path, "a directory")):
        with pytest.raises(InputError) as e:
            read_audio_file(path, BodyLimit(1000, "a test"))
        assert e.value.code == "not_a_file" and kind in e.value.message and "not a regular file" in e.value.message


def test_client_recognize_refuses_a_large_file_before_connecting(tmp_path: Path) -> None:
    big = tmp_path / "big.wav"
    big.write_bytes(b"x" * 2001)
    with TinyDaemon() as d, Client(d.socket, max_body_bytes=2000) as c:
        with pytest.raises(InputError, match="larger than 2000 bytes"):
            c.recognize(big)
        assert d.connections == 0
        assert c.recognize(b"x" * 5000).duration_s == 5000  # bytes in memory: the daemon judges them


def test_read_audio_stream_bounded_by_size_and_time() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"abc")
        os.close(w)
        w = -1
        assert read_audio_stream(r, BodyLimit(10, "a test"), timeout=30) == b"abc"
    finally:
        os.close(r)
        if w != -1:
            os.close(w)
    r, w = os.pipe()  # a writer that holds the pipe open and never finishes
    try:
        os.write(w, b"RIFF")
        with pytest.raises(InputError) as e:
            read_audio_stream(r, BodyLimit(1000, "a test"), timeout=0.2)
        assert e.value.code == "timeout" and "within 0.2 s (4 bytes so far)" in e.value.message
    finally:
        os.close(r)
        os.close(w)
    with open("/dev/zero", "rb") as zero:
        with pytest.raises(InputError, match="larger than 100000 bytes"):
            read_audio_stream(zero.fileno(), BodyLimit(100_000, "a test"), timeout=30)


def test_body_limit_follows_the_daemons_settings(tmp_path: Path) -> None:
    toml = tmp_path / "e2vd.toml"
    toml.write_text("max_body_bytes = 2000\n")
    assert body_limit({"E2VD_CONFIG": str(toml)}) == BodyLimit(2000, f"from {toml}")
    assert body_limit({"E2VD_CONFIG": str(toml), "E2VD_MAX_BODY_BYTES": "3000"}) == \
        BodyLimit(3000, "from $E2VD_MAX_BODY_BYTES")
    empty = body_limit({"E2VD_CONFIG": "/dev/null"})
    assert empty.max_bytes == 50_000_000 and "the default" in empty.source
    # Unrelated settings, even broken ones, do not matter to the client.
    assert body_limit({"E2VD_CONFIG": str(toml), "E2VD_IDLE_TIMEOUT": "soon"}).max_bytes == 2000
    broken = body_limit({"E2VD_CONFIG": str(toml), "E2VD_MAX_BODY_BYTES": "lots"})
    assert broken.max_bytes == 50_000_000 and "could not be read" in broken.source and "E2VD_MAX_BODY_BYTES" in broken.source
    missing = body_limit({"E2VD_CONFIG": str(tmp_path / "none.toml")})
    assert missing.max_bytes == 50_000_000 and "does not exist" in missing.source


# -- hostile arguments and peers (issue 7, item 9) --------------------------------------------

@pytest.mark.parametrize("timeout", [-1.0, 0.0, float("nan"), float("inf"), 1e300])
def test_unusable_timeouts_are_refused_at_once(timeout: float) -> None:
    with pytest.raises(ValueError, match="seconds > 0"):
        Client("/tmp/x.sock", timeout=timeout)


def test_peer_that_does_not_speak_http_is_unreachable() -> None:
    with RawPeer(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n") as peer, Client(peer.socket) as c:
        with pytest.raises(DaemonUnreachable) as e:
            c.health()
        assert "does not speak HTTP" in str(e.value) and "SSH-2.0" in str(e.value)
        assert peer.connections == 1  # not retried: it answered, just not in HTTP


@pytest.mark.parametrize("answer, what", [
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n{}", "LineTooLong"),
    (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n{}", "more than 100 headers"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"status\"", "IncompleteRead"),
])
def test_malformed_http_answers_are_server_errors(answer: bytes, what: str) -> None:
    with RawPeer(answer) as peer, Client(peer.socket) as c:
        with pytest.raises(ClientError) as e:
            c.health()
    assert e.value.status == 502 and e.value.code == "internal" and not e.value.rejected
    assert "malformed answer to GET /v1/health" in e.value.message and what in e.value.message


@pytest.mark.parametrize("answer", [
    http_answer("[" * 100_000 + "]" * 100_000),                                  # RecursionError in json
    json_answer({"labels": [], "scores": [], "duration_s": 1.0}),               # nothing to rank
    json_answer({"labels": [1, 2], "scores": [0.5, 0.5], "duration_s": 1.0}),   # labels not strings
    json_answer({"labels": ["a"], "scores": [float("nan")], "duration_s": 1.0}),
    json_answer({"labels": ["a"], "scores": [1.0], "duration_s": 1.0, "timing_ms": [1]}),
    json_answer({"labels": ["a"], "scores": [1.0], "duration_s": float("inf")}),
    json_answer({"labels": ["a"], "scores": [1.0], "duration_s": 1.0, "embedding": [[1.0], [1.0, 2.0]]}),
    json_answer({"labels": ["a"], "scores": [1.0], "duration_s": 1.0, "embedding": [float("nan")]}),
])
def test_mangled_recognition_answers_are_server_errors(answer: bytes) -> None:
    with RawPeer(answer) as peer, Client(peer.socket) as c:
        with pytest.raises(ClientError) as e:
            c.recognize(b"RIFF")
    assert e.value.status == 502 and e.value.code == "internal" and e.value.exit_code == ExitCode.SERVER
    assert "POST /v1/recognize" in e.value.message   # "answered ... with non-JSON" or "... is malformed"


@pytest.mark.parametrize("status, code", [
    ("400 Bad Request", "bad_request"), ("404 Not Found", "not_found"), ("408 Request Timeout", "timeout"),
    ("413 Payload Too Large", "too_large"), ("422 Unprocessable Entity", "bad_request"),
    ("418 I'm a teapot", "bad_request"), ("500 Internal Server Error", "internal"),
    ("503 Service Unavailable", "internal"), ("502 Bad Gateway", "internal"),
])
def test_an_error_without_error_document_gets_a_code_of_protocol_errors(status: str, code: str) -> None:
    """Something other than the daemon answered (it always sends {"error": ...}): the code is the
    one protocol.ERRORS gives that status, or the HTTP-level bad_request/internal where several
    codes share the status or none has it; the exit code follows the status class."""
    with RawPeer(http_answer("<html>oops</html>", status)) as peer, Client(peer.socket) as c:
        with pytest.raises(ClientError) as e:
            c.health()
    assert e.value.code == code and code in protocol.ERRORS and e.value.status == int(status[:3])
    assert e.value.exit_code == (ExitCode.REJECTED if status.startswith("4") else ExitCode.SERVER)
    assert e.value.message == "<html>oops</html>"


def test_every_error_carries_its_exit_code(tmp_path: Path) -> None:
    """The `e2vd` command's exit status for each client error is the exception's own exit_code."""
    assert DaemonUnreachable("s", "m").exit_code == DaemonTimeout("s", "m").exit_code == ExitCode.UNREACHABLE
    assert InputError("f", "too_large", "m").exit_code == ExitCode.REJECTED
    assert ClientError(400, "bad_audio", "m").exit_code == ClientError(422, "too_long", "m").exit_code == ExitCode.REJECTED
    assert ClientError(503, "busy", "m").exit_code == ClientError(500, "internal", "m").exit_code == ExitCode.SERVER
    assert DaemonDied("s", "m").exit_code == ClientError(503, "config_invalid", "m").exit_code == ExitCode.SERVER
    with pytest.raises(DaemonUnreachable) as e:
        Client(tmp_path / "none.sock").health()
    assert e.value.exit_code == ExitCode.UNREACHABLE


def test_socket_path_that_is_no_socket_says_so(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    for path, kind in ((plain, "a regular file"), (tmp_path, "a directory")):
        with pytest.raises(DaemonUnreachable) as e:
            Client(path).health()
        assert f"{path} is {kind}, not a socket" in str(e.value) and "--socket" in str(e.value)


def test_warmup_hold_keeps_every_digit_and_escapes_the_plus() -> None:
    with TinyDaemon() as d, Client(d.socket) as c:
        c.warmup(1234567)
        c.warmup(0.25)
        c.warmup(1e17)
    assert [r[2]["hold"] for r in d.requests] == ["1234567", "0.25", "1e+17"]


# -- against the real daemon (`e2vd serve` with the tiny stand-in) ----------------------------

@pytest.fixture(scope="module")
def daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    from daemon_proc import DaemonProcess

    sock = tmp_path_factory.mktemp("client") / "e2vd.sock"
    with DaemonProcess(sock, tiny_model, wait_ready=True, connection_timeout=3, idle_timeout=600) as d:
        yield d


def test_daemon_recognize_utterance_and_frame(daemon, wav_file: Path) -> None:
    with Client(daemon.socket) as c:
        r = c.recognize(wav_file)
        assert r.labels == LABELS and len(r.model_labels) == 9
        assert sum(r.scores) == pytest.approx(1.0, abs=1e-4)
        best = int(np.argmax(r.scores))
        assert (r.top.label, r.top.score) == (r.labels[best], pytest.approx(r.scores[best]))
        assert r.duration_s == pytest.approx(2.0, abs=0.01) and r.embedding is None
        assert r.model and set(r.timing_ms) >= {"queue", "infer"}
        u = c.recognize(wav_file.read_bytes(), embedding=True)
        f = c.recognize(wav_file, granularity="frame", embedding=True)
        assert u.scores == pytest.approx(r.scores, abs=1e-6)
        assert u.embedding.ndim == 1 and u.embedding.shape[0] > 0
        assert f.embedding.ndim == 2 and f.embedding.shape[1] == u.embedding.shape[0]
        assert abs(f.embedding.shape[0] - 100) <= 2  # 50 frames per second of audio
        assert c.connections_opened == 1


def test_daemon_health_status_warmup(daemon, wav_bytes: bytes) -> None:
    with Client(daemon.socket) as c:
        assert c.health() == {"status": "ready"}
        before = c.status()["requests_served"]
        c.recognize(wav_bytes)
        st = c.status()
        assert st["requests_served"] == before + 1
        assert st["device"] == "cpu" and st["connections"] == 1  # this client's one kept-alive connection
        w = c.warmup(30)
        assert w["status"] == "ready" and w["hold_s"] == pytest.approx(30)
        assert c.status()["keep_warm_deadline"] is not None
        assert "/v1/recognize" in json.dumps(c.openapi())


def test_daemon_bad_audio_is_a_client_error_and_daemon_keeps_serving(daemon, wav_bytes: bytes) -> None:
    with Client(daemon.socket) as c:
        with pytest.raises(ClientError) as e:
            c.recognize(b"RIFF....WAVEfmt definitely not audio")
        assert e.value.status == 400 and e.value.code == "bad_audio" and e.value.rejected
        with pytest.raises(ClientError) as e:
            c.recognize(wav_bytes, granularity="sideways")
        assert e.value.code == "bad_option"
        assert c.recognize(wav_bytes).duration_s == pytest.approx(2.0, abs=0.01)


def test_daemon_closed_idle_connection_is_reopened_transparently(daemon, wav_bytes: bytes) -> None:
    with Client(daemon.socket) as c:
        first = c.recognize(wav_bytes)
        time.sleep(4.0)  # past the daemon's connection_timeout (3 s): it closes our connection
        second = c.recognize(wav_bytes)
        assert second.scores == pytest.approx(first.scores, abs=1e-6)
        assert c.connections_opened == 2


def test_daemon_result_equals_in_process_engine(daemon, wav_bytes: bytes, tiny_model: Path) -> None:
    from e2vd.engine import Engine

    engine = Engine.load(str(tiny_model), device="cpu")
    local = engine.recognize(wav_bytes, embedding=True)
    with Client(daemon.socket) as c:
        remote = c.recognize(wav_bytes, embedding=True)
    assert remote.labels == local.labels and remote.model_labels == local.model_labels
    assert remote.scores == pytest.approx(local.scores, abs=1e-5)
    assert remote.top.label == local.top.label
    np.testing.assert_allclose(remote.embedding, local.embedding, atol=1e-5)


def test_importing_the_client_and_asking_status_do_not_import_numpy(wav_file: Path) -> None:
    """numpy comes only with a recognition (e2vd.client.Recognition, whose embedding is an array):
    `e2vd status` and `e2vd health` start without it. A fresh interpreter, against a real socket."""
    code = ("import sys; sys.path.insert(0, sys.argv[2]); import e2vd.client as c\n"
            "assert 'numpy' not in sys.modules, 'import'\n"
            "with c.Client(sys.argv[1]) as cl:\n"
            "    assert cl.status()['model'] == 'tiny-test' and cl.health()['status'] == 'ready'\n"
            "    assert 'numpy' not in sys.modules, 'status'\n"
            "    r = cl.recognize(sys.argv[3], embedding=True)\n"
            "assert 'numpy' in sys.modules and isinstance(r, c.Recognition)\n"
            "assert type(r.embedding).__name__ == 'ndarray'\n"
            "from e2vd.client import Recognition\n"
            "import pickle; assert Recognition is c.Recognition and pickle.loads(pickle.dumps(r)).top == r.top\n"
            "assert 'Recognition' in dir(c) and Recognition.__qualname__ == 'Recognition'\n"
            "print('ok')\n")
    root = str(Path(__file__).resolve().parent.parent)
    with TinyDaemon() as d:
        proc = subprocess.run([sys.executable, "-c", code, d.socket, root, str(wav_file)],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
