"""The low-confidence fallback model (e2vd.fallback) and the `base` stand-in it is tested with.

The main model is the tiny stand-in, the fallback the base stand-in (emotion2vec base shape),
both funasr's real Emotion2vec with seeded random weights. Random weights give top scores near
1/9, so thresholds are set per test around the scores the tiny stand-in actually gives:
`fallback_below` halfway between an unsure clip and a surer one, or 1.0 (every answer goes to
the fallback) for the end-to-end daemon tests. In-process tests run the real `Deciding` over
real `Scheduler`s (real worker threads); the daemon tests run `python -m e2vd serve`.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, wav_clip
from daemon_proc import DaemonProcess

from e2vd import standin
from e2vd.audio import decode
from e2vd.cli import format_table
from e2vd.client import Client, Recognition as Served
from e2vd.config import ConfigError, Settings, check_file, load_settings
from e2vd.engine import Engine
from e2vd.fallback import Deciding, Fallback, load_fallback_engine
from e2vd.result import Primary
from e2vd.scheduler import Scheduler
from e2vd.lifecycle import Reason
from e2vd.vocabulary import LABELS, State
from test_daemon import KILL_WAIT_S, FakeEngine, events, in_process, recognize_head, watched  # noqa: F401

UNSURE = (1, 2.0)   # (seed, seconds) of the clip the tiny stand-in is least sure about
SURER = (2, 1.0)    # ... and of one it is surer about (top scores measured: ~0.148 and ~0.169)


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Engine:
    return Engine.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def base(base_model) -> Engine:
    return Engine.load(str(base_model), device="cpu")


@pytest.fixture(scope="module")
def clips() -> dict[str, bytes]:
    return {"unsure": wav_clip(UNSURE[1], seed=UNSURE[0]), "surer": wav_clip(SURER[1], seed=SURER[0])}


@pytest.fixture(scope="module")
def between(tiny, clips) -> float:
    """A threshold halfway between the tiny stand-in's top scores for the two clips."""
    low = tiny.recognize(clips["unsure"]).top.score
    high = tiny.recognize(clips["surer"]).top.score
    assert low < high, f"the clips no longer differ as the tests need: {low} vs {high}"
    return (low + high) / 2


def started(load, **kw) -> Scheduler:
    scheduler = Scheduler(load, queue_size=8, max_batch=1, **kw)
    scheduler.start()
    return scheduler


def decide(deciding: Deciding, clip: bytes, **options):
    job = deciding.submit(decode(clip), **options)
    assert job.wait(120), "no answer within 120 s"
    return job


def close_scores(a, b, tol: float = 1e-5) -> bool:
    return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=tol, rtol=0))


# --- the decision, in-process ------------------------------------------------------------------

def test_unsure_clip_goes_to_the_fallback_and_a_surer_one_does_not(tiny, base, clips, between, base_model):
    fallback = Fallback(str(base_model), between, lambda: base)
    deciding = Deciding(started(lambda: tiny), fallback)
    try:
        surer = decide(deciding, clips["surer"])
        assert surer.decided_by == "primary" and surer.primary is None and surer.fallback_ms is None
        assert surer.error is None and surer.fallback_error is None
        assert surer.result.scores == tiny.recognize(clips["surer"]).scores
        assert not fallback.started, "a sure answer must not load the fallback"

        unsure = decide(deciding, clips["unsure"])
        assert unsure.decided_by == "fallback" and unsure.fallback_error is None
        assert unsure.model == base.model_id and unsure.primary_model == tiny.model_id
        assert close_scores(unsure.result.scores, base.recognize(clips["unsure"]).scores)
        direct = tiny.recognize(clips["unsure"])
        assert unsure.primary == Primary(list(LABELS), direct.scores, tiny.model_id)
        assert unsure.primary.top.score < between <= 1.0
        assert unsure.fallback_ms is not None and unsure.fallback_ms > 0
        assert unsure.queue_ms >= 0 and unsure.batch_size == 1   # the primary's timings
    finally:
        deciding.primary.stop(5)
        deciding.close(5)


