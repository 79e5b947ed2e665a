"""The engine on the tiny stand-in: results, parity with funasr's AutoModel, batching, validation."""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, speechlike
from e2vd import engine as engine_mod
from e2vd import gpu
from e2vd.audio import MAX_SAMPLE_MAGNITUDE, Audio, AudioError, from_samples
from e2vd.engine import Engine, ModelError, Recognition, plan_passes
from e2vd.vocabulary import LABELS, ExitCode


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Engine:
    return Engine.load(str(tiny_model), device="cpu")


@pytest.fixture(scope="module")
def padded(tiny_model: Path) -> Engine:
    """A CPU engine with padded batching (a GPU's default; the CPU's is equal lengths only)."""
    return Engine.load(str(tiny_model), device="cpu", batching="padded")


@pytest.fixture(scope="module")
def automodel(tiny_model: Path):
    from funasr import AutoModel

    return AutoModel(model=str(tiny_model), disable_update=True, device="cpu", disable_pbar=True)


def clip(seconds: float, seed: int = 0, gain: float = 1.0) -> Audio:
    return from_samples(gain * speechlike(seconds, seed=seed)[:, 0], 16000)


# -- results -----------------------------------------------------------------------------------

def test_recognize_bytes(engine: Engine, wav_bytes: bytes, tiny_model: Path) -> None:
    r = engine.recognize(wav_bytes)
    assert isinstance(r, Recognition) and r.labels == list(LABELS)
    assert r.model_labels[0] == "生气/angry" and r.model_labels[-1] == "<unk>"
    assert len(r.scores) == 9 and sum(r.scores) == pytest.approx(1.0, abs=1e-6)
    assert r.top.score == max(r.scores) and r.top.label == LABELS[int(np.argmax(r.scores))]
    assert r.duration_s == pytest.approx(2.0)
    assert r.embedding is None
    assert engine.model_dir == tiny_model and engine.model_id == str(tiny_model)
    assert engine.device == "cpu" and engine.dtype == "fp32" and engine.load_seconds > 0


def test_embeddings_have_model_width_and_50_hz_frames(engine: Engine) -> None:
    utt = engine.recognize(clip(2.0), embedding=True)
    frame = engine.recognize(clip(2.0), granularity="frame", embedding=True)
    assert utt.embedding.shape == (64,)
    assert frame.embedding.shape[1] == 64
    assert abs(frame.embedding.shape[0] - 2.0 * engine_mod.FRAME_RATE_HZ) <= 1
    np.testing.assert_allclose(frame.embedding.mean(axis=0), utt.embedding, atol=1e-6)
    assert frame.scores == utt.scores


def test_to_dict_is_json_ready(engine: Engine) -> None:
    d = engine.recognize(clip(1.0), granularity="frame", embedding=True).to_dict()
    again = json.loads(json.dumps(d))
    assert set(again) == {"labels", "scores", "top", "model_labels", "duration_s", "embedding"}
    assert again["top"]["label"] in LABELS and len(again["embedding"][0]) == 64
    assert "embedding" not in engine.recognize(clip(1.0)).to_dict()


def test_different_audio_gives_different_scores(engine: Engine) -> None:
    assert engine.recognize(clip(1.0, seed=1)).scores != engine.recognize(clip(1.5, seed=2)).scores


def test_bad_audio_and_options(engine: Engine) -> None:
    with pytest.raises(AudioError) as err:
        engine.recognize(b"this is not audio")
    assert err.value.code == "bad_audio"
    with pytest.raises(AudioError) as err:
        engine.recognize(clip(3.0), max_seconds=2.0)
    assert err.value.code == "too_long"
    with pytest.raises(ValueError, match="granularity"):
        engine.recognize(clip(1.0), granularity="word")


def test_scores_do_not_depend_on_the_scale_up_to_the_audio_bound(engine: Engine) -> None:
    """The model layer-norms the waveform: a clip at full scale 1 and the same clip at
    e2vd.audio's bound (2^31, 32-bit PCM written as float) score alike, so the bound refuses
    nothing the model could score correctly, while beyond it (3e38) scores were NaN."""
    x = speechlike(2.0, seed=3)[:, 0]
    unit = x / np.abs(x).max()
    at_one = engine.recognize(from_samples(unit, 16000))
    at_bound = engine.recognize(from_samples(unit * MAX_SAMPLE_MAGNITUDE, 16000))
    assert at_bound.scores == pytest.approx(at_one.scores, abs=1e-5)
    with pytest.raises(AudioError) as err:
        engine.recognize(from_samples(unit * np.float32(3e38), 16000))
    assert err.value.code == "bad_audio" and err.value.exit_code == ExitCode.REJECTED


