"""Build stand-in model directories for emotion2vec+ large with funasr's own `Emotion2vec` class.

No model hub is reachable where e2vd is developed and tested, so tests and benchmarks use stand-ins
that have the real directory layout and go through exactly the loading code the real model uses:

* ``config.yaml``        the real emotion2vec+ large config (encoded below, not read from anywhere),
                         shrunk for ``tiny``;
* ``configuration.json`` the ModelScope/funasr pipeline metadata (points at the three other files);
* ``tokens.txt``         the 9 real label strings in the real order;
* ``model.pt``           a fairseq-style checkpoint: ``{"model": {"d2v_model.*", "proj.*"}, ...,
                         "last_optimizer_state": ...}``, random weights from a fixed seed.

Presets:

* ``tiny``:  same structure, ~0.3 M parameters; keeps the 320x convolutional down-sampling so frames
  are 50 Hz like the real model. Builds in seconds; used by the tests.
* ``large``: the real sizes (164,048,921 parameters) plus an Adam optimizer-state block, so
  ``model.pt`` is ~1.95 GB like the real file. Used by the cold-start benchmark.
* ``base``:  the large config changed to the published emotion2vec base shape (embed_dim 768,
  12 attention heads and 12 ALiBi heads; everything else as large), the same 9 labels. The
  low-confidence fallback model of the tests and bench/fallback.py. Written without the
  optimizer-state block (the engine never reads it; it would only triple the file and the build).

Usage: ``python -m e2vd.standin {tiny,large,base} DIR``
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

#: The real label strings of emotion2vec+ (tokens.txt of iic/emotion2vec_plus_large), in order.
TOKENS: tuple[str, ...] = (
    "生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral",
    "其他/other", "难过/sad", "吃惊/surprised", "<unk>",
)

#: configuration.json of the real model directory (funasr reads file names from it).
CONFIGURATION: dict[str, Any] = {
    "framework": "pytorch",
    "task": "emotion-recognition",
    "pipeline": {"type": "funasr-pipeline"},
    "model": {"type": "funasr"},
    "file_path_metas": {
        "init_param": "model.pt",
        "tokenizer_conf": {"token_list": "tokens.txt"},
        "config": "config.yaml",
    },
    "model_name_in_hub": {"ms": "iic/emotion2vec_base", "hf": ""},
}

#: config.yaml of iic/emotion2vec_plus_large, verbatim.
REAL_CONFIG_YAML = """\