def test_threshold_zero_never_asks_and_one_always_does(tiny, base, clips, base_model):
    for below, expected in ((0.0, "primary"), (1.0, "fallback")):
        deciding = Deciding(started(lambda: tiny), Fallback(str(base_model), below, lambda: base))
        try:
            assert {decide(deciding, c).decided_by for c in clips.values()} == {expected}
        finally:
            deciding.primary.stop(5)
            deciding.close(5)


def test_fallback_embedding_is_the_fallbacks(tiny, base, clips, base_model):
    """The answer is wholly the fallback's: its embedding too (768-dim for base, 64 for tiny)."""
    deciding = Deciding(started(lambda: tiny), Fallback(str(base_model), 1.0, lambda: base))
    try:
        job = decide(deciding, clips["unsure"], embedding=True)
        assert job.decided_by == "fallback" and job.result.embedding.shape == (768,)
        frame = decide(deciding, clips["unsure"], granularity="frame", embedding=True)
        assert frame.result.embedding.shape[1] == 768 and frame.result.embedding.shape[0] > 90
    finally:
        deciding.primary.stop(5)
        deciding.close(5)


def test_no_fallback_configured_answers_the_primary(tiny, clips):
    deciding = Deciding(started(lambda: tiny))
    try:
        job = decide(deciding, clips["unsure"])
        assert job.decided_by == "primary" and not job.has_fallback and job.primary is None
        assert Deciding.around(deciding) is deciding
        assert Deciding.around(deciding.primary).fallback is None
    finally:
        deciding.primary.stop(5)


def test_fallback_is_loaded_on_first_need_only(tiny, clips, base_model, caplog):
    """With the real loader: nothing loads at start or for sure answers; the first unsure one
    loads it (fallback_loaded), on the CPU, once."""
    settings = Settings(fallback_model=str(base_model), fallback_below=1.0)
    fallback = Fallback.from_settings(settings)
    assert fallback is not None and fallback.below == 1.0
    deciding = Deciding(started(lambda: tiny), fallback)
    try:
        assert not fallback.started and fallback.state is None and fallback.engine is None
        fallback.below = 0.0
        assert decide(deciding, clips["unsure"]).decided_by == "primary"
        assert not fallback.started and fallback.engine is None
        fallback.below = 1.0
        with caplog.at_level("INFO", logger="e2vd"):
            assert decide(deciding, clips["unsure"]).decided_by == "fallback"
            assert decide(deciding, clips["surer"]).decided_by == "fallback"
        assert fallback.state == State.READY and fallback.engine.device == "cpu"
        loaded = [r for r in caplog.records if getattr(r, "e2vd_event", None) == "fallback_loaded"]
        assert len(loaded) == 1 and loaded[0].e2vd_fields["device"] == "cpu"
        assert loaded[0].threadName == "e2vd-fallback"   # its own worker, told apart in the journal
    finally:
        deciding.primary.stop(5)
        deciding.close(5)
    assert Fallback.from_settings(Settings()) is None   # fallback_model empty: off


