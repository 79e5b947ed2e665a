"""Hostile model directories: everything e2vd reads from one (config.yaml, tokens.txt, model.pt)
crafted to run code, hang the load, exhaust memory or CPU, or crash the process.

Every case either loads correctly (the input was in fact harmless) or ends in e2vd's ModelError
naming the file, what is wrong and what to do; never another exception, a hang or a dead process.
Cases that could kill or hang pytest before the fix (SIGBUS, memory bombs, endless loops) load in
a child process (`load_in_child`) with a generous time limit, which only guards against a hang.
"""
from __future__ import annotations

import argparse
import collections
import copyreg
import functools
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


# -- model.pt -----------------------------------------------------------------------------------

class Call:
    """Unpickles as fn(*args): how a crafted checkpoint calls a global."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def checkpoint_of(tiny_model: Path) -> dict[str, Any]:
    return torch.load(tiny_model / "model.pt", weights_only=True)


def with_checkpoint(tiny_model: Path, dest: Path, ckpt: Any) -> Path:
    """A copy of the tiny model whose model.pt is torch.save(ckpt)."""
    model = copy_model(tiny_model, dest)
    torch.save(ckpt, model / "model.pt")
    return model


def with_extra(tiny_model: Path, dest: Path, extra: Any) -> Path:
    """A copy of the tiny model whose checkpoint also holds `extra` (under "extra")."""
    ckpt = checkpoint_of(tiny_model)
    ckpt["extra"] = extra
    return with_checkpoint(tiny_model, dest, ckpt)


def shared_tree(depth: int) -> list:
    """Lists of two references to the list below, `depth` deep: a few hundred bytes pickled,
    2**depth leaves when anything walks it as a tree (str(), a DictConfig's copy)."""
    node: list = ["x" * 8]
    for _ in range(depth):
        node = [node, node]
    return node


def dict_tree(depth: int) -> dict:
    node: dict = {"leaf": "x" * 8}
    for i in range(depth):
        node = {"a": node, "b": node}
    return node


@pytest.mark.parametrize("fn,args", [
    (os.system, ("touch /tmp/e2vd-hostile-pt",)),
    (eval, ("__import__('os').system('touch /tmp/e2vd-hostile-pt')",)),
    (exec, ("open('/tmp/e2vd-hostile-pt', 'w')",)),
    (getattr, ("x", "upper")),
    (subprocess.Popen, (["touch", "/tmp/e2vd-hostile-pt"],)),
    (torch.full, ((1 << 40,), 1.0)),
    (torch.load, ("/tmp/e2vd-hostile-pt",)),
    (torch.serialization.add_safe_globals, ([os.system],)),
    (functools.partial, (os.system, "touch /tmp/e2vd-hostile-pt")),
    (bytearray, (1 << 34,)),
    (collections.Counter, ("abc",)),
    (set, ([1, 2],)),
    (complex, (1, 2)),
    (collections.OrderedDict, ([("a", 1)],)),
    (torch._utils._rebuild_device_tensor_from_cpu_tensor, (torch.zeros(2), torch.float64, "cpu", False)),
])
def test_checkpoint_calling_anything_else_is_refused(tiny_model: Path, tmp_path: Path, fn: Any, args: tuple) -> None:
    """Code, torch functions, memory bombs (bytearray of 16 GiB of zeros, which torch's own
    weights_only allow-list lets a pickle call) and calls with arguments of what may only be
    named: refused before anything runs, naming what."""
    model = with_extra(tiny_model, tmp_path / "m", Call(fn, *args))
    message = child_error(model)
    assert str(model / "model.pt") in message and "refused" in message and "Nothing from it has run" in message
    assert not Path("/tmp/e2vd-hostile-pt").exists()


def test_omegaconf_internals_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    omegaconf = pytest.importorskip("omegaconf")
    model = with_extra(tiny_model, tmp_path / "m", Call(omegaconf.OmegaConf.create, {"a": 1}))
    message = load_error(model)
    assert "omegaconf.omegaconf.OmegaConf" in message and "refused" in message


@pytest.mark.parametrize("fn", [str, int, dict, list, argparse.Namespace, "DictConfig", "ListConfig", "AnyNode",
                                collections.defaultdict])
def test_allowed_config_globals_called_with_bombs_load_as_inert_stubs(tiny_model: Path, tmp_path: Path,
                                                                     fn: Any) -> None:
    """torch lets a pickle call every allowed global with arguments of its choosing: str() of a
    tree of shared lists spells out 2**60 leaves, DictConfig copies one node by node, int()
    refuses 5000 digits (ValueError). The configuration globals load as inert stubs instead:
    the model loads with its weights, nothing is expanded."""
    if isinstance(fn, str):
        omegaconf = pytest.importorskip("omegaconf")
        fn = {"DictConfig": omegaconf.DictConfig, "ListConfig": omegaconf.ListConfig,
              "AnyNode": omegaconf.nodes.AnyNode}[fn]
    arg = {int: "9" * 5000, dict: dict_tree(60), argparse.Namespace: shared_tree(60)}.get(fn, shared_tree(60))
    if fn is getattr(pytest.importorskip("omegaconf"), "DictConfig"):
        arg = dict_tree(60)
    model = with_extra(tiny_model, tmp_path / "m", Call(fn, arg))
    out = load_in_child(model)
    assert out["outcome"] == "loaded", out


def test_config_objects_with_broken_state_load_as_inert_stubs(tiny_model: Path, tmp_path: Path) -> None:
    """A DictConfig whose pickled state lacks what its __setstate__ reads (KeyError when rebuilt)."""
    omegaconf = pytest.importorskip("omegaconf")

    class Broken:
        @property
        def __class__(self):   # what pickle checks NEWOBJ's class against
            return omegaconf.DictConfig

        def __reduce__(self):
            return copyreg.__newobj__, (omegaconf.DictConfig,), {"junk": shared_tree(60)}

    model = with_extra(tiny_model, tmp_path / "m", Broken())
    out = load_in_child(model)
    assert out["outcome"] == "loaded", out


def test_deeply_nested_containers_are_data(tiny_model: Path, tmp_path: Path) -> None:
    """A pickle of 1,000,000 nested lists (2 MB): torch's unpickler is iterative and the scan
    too, so it is data (here: no weights, a ModelError), never a RecursionError or a crash."""
    model = copy_model(tiny_model, tmp_path / "m")
    depth = 1_000_000
    rewrite_zip(model / "model.pt", pickle_bytes=b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b".")
    message = child_error(model)
    assert str(model / "model.pt") in message and "no model weights" in message


def rebuilt(storage_of: torch.Tensor, size: tuple, stride: tuple, offset: int = 0) -> Call:
    """A tensor torch rebuilds from `storage_of`'s storage with the declared size and stride."""
    return Call(torch._utils._rebuild_tensor_v2, storage_of.untyped_storage(), offset, size, stride, False,
                collections.OrderedDict())


@pytest.mark.parametrize("size,stride", [
    ((1 << 40,), (1,)),         # far beyond its 16-byte storage
    ((1 << 50,), (0,)),         # 2**50 elements repeating one number: no memory until read
    ((1 << 20, 1 << 20), (0, 1)),
    ((4,), (1 << 40,)),
])
def test_tensor_larger_than_its_storage_is_refused(tiny_model: Path, tmp_path: Path, size: tuple,
                                                   stride: tuple) -> None:
    """Among the extras (never used by the model): reading it whole (page_in) would run forever."""
    ckpt = checkpoint_of(tiny_model)
    ckpt["model"]["d2v_model.junk"] = rebuilt(torch.zeros(4), size, stride)
    model = with_checkpoint(tiny_model, tmp_path / "m", ckpt)
    message = child_error(model)
    assert str(model / "model.pt") in message


def rewrite_zip(path: Path, compress: int | None = None, pickle_bytes: bytes | None = None) -> None:
    """Rewrite checkpoint `path`'s zip: every entry with `compress`, data.pkl replaced by `pickle_bytes`."""
    with zipfile.ZipFile(path) as z:
        entries = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as out:
        for info, data in entries:
            if pickle_bytes is not None and info.filename.endswith("/data.pkl"):
                data = pickle_bytes
            out.writestr(info.filename, data, compress_type=zipfile.ZIP_STORED if compress is None else compress)


def test_compressed_zip_bomb_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    """A deflated data.pkl of 256 MiB (a bomb's shape, 1000:1; 4 GiB took 20 s just to write) would be
    inflated into memory whole: any compressed entry is refused before anything is inflated."""
    model = copy_model(tiny_model, tmp_path / "m")
    path = model / "model.pt"
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for name in names:
            if name.endswith("/data.pkl"):
                with out.open(zipfile.ZipInfo(name), "w", force_zip64=True) as fh:
                    chunk = b"\x00" * (1 << 24)
                    for _ in range(16):
                        fh.write(chunk)
    message = child_error(model)
    assert str(path) in message and ("compressed" in message or "data.pkl" in message)


def test_compressed_entries_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    rewrite_zip(model / "model.pt", compress=zipfile.ZIP_DEFLATED)
    message = load_error(model)
    assert str(model / "model.pt") in message and "compressed" in message


def test_huge_declared_entry_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    """A central directory declaring an entry of 2**40 bytes in a small file."""
    model = copy_model(tiny_model, tmp_path / "m")
    path = model / "model.pt"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    central = data.rfind(b"PK\x01\x02" + bytes(data[data.rfind(b"PK\x01\x02"):][4:8]), 0)
    # find this entry's central directory record by its name and patch both sizes to 0xFFFFFFF0
    at = data.find(b"PK\x01\x02", data.find(b"PK\x05\x06") - 100000 if central < 0 else 0)
    while at >= 0:
        name_len = int.from_bytes(data[at + 28:at + 30], "little")
        if data[at + 46:at + 46 + name_len].decode() == info.filename:
            data[at + 20:at + 24] = data[at + 24:at + 28] = (0xFFFFFFF0).to_bytes(4, "little")
            break
        at = data.find(b"PK\x01\x02", at + 4)
    assert at >= 0
    path.write_bytes(bytes(data))
    message = child_error(model)
    assert str(path) in message


def test_not_a_zip_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    model = copy_model(tiny_model, tmp_path / "m")
    (model / "model.pt").write_bytes(pickle.dumps({"model": {}}))
    message = load_error(model)
    assert str(model / "model.pt") in message


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.bool, torch.uint8])
def test_weights_of_a_non_float_dtype_are_refused(tiny_model: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    ckpt = checkpoint_of(tiny_model)
    ckpt["model"]["proj.weight"] = ckpt["model"]["proj.weight"].to(dtype)
    model = with_checkpoint(tiny_model, tmp_path / "m", ckpt)
    message = load_error(model)
    assert str(model / "model.pt") in message and "proj.weight" in message and str(dtype) in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_of_another_float_dtype_load_as_fp32(tiny_model: Path, tmp_path: Path, dtype: torch.dtype) -> None:
    ckpt = checkpoint_of(tiny_model)
    ckpt["model"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    model = with_checkpoint(tiny_model, tmp_path / "m", ckpt)
    engine = Engine.load(str(model), device="cpu")
    expected = Engine.load(str(tiny_model), device="cpu")
    audio = from_samples(speechlike(1.0)[:, 0], 16000)
    got, want = engine.recognize(audio).scores, expected.recognize(audio).scores
    assert all(abs(a - b) < (1e-6 if dtype == torch.float64 else 5e-2) for a, b in zip(got, want))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 3e38])