# network architecture
model: Emotion2vec
model_conf:
  _name: data2vec_multi
  activation_dropout: 0.0
  adversarial_hidden_dim: 128
  adversarial_training: false
  adversarial_weight: 0.1
  attention_dropout: 0.1
  average_top_k_layers: 16
  batch_norm_target_layer: false
  clone_batch: 12
  cls_loss: 1.0
  cls_type: chunk
  d2v_loss: 1.0
  decoder_group: false
  depth: 8
  dropout_input: 0.0
  ema_anneal_end_step: 20000
  ema_decay: 0.9997
  ema_encoder_only: false
  ema_end_decay: 1.0
  ema_same_dtype: true
  embed_dim: 1024
  encoder_dropout: 0.1
  end_drop_path_rate: 0.0
  end_of_block_targets: false
  instance_norm_target_layer: true
  instance_norm_targets: false
  layer_norm_first: false
  layer_norm_target_layer: false
  layer_norm_targets: false
  layerdrop: 0.0
  log_norms: true
  loss_beta: 0.0
  loss_scale: null
  mae_init: false
  max_update: 100000
  min_pred_var: 0.01
  min_target_var: 0.1
  mlp_ratio: 4.0
  normalize: true
  modalities:
    _name: null
    audio:
      add_masks: false
      alibi_max_pos: null
      alibi_scale: 1.0
      conv_pos_depth: 5
      conv_pos_groups: 16
      conv_pos_pre_ln: false
      conv_pos_width: 95
      decoder:
        add_positions_all: false
        add_positions_masked: false
        decoder_dim: 768
        decoder_groups: 16
        decoder_kernel: 7
        decoder_layers: 4
        decoder_residual: true
        input_dropout: 0.1
        projection_layers: 1
        projection_ratio: 2.0
      ema_local_encoder: false
      encoder_zero_mask: true
      end_drop_path_rate: 0.0
      extractor_mode: layer_norm
      feature_encoder_spec: '[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]'
      init_extra_token_zero: true
      inverse_mask: false
      keep_masked_pct: 0.0
      learned_alibi: false
      learned_alibi_scale: true
      learned_alibi_scale_per_head: true
      learned_alibi_scale_per_layer: false
      local_grad_mult: 1.0
      mask_channel_length: 64
      mask_channel_prob: 0.0
      mask_dropout: 0.0
      mask_length: 5
      mask_noise_std: 0.01
      mask_prob: 0.55
      mask_prob_adjust: 0.1
      mask_prob_min: null
      model_depth: 8
      num_alibi_heads: 16
      num_extra_tokens: 10
      prenet_depth: 4
      prenet_dropout: 0.1
      prenet_layerdrop: 0.0
      remove_masks: false
      start_drop_path_rate: 0.0
      type: AUDIO
      use_alibi_encoder: true
    image:
      add_masks: false
      alibi_dims: 2
      alibi_distance: manhattan
      alibi_max_pos: null
      alibi_scale: 1.0
      decoder:
        add_positions_all: false
        add_positions_masked: false
        decoder_dim: 384
        decoder_groups: 16
        decoder_kernel: 5
        decoder_layers: 5
        decoder_residual: true
        input_dropout: 0.1
        projection_layers: 1
        projection_ratio: 2.0
      ema_local_encoder: false
      embed_dim: 768
      enc_dec_transformer: false
      encoder_zero_mask: true
      end_drop_path_rate: 0.0
      fixed_positions: true
      in_chans: 3
      init_extra_token_zero: true
      input_size: 224
      inverse_mask: false
      keep_masked_pct: 0.0
      learned_alibi: false
      learned_alibi_scale: false
      learned_alibi_scale_per_head: false
      learned_alibi_scale_per_layer: false
      local_grad_mult: 1.0
      mask_channel_length: 64
      mask_channel_prob: 0.0
      mask_dropout: 0.0
      mask_length: 5
      mask_noise_std: 0.01
      mask_prob: 0.7
      mask_prob_adjust: 0.0
      mask_prob_min: null
      model_depth: 8
      num_alibi_heads: 16
      num_extra_tokens: 0
      patch_size: 16
      prenet_depth: 4
      prenet_dropout: 0.0
      prenet_layerdrop: 0.0
      remove_masks: false
      start_drop_path_rate: 0.0
      transformer_decoder: false
      type: IMAGE
      use_alibi_encoder: false
    text:
      add_masks: false
      alibi_max_pos: null
      alibi_scale: 1.0
      decoder:
        add_positions_all: false
        add_positions_masked: false
        decoder_dim: 384
        decoder_groups: 16
        decoder_kernel: 5
        decoder_layers: 5
        decoder_residual: true
        input_dropout: 0.1
        projection_layers: 1
        projection_ratio: 2.0
      dropout: 0.1
      ema_local_encoder: false
      encoder_zero_mask: true
      end_drop_path_rate: 0.0
      init_extra_token_zero: true
      inverse_mask: false
      keep_masked_pct: 0.0
      layernorm_embedding: true
      learned_alibi: false
      learned_alibi_scale: false
      learned_alibi_scale_per_head: false
      learned_alibi_scale_per_layer: false
      learned_pos: true
      local_grad_mult: 1.0
      mask_channel_length: 64
      mask_channel_prob: 0.0
      mask_dropout: 0.0
      mask_length: 5
      mask_noise_std: 0.01
      mask_prob: 0.7
      mask_prob_adjust: 0.0
      mask_prob_min: null
      max_source_positions: 512
      model_depth: 8
      no_scale_embedding: true
      no_token_positional_embeddings: false
      num_alibi_heads: 16
      num_extra_tokens: 0
      prenet_depth: 4
      prenet_dropout: 0.0
      prenet_layerdrop: 0.0
      remove_masks: false
      start_drop_path_rate: 0.0
      type: TEXT
      use_alibi_encoder: false
  norm_affine: true
  norm_eps: 1.0e-05
  num_heads: 16
  post_mlp_drop: 0.1
  recon_loss: 0.0
  seed: 1
  shared_decoder: null
  skip_ema: false
  start_drop_path_rate: 0.0
  supported_modality: AUDIO

tokenizer: CharTokenizer
tokenizer_conf:
  unk_symbol: <unk>
  split_with_space: true

scope_map:
  - 'd2v_model.'
  - none