def test_broken_fallback_answers_the_primary_and_says_why(tiny, clips, tmp_path, caplog):
    """A fallback directory without model.pt: the unsure answer is the primary's, with
    fallback_error; one fallback_unavailable event; later requests are served all the same."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("model: Emotion2vec\n")
    settings = Settings(fallback_model=str(broken), fallback_below=1.0)
    deciding = Deciding(started(lambda: tiny), Fallback.from_settings(settings))
    try:
        with caplog.at_level("INFO", logger="e2vd"):
            jobs = [decide(deciding, clips["unsure"]) for _ in range(3)]
        for job in jobs:
            assert job.error is None and job.decided_by == "primary" and job.primary is None
            assert job.result.scores == tiny.recognize(clips["unsure"]).scores
            assert job.fallback_error.startswith("the fallback model could not be loaded: ")
            assert str(broken) in job.fallback_error
        unavailable = [r for r in caplog.records if getattr(r, "e2vd_event", None) == "fallback_unavailable"]
        assert len(unavailable) == 1 and str(broken) in unavailable[0].e2vd_fields["error"]
        assert deciding.state == State.READY and deciding.fallback.state == State.UNAVAILABLE
    finally:
        deciding.primary.stop(5)
        deciding.close(5)


def test_fallback_loader_takes_the_fallback_settings(base_model):
    engine = load_fallback_engine(Settings(fallback_model=str(base_model), device="cuda:3", dtype="fp16",
                                           quantize=True))
    assert (engine.device, engine.dtype, engine.quantized) == ("cpu", "fp32", False)
    assert engine.model_id == str(base_model)


def test_a_stuck_fallback_call_ends_the_daemon_like_a_stuck_primary_call(in_process, monkeypatch, caplog, clips):
    """The daemon's watchdog watches the fallback's model calls too: one that reaches
    inference_timeout ends the process (WATCHDOG=trigger, exit 5), or it would hold its request,
    and with it the daemon and the main model's GPU, for ever. (The in-process daemon harness of
    test_daemon.py, whose fake engines can be made to hang.)"""
    watched(monkeypatch)
    ip = in_process(inference_timeout=120, fallback_model="fake/fallback", fallback_below=1.0)
    hung = FakeEngine()
    hung.gate.clear()
    assert ip.daemon.deciding.fallback is not None and not ip.daemon.deciding.fallback.started
    ip.daemon.deciding.fallback = Fallback("fake/fallback", 1.0, lambda: hung, clock=ip.clock)
    held = []

    def body(ip) -> None:
        ip.ready()
        s = ip.connect()
        held.append(s)
        s.sendall(recognize_head(clips["unsure"]) + clips["unsure"])
        assert hung.entered.wait(30), "the fallback's model call never began"
        assert ip.daemon.deciding.running.device == "cpu" and ip.daemon.scheduler.running is None
        ip.clock.advance(90)
        status, _, st = ip.request("GET", "/v1/status")   # shows the call the watchdog watches
        assert status == 200 and st["inference_running_s"] == 90.0, st
        ip.clock.advance(29.999)
        ip.serving()
        ip.clock.advance(0.001)
        ip.exits(Reason.STUCK)
        ip.notify.wait_for("WATCHDOG=trigger")
        ip.clock.advance(KILL_WAIT_S)
        ip.daemon.wake()

    try:
        assert ip.run(body) == 5
    finally:
        hung.gate.set()
        for s in held:
            s.close()
    (name, fields), = events(caplog, "inference_stuck")
    assert fields["running_seconds"] == 120.0 and fields["device"] == "cpu"


# --- settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, says", [
    ("FALLBACK_BELOW", "1.5", "between 0 and 1"),
    ("FALLBACK_BELOW", "-0.1", "between 0 and 1"),
    ("FALLBACK_BELOW", "nan", "finite"),
    ("FALLBACK_BELOW", "high", "a number"),
    ("FALLBACK_DEVICE", "auto", "cpu"),
    ("FALLBACK_DEVICE", "gpu0", "cuda:N"),
    ("FALLBACK_MODEL", "base model", "ModelScope id"),
    ("FALLBACK_MODEL", "/srv/m\x1b[2J", "control characters"),
    ("FALLBACK_BELOW", "inf", "finite"),
    ("FALLBACK_BELOW", "true", "a number"),
    ("FALLBACK_DEVICE", "cuda:-1", "cuda:N"),
    ("FALLBACK_DEVICE", "cuda:99999999999", "cuda:N"),
    ("FALLBACK_DEVICE", "cuda:\u0661", "cuda:N"),           # an Arabic-Indic digit one
    ("FALLBACK_DEVICE", "cuda: 0", "cuda:N"),
    ("DEVICE", "cuda:\uff11", "cuda:N"),                    # a full-width digit one
    ("FALLBACK_MODEL", "./models/base", "absolute"),        # the daemon runs from /, check-config from here
    ("FALLBACK_MODEL", "../base", "absolute"),
    ("FALLBACK_MODEL", "~/base", "absolute"),
    ("FALLBACK_MODEL", "iic/..", "ModelScope id"),
    ("FALLBACK_MODEL", "iic/.", "ModelScope id"),
    ("FALLBACK_MODEL", "iic/emotion2vec_b\u0430se", "ModelScope id"),   # a Cyrillic a
    ("GPU_LOCK", "lock/gpu.lock", "absolute"),
    ("GPU_LOCK", "/run/e2vd/lo\x1bck", "control characters"),
    ("GPU_LOCK", "/" + "x" * 5000, "too long"),
    ("FALLBACK_MODEL", "/srv/m\udcff", "UTF-8"),            # an undecodable byte from the environment
    ("GPU_LOCK", "/run/e2vd/lock/gpu\udcff.lock", "UTF-8"),
    ("GPU_LOCK_TIMEOUT", "-1", "a duration like"),
    ("GPU_LOCK_TIMEOUT", "nan", "a duration like"),
    ("GPU_LOCK_TIMEOUT", "1e400", "a duration like"),
])
def test_bad_fallback_settings_are_refused(key, value, says):
    with pytest.raises(ConfigError) as err:
        load_settings(env={f"E2VD_{key}": value}, config_path="/dev/null")
    assert f"E2VD_{key}" in str(err.value) and says in str(err.value)


def test_fallback_settings_defaults_and_forms(tmp_path):
    s = Settings()
    assert (s.fallback_model, s.fallback_device, s.fallback_below) == ("", "cpu", 0.7)
    path = tmp_path / "e2vd.toml"
    path.write_text('fallback_model = "iic/emotion2vec_base"\nfallback_device = "cuda:1"\nfallback_below = 0.5\n')
    s = load_settings(env={}, config_path=str(path))
    assert (s.fallback_model, s.fallback_device, s.fallback_below) == ("iic/emotion2vec_base", "cuda:1", 0.5)
    path.write_text('fallback_below = "0.5"\n')
    with pytest.raises(ConfigError, match="key 'fallback_below'"):
        load_settings(env={}, config_path=str(path))


def test_check_config_names_a_missing_fallback_directory(tmp_path, tiny_model):
    path = tmp_path / "e2vd.toml"
    path.write_text(f'model = "{tiny_model}"\nfallback_model = "{tmp_path}/nowhere"\n')
    with pytest.raises(ConfigError) as err:
        check_file(str(path))
    assert "key 'fallback_model'" in str(err.value) and "does not exist" in str(err.value)
    assert '"" to turn the fallback off' in str(err.value)
    path.write_text(f'model = "{tiny_model}"\nfallback_model = "{tiny_model}"\n')
    assert check_file(str(path))[0].fallback_model == str(tiny_model)


# --- the daemon over HTTP --------------------------------------------------------------------------

def test_daemon_answers_with_the_fallback_and_keeps_the_primary(tiny_model, base_model, base, tiny, clips, tmp_path):
    sock = tmp_path / "e2vd.sock"
    with DaemonProcess(sock, tiny_model, wait_ready=True, idle_timeout=600, fallback_model=base_model,
                       fallback_below=1.0) as d:
        assert "fallback_loaded" not in d.log_text(), "the fallback must not load at start"
        assert d.request("GET", "/v1/status")[2]["fallback"] == {"model": str(base_model), "below": 1.0,
                                                                 "state": None, "error": None}
        maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
        assert str(base_model) not in maps and str(tiny_model) in maps
        status, _, answer = d.request("POST", "/v1/recognize", clips["unsure"])
        assert status == 200, answer
        assert answer["decided_by"] == "fallback" and answer["model"] == str(base_model)
        assert close_scores(answer["scores"], base.recognize(clips["unsure"]).scores)
        direct = tiny.recognize(clips["unsure"])
        primary = answer["primary"]
        assert primary["model"] == str(tiny_model) and close_scores(primary["scores"], direct.scores)
        assert primary["top"] == {"label": direct.top.label, "score": primary["scores"][LABELS.index(direct.top.label)]}
        assert set(answer["timing_ms"]) == {"queue", "infer", "fallback"} and "fallback_error" not in answer
        assert str(base_model) in Path(f"/proc/{d.proc.pid}/maps").read_text()
        assert d.request("GET", "/v1/status")[2]["fallback"]["state"] == "ready"

        served = Client(socket=str(sock)).recognize(clips["unsure"])
        assert served.decided_by == "fallback" and served.primary.model == str(tiny_model)
        assert close_scores(served.scores, answer["scores"], 0)

        wav = tmp_path / "clip.wav"
        wav.write_bytes(clips["unsure"])
        cli = subprocess.run([sys.executable, "-m", "e2vd", "recognize", "--socket", str(sock), str(wav)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert cli.returncode == 0, cli.stderr
        assert f"fallback model {base_model}" in cli.stdout
        assert f"the main model {tiny_model} was unsure" in cli.stdout
        cli = subprocess.run([sys.executable, "-m", "e2vd", "recognize", "--json", "--socket", str(sock), str(wav)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert json.loads(cli.stdout)["decided_by"] == "fallback", cli.stdout
        log = d.log_text()
    assert log.count("event=fallback_loaded") == 1
    assert "decided_by=fallback" in log and "primary_top_score=" in log and "fallback_ms=" in log


def test_daemon_survives_a_broken_fallback(tiny_model, clips, tmp_path):
    sock = tmp_path / "e2vd.sock"
    missing = tmp_path / "no-such-model"
    with DaemonProcess(sock, tiny_model, wait_ready=True, idle_timeout=600, fallback_model=missing,
                       fallback_below=1.0) as d:
        for _ in range(2):
            status, _, answer = d.request("POST", "/v1/recognize", clips["unsure"])
            assert status == 200, answer
            assert answer["decided_by"] == "primary" and answer["model"] == str(tiny_model)
            assert "primary" not in answer and str(missing) in answer["fallback_error"]
        assert d.request("GET", "/v1/health")[2] == {"status": "ready"}
        fallback = d.request("GET", "/v1/status")[2]["fallback"]
        assert fallback["state"] == "unavailable" and str(missing) in fallback["error"]
        assert d.proc.poll() is None
        log = d.log_text()
    assert log.count("event=fallback_unavailable") == 1 and "fallback_error=" in log


# --- the answer's Python side -------------------------------------------------------------------

def test_served_recognition_reads_and_writes_the_decision():
    doc = {"labels": list(LABELS), "scores": [0.2] + [0.1] * 8, "model_labels": list(LABELS), "duration_s": 1.0,
           "model": "/m/base", "decided_by": "fallback", "timing_ms": {"queue": 1, "infer": 2, "fallback": 30},
           "primary": {"labels": list(LABELS), "scores": [0.1] * 8 + [0.2], "top": {"label": "x", "score": 9},
                       "model": "/m/large"}}
    served = Served.from_json(doc)
    assert served.decided_by == "fallback" and served.primary.top.label == "unknown"   # top recomputed
    assert served.primary.model == "/m/large" and served.fallback_error == ""
    again = Served.from_json(json.loads(json.dumps(served.to_dict())))
    assert again == served
    old = {k: v for k, v in doc.items() if k not in ("decided_by", "primary")}
    assert Served.from_json(old).decided_by == "primary" and Served.from_json(old).primary is None
    for bad in ({"decided_by": "both"}, {"primary": [1]}, {"primary": {"labels": ["a"], "scores": ["x"]}},
                {"primary": {"labels": ["a"], "scores": [float("inf")]}},
                {"primary": {"labels": ["a"], "scores": [1.0], "model": 3}}):
        with pytest.raises(ValueError):
            Served.from_json({**doc, **bad})


def test_table_says_which_model_decided():
    base = Served(list(LABELS), [0.2] + [0.1] * 8, list(LABELS), 1.0, model="/m/base",
                  timing_ms={"queue": 1.0, "infer": 2.0, "fallback": 30.0}, decided_by="fallback",
                  primary=Primary(list(LABELS), [0.1] * 4 + [0.2] + [0.1] * 4, "/m/large"))
    table = format_table("a.wav", base, unicode=False).splitlines()
    assert table[0] == "a.wav: angry 20.0%  (1.00 s of audio, fallback model /m/base, 33 ms in daemon)"
    assert table[1] == "  decided by the fallback: the main model /m/large was unsure (neutral 20.0%)"
    primary = dataclasses.replace(base, decided_by="primary", primary=None, model="/m/large",
                                  fallback_error="the fallback model could not be loaded: gone")
    table = format_table("a.wav", primary, unicode=False).splitlines()
    assert "model /m/large" in table[0] and "fallback model" not in table[0]
    assert table[1] == "  decided by the main model: the fallback model could not be loaded: gone"


# --- the base stand-in ---------------------------------------------------------------------------

def test_base_standin_has_the_published_base_shape(base_model, base, clips):
    config = standin.config_for("base")
    conf, audio = config["model_conf"], config["model_conf"]["modalities"]["audio"]
    assert (conf["embed_dim"], conf["num_heads"], audio["num_alibi_heads"]) == (768, 12, 12)
    large = standin.config_for("large")["model_conf"]
    assert conf["depth"] == large["depth"] and audio["prenet_depth"] == large["modalities"]["audio"]["prenet_depth"]
    assert (base_model / "tokens.txt").read_text(encoding="utf-8").splitlines() == list(standin.TOKENS)
    assert sum(p.numel() for p in base._model.parameters()) < standin.LARGE_PARAMS
    result = base.recognize(clips["surer"], embedding=True)
    assert result.labels == list(LABELS) and result.embedding.shape == (768,)


# --- GPU: the fallback holds no CUDA memory -------------------------------------------------------

def test_fallback_adds_no_cuda_memory(tiny_model, base_model, clips):
    """Primary on the GPU, fallback on the CPU: loading and running the fallback changes neither
    torch's allocated/reserved CUDA memory nor this process's memory on the GPU as NVML sees it."""
    import torch

    from e2vd.gpu import device_memory

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    primary = Engine.load(str(tiny_model), device="cuda:0", min_free_mb=0)
    deciding = Deciding(started(lambda: primary),
                        Fallback.from_settings(Settings(fallback_model=str(base_model), fallback_below=1.0)))
    try:
        deciding.fallback.below = 0.0
        assert decide(deciding, clips["unsure"]).decided_by == "primary"   # CUDA context and caches warm
        torch.cuda.synchronize()
        before = (torch.cuda.memory_allocated(0), torch.cuda.memory_reserved(0))
        nvml_before = getattr(device_memory("cuda:0"), "process_bytes", None)
        deciding.fallback.below = 1.0
        for clip in clips.values():
            assert decide(deciding, clip).decided_by == "fallback"
        torch.cuda.synchronize()
        assert deciding.fallback.engine.device == "cpu"
        assert (torch.cuda.memory_allocated(0), torch.cuda.memory_reserved(0)) == before
        assert getattr(device_memory("cuda:0"), "process_bytes", None) == nvml_before
    finally:
        deciding.primary.stop(5)
        deciding.close(5)


# --- a hostile fallback model directory ------------------------------------------------------------

def hostile_copy(tiny_model: Path, dest: Path, old: str, new: str) -> Path:
    """A copy of the tiny stand-in with the config.yaml line `old` replaced by `new`."""
    import shutil

    shutil.copytree(tiny_model, dest)
    text = (dest / "config.yaml").read_text(encoding="utf-8")
    assert old in text, old
    (dest / "config.yaml").write_text(text.replace(old, new, 1), encoding="utf-8")
    return dest


SPEC = "feature_encoder_spec: '[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64,2,2)] + [(64,2,2)]'"


def test_fallback_config_yaml_that_would_run_code_is_refused_and_nothing_runs(tiny_model, tmp_path):
    """funasr eval()s feature_encoder_spec: a config.yaml is data, so only a literal list of
    (channels, kernel, stride) joined by + and * is taken, and nothing in it runs."""
    marker = tmp_path / "ran"
    model = hostile_copy(tiny_model, tmp_path / "m", SPEC,
                         f"feature_encoder_spec: \"__import__('os').system('touch {marker}') or [(64, 10, 5)]\"")
    with pytest.raises(Exception) as err:
        load_fallback_engine(Settings(fallback_model=str(model)))
    assert not marker.exists(), "config.yaml ran code"
    message = str(err.value)
    assert type(err.value).__name__ == "ModelError"
    assert str(model / "config.yaml") in message and "feature_encoder_spec" in message
    assert "copy the model's config.yaml again" in message


@pytest.mark.parametrize("old, new, says", [
    ("  embed_dim: 64\n", "  embed_dim: 1000000000000\n", "embed_dim"),
    ("  embed_dim: 64\n", "  embed_dim: -5\n", "embed_dim"),
    ("  embed_dim: 64\n", "  embed_dim: abc\n", "embed_dim"),
    ("  embed_dim: 64\n", "  embed_dim: true\n", "embed_dim"),
    ("  depth: 2\n", "  depth: 20000\n", "depth"),
    ("  embed_dim: 64\n", "  embed_dim: 65\n", "cannot build"),      # funasr refuses it deep inside
    (SPEC, "feature_encoder_spec: '[(64, 10, 5)] * 100000000'", "feature_encoder_spec"),
    (SPEC, "feature_encoder_spec: '[(64, 10)]'", "feature_encoder_spec"),
    (SPEC, "feature_encoder_spec: '[]'", "feature_encoder_spec"),
    (SPEC, "feature_encoder_spec: 7", "feature_encoder_spec"),
])
def test_fallback_config_yaml_with_odd_sizes_is_model_unavailable(tiny_model, tmp_path, old, new, says):
    """A config.yaml asking for an absurd or broken network: a ModelError naming the file and the
    key (the daemon's model_unavailable / fallback_error), quickly, without building it."""
    import time as _time

    model = hostile_copy(tiny_model, tmp_path / "m", old, new)
    start = _time.monotonic()
    with pytest.raises(Exception) as err:
        load_fallback_engine(Settings(fallback_model=str(model)))
    assert type(err.value).__name__ == "ModelError", repr(err.value)
    assert str(model / "config.yaml") in str(err.value) and says in str(err.value), str(err.value)
    assert _time.monotonic() - start < 10


def test_a_fallback_model_that_is_a_symlink_loop_or_a_file(tmp_path, tiny_model):
    """check-config and the fallback's load both say what is wrong with the directory."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    plain = tmp_path / "file"
    plain.write_text("not a model")
    for path, says in ((loop, "symbolic link loop"), (plain, "is a file, not a directory")):
        conf = tmp_path / "e2vd.toml"
        conf.write_text(f'model = "{tiny_model}"\nfallback_model = "{path}"\n')
        with pytest.raises(ConfigError) as err:
            check_file(str(conf))
        assert "key 'fallback_model'" in str(err.value) and says in str(err.value), str(err.value)
        with pytest.raises(Exception) as err:
            load_fallback_engine(Settings(fallback_model=str(path)))
        assert type(err.value).__name__ == "ModelError", repr(err.value)
        assert str(path) in str(err.value) and says in str(err.value), str(err.value)


def _bomb(levels: int = 9) -> str:
    """YAML whose aliases denote 10**levels strings in a few hundred bytes ("billion laughs")."""
    text = 'l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]\n'
    return text + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, levels))


@pytest.mark.parametrize("what", ["alias bomb", "huge config.yaml", "huge tokens.txt"])
def test_a_fallback_model_directory_cannot_exhaust_the_daemon(tiny_model, tmp_path, what):
    """A config.yaml or tokens.txt that would take the daemon's memory or minutes (an alias bomb
    took 60 s and 0.8 GB, still growing, before this was checked): a ModelError at once."""
    import shutil
    import time as _time

    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    config = (model / "config.yaml").read_text(encoding="utf-8")
    if what == "alias bomb":
        (model / "config.yaml").write_text(_bomb() + config.replace("model_conf:\n", "model_conf:\n  junk: *l8\n", 1))
        name, says = "config.yaml", "aliases"
    elif what == "huge config.yaml":
        (model / "config.yaml").write_text(config + "#" * (3 << 20) + "\n")
        name, says = "config.yaml", "bytes"
    else:
        with open(model / "tokens.txt", "a", encoding="utf-8") as fh:
            fh.write("#" * (3 << 20))
        name, says = "tokens.txt", "bytes"
    start = _time.monotonic()
    with pytest.raises(Exception) as err:
        load_fallback_engine(Settings(fallback_model=str(model)))
    assert _time.monotonic() - start < 10
    assert type(err.value).__name__ == "ModelError", repr(err.value)
    assert str(model / name) in str(err.value) and says in str(err.value), str(err.value)


@pytest.mark.parametrize("what", ["booby-trapped model.pt", "config.yaml running code", "labels reordered",
                                  "a label with an escape"])
def test_a_hostile_fallback_directory_is_answered_by_the_primary_with_the_reason(tiny, clips, tmp_path, what):
    """The fallback as the daemon builds it (Fallback.from_settings: load_fallback_engine, i.e.
    Engine.load's checks): a model.pt or config.yaml that would run code runs nothing; tokens.txt
    whose labels are in another order than the main model's (answers could not be compared) or
    carry an escape sequence is refused. The answer is the main model's, fallback_error names
    the file."""
    import shutil

    import torch
    from test_engine import RunsCommand

    marker = tmp_path / "ran"
    model = tmp_path / "m"
    shutil.copytree(Path(tiny.model_dir), model)
    if what == "booby-trapped model.pt":
        ckpt = torch.load(model / "model.pt", weights_only=True)
        ckpt["extra"] = RunsCommand(f"touch {marker}")
        torch.save(ckpt, model / "model.pt")
        name = "model.pt"
    elif what == "config.yaml running code":
        text = (model / "config.yaml").read_text(encoding="utf-8")
        (model / "config.yaml").write_text(text.replace(SPEC, f"feature_encoder_spec: \"__import__('os').system("
                                                              f"'touch {marker}') or [(64, 10, 5)]\"", 1))
        name = "config.yaml"
    else:
        tokens = (model / "tokens.txt").read_text(encoding="utf-8").splitlines()
        if what == "labels reordered":
            tokens[0], tokens[1] = tokens[1], tokens[0]
        else:
            tokens[0] = "生气/angry\x1b[2J"
        (model / "tokens.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
        name = "tokens.txt"
    settings = Settings(model=str(tiny.model_dir), fallback_model=str(model), fallback_below=1.0)
    deciding = Deciding(started(lambda: tiny), Fallback.from_settings(settings))
    try:
        job = decide(deciding, clips["unsure"])
        assert job.decided_by == "primary" and job.result.scores == tiny.recognize(clips["unsure"]).scores
        assert str(model / name) in job.fallback_error, job.fallback_error
        assert job.fallback_error.startswith("the fallback model could not be loaded")
    finally:
        deciding.primary.stop(5)
        deciding.close(5)
    assert not marker.exists(), "the fallback's model directory ran code"


def test_an_unpulled_fallback_id_of_an_instance_names_the_pull_into_its_cache(tmp_path):
    """An instance's fallback_model id that was not pulled: the fix names the instance's own
    cache_dir (a plain `e2vd pull ID` would fill the default instance's cache)."""
    cache = tmp_path / "var/cache/e2vd-small"
    with pytest.raises(Exception) as err:
        load_fallback_engine(Settings(cache_dir=str(cache), fallback_model="iic/emotion2vec_base"))
    assert type(err.value).__name__ == "ModelError"
    assert f"run: sudo e2vd pull iic/emotion2vec_base --cache-dir {cache}" in str(err.value), str(err.value)


def test_a_fallback_directory_the_service_may_not_read_says_so_not_missing(tiny_model):
    """A fallback directory readable by root only (check-config, run as root, passes) seen by the
    daemon's own user: the error says permission denied and how to fix it, not 'is missing'."""
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="e2vd-perm-"))
    try:
        top.chmod(0o755)
        model = top / "m"
        shutil.copytree(tiny_model, model)
        model.chmod(0o700)
        # the checks Engine.load (so the fallback's load) makes first, as another user (after the
        # imports: Python is under /root)
        code = ("import os, sys, pickle\nfrom e2vd.engine import read_tokens, resolve_model\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "try:\n    read_tokens(resolve_model(sys.argv[1])[0])\n"
                "except Exception as e:\n    print(type(e).__name__, e)\n")
        out = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, cwd=ROOT,
                             timeout=120).stdout
    finally:
        shutil.rmtree(top)
    assert out.startswith("ModelError"), out
    assert "is missing" not in out and "permission denied" in out and "uid 65534" in out, out
    assert "chmod" in out, out