def test_decoded_clip_just_past_the_limit_says_so(engine: Engine) -> None:
    with pytest.raises(AudioError) as err:
        engine.recognize(from_samples(np.zeros(480160, np.float32), 16000, max_seconds=60), max_seconds=30)
    assert err.value.code == "too_long"
    assert "30.01 s long" in err.value.message and "limit is 30 s" in err.value.message


def test_memory_reports_weight_bytes(engine: Engine) -> None:
    params = sum(p.numel() for p in engine._model.parameters())
    assert engine.memory()["param_bytes"] >= params * 4


# -- parity with funasr AutoModel.generate ------------------------------------------------------

@pytest.mark.parametrize("granularity", ["utterance", "frame"])
@pytest.mark.parametrize("seconds,seed", [(1.0, 0), (3.3, 5)])
def test_parity_with_funasr_automodel(engine: Engine, automodel, granularity: str,
                                      seconds: float, seed: int) -> None:
    audio = clip(seconds, seed=seed)
    ours = engine.recognize(audio, granularity=granularity, embedding=True)
    theirs = automodel.generate(audio.samples, granularity=granularity, extract_embedding=True)[0]
    assert theirs["labels"] == ours.model_labels
    np.testing.assert_allclose(ours.scores, theirs["scores"], atol=1e-5, rtol=0)
    assert ours.embedding.shape == theirs["feats"].shape
    np.testing.assert_allclose(ours.embedding, theirs["feats"], atol=1e-5, rtol=0)


# -- batching -----------------------------------------------------------------------------------

@pytest.mark.parametrize("batching", ["padded", "equal"])
def test_batch_equals_one_by_one(engine: Engine, padded: Engine, batching: str) -> None:
    batched = padded if batching == "padded" else engine
    assert batched.batching == batching
    clips = [clip(1.0, seed=1), clip(2.0, seed=2), clip(1.0, seed=3, gain=0.2),
             clip(1.5, seed=4), clip(2.0, seed=5, gain=3.0)]
    for granularity in ("utterance", "frame"):
        batch = batched.recognize_batch(clips, granularity=granularity, embedding=True)
        assert len(batch) == len(clips)
        for c, b in zip(clips, batch):
            one = engine.recognize(c, granularity=granularity, embedding=True)
            np.testing.assert_allclose(b.scores, one.scores, atol=1e-5, rtol=0)
            np.testing.assert_allclose(b.embedding, one.embedding, atol=1e-5, rtol=0)
            assert b.duration_s == one.duration_s


#: Clip lengths (s) of the parity pool: both ends of 0.5-12 s and log-uniform draws between
#: (a seeded generator: the same clips on every run).
_POOL_SECONDS = [0.5, 12.0] + [float(s) for s in np.exp(np.random.default_rng(12).uniform(
    np.log(0.5), np.log(12.0), 10)).round(3)]


