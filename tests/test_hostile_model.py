"""Hostile model directories: everything e2vd reads from one (config.yaml, tokens.txt, model.pt)
crafted to run code, hang the load, exhaust memory or CPU, or crash the process.

Every case either loads correctly (the input was in fact harmless) or ends in e2vd's ModelError
naming the file, what is wrong and what to do; never another exception, a hang or a dead process.
Cases that could kill or hang pytest before the fix (SIGBUS, memory bombs, endless loops) load in
a child process (`load_in_child`) with a generous time limit, which only guards against a hang.
"""
from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import ROOT, speechlike
from e2vd import engine as engine_mod
from e2vd.audio import from_samples
from e2vd.engine import Engine, ModelError

FILES = ("model.pt", "config.yaml", "tokens.txt")
#: How long a child process may load a model before it counts as hung (a guard, not a measurement).
CHILD_LIMIT_S = 300


# -- building hostile directories ----------------------------------------------------------------

def copy_model(tiny_model: Path, dest: Path) -> Path:
    """A writable copy of the tiny stand-in at `dest`."""
    shutil.copytree(tiny_model, dest)
    return dest


def load_error(model: Path) -> str:
    """Engine.load(model) on the CPU must raise ModelError; its message."""
    with pytest.raises(ModelError) as err:
        Engine.load(str(model), device="cpu")
    return str(err.value)