def test_non_finite_weights_are_refused_at_load(tiny_model: Path, tmp_path: Path, value: float) -> None:
    ckpt = checkpoint_of(tiny_model)
    key = next(k for k in ckpt["model"] if k.endswith("blocks.0.attn.qkv.weight"))
    ckpt["model"][key][0, :] = value
    model = with_checkpoint(tiny_model, tmp_path / "m", ckpt)
    message = load_error(model)
    assert str(model / "model.pt") in message and key.removeprefix("d2v_model.") in message and "NaN" in message


def test_non_finite_values_in_unused_tensors_load(tiny_model: Path, tmp_path: Path) -> None:
    ckpt = checkpoint_of(tiny_model)
    ckpt["model"]["d2v_model.ema_junk"] = torch.full((4,), float("nan"))
    model = with_checkpoint(tiny_model, tmp_path / "m", ckpt)
    Engine.load(str(model), device="cpu")


def test_weights_that_overflow_on_audio_answer_a_clear_error(tiny_model: Path, tmp_path: Path) -> None:
    """Finite weights can still overflow to infinity on some audio: that request fails with
    NonFiniteResult saying so, never a NaN result (which JSON cannot carry)."""
    ckpt = checkpoint_of(tiny_model)
    key = "d2v_model.modality_encoders.AUDIO.project_features.2.weight"
    weight = torch.full_like(ckpt["model"][key], 1e33)
    weight[:, 1::2] = -1e33   # finite sums in the file; a layer norm's variance overflows on audio
    ckpt["model"][key] = weight
    model = with_checkpoint(tiny_model, tmp_path / "m", ckpt)
    engine = Engine.load(str(model), device="cpu")
    with pytest.raises(engine_mod.NonFiniteResult, match="NaN or infinite"):
        engine.recognize(from_samples(speechlike(1.0)[:, 0], 16000))