@pytest.fixture(scope="module")
def pool() -> list[Audio]:
    """Speech-like clips of `_POOL_SECONDS`, each with its own gain (0.1-3)."""
    gains = np.random.default_rng(13).uniform(0.1, 3.0, len(_POOL_SECONDS))
    return [clip(s, seed=100 + i, gain=float(g)) for i, (s, g) in enumerate(zip(_POOL_SECONDS, gains))]


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the same arithmetic whatever the machine's core count,
    and no OpenMP barrier waiting for a thread that other processes keep off a shared CPU (on
    the 2-core development machine under load, 10x faster than two threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_clips_of_any_lengths_in_one_padded_pass_equal_one_by_one(tiny_model: Path, pool: list[Audio],
                                                                  one_thread: None) -> None:
    """The batching contract: 24 random mixes of 2-4 clips of 0.5-12 s, each mix in ONE forward
    pass however uneven (padding up to 96 %: `max_padding` lifted), give every clip the scores
    and embeddings it gets alone, within 1e-5; utterance and frame granularity alternate."""
    engine = Engine.load(str(tiny_model), device="cpu", batching="padded")
    assert engine.batching == "padded" and engine.batching_reason == ""
    engine.max_padding = 1.0
    rng = np.random.default_rng(14)
    alone: dict[tuple[int, str], Recognition] = {}
    for m in range(24):
        granularity = ("utterance", "frame")[m % 2]
        picks = [int(i) for i in rng.choice(len(pool), size=int(rng.integers(2, 5)), replace=False)]
        mix = [pool[i] for i in picks]
        assert engine.forward_passes(mix) == [list(range(len(mix)))]
        batch = engine.recognize_batch(mix, granularity=granularity, embedding=True)
        for i, got in zip(picks, batch):
            if (i, granularity) not in alone:
                alone[i, granularity] = engine.recognize(pool[i], granularity=granularity, embedding=True)
            one = alone[i, granularity]
            np.testing.assert_allclose(got.scores, one.scores, atol=1e-5, rtol=0)
            assert got.embedding.shape == one.embedding.shape
            np.testing.assert_allclose(got.embedding, one.embedding, atol=1e-5, rtol=0)
            assert got.duration_s == one.duration_s


def test_funasr_padding_mask_alone_would_change_results(padded: Engine) -> None:
    """Why the engine masks the positional convolutions too: with only funasr's own padding mask,
    a short clip's last frames see the padded frames' features (and attention spreads them)."""
    short, long = clip(1.0, seed=1), clip(2.0, seed=2)
    with pytest.MonkeyPatch.context() as mp:      # the hooks never active: funasr's masking alone
        mp.setattr(padded._positional_mask, "active", lambda keep: contextlib.nullcontext())
        masked, frames = padded.forward([short.samples, long.samples])
    alone, alone_frames = padded.forward([short.samples])
    assert np.abs(frames[0] - alone_frames[0]).max() > 0.1
    assert np.abs(masked[0] - alone[0]).max() > 1e-4
    probs, _ = padded.forward([short.samples, long.samples])
    np.testing.assert_allclose(probs[0], alone[0], atol=1e-5, rtol=0)


def test_frames_follow_funasrs_formula(engine: Engine) -> None:
    assert [engine.frames(n) for n in (400, 16000, 80000, 192000)] == [1, 49, 249, 599]
    for seconds in (0.025, 1.0, 3.3):
        _, frames = engine.forward([clip(seconds).samples])
        assert frames[0].shape[0] == engine.frames(len(clip(seconds).samples))


def test_passes_keep_padding_under_a_quarter() -> None:
    lengths = [16000, 160000, 150000, 20000, 158000, 18000, 140000, 60000]
    passes = plan_passes(lengths)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    for p in passes:
        longest = max(lengths[i] for i in p)
        assert len(p) * longest - sum(lengths[i] for i in p) <= 0.25 * len(p) * longest
        assert plan_passes([lengths[i] for i in p]) == [list(range(len(p)))]   # a pass stays one
    assert passes == [[0, 3, 5], [1, 2, 4, 6, 7]]   # shortest first; 60000 joins: 16.5 % padding
    assert plan_passes([16000, 64000, 64000, 64000, 64000]) == [[0, 1, 2, 3, 4]]   # 15 % padding
    assert plan_passes([16000, 64000]) == [[0], [1]]                               # 37.5 %
    assert plan_passes([5, 7, 5], "equal") == [[0, 2], [1]]
    assert plan_passes([5, 5], "single") == [[0], [1]]
    assert plan_passes([]) == []
    with pytest.raises(ValueError):
        plan_passes([1], "sorted")


def test_recognize_batch_runs_the_planned_passes(padded: Engine) -> None:
    """Clips of similar length share a pass, a much shorter one runs apart; results keep order."""
    clips = [clip(2.0, seed=1), clip(0.5, seed=2), clip(1.8, seed=3)]
    assert padded.forward_passes(clips) == [[1], [0, 2]]             # together: 28 % padding
    assert padded.forward_passes(clips + [clip(1.9, seed=4)]) == [[0, 1, 2, 3]]   # 22.5 %
    batch = padded.recognize_batch(clips)
    for c, b in zip(clips, batch):
        np.testing.assert_allclose(b.scores, padded.recognize(c).scores, atol=1e-5, rtol=0)


def test_batching_mode_from_the_model_config() -> None:
    conf = {"modalities": {"audio": {"extractor_mode": "layer_norm", "learned_alibi": False}}}
    assert engine_mod.batching_mode(conf, quantized=False) == ("padded", "")
    assert engine_mod.batching_mode(conf, quantized=True)[0] == "single"
    group_norm = {"modalities": {"audio": {"extractor_mode": "default"}}}
    assert engine_mod.batching_mode(group_norm, quantized=False)[0] == "equal"
    learned = {"modalities": {"audio": {"extractor_mode": "layer_norm", "learned_alibi": True}}}
    mode, reason = engine_mod.batching_mode(learned, quantized=False)
    assert mode == "equal" and "ALiBi" in reason


def test_padded_batching_by_default_on_a_gpu_only(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU batches run slower than one by one and padding slows them further
    (bench/concurrency.py --mixed --max-batch 8), so a CPU engine keeps equal lengths only unless
    asked; nothing can ask for more than the model keeps exact."""
    monkeypatch.delenv(engine_mod.BENCH_BATCHING_ENV, raising=False)
    exact = ("padded", "")
    assert engine_mod.choose_batching(None, "cuda:0", exact) == exact
    assert engine_mod.choose_batching(None, "cpu", exact) == ("equal", engine_mod.CPU_BATCHING_REASON)
    assert engine.batching == "equal" and engine.batching_reason == engine_mod.CPU_BATCHING_REASON
    assert engine_mod.choose_batching("padded", "cpu", exact) == exact
    int8 = ("single", "INT8 ...")
    assert engine_mod.choose_batching("padded", "cuda:0", int8) == int8
    assert engine_mod.choose_batching("equal", "cuda:0", exact)[0] == "equal"
    with pytest.raises(ValueError):
        engine_mod.choose_batching("sorted", "cpu", exact)


def test_int8_engine_runs_each_clip_alone(tiny_model: Path) -> None:
    """Dynamic INT8 scales activations over the whole batch: no batch keeps the contract."""
    q = Engine.load(str(tiny_model), device="cpu", quantize=True, batching="padded")
    clips = [clip(1.0, seed=1), clip(1.0, seed=2)]
    assert q.batching == "single" and q.forward_passes(clips) == [[0], [1]]
    assert [r.scores for r in q.recognize_batch(clips)] == [q.recognize(c).scores for c in clips]


def test_benchmark_switch_chooses_the_batching_when_load_is_not_told(tiny_model: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """$E2VD_BENCH_BATCHING (bench/concurrency.py's switch for its daemons) stands in for
    Engine.load's `batching`; an equal-lengths engine refuses uneven clips in one pass."""
    clips = [clip(1.0, seed=1), clip(1.2, seed=2), clip(1.0, seed=3)]
    monkeypatch.setenv(engine_mod.BENCH_BATCHING_ENV, "padded")
    assert Engine.load(str(tiny_model), device="cpu").forward_passes(clips) == [[0, 1, 2]]
    assert Engine.load(str(tiny_model), device="cpu", batching="single").batching == "single"
    monkeypatch.setenv(engine_mod.BENCH_BATCHING_ENV, "equal")
    eq = Engine.load(str(tiny_model), device="cpu")
    assert eq.batching == "equal" and eq.forward_passes(clips) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="different lengths"):
        eq.forward([c.samples for c in clips])
    monkeypatch.setenv(engine_mod.BENCH_BATCHING_ENV, "wide")
    with pytest.raises(ModelError, match="E2VD_BENCH_BATCHING"):
        Engine.load(str(tiny_model), device="cpu")
    with pytest.raises(ValueError, match="batching"):
        Engine.load(str(tiny_model), device="cpu", batching="wide")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU in this torch")
def test_padded_batch_on_the_gpu_equals_one_by_one(tiny_model: Path, pool: list[Audio]) -> None:
    """fp32 on the GPU: 8 random mixes of the pool in one pass each, against one by one on the
    same GPU, and against the CPU's one-by-one results, within 1e-5."""
    gpu_engine = Engine.load(str(tiny_model), device="cuda:0", dtype="fp32")
    cpu_engine = Engine.load(str(tiny_model), device="cpu")
    assert gpu_engine.batching == "padded"                 # a GPU's default
    gpu_engine.max_padding = 1.0
    rng = np.random.default_rng(15)
    for m in range(8):
        granularity = ("utterance", "frame")[m % 2]
        mix = [pool[int(i)] for i in rng.choice(len(pool), size=int(rng.integers(2, 5)), replace=False)]
        assert gpu_engine.forward_passes(mix) == [list(range(len(mix)))]
        for c, got in zip(mix, gpu_engine.recognize_batch(mix, granularity=granularity, embedding=True)):
            for ref_engine in (gpu_engine, cpu_engine):
                one = ref_engine.recognize(c, granularity=granularity, embedding=True)
                np.testing.assert_allclose(got.scores, one.scores, atol=1e-5, rtol=0)
                np.testing.assert_allclose(got.embedding, one.embedding, atol=1e-5, rtol=0)


def test_empty_batch(engine: Engine) -> None:
    assert engine.recognize_batch([]) == []


# -- resolving and validating the model ----------------------------------------------------------

def copy_model(tiny_model: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    return dest


@pytest.mark.parametrize("name", ["model.pt", "tokens.txt", "config.yaml"])
def test_missing_file_is_named(tiny_model: Path, tmp_path: Path, name: str) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    (model / name).unlink()
    with pytest.raises(ModelError, match=str(model / name)) as err:
        Engine.load(str(model), device="cpu")
    if name == "model.pt":
        assert "random weights" in str(err.value)


@pytest.mark.parametrize("tokens,problem", [
    ("生气/angry\n厌恶/disgusted\n", "has 2 labels, expected 9"),
    ("\n".join(["a/x"] * 10) + "\n", "has 10 labels"),
    ("厌恶/disgusted\n生气/angry\n恐惧/fearful\n开心/happy\n中立/neutral\n其他/other\n难过/sad\n"
     "吃惊/surprised\n<unk>\n", "line 1 is '厌恶/disgusted'"),
])
def test_odd_tokens_are_refused(tiny_model: Path, tmp_path: Path, tokens: str, problem: str) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    (model / "tokens.txt").write_text(tokens, encoding="utf-8")
    with pytest.raises(ModelError, match=problem):
        Engine.load(str(model), device="cpu")


def test_truncated_checkpoint_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    data = (model / "model.pt").read_bytes()
    (model / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="model.pt"):
        Engine.load(str(model), device="cpu")


def test_checkpoint_of_another_size_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    ckpt = torch.load(model / "model.pt", weights_only=True)
    ckpt["model"]["proj.weight"] = torch.zeros(9, 32)
    torch.save(ckpt, model / "model.pt")
    with pytest.raises(ModelError, match="proj.weight"):
        Engine.load(str(model), device="cpu")


def test_checkpoint_without_pretraining_decoder_loads(engine: Engine, tiny_model: Path,
                                                      tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    ckpt = torch.load(model / "model.pt", weights_only=True)
    decoder = [k for k in ckpt["model"] if ".decoder." in k]
    assert decoder
    for k in decoder:
        del ckpt["model"][k]
    torch.save(ckpt, model / "model.pt")
    audio = clip(1.0)
    assert Engine.load(str(model), device="cpu").recognize(audio).scores == engine.recognize(audio).scores


class RunsCommand:
    """Unpickles by calling os.system(command): what a booby-trapped model.pt carries."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def process_wide_allowed() -> set[str]:
    """The "module.name" of every global on torch's process-wide weights_only allow-list."""
    names = set()
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def booby_trapped(tiny_model: Path, dest: Path, marker: Path) -> Path:
    """A copy of the tiny model whose model.pt holds the real weights plus an object that, when
    fully unpickled, creates `marker`."""
    model = copy_model(tiny_model, dest)
    ckpt = torch.load(model / "model.pt", weights_only=True)
    ckpt["extra"] = RunsCommand(f"touch {shlex.quote(str(marker))}")
    torch.save(ckpt, model / "model.pt")
    return model


def test_checkpoint_that_would_run_code_is_refused_and_nothing_runs(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # overrides only a default, not ours
    marker = tmp_path / "ran"
    model = booby_trapped(tiny_model, tmp_path / "m", marker)
    with pytest.raises(ModelError) as err:
        engine_mod.load_weights(model / "model.pt")
    assert not marker.exists()
    message = str(err.value)
    assert str(model / "model.pt") in message and "posix.system" in message
    assert "nothing from it has run" in message.lower() and "weights_only=False" in message
    assert not process_wide_allowed() & engine_mod.CONFIG_GLOBALS


def test_engine_load_refuses_a_checkpoint_that_would_run_code(tiny_model: Path, tmp_path: Path) -> None:
    """What a daemon sees: Engine.load raises ModelError (reported as model_unavailable)."""
    marker = tmp_path / "ran"
    model = booby_trapped(tiny_model, tmp_path / "m", marker)
    with pytest.raises(ModelError, match=r"posix\.system"):
        Engine.load(str(model), device="cpu")
    assert not marker.exists()


def test_checkpoint_with_pickled_namespace_loads_as_data(engine: Engine, tiny_model: Path,
                                                         tmp_path: Path, caplog) -> None:
    """Older fairseq checkpoints pickle an argparse.Namespace: it is allowed, nothing else is."""
    import argparse

    model = copy_model(tiny_model, tmp_path / "m")
    ckpt = torch.load(model / "model.pt", weights_only=True)
    ckpt["args"] = argparse.Namespace(arch="data2vec_multi", lr=[5e-5], layers=8, fp16=True)
    torch.save(ckpt, model / "model.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(model / "model.pt") == ["argparse.Namespace"]
    with caplog.at_level(logging.INFO, logger="e2vd.engine"):
        loaded = Engine.load(str(model), device="cpu")
    assert "argparse.Namespace" in caplog.text and "full unpickling" not in caplog.text
    audio = clip(1.0)
    assert loaded.recognize(audio).scores == engine.recognize(audio).scores
    assert not process_wide_allowed() & engine_mod.CONFIG_GLOBALS


def test_checkpoint_with_pickled_omegaconf_config_loads(engine: Engine, tiny_model: Path,
                                                        tmp_path: Path) -> None:
    """fairseq/hydra checkpoints pickle omegaconf containers (DictConfig, ListConfig, their nodes)."""
    omegaconf = pytest.importorskip("omegaconf")
    model = copy_model(tiny_model, tmp_path / "m")
    ckpt = torch.load(model / "model.pt", weights_only=True)
    ckpt["cfg"] = omegaconf.OmegaConf.create({
        "model": {"_name": "data2vec_multi", "depth": 8, "dropout": 0.1, "layer_norm_first": False,
                  "modalities": {"audio": {"feature_encoder_spec": "[(512, 10, 5)]"}}},
        "optimization": {"lr": [5e-5], "max_update": 100000, "note": None,
                         "name": "${model._name}"},
    })
    ckpt["lcfg"] = omegaconf.OmegaConf.create([1, "two", {"three": 3.0}])
    torch.save(ckpt, model / "model.pt")
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(model / "model.pt"))
    assert {"omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig"} <= unsafe
    back = engine_mod.load_checkpoint(model / "model.pt")
    # loaded as inert stand-ins, never rebuilt (tests/test_hostile_model.py: what rebuilding allows)
    assert isinstance(back["cfg"], engine_mod.ConfigStub) and not isinstance(back["cfg"], omegaconf.DictConfig)
    assert back["cfg"].pickled_name == "omegaconf.dictconfig.DictConfig"
    assert back["lcfg"].pickled_name == "omegaconf.listconfig.ListConfig"
    assert torch.equal(back["model"]["proj.weight"], ckpt["model"]["proj.weight"])
    loaded = Engine.load(str(model), device="cpu")
    audio = clip(1.0)
    assert loaded.recognize(audio).scores == engine.recognize(audio).scores
    assert not process_wide_allowed() & engine_mod.CONFIG_GLOBALS


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist.*E2VD_MODEL"):
        Engine.load(str(tmp_path / "nowhere"), device="cpu")


def test_relative_id_that_exists_locally_is_ambiguous(tiny_model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    copy_model(tiny_model, tmp_path / "iic" / "emotion2vec_plus_large")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="ambiguous.*absolute path"):
        Engine.load("iic/emotion2vec_plus_large", device="cpu", cache_dir=str(tmp_path / "cache"))


def test_not_a_model_name(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither an absolute directory nor a ModelScope id"):
        Engine.load("just-a-name", device="cpu")


def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_an_id_not_pulled_names_the_pull_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon never downloads (issue 15): no network attempt, one command to run."""
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "127.0.0.1:9")  # a network attempt would fail
    with pytest.raises(ModelError, match="not been pulled.*run: sudo e2vd pull iic/emotion2vec_plus_large"):
        Engine.load("iic/emotion2vec_plus_large", device="cpu", cache_dir=str(tmp_path))


def test_downloaded_model_is_used_from_the_cache(tiny_model: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    no_proxy(monkeypatch)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", "127.0.0.1:9")  # a network attempt would fail
    target = tmp_path / "models" / "iic" / "emotion2vec_plus_large" / engine_mod.DEFAULT_REVISION
    copy_model(tiny_model, target)
    (target / ".e2vd-complete").write_text("done\n")
    loaded = Engine.load(engine_mod.DEFAULT_MODEL, device="cpu", cache_dir=str(tmp_path))
    assert loaded.model_dir == target and loaded.model_id == engine_mod.DEFAULT_MODEL


def test_unknown_dtype(tiny_model: Path) -> None:
    with pytest.raises(ModelError, match="dtype"):
        Engine.load(str(tiny_model), device="cpu", dtype="fp8")


def test_half_precision_on_cpu_falls_back_to_fp32(tiny_model: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="e2vd.engine"):
        loaded = Engine.load(str(tiny_model), device="cpu", dtype="bf16")
    assert loaded.dtype == "fp32" and "bf16" in caplog.text


def test_int8_quantization_on_cpu(engine: Engine, tiny_model: Path) -> None:
    q = Engine.load(str(tiny_model), device="cpu", quantize=True)
    assert q.quantized
    audio = clip(2.0, seed=3)
    a, b = engine.recognize(audio), q.recognize(audio)
    assert sum(b.scores) == pytest.approx(1.0, abs=1e-5)
    assert np.abs(np.array(a.scores) - b.scores).max() < 0.05  # close, not equal: int8 weights
    assert q.memory()["param_bytes"] < engine.memory()["param_bytes"]


# -- importing funasr lightly -----------------------------------------------------------------

def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_light_import_keeps_funasr_usable(tiny_model: Path) -> None:
    """After Engine.load, `from funasr import AutoModel` still gets the whole, working package."""
    proc = _run(f"""
import logging, sys
logging.basicConfig(level=logging.WARNING, format="OURS %(message)s")
handlers = list(logging.getLogger().handlers)
from e2vd.engine import Engine
e = Engine.load({str(tiny_model)!r}, device="cpu")
light = sorted(m for m in sys.modules if m == "funasr" or m.startswith("funasr."))
assert light == [], light
assert logging.getLogger().handlers == handlers
from funasr import AutoModel
import funasr
assert len([m for m in sys.modules if m.startswith("funasr.")]) > 100
m = AutoModel(model={str(tiny_model)!r}, disable_update=True, device="cpu", disable_pbar=True)
import numpy as np
print("LABELS", len(m.generate(np.zeros(16000, dtype=np.float32) + 0.1)[0]["labels"]))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LABELS 9" in proc.stdout


def test_engine_import_is_quiet_and_light(tiny_model: Path) -> None:
    proc = _run(f"""
import sys
from e2vd.engine import Engine
Engine.load({str(tiny_model)!r}, device="cpu")
print("MODULES", len([m for m in sys.modules if m.startswith("funasr")]))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "MODULES 0"  # nothing printed by funasr ("Notice: ffmpeg ...")


# -- device choice (real NVML here finds no GPU; fake device lists for the GPU cases) ----------

def test_auto_device_without_gpu_is_cpu(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "list_gpus", lambda: [])  # what NVML gives on a machine without GPU
    assert Engine.load(str(tiny_model)).device == "cpu"


def test_named_gpu_that_does_not_exist(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "list_gpus", lambda: [])
    with pytest.raises(gpu.DeviceError, match="cuda:1"):
        Engine.load(str(tiny_model), device="cuda:1")


def fake_gpu(free_mb: int) -> gpu.GpuInfo:
    return gpu.GpuInfo(index=0, name="Fake GPU", total_bytes=80_000 << 20, free_bytes=free_mb << 20)


def test_busy_gpu_refused_or_cpu_by_policy(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "list_gpus", lambda: [fake_gpu(500)])
    with pytest.raises(gpu.GpuBusyError, match="500 MB free"):
        Engine.load(str(tiny_model), min_free_mb=2048, busy_policy="refuse")
    assert Engine.load(str(tiny_model), min_free_mb=2048, busy_policy="cpu").device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_gpu_without_cuda_torch_is_explained(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "list_gpus", lambda: [fake_gpu(40_000)])
    with pytest.raises(ModelError, match="cuda:0 was chosen but this PyTorch .* cannot use CUDA"):
        Engine.load(str(tiny_model), device="auto")


def test_weight_init_functions_are_restored(engine: Engine) -> None:
    """Engine.load skips random init while building; torch.nn.init must work again afterwards."""
    t = torch.zeros(1000)
    torch.nn.init.normal_(t)
    assert t.std() > 0.5


def test_shortest_accepted_clip_gives_one_frame(engine: Engine) -> None:
    """25 ms (400 samples, the shortest clip e2vd.audio accepts) still yields one 20 ms frame."""
    r = engine.recognize(from_samples(0.1 * speechlike(0.025)[:, 0], 16000), granularity="frame",
                         embedding=True)
    assert r.embedding.shape == (1, 64) and sum(r.scores) == pytest.approx(1.0, abs=1e-6)


def test_local_directory_never_touches_the_network(tiny_model: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("Engine.load opened a network connection for a local directory")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert Engine.load(str(tiny_model), device="cpu").model_dir == tiny_model


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which this process has `path` memory-mapped (from /proc/self/maps)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_cpu_weights_are_the_mapped_file_not_copies(tiny_model: Path, tmp_path: Path) -> None:
    """No copy of the checkpoint: every weight lives in the memory-mapped model.pt."""
    model = copy_model(tiny_model, tmp_path / "m")  # a file no other test has mapped
    loaded = Engine.load(str(model), device="cpu")
    ranges = _mapped_ranges(model / "model.pt")
    assert ranges, "model.pt is not memory-mapped"
    params = list(loaded._model.parameters())
    inside = [p for p in params if any(a <= p.data_ptr() < b for a, b in ranges)]
    assert len(inside) == len(params)


def test_load_leaves_the_garbage_collector_as_it_found_it(tiny_model: Path) -> None:
    """Engine.load pauses Python's cyclic collector while it loads (a full collection would walk
    torch's objects for nothing) and puts it back as it was, also when the load fails."""
    assert gc.isenabled()
    Engine.load(str(tiny_model), device="cpu")
    assert gc.isenabled()
    with pytest.raises(ModelError):
        Engine.load(str(tiny_model / "nowhere"), device="cpu")
    assert gc.isenabled()
    gc.disable()
    try:
        Engine.load(str(tiny_model), device="cpu")
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_checkpoint_read_on_a_thread_raises_its_own_error(tiny_model: Path, tmp_path: Path) -> None:
    """The checkpoint is read while the model is built: its ModelError still reaches the caller,
    and the weights read are those a plain build_model gets."""
    model = copy_model(tiny_model, tmp_path / "m")
    (model / "model.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        engine_mod.load_model(engine_mod.read_config(model), model / "model.pt", 9)
    config = engine_mod.read_config(tiny_model)
    threaded = engine_mod.load_model(config, tiny_model / "model.pt", 9)
    plain = engine_mod.build_model(config, engine_mod.load_weights(tiny_model / "model.pt"), 9,
                                   tiny_model / "model.pt")
    assert threaded.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(threaded.state_dict()[k], v) for k, v in plain.state_dict().items())


def test_fp32_on_cuda_turns_tf32_off_only_inside_the_call():
    """"fp32" on a GPU must be IEEE fp32 (cuDNN would use TF32 by default); the process-wide flags
    come back afterwards, also after an error. The flags are torch's own, settable without a GPU."""
    from e2vd.engine import _ieee_fp32

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32 = matmul.allow_tf32 = True
        with _ieee_fp32(True):
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (False, False)
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
        with pytest.raises(RuntimeError), _ieee_fp32(True):
            raise RuntimeError("inference failed")
        assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
        with _ieee_fp32(False):   # fp16/bf16 and the CPU: left alone
            assert (cudnn.allow_tf32, matmul.allow_tf32) == (True, True)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