def load_in_child(model: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Engine.load(model) on the CPU in a child process; what happened:
    {"outcome": "loaded", "scores": [...]} or {"outcome": "error", "type": NAME, "message": ...}.
    Fails the test when the child dies (a signal, e.g. SIGBUS) or hangs past CHILD_LIMIT_S."""
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from e2vd.engine import Engine
        from e2vd.audio import from_samples
        try:
            e = Engine.load({str(model)!r}, device="cpu")
            t = np.arange(16000, dtype=np.float32) / 16000
            r = e.recognize(from_samples(0.3 * np.sin(2 * np.pi * 220 * t), 16000))
            out = {{"outcome": "loaded", "scores": r.scores}}
        except BaseException as err:
            out = {{"outcome": "error", "type": type(err).__name__, "message": str(err)}}
        sys.stdout.write("\\nRESULT " + json.dumps(out) + "\\n")
    """)
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              timeout=CHILD_LIMIT_S, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {model} hung for {CHILD_LIMIT_S} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (
        f"the process loading {model} died (exit status {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def child_error(model: Path, env: dict[str, str] | None = None) -> str:
    """`load_in_child` must end in ModelError; its message."""
    out = load_in_child(model, env)
    assert out["outcome"] == "error" and out["type"] == "ModelError", out
    return out["message"]


def as_root() -> bool:
    return os.geteuid() == 0


def replace(model: Path, name: str) -> Path:
    """Remove `name` from `model` and return its path (for the caller to put something else there)."""
    path = model / name
    path.unlink()
    return path


# -- the three files as things that are not regular files ------------------------------------------

@pytest.mark.parametrize("name", FILES)
def test_fifo_is_refused_without_blocking(tiny_model: Path, tmp_path: Path, name: str) -> None:
    """A FIFO would block open() (and read()) forever: refused as not a regular file."""
    model = copy_model(tiny_model, tmp_path / "m")
    os.mkfifo(replace(model, name))
    message = child_error(model)
    assert str(model / name) in message and "FIFO" in message


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/urandom", "/dev/null"])
@pytest.mark.parametrize("name", FILES)
def test_symlink_to_a_device_is_refused(tiny_model: Path, tmp_path: Path, name: str, target: str) -> None:
    if not os.path.exists(target):
        pytest.skip(f"{target} does not exist here")
    model = copy_model(tiny_model, tmp_path / "m")
    replace(model, name).symlink_to(target)
    message = load_error(model)
    assert str(model / name) in message and "device" in message


@pytest.mark.parametrize("target", ["/proc/self/mem", "/proc/self/environ", "/proc/self/maps"])
@pytest.mark.parametrize("name", FILES)
def test_symlink_into_proc_is_refused(tiny_model: Path, tmp_path: Path, name: str, target: str) -> None:
    """/proc files are 'regular' with a size of 0 and contents that are no model file's: reading
    /proc/self/mem at offset 0 fails with EIO; environ would be read as labels or YAML."""
    model = copy_model(tiny_model, tmp_path / "m")
    replace(model, name).symlink_to(target)
    message = load_error(model)
    assert str(model / name) in message


@pytest.mark.parametrize("name", FILES)
def test_directory_is_refused(tiny_model: Path, tmp_path: Path, name: str) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    replace(model, name).mkdir()
    message = load_error(model)
    assert str(model / name) in message and "directory" in message


@pytest.mark.parametrize("name", FILES)
def test_dangling_symlink_is_refused(tiny_model: Path, tmp_path: Path, name: str) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    replace(model, name).symlink_to(tmp_path / "gone")
    message = load_error(model)
    assert str(model / name) in message and "symbolic link" in message and str(tmp_path / "gone") in message


@pytest.mark.parametrize("name", FILES)
def test_symlink_loop_is_refused(tiny_model: Path, tmp_path: Path, name: str) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    path = replace(model, name)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    path.symlink_to(tmp_path / "a")
    message = load_error(model)
    assert str(model / name) in message and "loop" in message


@pytest.mark.parametrize("name", FILES)
def test_symlink_to_a_regular_file_elsewhere_loads(tiny_model: Path, tmp_path: Path, name: str) -> None:
    """Hub caches link each file to a blob: a symbolic link to a regular file is fine."""
    model = copy_model(tiny_model, tmp_path / "m")
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    shutil.move(str(model / name), blob)
    (model / name).symlink_to(blob)
    Engine.load(str(model), device="cpu")


@pytest.mark.skipif(as_root(), reason="root reads files whatever their mode: chmod 000 does not bite")
@pytest.mark.parametrize("name", FILES)
def test_unreadable_file_is_refused(tiny_model: Path, tmp_path: Path, name: str) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    (model / name).chmod(0)
    message = load_error(model)
    assert str(model / name) in message and "permission denied" in message and "chmod" in message


# -- tokens.txt ---------------------------------------------------------------------------------

def write_tokens(model: Path, data: bytes) -> None:
    (model / "tokens.txt").write_bytes(data)


def real_tokens(tiny_model: Path) -> list[str]:
    return (tiny_model / "tokens.txt").read_text(encoding="utf-8").split()


def test_tokens_with_nul_bytes_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    tokens = real_tokens(tiny_model)
    tokens[0] = "生气/angry\x00"
    write_tokens(model, "\n".join(tokens).encode())
    message = load_error(model)
    assert str(model / "tokens.txt") in message and "line 1" in message


def test_tokens_with_control_characters_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    """A label is sent to every client and printed by `e2vd recognize`: no terminal escapes."""
    model = copy_model(tiny_model, tmp_path / "m")
    tokens = real_tokens(tiny_model)
    tokens[3] = "\x1b]0;owned\x07\x1b[2J开心/happy"
    write_tokens(model, "\n".join(tokens).encode())
    message = load_error(model)
    assert str(model / "tokens.txt") in message and "line 4" in message and "control" in message


def test_overlong_label_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    tokens = real_tokens(tiny_model)
    tokens[2] = "x" * 100_000 + "/fearful"
    write_tokens(model, "\n".join(tokens).encode())
    message = load_error(model)
    assert str(model / "tokens.txt") in message and "line 3" in message and "characters" in message


def test_tokens_not_utf8_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    write_tokens(model, "\n".join(real_tokens(tiny_model)).encode("utf-16"))
    message = load_error(model)
    assert str(model / "tokens.txt") in message and "UTF-8" in message


def test_a_million_lines_of_tokens_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    write_tokens(model, b"a/angry\n" * 1_000_000)
    message = load_error(model)
    assert str(model / "tokens.txt") in message


def test_a_million_empty_lines_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    write_tokens(model, b"\n" * 1_000_000)
    message = load_error(model)
    assert str(model / "tokens.txt") in message and "0 labels" in message


def test_tokens_in_another_order_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    tokens = real_tokens(tiny_model)
    write_tokens(model, "\n".join(tokens[::-1]).encode())
    message = load_error(model)
    assert str(model / "tokens.txt") in message and "order" in message


def test_tokens_with_a_bom_and_crlf_load_without_the_bom(tiny_model: Path, tmp_path: Path) -> None:
    """A BOM and CRLF line ends (an editor on Windows) are harmless: the labels are read without them."""
    model = copy_model(tiny_model, tmp_path / "m")
    tokens = real_tokens(tiny_model)
    write_tokens(model, b"\xef\xbb\xbf" + "\r\n".join(tokens).encode() + b"\r\n")
    engine = Engine.load(str(model), device="cpu")
    assert engine.model_labels == tokens


# -- config.yaml --------------------------------------------------------------------------------

def config_of(tiny_model: Path) -> dict[str, Any]:
    return yaml.safe_load((tiny_model / "config.yaml").read_text(encoding="utf-8"))


def write_config(model: Path, config: dict[str, Any] | str) -> None:
    text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    (model / "config.yaml").write_text(text, encoding="utf-8")


def with_conf(tiny_model: Path, dest: Path, dotted: str, value: Any) -> Path:
    """A copy of the tiny model whose config.yaml sets model_conf.`dotted` to `value`."""
    model = copy_model(tiny_model, dest)
    config = config_of(tiny_model)
    *parents, leaf = dotted.split(".")
    node = config["model_conf"]
    for key in parents:
        node = node[key]
    node[leaf] = value
    write_config(model, config)
    return model


@pytest.mark.parametrize("text", [
    "model: !!python/object/apply:os.system ['touch /tmp/e2vd-hostile-yaml']\n",
    "model: !!python/name:os.system\n",
    "model: !!python/object/new:subprocess.Popen [['true']]\n",
])
def test_python_yaml_tags_run_nothing(tiny_model: Path, tmp_path: Path, text: str) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    write_config(model, text)
    message = load_error(model)
    assert str(model / "config.yaml") in message and "YAML" in message
    assert not Path("/tmp/e2vd-hostile-yaml").exists()


def test_yaml_alias_bomb_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    write_config(model, "\n".join(lines) + "\nmodel: Emotion2vec\nmodel_conf: {x: *a9}\n")
    message = load_error(model)
    assert str(model / "config.yaml") in message and "aliases" in message


def test_deeply_nested_yaml_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    """PyYAML constructs nested collections recursively: deep nesting must not escape as RecursionError."""
    model = copy_model(tiny_model, tmp_path / "m")
    write_config(model, "model: Emotion2vec\nmodel_conf: " + "[" * 100_000 + "]" * 100_000 + "\n")
    message = load_error(model)
    assert str(model / "config.yaml") in message


def test_integer_with_too_many_digits_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    """Python refuses to convert more than 4300 digits (ValueError inside PyYAML)."""
    model = copy_model(tiny_model, tmp_path / "m")
    text = (tiny_model / "config.yaml").read_text(encoding="utf-8")
    write_config(model, text.replace("embed_dim: 64", "embed_dim: " + "9" * 5000, 1))
    message = load_error(model)
    assert str(model / "config.yaml") in message


#: Sizes that hung or exhausted memory while funasr built the network (loaded in a child process).
HAZARDOUS_SIZES = [
    ("depth", 10 ** 9), ("modalities.audio.conv_pos_depth", 10 ** 9),
    ("modalities.audio.decoder.projection_layers", 10 ** 9),
]


@pytest.mark.parametrize("dotted,value", HAZARDOUS_SIZES)
def test_sizes_that_would_hang_the_build_are_refused(tiny_model: Path, tmp_path: Path, dotted: str,
                                                     value: Any) -> None:
    model = with_conf(tiny_model, tmp_path / "m", dotted, value)
    message = child_error(model)
    assert str(model / "config.yaml") in message and f"model_conf.{dotted}" in message


@pytest.mark.parametrize("dotted,value", [
    ("embed_dim", 10 ** 30), ("embed_dim", 0), ("embed_dim", -64), ("embed_dim", "64"), ("embed_dim", 64.0),
    ("embed_dim", True), ("num_heads", 0), ("modalities.audio.conv_pos_depth", 0),
    ("modalities.audio.conv_pos_width", 10 ** 12), ("modalities.audio.conv_pos_groups", 0),
    ("modalities.audio.num_extra_tokens", 10 ** 12), ("modalities.audio.num_extra_tokens", -1),
    ("modalities.audio.decoder.decoder_kernel", 10 ** 12),
    ("modalities.audio.decoder.decoder_groups", 0),
    ("mlp_ratio", 1e300), ("mlp_ratio", float("nan")), ("mlp_ratio", -4.0), ("mlp_ratio", "4"),
    ("modalities.audio.decoder.projection_ratio", 1e300),
    ("norm_eps", float("nan")), ("normalize", "false"),
])
def test_sizes_out_of_range_are_refused_before_building(tiny_model: Path, tmp_path: Path, dotted: str,
                                                         value: Any) -> None:
    model = with_conf(tiny_model, tmp_path / "m", dotted, value)
    message = load_error(model)
    assert str(model / "config.yaml") in message and f"model_conf.{dotted}" in message


@pytest.mark.parametrize("value", [
    "${oc.env:HOME}", "${oc.decode:'[1, 2]'}", "${modalities.audio.conv_pos_width}",
    "prefix ${oc.env:PATH} suffix",
])
def test_omegaconf_interpolations_are_refused(tiny_model: Path, tmp_path: Path, value: str) -> None:
    """funasr hands model_conf to OmegaConf.create, which resolves ${...} on access: reading the
    environment (into error messages clients see) or string-doubling bombs. Refused, naming the key."""
    model = with_conf(tiny_model, tmp_path / "m", "encoder_dropout", value)
    message = load_error(model)
    assert str(model / "config.yaml") in message and "model_conf.encoder_dropout" in message
    assert "interpolation" in message


def test_interpolation_bomb_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    config = config_of(tiny_model)
    conf = config["model_conf"]
    conf["b0"] = "x" * 64
    for i in range(1, 60):
        conf[f"b{i}"] = f"${{b{i - 1}}}${{b{i - 1}}}"
    conf["attention_dropout"] = "${b59}"
    write_config(model, config)
    message = child_error(model)
    assert str(model / "config.yaml") in message and "interpolation" in message


@pytest.mark.parametrize("name", ["Wav2Vec2", "emotion2vec", None, 42])
def test_another_model_class_is_refused(tiny_model: Path, tmp_path: Path, name: Any) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    config = config_of(tiny_model)
    config["model"] = name
    write_config(model, config)
    message = load_error(model)
    assert str(model / "config.yaml") in message and "Emotion2vec" in message


@pytest.mark.parametrize("conf", [[1, 2], "Emotion2vec", None, {"modalities": [1, 2]},
                                  {"modalities": {"audio": "AUDIO"}}])
def test_model_conf_of_the_wrong_shape_is_refused(tiny_model: Path, tmp_path: Path, conf: Any) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    config = config_of(tiny_model)
    if isinstance(conf, dict):
        config["model_conf"].update(conf)
    else:
        config["model_conf"] = conf
    write_config(model, config)
    message = load_error(model)
    assert str(model / "config.yaml") in message


@pytest.mark.parametrize("spec", [
    "__import__('os').system('touch /tmp/e2vd-hostile-spec')",
    "[(64, 10, 5)] * 10 ** 9",
    "[(64, 10, 5)] * 4 * 4 * 4 * 4",
    "[" * 200 + "]" * 200,
    "[(64, 10, 5)] + [(64, 3, 2)] * 4 + [(64, 2, 2)] + [(64, 2, 2)]" + " " * 1000,
    [[64, 10, 5]],
    "[(64, 10, 5), (64, 0, 2)]",
    "[(64, 10)]",
    "[]",
    "[(64.0, 10, 5)]",
    "[(True, 10, 5)]",
])
def test_strange_feature_encoder_specs_are_refused(tiny_model: Path, tmp_path: Path, spec: Any) -> None:
    model = with_conf(tiny_model, tmp_path / "m", "modalities.audio.feature_encoder_spec", spec)
    message = load_error(model)
    assert str(model / "config.yaml") in message and "feature_encoder_spec" in message
    assert not Path("/tmp/e2vd-hostile-spec").exists()


def test_feature_encoder_spec_as_a_plain_literal_loads(tiny_model: Path, tmp_path: Path) -> None:
    """The spec written out as one list literal is the same network: it loads."""
    spec = "[(64, 10, 5), (64, 3, 2), (64, 3, 2), (64, 3, 2), (64, 3, 2), (64, 2, 2), (64, 2, 2)]"
    model = with_conf(tiny_model, tmp_path / "m", "modalities.audio.feature_encoder_spec", spec)
    Engine.load(str(model), device="cpu")


def test_config_with_a_bom_loads(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    (model / "config.yaml").write_bytes(b"\xef\xbb\xbf" + (tiny_model / "config.yaml").read_bytes())
    Engine.load(str(model), device="cpu")
