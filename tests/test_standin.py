"""Stand-in model directories: layout, real config, real class, loadable by funasr's AutoModel."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import speechlike
from e2vd import standin

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "emotion2vec_plus_large"


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    """{"a.b.c": leaf} for a nested dict."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def test_tiny_directory_has_the_real_layout(tiny_model: Path) -> None:
    assert sorted(p.name for p in tiny_model.iterdir()) == [
        "config.yaml", "configuration.json", "model.pt", "tokens.txt"]
    assert tiny_model.joinpath("tokens.txt").read_text(encoding="utf-8").split("\n")[:9] == [
        "生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral",
        "其他/other", "难过/sad", "吃惊/surprised", "<unk>"]
    meta = json.loads(tiny_model.joinpath("configuration.json").read_text(encoding="utf-8"))
    assert meta["file_path_metas"] == {"init_param": "model.pt", "config": "config.yaml",
                                       "tokenizer_conf": {"token_list": "tokens.txt"}}
    config = yaml.safe_load(tiny_model.joinpath("config.yaml").read_text(encoding="utf-8"))
    assert config == standin.config_for("tiny")
    assert config["scope_map"] == ["d2v_model.", "none"]


def test_tiny_checkpoint_is_fairseq_style(tiny_model: Path) -> None:
    ckpt = torch.load(tiny_model / "model.pt", weights_only=True, mmap=True)
    keys = list(ckpt["model"])
    assert keys and all(k.startswith(("d2v_model.", "proj.")) for k in keys)
    assert {"proj.weight", "proj.bias"} <= set(keys)
    assert ckpt["model"]["proj.weight"].shape[0] == 9
    assert "last_optimizer_state" in ckpt and "optimizer_history" in ckpt
    params = sum(v.numel() for k, v in ckpt["model"].items())
    assert 100_000 < params < 1_000_000, params


def test_build_is_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    again = standin.build("tiny", tmp_path / "again")
    first = torch.load(tiny_model / "model.pt", weights_only=True)["model"]
    second = torch.load(again / "model.pt", weights_only=True)["model"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_large_has_the_real_parameter_count() -> None:
    with torch.device("meta"):  # the real sizes, without allocating 656 MB
        model = standin.build_model("large")
    assert sum(p.numel() for p in model.parameters()) == standin.LARGE_PARAMS == 164_048_921


def test_tiny_changes_only_sizes() -> None:
    large, tiny = _flatten(standin.config_for("large")), _flatten(standin.config_for("tiny"))
    assert large.keys() == tiny.keys()
    changed = {k for k in large if large[k] != tiny[k]}
    assert changed == set(standin.TINY_CHANGES)
    # the conv front end keeps its kernels and strides: 5 * 2**6 = 320x down-sampling, 50 Hz frames
    spec = eval(tiny["model_conf.modalities.audio.feature_encoder_spec"])  # noqa: S307 - our constant
    assert [layer[1:] for layer in spec] == [layer[1:] for layer in
                                            eval(large["model_conf.modalities.audio.feature_encoder_spec"])]  # noqa: S307
    assert np.prod([stride for _, _, stride in spec]) == 320


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="tiny, large"):
        standin.config_for("huge")


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference is not available")
def test_config_matches_the_real_one(tmp_path: Path) -> None:
    real = yaml.safe_load((REFERENCE / "config.yaml").read_text(encoding="utf-8"))
    assert standin.config_for("large") == real
    standin.write_config("large", tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text(encoding="utf-8")) == real
    tiny, flat_real = _flatten(standin.config_for("tiny")), _flatten(real)
    assert tiny.keys() == flat_real.keys()
    assert {k for k in tiny if tiny[k] != flat_real[k]} == set(standin.TINY_CHANGES)
    assert json.loads((REFERENCE / "configuration.json").read_text(encoding="utf-8")) == standin.CONFIGURATION
    assert (REFERENCE / "tokens.txt").read_text(encoding="utf-8").split() == list(standin.TOKENS)


def test_funasr_automodel_loads_tiny(tiny_model: Path) -> None:
    from funasr import AutoModel

    model = AutoModel(model=str(tiny_model), disable_update=True, device="cpu", disable_pbar=True)
    result = model.generate(speechlike(1.0)[:, 0], granularity="utterance")[0]
    assert result["labels"] == list(standin.TOKENS)
    assert len(result["scores"]) == 9
    assert sum(result["scores"]) == pytest.approx(1.0, abs=1e-5)