def test_meta_and_sparse_tensors_are_refused(tiny_model: Path, tmp_path: Path) -> None:
    ckpt = checkpoint_of(tiny_model)
    ckpt["model"]["proj.weight"] = ckpt["model"]["proj.weight"].to_sparse()
    model = with_checkpoint(tiny_model, tmp_path / "m", ckpt)
    message = load_error(model)
    assert str(model / "model.pt") in message and "_rebuild_sparse_tensor" in message
    ckpt["model"]["proj.weight"] = torch.empty(9, 64, device="meta")
    model = with_checkpoint(tiny_model, tmp_path / "m2", ckpt)
    message = load_error(model)
    assert str(model / "model.pt") in message and "_rebuild_meta_tensor_no_storage" in message


def test_missing_and_wrong_shaped_keys_are_refused_extra_keys_ignored(tiny_model: Path, tmp_path: Path) -> None:
    ckpt = checkpoint_of(tiny_model)
    del ckpt["model"]["proj.bias"]
    message = load_error(with_checkpoint(tiny_model, tmp_path / "a", ckpt))
    assert "lacks 1" in message and "proj.bias" in message
    ckpt = checkpoint_of(tiny_model)
    ckpt["model"]["proj.bias"] = torch.zeros(10)
    message = load_error(with_checkpoint(tiny_model, tmp_path / "b", ckpt))
    assert "proj.bias" in message and "shape" in message
    ckpt = checkpoint_of(tiny_model)
    ckpt["model"]["d2v_model.something_else.weight"] = torch.zeros(3)
    Engine.load(str(with_checkpoint(tiny_model, tmp_path / "c", ckpt)), device="cpu")


@pytest.mark.parametrize("layout", ["flat", "state_dict", "module", "list", "weights_elsewhere", "tensor"])
def test_state_dict_under_odd_names(tiny_model: Path, tmp_path: Path, layout: str) -> None:
    weights = checkpoint_of(tiny_model)["model"]
    ckpt: Any = {
        "flat": weights,
        "state_dict": {"state_dict": weights},
        "module": {"module": weights},
        "list": {"model": list(weights.values())},
        "weights_elsewhere": {"model": {"note": "elsewhere"}, "ema": weights},
        "tensor": weights["proj.weight"],
    }[layout]
    model = with_checkpoint(tiny_model, tmp_path / "m", ckpt)
    if layout in ("flat", "state_dict"):
        Engine.load(str(model), device="cpu")
    else:
        message = load_error(model)
        assert str(model / "model.pt") in message