"""

#: What the tiny preset changes in the real config (dotted paths into config.yaml).
#: Kept: every structural switch, the 7-layer conv front end's kernels and strides (320x: 50 Hz frames).
TINY_CHANGES: dict[str, Any] = {
    "model_conf.embed_dim": 64,
    "model_conf.num_heads": 4,
    "model_conf.depth": 2,
    "model_conf.average_top_k_layers": 2,
    "model_conf.modalities.audio.feature_encoder_spec":
        "[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64,2,2)] + [(64,2,2)]",
    "model_conf.modalities.audio.num_alibi_heads": 4,
    "model_conf.modalities.audio.model_depth": 2,
    "model_conf.modalities.audio.prenet_depth": 1,
    "model_conf.modalities.audio.decoder.decoder_dim": 32,
    "model_conf.modalities.audio.decoder.decoder_layers": 1,
}

#: What the base preset changes in the real config: the published emotion2vec base shape.
BASE_CHANGES: dict[str, Any] = {
    "model_conf.embed_dim": 768,
    "model_conf.num_heads": 12,
    "model_conf.modalities.audio.num_alibi_heads": 12,
}

#: The changes each preset makes to the real (large) config.
PRESET_CHANGES: dict[str, dict[str, Any]] = {"tiny": TINY_CHANGES, "large": {}, "base": BASE_CHANGES}
PRESETS = tuple(PRESET_CHANGES)
SEED = 20240601
LARGE_PARAMS = 164_048_921


def config_for(preset: str) -> dict[str, Any]:
    """Return the parsed config.yaml for `preset` (one of PRESETS; large is the real config)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown stand-in preset {preset!r}: choose one of {', '.join(PRESETS)}")
    config = yaml.safe_load(REAL_CONFIG_YAML)
    for dotted, value in PRESET_CHANGES[preset].items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        if leaf not in node:
            raise KeyError(f"the {preset} preset changes {dotted}, which the real config does not have")
        node[leaf] = value
    return config


def build_model(preset: str) -> torch.nn.Module:
    """Instantiate funasr's `Emotion2vec` for `preset` with seeded random weights (eval mode, fp32)."""
    from e2vd.engine import new_emotion2vec  # the engine's light import of the funasr class

    config = config_for(preset)
    torch.manual_seed(SEED)
    model = new_emotion2vec(copy.deepcopy(config["model_conf"]), len(TOKENS))
    return model.eval()


def checkpoint(model: torch.nn.Module, optimizer_state: bool = True) -> dict[str, Any]:
    """Return a fairseq-style checkpoint dict of `model`, laid out like the real model.pt.

    ``model`` holds the encoder under ``d2v_model.`` and the classifier as ``proj.*``; with
    `optimizer_state`, ``last_optimizer_state`` holds Adam's two moment tensors per parameter
    (zeros: only their size matters), which is what makes the real file ~3x the weights' size.
    Only plain containers, numbers, strings and tensors: loadable with ``weights_only=True``.
    """
    weights = {}
    for name, tensor in model.state_dict().items():
        key = name if name.startswith("proj.") else "d2v_model." + name
        weights[key] = tensor.detach().clone()
    ckpt: dict[str, Any] = {
        "args": None,
        "cfg": {"model": {"_name": "emotion2vec"}, "task": {"_name": "emotion_recognition"}},
        "model": weights,
        "criterion": None,
        "optimizer_history": [{
            "criterion_name": "ModelCriterion",
            "optimizer_name": "FairseqAdam",
            "lr_scheduler_state": {"best": None},
            "num_updates": 0,
        }],
        "task_state": {},
        "extra_state": {"epoch": 1, "train_iterator": {"epoch": 1}},
    }
    if optimizer_state:
        params = [p for p in model.parameters()]
        ckpt["last_optimizer_state"] = {
            "state": {i: {"step": torch.tensor(0.0),
                          "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                      for i, p in enumerate(params)},
            "param_groups": [{"lr": 5e-5, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01,
                              "params": list(range(len(params)))}],
        }
    return ckpt


def write_config(preset: str, path: Path) -> None:
    """Write config.yaml for `preset`: the real text for large, a YAML dump of the changed dict
    for the others."""
    if preset == "large":
        path.write_text(REAL_CONFIG_YAML, encoding="utf-8")
    else:
        text = yaml.safe_dump(config_for(preset), sort_keys=False, allow_unicode=True)
        path.write_text(f"# e2vd {preset} stand-in: the real emotion2vec+ large config, changed: "
                        f"{', '.join(PRESET_CHANGES[preset])}\n" + text, encoding="utf-8")


def build(preset: str, out_dir: str | Path) -> Path:
    """Build the `preset` stand-in into `out_dir` (created; existing files overwritten); return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(preset)
    write_config(preset, out / "config.yaml")
    (out / "configuration.json").write_text(json.dumps(CONFIGURATION, indent=2) + "\n", encoding="utf-8")
    (out / "tokens.txt").write_text("\n".join(TOKENS) + "\n", encoding="utf-8")
    tmp = out / "model.pt.partial"
    torch.save(checkpoint(model, optimizer_state=preset != "base"), tmp)
    tmp.replace(out / "model.pt")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``python -m e2vd.standin {tiny,large,base} DIR``."""
    parser = argparse.ArgumentParser(prog="python -m e2vd.standin", description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=PRESETS)
    parser.add_argument("dir", type=Path, help="output directory (created if missing)")
    args = parser.parse_args(argv)
    out = build(args.preset, args.dir)
    size = (out / "model.pt").stat().st_size
    print(f"built {args.preset} stand-in in {out} (model.pt: {size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
