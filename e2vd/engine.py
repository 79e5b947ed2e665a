"""The model: resolve, validate, load and run emotion2vec+ with funasr's own `Emotion2vec` class.

This is the only runtime module that imports funasr or modelscope. What it does differently from
funasr's `AutoModel`, and why:

* It imports only ``funasr.models.emotion2vec.model`` (0.5 s), not the whole funasr package
  (~400 modules, ~10 s), and leaves ``sys.modules`` as it found it so that a later
  ``from funasr import AutoModel`` in the same process still gets the complete package.
* It checks the model directory before loading: funasr silently runs with *random weights* when
  ``model.pt`` is missing, and mislabels results when ``tokens.txt`` is odd.
* It memory-maps the checkpoint (``torch.load(weights_only=True, mmap=True)``) and assigns the
  weights to a model built on the ``meta`` device: the ~1.3 GB optimizer state of the real
  ``model.pt`` is never read, nothing is deep-copied, nothing is randomly initialised first.
  A thread maps the checkpoint and pages its tensors in while the model is built
  (`load_model`), and Python's garbage collector is paused during the load (`gc_paused`).
* A model directory is data: nothing in it may run code. Checkpoints are only ever unpickled by
  torch's weights_only unpickler; the configuration objects of training runs (argparse
  ``Namespace``, omegaconf containers: `CONFIG_GLOBALS`) are allowed for that one load, and a
  checkpoint naming any other global is refused with a ModelError that names it. funasr
  ``eval()``s config.yaml's ``feature_encoder_spec``: it is read as a literal instead
  (`feature_layers`), and the numbers that size the network are bounded (`CONFIG_LIMITS`), so a
  damaged or hostile config.yaml is a ModelError, never code run or a network too big to build.
* It runs the very same forward pass as ``Emotion2vec.inference`` (waveform layer norm, mean over
  frames, ``proj``, softmax) on samples it gets from `e2vd.audio`, so a clip's results equal
  ``AutoModel.generate`` on the same samples (tests/test_engine.py proves it).
* On a GPU, clips of different lengths share a forward pass ("padded" batching): each is
  layer-normed over its own samples, zero-padded to the longest, and the padding is masked
  everywhere it could reach a clip's own frames: funasr's ``padding_mask`` for attention, and the
  zero padding of the convolutional positional encoder, which funasr does not mask
  (`PositionalConvMask`). Each clip is averaged over its own frames. Results equal one-by-one
  inference within 1e-5 (fp32). Models or settings where padding cannot be made exact batch less
  (`batching_mode`); on the CPU, where batches run slower, only equal lengths share a pass unless
  asked (`choose_batching`).

`Engine` is not thread-safe: call it from one thread (the daemon's inference worker).
"""
from __future__ import annotations

import _compat_pickle
import ast
import contextlib
import copy
import gc
import importlib
import importlib.util
import io
import logging
import os
import pickletools
import stat
import sys
import threading
import time
import types
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from e2vd.audio import Audio, check_duration, decode
from e2vd.config import MODEL_ID_PATTERN, Settings
from e2vd.gpu import GpuOutOfMemory, choose_device, cpu_instead, device_memory
from e2vd.gpu_lock import GpuLock, GpuLockTimeout
from e2vd.model_files import ModelError, check_model_files
from e2vd.result import Recognition
from e2vd.vocabulary import DTYPES, LABELS, Granularity

log = logging.getLogger(__name__)

DEFAULT_MODEL = Settings.model
#: ModelScope revision (git tag) of iic/emotion2vec_plus_large that e2vd is pinned to: the tag
#: FunASR users pin (``model_revision="v2.0.5"``); a new upstream upload cannot change results.
DEFAULT_REVISION = "v2.0.5"
#: Frames per second of the model's output (320x convolutional down-sampling of 16 kHz audio).
FRAME_RATE_HZ = 50
#: torch's type for each precision name of `e2vd.vocabulary.DTYPES` (tests/test_vocabulary.py
#: checks that the keys are exactly those names).
_TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16,
                                         "bf16": torch.bfloat16}
_IMPORT_LOCK = threading.Lock()


class NonFiniteResult(RuntimeError):
    """The loaded model computed NaN or infinity for a request (weights that overflow on its
    audio); the message says so. Raised instead of a result that JSON cannot carry."""


# ----------------------------------------------------------------------------------------------
# Importing funasr's model class without importing all of funasr


def new_emotion2vec(model_conf: dict[str, Any], vocab_size: int) -> torch.nn.Module:
    """Instantiate funasr's `Emotion2vec(model_conf=..., vocab_size=...)`, importing little of funasr.

    ``import funasr`` runs ``funasr/__init__.py``, which imports every funasr module (~10 s). The
    class only needs ``funasr.models.emotion2vec.*``, ``funasr.register`` and
    ``funasr.utils.load_utils``. Those are imported under a temporary, empty ``funasr`` package
    whose ``__path__`` is the real one, and the model is built inside that window too (its blocks
    import ``funasr.models.emotion2vec.timm_modules`` lazily). Afterwards every ``funasr*`` entry
    added to ``sys.modules`` is removed again, so a later ``import funasr`` runs the real package
    from scratch. funasr's import-time print ("Notice: ffmpeg is not installed ...") is swallowed
    and the root logger's handlers and level are kept. Construction honours the caller's
    ``torch.device(...)`` context and random seed.
    """
    with _IMPORT_LOCK:
        # funasr already imported (e.g. the user's `from funasr import AutoModel`): use it as it is
        light = "funasr" not in sys.modules
        with _light_funasr() if light else contextlib.nullcontext(), _quiet_import():
            cls = importlib.import_module("funasr.models.emotion2vec.model").Emotion2vec
            return cls(model_conf=model_conf, vocab_size=vocab_size)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                   "orthogonal_")


@contextlib.contextmanager
def skip_weight_init():
    """Within the block, ``torch.nn.init`` functions leave tensors as they are.

    For building a model whose weights are assigned from a checkpoint right after: random
    initialisation is wasted work, and on the ``meta`` device ``normal_`` even imports
    ``torch._dynamo`` (~4 s). Not thread-safe: modules built by other threads meanwhile are
    not initialised either (the engine builds under a lock, once per process).
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, _keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


@contextlib.contextmanager
def gc_paused():
    """Within the block, Python's cyclic garbage collector does not run (it is enabled again after,
    if it was). Loading allocates tens of thousands of objects on top of torch's ~170,000, enough
    to set off a full collection that walks all of them: ~0.08 s of the cold start on the 2-core
    CPU, for no garbage worth collecting. Process-wide: other threads' allocations are not
    collected meanwhile either (reference counting still frees what they drop)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Stand-in for a torch.nn.init function: return `tensor` unchanged."""
    return tensor


@contextlib.contextmanager
def _light_funasr():
    """Within the block, ``funasr`` is an empty package: importing a submodule skips its __init__."""
    spec = importlib.util.find_spec("funasr")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("funasr is not installed in this Python: install e2vd's dependencies "
                         "(pip install -e .) and try again")
    stub = types.ModuleType("funasr")
    stub.__path__ = list(spec.submodule_search_locations)
    before = set(sys.modules)
    sys.modules["funasr"] = stub
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            if name == "funasr" or name.startswith("funasr."):
                del sys.modules[name]


@contextlib.contextmanager
def _quiet_import():
    """Swallow stdout and keep the root logger's handlers and level while funasr modules import."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


# ----------------------------------------------------------------------------------------------
# Resolving and validating the model directory


def resolve_model(model: str, cache_dir: str | None = None,
                  revision: str = DEFAULT_REVISION) -> tuple[Path, str]:
    """Return (model directory, model id) for `model`.

    `model` is the path of a local model directory, absolute or explicitly relative ("./dir";
    used as is, never touching the network), or a ModelScope id "owner/name" that `e2vd pull`
    placed at the pinned `revision` in `cache_dir` (default ``$XDG_CACHE_HOME/e2vd`` or
    ``~/.cache/e2vd``); one not pulled is a ModelError naming ``sudo e2vd pull ID``.
    A relative "owner/name" that also exists as a local directory is refused as ambiguous rather
    than silently taken.
    """
    if not model or not model.strip():
        raise ModelError("no model given: set E2VD_MODEL (or `model` in /etc/e2vd/e2vd.toml) to an "
                         f"absolute model directory or a ModelScope id such as {DEFAULT_MODEL}")
    expanded = os.path.expanduser(model)
    if os.path.isabs(expanded) or model.startswith(("./", "../")):
        try:
            path = Path(expanded).resolve()
        except (RuntimeError, OSError) as err:   # a symbolic link loop (RuntimeError in Python 3.11)
            raise ModelError(f"model directory {model} cannot be resolved: it is a symbolic link loop "
                             f"({err}); point it at a real directory holding config.yaml, model.pt and "
                             "tokens.txt") from None
        if path.is_file():
            raise ModelError(f"model directory {path} is a file, not a directory: set it to the directory "
                             "holding config.yaml, model.pt and tokens.txt")
        if not path.is_dir():
            raise ModelError(f"model directory {path} does not exist (or is not a directory): set "
                             "E2VD_MODEL to a directory holding config.yaml, model.pt and tokens.txt")
        return path, str(path)
    if not MODEL_ID_PATTERN.fullmatch(model):
        raise ModelError(f"model {model!r} is neither an absolute directory nor a ModelScope id "
                         f"'owner/name' (like {DEFAULT_MODEL}): give an absolute path or an id")
    if os.path.exists(model):
        raise ModelError(f"model {model!r} is ambiguous: it looks like a ModelScope id but also "
                         f"exists here as {os.path.abspath(model)}; give the absolute path "
                         f"({os.path.abspath(model)}) to use the local directory")
    return _download(model, revision, _cache_root(cache_dir)), model


def _cache_root(cache_dir: str | None) -> Path:
    """The directory models are downloaded into."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "e2vd"


def _download(model_id: str, revision: str, cache_root: Path) -> Path:
    """Return the pulled copy of `model_id` at `revision` in `cache_root`; never downloads.

    A model is there when ``cache_root/models/ID/REVISION`` holds model.pt and the
    ``.e2vd-complete`` marker, which `e2vd pull` writes only after every file's size and SHA-256
    matched the hub's listing (e2vd.pull). Otherwise ModelError saying which command to run:
    the daemon runs without network access (PrivateNetwork=yes), so it could not fetch it anyway.
    """
    target = cache_root / "models" / model_id / revision
    if (target / "model.pt").is_file() and (target / ".e2vd-complete").is_file():
        return target
    unfinished = (target.parent / f".{revision}.partial").is_dir()
    # another cache than the default's (an instance's /var/cache/e2vd-NAME): a plain pull would miss it
    where = "" if str(cache_root) == Settings.cache_dir else f" --cache-dir {cache_root}"
    raise ModelError(f"model {model_id} (revision {revision}) has not been pulled into {cache_root}"
                     + (" (a pull was started and not finished)" if unfinished else "")
                     + f"; the daemon never downloads. run: sudo e2vd pull {model_id}{where}")


def read_tokens(model_dir: Path) -> list[str]:
    """Validate `model_dir` and return its 9 label strings from tokens.txt.

    Raises ModelError naming the file when config.yaml, model.pt or tokens.txt is missing or odd.
    """
    tokens = model_dir / "tokens.txt"
    check_model_files(model_dir)
    try:
        lines = _small_text(tokens, "the model's tokens.txt").splitlines()
    except UnicodeDecodeError as err:
        raise ModelError(f"{tokens} is not UTF-8 text ({err}); copy the model's tokens.txt again") from err
    labels = [line.strip() for line in lines if line.strip()]
    if len(labels) != len(LABELS):
        raise ModelError(f"{tokens} has {len(labels)} labels, expected {len(LABELS)} "
                         f"({', '.join(LABELS)}): this is not an emotion2vec+ model directory")
    for i, (token, expected) in enumerate(zip(labels, LABELS)):
        if len(token) > MAX_LABEL_CHARS or not token.isprintable():
            raise ModelError(f"{tokens} line {i + 1} ({token[:40]!r}) is not a label: labels are at most "
                             f"{MAX_LABEL_CHARS} characters without control characters (every client "
                             "receives them); copy the model's tokens.txt again")
        if english_label(token) != expected:
            raise ModelError(f"{tokens} line {i + 1} is {token!r}, expected the {expected!r} label "
                             "there: the labels are missing or in another order than emotion2vec+'s")
    return labels


#: The longest label tokens.txt may hold (the real ones: up to 12 characters, "吃惊/surprised").
MAX_LABEL_CHARS = 64


def english_label(token: str) -> str:
    """Map a model label string ("生气/angry", "<unk>") to its English name ("angry", "unknown")."""
    if token == "<unk>":
        return "unknown"
    return token.rsplit("/", 1)[-1].strip().lower()


def read_config(model_dir: Path) -> dict[str, Any]:
    """Parse config.yaml of `model_dir`; it must describe an `Emotion2vec` model."""
    import yaml

    path = model_dir / "config.yaml"
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster
        config = yaml.load(_small_text(path, "the model's config.yaml"), Loader=loader)  # noqa: S506 - safe
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, OverflowError, RecursionError, TypeError) as err:
        # ValueError: an integer of more than 4300 digits; RecursionError: collections nested too deeply
        raise ModelError(f"{path} is not valid YAML ({type(err).__name__}: {str(err)[:300]}); copy the "
                         "model's config.yaml again") from None
    if _nodes_over(config, MAX_CONFIG_NODES):
        raise ModelError(f"{path} denotes more than {MAX_CONFIG_NODES} values (YAML aliases repeating one "
                         "another, or a file that is not a model's config): copy the model's config.yaml again")
    if not isinstance(config, dict) or config.get("model") != "Emotion2vec" \
            or not isinstance(config.get("model_conf"), dict):
        raise ModelError(f"{path} does not describe an Emotion2vec model (need `model: Emotion2vec` "
                         "and `model_conf`): point E2VD_MODEL at an emotion2vec+ directory")
    _check_sizes(config["model_conf"], path)
    return config


#: The largest config.yaml or tokens.txt read (the real ones: ~6 KB and ~100 bytes).
MAX_TEXT_BYTES = 1 << 20
#: The most values config.yaml may denote, aliases counted at each use (the real one: ~400):
#: YAML aliases can repeat one another into billions of values in a few hundred bytes.
MAX_CONFIG_NODES = 100_000


def _small_text(path: Path, what: str) -> str:
    """The UTF-8 text of regular file `path` (`what` names it in the fix), without a leading byte
    order mark; refused (ModelError) beyond MAX_TEXT_BYTES without reading more than that, or when
    it is no longer a regular file once opened (opened non-blocking: a FIFO put there meanwhile
    cannot stall the load). Raises UnicodeDecodeError for bytes that are not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ModelError(f"{path} is not a regular file: it is not {what}; copy it again")
            data = fh.read(MAX_TEXT_BYTES + 1)
    except OSError as err:
        raise ModelError(f"{path} cannot be read ({err.strerror or err}): it should be {what}; "
                         "copy it again") from None
    if len(data) > MAX_TEXT_BYTES:
        raise ModelError(f"{path} is larger than {MAX_TEXT_BYTES} bytes, far more than {what} holds: it is "
                         f"not {what}; copy it again")
    return data.decode("utf-8").removeprefix("\ufeff")


def _nodes_over(doc: Any, limit: int) -> bool:
    """Whether `doc` (loaded YAML) holds more than `limit` values, a shared one counted at each
    place it appears; stops counting past `limit`, so an alias bomb costs no more than that."""
    stack, count = [doc], 0
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            return True
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


#: The largest value config.yaml may give each number that sizes the network ("a.b" is key b
#: of the mapping a in model_conf). The published large model has embed_dim 1024, depth 8, 16
#: heads; these leave room for any real model and refuse a damaged or hostile config.yaml before
#: the network is built (a depth of 20 000 alone took 1.4 GB and 16 s on the meta device; funasr
#: builds conv_pos_depth and projection_layers layers in Python loops too).
#: Widths, kernels and group counts must be at least 1; layer counts may be 0 (no such layers).
CONFIG_LIMITS: dict[str, tuple[int, int]] = {
    "embed_dim": (1, 16384), "depth": (0, 256), "num_heads": (1, 256),
    "modalities.audio.model_depth": (0, 256), "modalities.audio.prenet_depth": (0, 256),
    "modalities.audio.num_alibi_heads": (0, 256), "modalities.audio.decoder.decoder_dim": (1, 16384),
    "modalities.audio.decoder.decoder_layers": (0, 256),
    "modalities.audio.conv_pos_depth": (1, 256), "modalities.audio.conv_pos_width": (1, 65536),
    "modalities.audio.conv_pos_groups": (1, 16384), "modalities.audio.num_extra_tokens": (0, 65536),
    "modalities.audio.decoder.decoder_kernel": (1, 65536),
    "modalities.audio.decoder.decoder_groups": (1, 16384),
    "modalities.audio.decoder.projection_layers": (0, 256),
}
#: The range of each real number of config.yaml that sizes the network or its arithmetic
#: (emotion2vec+: mlp_ratio 4.0, projection_ratio 2.0, norm_eps 1e-05); a whole number is
#: accepted too. NaN, infinities and strings are refused.
CONFIG_REAL_LIMITS: dict[str, tuple[float, float]] = {
    "mlp_ratio": (1e-3, 64.0), "modalities.audio.decoder.projection_ratio": (1e-3, 64.0),
    "norm_eps": (0.0, 1.0),
}
#: Switches of config.yaml that must be true or false: funasr tests them for truth, so a string
#: such as "false" would silently build or run another network (`normalize` changes every result
#: without changing a single weight).
CONFIG_SWITCHES: tuple[str, ...] = (
    "normalize", "layer_norm_first", "norm_affine", "end_of_block_targets",
    "modalities.audio.conv_pos_pre_ln", "modalities.audio.use_alibi_encoder",
    "modalities.audio.learned_alibi", "modalities.audio.learned_alibi_scale_per_head",
    "modalities.audio.learned_alibi_scale_per_layer",
)
#: feature_encoder_spec: at most this many convolution layers, each number at most MAX_CONV.
MAX_FEATURE_LAYERS = 64
MAX_CONV = 65536
FEATURE_SPEC_KEY = "modalities.audio.feature_encoder_spec"


def _check_sizes(model_conf: dict[str, Any], path: Path) -> None:
    """Refuse (ModelError naming `path` and the key) a config.yaml whose sizes are not whole
    numbers within CONFIG_LIMITS, and make its feature_encoder_spec a plain literal.

    funasr `eval()`s feature_encoder_spec (a Python expression such as "[(512, 10, 5)] +
    [(512, 3, 2)] * 4"): a config.yaml is data, so the expression is read here with
    `feature_layers` (list and tuple literals of whole numbers, + and * only; nothing runs) and
    written back as the literal list it denotes. Keys that are absent keep funasr's defaults."""
    fix = "copy the model's config.yaml again (it is damaged, or not an emotion2vec+ config)"
    interpolated = _interpolation(model_conf)
    if interpolated is not None:
        dotted, text = interpolated
        raise ModelError(f"{path}: model_conf.{dotted} is {text[:80]!r}, an omegaconf interpolation (${{...}}): "
                         "funasr would resolve it while building the network (reading the environment, "
                         f"other keys or resolvers); a model's config holds plain values only. {fix}")
    for dotted, (low, high) in CONFIG_LIMITS.items():
        found, value = _dotted(model_conf, dotted)
        if found and (type(value) is not int or not low <= value <= high):
            raise ModelError(f"{path}: model_conf.{dotted} is {_shown(value)}, expected a whole number "
                             f"from {low} to {high}; {fix}")
    for dotted, (low_f, high_f) in CONFIG_REAL_LIMITS.items():
        found, value = _dotted(model_conf, dotted)
        if found and (type(value) not in (int, float) or not low_f <= value <= high_f):
            raise ModelError(f"{path}: model_conf.{dotted} is {_shown(value)}, expected a number from "
                             f"{low_f:g} to {high_f:g}; {fix}")
    for dotted in CONFIG_SWITCHES:
        found, value = _dotted(model_conf, dotted)
        if found and type(value) is not bool:
            raise ModelError(f"{path}: model_conf.{dotted} is {_shown(value)}, expected true or false "
                             f"(funasr would take any other value for true); {fix}")
    found, spec = _dotted(model_conf, FEATURE_SPEC_KEY)
    if found:
        try:
            layers = feature_layers(spec)
        except ValueError as err:
            raise ModelError(f"{path}: model_conf.{FEATURE_SPEC_KEY} {str(spec)[:120]!r} is refused: {err}; "
                             f"{fix}") from None
        model_conf["modalities"]["audio"]["feature_encoder_spec"] = repr(layers)


def _shown(value: Any) -> str:
    """`value` as an operator's message quotes it: its repr, at most 40 characters."""
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    if type(value) is int and value.bit_length() > 128:
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    return repr(value)[:40]


def _interpolation(node: Any, prefix: str = "") -> tuple[str, str] | None:
    """(dotted key, text) of the first string in `node` (config.yaml's model_conf, already bounded
    by MAX_CONFIG_NODES) that omegaconf would take for an interpolation ("${...}"); None if none."""
    stack: list[tuple[str, Any]] = [(prefix, node)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str) and "${" in item:
            return where, item
        if isinstance(item, dict):
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    return None


def _dotted(mapping: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """(found, value) of key path "a.b.c" in nested mappings."""
    node: Any = mapping
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def feature_layers(spec: object) -> list[tuple[int, int, int]]:
    """The (channels, kernel, stride) layers that the expression `spec` denotes, read without
    running it: list and tuple literals of whole numbers, joined by + (lists) and * (a list
    times a whole number). 1 to MAX_FEATURE_LAYERS layers of three numbers from 1 to MAX_CONV;
    ValueError saying what is wrong otherwise."""
    if not isinstance(spec, str) or len(spec) > 500:
        raise ValueError("it must be a short string like \"[(512, 10, 5)] + [(512, 3, 2)] * 4\"")
    try:
        tree = ast.parse(spec, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError("it is not an expression of list literals") from None

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= MAX_CONV:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) <= MAX_FEATURE_LAYERS:
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list) \
                    and len(left) + len(right) <= MAX_FEATURE_LAYERS:
                return left + right
            if isinstance(node.op, ast.Mult) and isinstance(left, list) and type(right) is int \
                    and len(left) * right <= MAX_FEATURE_LAYERS:
                return left * right
        raise ValueError(f"only list and tuple literals of whole numbers joined by + and * are accepted, "
                         f"with at most {MAX_FEATURE_LAYERS} layers (nothing in it was run)")

    try:
        layers = value(tree.body)
    except RecursionError:
        raise ValueError("it nests too deeply") from None
    if (not isinstance(layers, list) or not layers
            or not all(isinstance(t, tuple) and len(t) == 3 and all(1 <= n <= MAX_CONV for n in t) for t in layers)):
        raise ValueError(f"it must be a list of 1 to {MAX_FEATURE_LAYERS} (channels, kernel, stride) "
                         f"layers, each number from 1 to {MAX_CONV}")
    return layers


# ----------------------------------------------------------------------------------------------
# Loading weights


#: Globals, as "module.name", that a checkpoint may pickle besides tensors and plain containers:
#: the configuration objects of training runs (fairseq's argparse.Namespace; omegaconf's
#: DictConfig/ListConfig with the metadata, nodes and plain types they record). They are never
#: rebuilt: each loads as an inert `ConfigStub` that keeps what the pickle gave it and calls
#: nothing, since torch's weights_only unpickler lets a pickle *call* every allowed global with
#: arguments of its choosing (``str`` of a list of lists sharing one another spells out 2**60
#: characters; ``DictConfig`` copies such a tree node by node) and runs their ``__setstate__``.
#: The engine needs only the tensors; omegaconf need not even be installed.
CONFIG_GLOBALS: frozenset[str] = frozenset({
    "argparse.Namespace",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode",
    "typing.Any", "collections.defaultdict",
    "builtins.dict", "builtins.list", "builtins.int", "builtins.float", "builtins.str",
    "builtins.bool",
})
#: What torch.save writes for tensors and state dicts, and all a checkpoint's pickle may name
#: besides CONFIG_GLOBALS: torch's own weights_only allow-list is far wider (builtins.bytearray
#: of 2**34 zeroed bytes, collections.Counter or set iterating a 2**40-element tensor that
#: repeats one number, device and wrapper-subclass rebuilders), so `scan_pickle` checks the
#: pickle against this list, without running it, before torch reads it.
TENSOR_GLOBALS: frozenset[str] = frozenset({
    "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
    "torch.device", "torch.Size",
} | {f"torch.{name}Storage" for name in (
    "Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
    "ComplexFloat", "ComplexDouble")})
#: The globals among TENSOR_GLOBALS and CONFIG_GLOBALS that the pickle may call, and with what:
#: None - any arguments; "()" - no arguments only (``OrderedDict()``, filled item by item after).
_CALLABLE: dict[str, str | None] = {
    "torch._utils._rebuild_tensor_v2": None, "torch._utils._rebuild_parameter": None,
    "torch.device": None, "collections.OrderedDict": "()", **{name: None for name in CONFIG_GLOBALS},
}
#: The largest data.pkl (the pickle that lists a checkpoint's objects; the real model.pt's is a
#: few hundred KB) and the most zip entries read: beyond them a file is not a model's checkpoint.
MAX_PICKLE_BYTES = 64 << 20
MAX_ARCHIVE_ENTRIES = 1 << 16


class ConfigStub:
    """An inert stand-in for one of CONFIG_GLOBALS in a loaded checkpoint: it records the
    arguments and state the pickle gave it and never calls, copies or prints them. One subclass
    per global (`stub_for`); `pickled_name` is the "module.name" the pickle used."""

    pickled_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "ConfigStub":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.pickled_name}, not rebuilt>"


_STUBS: dict[str, type[ConfigStub]] = {}


def stub_for(name: str) -> type[ConfigStub]:
    """The `ConfigStub` subclass standing in for global `name` (one of CONFIG_GLOBALS)."""
    if name not in _STUBS:
        _STUBS[name] = type(name.rpartition(".")[2], (ConfigStub,), {"pickled_name": name})
    return _STUBS[name]


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Return the model weights of checkpoint `path`, keyed like `Emotion2vec.state_dict()`.

    The file is memory-mapped, so only the tensors the model uses are ever read from disk; the
    optimizer state in the same file is not. Keys are remapped like funasr's scope_map
    ``['d2v_model.', none]``: ``d2v_model.X`` -> ``X``; ``proj.*`` stays. Every tensor is checked
    to be plain CPU data (`check_tensor`). On the CPU the model keeps using the mapped file:
    replace model.pt by renaming a new file over it, never by rewriting it in place while a
    daemon runs (the daemon would see the new bytes or SIGBUS).
    """
    ckpt = load_checkpoint(path)
    state = ckpt
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} holds no model weights (no 'model' dict of tensors): "
                         "copy the model's model.pt again")
    weights = {k.removeprefix("d2v_model."): v for k, v in state.items()
               if isinstance(k, str) and isinstance(v, torch.Tensor)}
    for key, tensor in weights.items():
        check_tensor(path, key, tensor)
    return weights


def check_tensor(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse (ModelError naming `path` and `key`) a tensor that is not plain CPU data within its
    storage: another layout or device (sparse, meta, quantized, nested), or more elements than
    its storage holds (strides of 0 repeat one number 2**40 times without memory, until
    something reads them all)."""
    fix = "copy the model's model.pt again"
    if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.is_quantized \
            or tensor.is_nested or type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        raise ModelError(f"{path}: tensor {key} is not plain data ({type(tensor).__name__}, layout "
                         f"{tensor.layout}, device {tensor.device}); {fix}")
    elements = tensor.numel()
    if elements * tensor.element_size() > tensor.untyped_storage().nbytes():
        raise ModelError(f"{path}: tensor {key} declares {elements} elements of shape {tuple(tensor.shape)} "
                         f"but holds {tensor.untyped_storage().nbytes()} bytes; {fix}")


def load_checkpoint(path: Path) -> Any:
    """Unpickle checkpoint `path`, memory-mapped, without running any code from it.

    First its zip archive and pickle are checked without running anything (`check_archive`,
    `scan_pickle`): it may name only TENSOR_GLOBALS and CONFIG_GLOBALS, and call only some of
    them; anything else is refused with ModelError naming the file and those globals. Then
    ``torch.load(weights_only=True, mmap=True)`` reads it with each of CONFIG_GLOBALS it names
    loaded as an inert `ConfigStub` (within `torch.serialization.safe_globals`: the process-wide
    allow-list is untouched). Any failure is a ModelError naming the file.
    """
    named = scan_pickle(path, check_archive(path))
    configs = sorted(named & CONFIG_GLOBALS)
    try:
        ckpt = _load_weights_only(path, [(stub_for(name), name) for name in configs])
    except ModelError:
        raise
    except Exception as err:  # noqa: BLE001 - zip, storage and format errors of a broken file
        raise ModelError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{str(err)[:300]}); the file is truncated or corrupt: copy the model's "
                         "model.pt again") from None
    if configs:
        log.info("%s pickles configuration objects (%s): skipped them, keeping only the tensors",
                 path, ", ".join(configs))
    return ckpt


def _load_weights_only(path: Path, allowed: list[tuple[Any, str]]) -> Any:
    """``torch.load`` of `path` onto the CPU, weights_only and memory-mapped, with `allowed`
    (object, "module.name") pairs added to torch's allow-list for this call only."""
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def check_archive(path: Path) -> bytes:
    """The pickle (data.pkl) of checkpoint `path`, once its zip archive is known to be what
    torch.save writes: at most MAX_ARCHIVE_ENTRIES entries, each stored uncompressed (a
    compressed entry would be inflated into memory whatever its size: a zip bomb; mmap needs
    the bytes as they are) and lying wholly within the file, data.pkl at most MAX_PICKLE_BYTES.
    ModelError naming the file otherwise."""
    fix = "the file is truncated, corrupt or not written by torch.save: copy the model's model.pt again"
    try:
        size = os.path.getsize(path)
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            if len(entries) > MAX_ARCHIVE_ENTRIES:
                raise ModelError(f"{path} holds {len(entries)} zip entries, more than a checkpoint's "
                                 f"{MAX_ARCHIVE_ENTRIES}; {fix}")
            for entry in entries:
                if entry.compress_type != zipfile.ZIP_STORED or entry.file_size != entry.compress_size:
                    raise ModelError(f"{path}: zip entry {entry.filename[:100]!r} is compressed; {fix}")
                if entry.header_offset + entry.file_size > size:
                    raise ModelError(f"{path}: zip entry {entry.filename[:100]!r} claims {entry.file_size} "
                                     f"bytes beyond the file's end ({size} bytes); {fix}")
            pickles = [e for e in entries if e.filename.endswith("/data.pkl") and e.filename.count("/") == 1]
            if len(pickles) != 1:
                raise ModelError(f"{path} is not a PyTorch checkpoint (no single data.pkl); {fix}")
            if pickles[0].file_size > MAX_PICKLE_BYTES:
                raise ModelError(f"{path}: data.pkl is {pickles[0].file_size} bytes, more than a model's "
                                 f"{MAX_PICKLE_BYTES}; {fix}")
            return archive.read(pickles[0])
    except ModelError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as err:
        raise ModelError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: "
                         f"{str(err)[:200]}); {fix}") from None


def scan_pickle(path: Path, data: bytes) -> set[str]:
    """The "module.name" globals that pickle `data` (checkpoint `path`'s data.pkl) names, once it
    is known, without running it, to name only TENSOR_GLOBALS and CONFIG_GLOBALS and to call
    only those in _CALLABLE the way they allow (OrderedDict with no arguments).

    Follows the pickle's stack and memo by kind of object (a global's name, the empty tuple, or
    any other value), opcode by opcode as torch's weights_only unpickler runs them; a call of
    anything else, or of something that is not a global, is refused with ModelError."""
    stack: list[str] = []
    marks: list[int] = []
    memo: dict[Any, str] = {}
    named: set[str] = set()
    refused: list[str] = []
    allowed = TENSOR_GLOBALS | CONFIG_GLOBALS
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "GLOBAL":
                full = _global_name(*str(arg).split(" ", 1))
                named.add(full)
                if full not in allowed:
                    refused.append(full)
                stack.append("g:" + full)
            elif name in ("REDUCE", "NEWOBJ"):
                args, fn = stack.pop(), stack.pop()
                rule = _CALLABLE.get(fn[2:], "-") if fn.startswith("g:") else "-"
                if name == "NEWOBJ" and fn[2:] not in CONFIG_GLOBALS:
                    rule = "-"
                if rule == "-" or (rule == "()" and args != "()"):
                    refused.append(f"a call of {fn[2:] if fn.startswith('g:') else 'an object'}"
                                   + (" with arguments" if rule == "()" else ""))
                stack.append("v")
            elif name == "EMPTY_TUPLE":
                stack.append("()")
            elif name == "MARK":
                marks.append(len(stack))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo.get(arg, "v"))
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("STACK_GLOBAL", "NEWOBJ_EX", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                refused.append(f"the {name} opcode")
                break
            else:
                before = op.stack_before
                if pickletools.markobject in before:
                    del stack[marks.pop():]
                    before = before[: before.index(pickletools.markobject)]
                if before:
                    del stack[len(stack) - len(before):]
                stack.extend("v" for _ in op.stack_after)
    except (ValueError, IndexError, KeyError) as err:
        raise ModelError(f"{path}: its pickle (data.pkl) is damaged ({str(err)[:200]}); the file is "
                         "truncated or corrupt: copy the model's model.pt again") from None
    if refused:
        raise ModelError(_refusal(path, sorted(set(refused))))
    return named


def _global_name(module: str, name: str = "") -> str:
    """"module.name" of a pickle's GLOBAL, with Python 2's names mapped to Python 3's as torch's
    weights_only unpickler maps them (protocol 2 writes "__builtin__ long" for builtins.int)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _refusal(path: Path, names: Sequence[str]) -> str:
    """An operator's message for a checkpoint refused because it pickles code-bearing `names`."""
    return (
        f"{path} was refused: it names code that unpickling would call ({', '.join(names)}), "
        f"but a model file may hold only tensors and configuration data (such code could run "
        f"commands as this service's user, or exhaust its memory). Nothing from it has run. Replace "
        f"it with the model's original model.pt (for a "
        f"model e2vd pulled, delete {path.parent} and run `sudo e2vd pull` again; otherwise copy "
        f"model.pt from a trusted source such as ModelScope's {DEFAULT_MODEL}). If you trust this "
        f"file, keep only its weights on a machine where "
        f"running it is safe: python -c \"import torch; c = torch.load('model.pt', "
        f"weights_only=False); torch.save({{'model': c['model']}}, 'model.pt.new')\" then rename "
        f"model.pt.new over model.pt.")


def build_model(config: dict[str, Any], weights: dict[str, torch.Tensor], num_labels: int,
                weights_path: Path) -> torch.nn.Module:
    """Build `Emotion2vec` on the meta device and assign `weights` to it (no copy, no random init).

    Every tensor the model uses must be in `weights` with the right shape, a floating-point dtype
    and finite values (else ModelError); extra tensors (the pre-training decoder, EMA copies) are
    ignored.
    """
    return assign_weights(construct_model(config, num_labels, weights_path.parent / "config.yaml"),
                          weights, weights_path)


def load_model(config: dict[str, Any], weights_path: Path, num_labels: int) -> torch.nn.Module:
    """`build_model` with the checkpoint `weights_path` read meanwhile: a thread memory-maps it
    (`load_weights`) and reads its tensors (`page_in`, which also finds non-finite ones) while
    this thread builds the model on the meta device; then the weights are assigned. Raises what
    either side raises (ModelError for the checkpoint first). On the 2-core CPU this takes the
    page faults of the first forward pass (~0.04 s for the large model) off the cold start."""
    def read() -> tuple[dict[str, torch.Tensor], frozenset[str]]:
        weights = load_weights(weights_path)
        return weights, page_in(weights)

    reader = _Background(read, name="e2vd-weights")
    try:
        model = construct_model(config, num_labels, weights_path.parent / "config.yaml")
    finally:
        weights, nonfinite = reader.result()
    return assign_weights(model, weights, weights_path, nonfinite)


def page_in(weights: dict[str, torch.Tensor]) -> frozenset[str]:
    """Read every element of each floating-point CPU tensor in `weights` (summing it): the pages
    of a memory-mapped checkpoint are then mapped (from the page cache, or read from disk) before
    the first forward pass needs them. Returns the names of the tensors whose sum is not finite:
    they hold NaN or infinity, or values so large that they overflow (a damaged file). torch
    releases the GIL while it reads."""
    bad = set()
    for name, tensor in weights.items():
        if tensor.device.type == "cpu" and tensor.numel() > 0 and tensor.is_floating_point():
            if not bool(torch.isfinite(tensor.detach().sum())):
                bad.add(name)
    return frozenset(bad)


class _Background:
    """Run `fn` on a daemon thread now; `result()` waits for it and returns its value or raises
    its exception."""

    def __init__(self, fn: Any, name: str) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller of result()
            self._error = err

    def result(self) -> Any:
        """`fn`'s return value, after waiting for it; re-raises its exception."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def construct_model(config: dict[str, Any], num_labels: int, config_path: Path | None = None) -> torch.nn.Module:
    """funasr's `Emotion2vec` for `config` on the meta device (no memory, no random init), without
    the pre-training decoder. A config funasr cannot build a network from (its values disagree,
    e.g. an embed_dim the convolution groups do not divide) is a ModelError naming `config_path`."""
    try:
        with torch.device("meta"), skip_weight_init():
            model = new_emotion2vec(copy.deepcopy(config["model_conf"]), num_labels)
    except ModelError:
        raise
    except Exception as err:   # funasr's own checks: TypeError, ValueError, RuntimeError, ZeroDivisionError ...
        where = config_path or "config.yaml"
        raise ModelError(f"{where} describes a network funasr's Emotion2vec cannot build "
                         f"({type(err).__name__}: {str(err)[:200]}); copy the model's config.yaml again "
                         "(it is damaged, or not an emotion2vec+ config)") from err
    for encoder in model.modality_encoders.values():
        # the decoder only serves pre-training: fairseq's own inference drops it the same way, and
        # a fine-tuned checkpoint need not carry its weights
        encoder.remove_pretraining_modules()
    return model


#: The dtypes a checkpoint's weights may have; any but float32 is converted to float32 (a copy).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def assign_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], weights_path: Path,
                   nonfinite: frozenset[str] | None = None) -> torch.nn.Module:
    """Assign `weights` (no copy) to `model` built on meta; return it in eval mode. Every tensor the
    model uses must be in `weights` with the right shape, one of WEIGHT_DTYPES (converted to the
    model's float32) and finite values (`nonfinite`: the names `page_in` found not finite; None:
    checked here), else ModelError naming `weights_path`: funasr would keep random weights for
    missing ones, and NaN would make every answer NaN."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing:
        raise ModelError(f"{weights_path} lacks {len(missing)} of the model's {len(expected)} tensors "
                         f"(first: {missing[0]}): it does not match config.yaml; copy both again")
    wrong = [k for k, v in expected.items() if tuple(weights[k].shape) != tuple(v.shape)]
    if wrong:
        k = wrong[0]
        raise ModelError(f"{weights_path}: tensor {k} has shape {tuple(weights[k].shape)} but "
                         f"config.yaml needs {tuple(expected[k].shape)}; model.pt and config.yaml "
                         "come from different models")
    odd = [k for k in expected if weights[k].dtype not in WEIGHT_DTYPES]
    if odd:
        raise ModelError(f"{weights_path}: tensor {odd[0]} holds {weights[odd[0]].dtype}, not floating-point "
                         "weights: the file is damaged or not this model's; copy the model's model.pt again")
    if nonfinite is None:
        nonfinite = page_in({k: weights[k] for k in expected})
    bad = [k for k in expected if k in nonfinite]
    if bad:
        raise ModelError(f"{weights_path}: tensor {bad[0]} (and {len(bad) - 1} more) holds NaN, infinite or "
                         "overflowing values: every answer would be NaN; the file is damaged, copy the "
                         "model's model.pt again")
    state = {k: weights[k] if weights[k].dtype == v.dtype else weights[k].to(v.dtype)
             for k, v in expected.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_meta:
            raise ModelError(f"internal: {name} of Emotion2vec was not loaded from {weights_path}")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Device selection


def _choose_device(requested: str, min_free_mb: int, busy_policy: str) -> str:
    """The device to load onto, from e2vd.gpu (NVML: the GPU with most free memory, busy policy).

    A GPU chosen by NVML is only usable if this torch build has CUDA: say so instead of failing
    later with torch's "not compiled with CUDA".
    """
    device = choose_device(requested, min_free_mb=min_free_mb, busy_policy=busy_policy).device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"{device} was chosen but this PyTorch ({torch.__version__}) cannot use "
                         "CUDA: install a CUDA build of torch 2.13.0, or set device = \"cpu\"")
    return device


def _lock_gpu(stack: contextlib.ExitStack, gpu_lock: GpuLock | None, requested: str, min_free_mb: int,
              busy_policy: str) -> str | None:
    """Enter `gpu_lock` on `stack` unless there is none or the CPU was requested; None then, and
    once the lock is held. "cpu" when the lock was not had in time and busy_policy is "cpu";
    GpuLockTimeout when it was not had in time and busy_policy is "refuse"."""
    if gpu_lock is None or requested.strip() == "cpu":
        return None
    try:
        stack.enter_context(gpu_lock.hold())
    except GpuLockTimeout as err:
        if busy_policy != "cpu":
            raise
        return cpu_instead(err.reason, min_free_mb).device
    return None


# ----------------------------------------------------------------------------------------------
# Batching: which clips may share a forward pass

#: How clips may share one forward pass (`Engine.batching`): "padded" - clips of any lengths,
#: zero-padded to the longest and masked (exact); "equal" - only clips of exactly equal length;
#: "single" - every clip alone.
BATCHING_MODES = ("padded", "equal", "single")
#: Largest share of padding in a padded forward pass: padded samples / (clips x longest clip).
MAX_PADDING = 0.25
#: A benchmark harness switch, not a setting (e2vd.config ignores E2VD_BENCH_*): the batching
#: `Engine.load` uses when not told (still narrowed to what is exact), so bench/concurrency.py can
#: compare equal-length-only batching with padded batching in one run, on the CPU too.
BENCH_BATCHING_ENV = "E2VD_BENCH_BATCHING"


def batching_mode(model_conf: dict[str, Any], quantized: bool) -> tuple[str, str]:
    """(mode, reason): the widest of `BATCHING_MODES` that keeps results equal to one-by-one
    inference for a model of config `model_conf` (config.yaml's ``model_conf``); the reason says
    why a mode below "padded" was chosen ("" for "padded").

    * INT8 dynamic quantization computes each activation's scale over the whole batch tensor, so
      any batch changes every clip's result (by 2e-3 on the tiny stand-in): "single".
    * ``extractor_mode: default`` group-normalizes the first convolution's output over time: the
      padded samples enter every frame's statistics (scores moved by up to 3.5e-2 on tiny-sized
      random weights). Learned ALiBi biases (``learned_alibi``) are stretched to the padded length
      (funasr 1.4.16 cannot even build such a model). Either way: "equal". emotion2vec+ uses
      neither: its extractor is layer-normed per frame, and its fixed ALiBi bias depends only on
      the distance between two frames, so masked keys leave it exact.
    """
    if quantized:
        return "single", ("INT8 dynamic quantization scales activations over the whole batch, so "
                          "each clip runs alone")
    audio = (model_conf.get("modalities") or {}).get("audio") or {}
    if audio.get("extractor_mode", "default") != "layer_norm":
        return "equal", ("the model group-normalizes its first convolution over time "
                         "(extractor_mode default), so padding would change every frame")
    if audio.get("learned_alibi"):
        return "equal", "the model's learned ALiBi biases depend on the padded length"
    return "padded", ""


#: Why a CPU engine, unless asked otherwise, lets only clips of equal length share a pass.
CPU_BATCHING_REASON = ("on the CPU a batch runs slower than its clips one by one and padding slows "
                       "it further, so only clips of equal length share a forward pass there")


def choose_batching(requested: str | None, device: str, limit: tuple[str, str]) -> tuple[str, str]:
    """(mode, reason) of an engine on `device`: `requested` (one of `BATCHING_MODES`; None: the
    benchmark switch $E2VD_BENCH_BATCHING when set, else "padded" on a GPU and "equal" on the CPU,
    see CPU_BATCHING_REASON) narrowed to `limit`, `batching_mode`'s widest exact mode and its
    reason: nothing can ask for more than stays equal to one-by-one inference.

    Raises ValueError for an unknown `requested`, ModelError for an unknown $E2VD_BENCH_BATCHING.
    """
    if requested is not None and requested not in BATCHING_MODES:
        raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {requested!r}")
    wanted, reason = requested, "" if requested == "padded" else f"batching={requested!r} was asked for"
    switch = os.environ.get(BENCH_BATCHING_ENV, "").strip()
    if wanted is None and switch:
        if switch not in BATCHING_MODES:
            raise ModelError(f"{BENCH_BATCHING_ENV}={switch!r} is not one of {', '.join(BATCHING_MODES)}; "
                             "unset it (it is a benchmark switch, not a setting)")
        wanted, reason = switch, "" if switch == "padded" else f"{BENCH_BATCHING_ENV}={switch} (a benchmark switch)"
    if wanted is None:
        wanted, reason = ("equal", CPU_BATCHING_REASON) if device == "cpu" else ("padded", "")
    if BATCHING_MODES.index(limit[0]) > BATCHING_MODES.index(wanted):
        return limit
    return wanted, reason


def plan_passes(lengths: Sequence[int], mode: str = "padded",
                max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Split clips of `lengths` (samples) into forward passes; return each pass's indices.

    "padded": clips sorted longest first; a pass takes the next clip as long as its padding stays
    at most `max_padding` of its samples (clips x longest), then the next pass begins. Passes are
    returned shortest first (short answers are not held up by long ones). Planning one pass's own
    clips again gives that one pass. "equal": one pass per distinct length, in order of first
    appearance. "single": one pass per clip. Indices within a pass are ascending.
    """
    if mode not in BATCHING_MODES:
        raise ValueError(f"batching mode must be one of {', '.join(BATCHING_MODES)}, not {mode!r}")
    if mode == "single":
        return [[i] for i in range(len(lengths))]
    if mode == "equal":
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault(n, []).append(i)
        return list(groups.values())
    passes: list[list[int]] = []
    samples = longest = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if passes:
            clips = len(passes[-1]) + 1
            if clips * longest - (samples + n) <= max_padding * clips * longest:
                passes[-1].append(i)
                samples += n
                continue
        passes.append([i])
        samples = longest = n
    return [sorted(p) for p in reversed(passes)]


class PositionalConvMask:
    """Makes funasr's convolutional positional encoder see zeros past each clip's end in a batch.

    funasr adds ``relative_positional_encoder(x)`` to the frame features: stacked "same"
    convolutions over time (emotion2vec+: 5 of kernel 19, zero padding 9) with no padding mask.
    Alone, a clip's last frames see zeros past its end; in a padded batch they would see the
    padded frames' features instead (the feature extractor turns zero samples into non-zero
    features), up to 5 x 9 = 45 frames (0.9 s) in, and attention then spreads the difference to
    every frame (frame features moved by up to 4.4 on the tiny stand-in). While `active`, a forward
    pre-hook on each of those convolutions zeroes the padded frames of its input, so a clip's
    own frames see exactly the zeros they see alone. Outside `active` the hooks do nothing.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._keep: torch.Tensor | None = None
        encoder = model.modality_encoders["AUDIO"].relative_positional_encoder
        self.convolutions = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv1d)] \
            if encoder is not None else []
        for conv in self.convolutions:
            conv.register_forward_pre_hook(self._zero_padding)

    @contextlib.contextmanager
    def active(self, keep: torch.Tensor):
        """Within the block, frames where `keep` (B, T) bool is False enter each convolution as 0."""
        self._keep = keep
        try:
            yield
        finally:
            self._keep = None

    def _zero_padding(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple | None:
        """Forward pre-hook: the convolution's input (B, C, T) with padded frames set to 0."""
        if self._keep is None:
            return None
        x = args[0]
        return (x.masked_fill(~self._keep[:, None, :], 0.0), *args[1:])


# ----------------------------------------------------------------------------------------------
# The engine


class Engine:
    """A loaded emotion2vec+ model on one device. Use `Engine.load`; call from one thread only."""

    def __init__(self, model: torch.nn.Module, model_id: str, model_dir: Path, device: str,
                 dtype: str, model_labels: list[str], normalize: bool, load_seconds: float,
                 quantized: bool = False, batching: str = "padded", batching_reason: str = "") -> None:
        if batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {batching!r}")
        self._model = model
        self.model_id = model_id
        self.model_dir = model_dir
        self.device = device
        self.dtype = dtype
        self.model_labels = model_labels
        self.normalize = normalize
        self.load_seconds = load_seconds
        self.quantized = quantized
        #: which clips may share a forward pass (`BATCHING_MODES`), and why not more ("" if padded)
        self.batching = batching
        self.batching_reason = batching_reason
        #: largest share of padding in a "padded" forward pass (see `plan_passes`)
        self.max_padding = MAX_PADDING
        self._torch_dtype = _TORCH_DTYPES[dtype]
        #: (channels, kernel, stride) of each layer of the convolutional feature extractor
        self._conv_layers: list[tuple[int, int, int]] = list(model.modality_encoders["AUDIO"].feature_enc_layers)
        self._positional_mask = PositionalConvMask(model) if batching == "padded" else None

    @classmethod
    def load(cls, model: str, device: str = Settings.device, dtype: str = Settings.dtype, *,
             quantize: bool = Settings.quantize, min_free_mb: int = Settings.min_free_mb,
             busy_policy: str = Settings.busy_policy, cache_dir: str | None = None,
             batching: str | None = None, gpu_lock: GpuLock | None = None) -> "Engine":
        """Resolve, validate and load `model` onto a device; return a ready engine.

        `device` is "auto" (the GPU with the most free memory, else CPU), "cpu" or "cuda:N";
        `min_free_mb`/`busy_policy` decide what happens when that GPU has too little free memory
        (see e2vd.gpu). `dtype` (one of `e2vd.vocabulary.DTYPES`: "fp32", "fp16", "bf16") applies
        on GPU; on CPU the model runs in fp32. Defaults are those of `e2vd.config.Settings`. `quantize` applies INT8 dynamic quantization to the Linear layers on CPU.
        `batching` (one of `BATCHING_MODES`; None: "padded" on a GPU, "equal" on the CPU) says
        which clips may share a forward pass; the model and `quantize` may narrow it
        (`choose_batching`).
        `gpu_lock` (the daemon's; None: no lock): unless `device` is "cpu", the device is chosen
        and the weights put on it while this lock is held, so that daemons loading at the same
        moment see each other's memory (e2vd.gpu_lock). The checkpoint is read before the lock
        is taken. No lock within its timeout: GpuLockTimeout, or the CPU under busy_policy "cpu".
        Raises ModelError (model or torch problems), e2vd.gpu.DeviceError / GpuBusyError (no such
        GPU; GPU too full or its lock held too long, and busy_policy "refuse") or ValueError
        (malformed option), each with a message naming the problem and the fix.
        """
        if dtype not in DTYPES:
            raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        if batching is not None and batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, not {batching!r}")
        start = time.perf_counter()
        with gc_paused():
            model_dir, model_id = resolve_model(model, cache_dir)
            labels = read_tokens(model_dir)
            config = read_config(model_dir)
            net = load_model(config, model_dir / "model.pt", len(labels))   # the CPU side: no lock needed
            with contextlib.ExitStack() as locked:
                chosen = _lock_gpu(locked, gpu_lock, device, min_free_mb, busy_policy) \
                    or _choose_device(device, min_free_mb, busy_policy)
                dtype, quantize = _effective_precision(chosen, dtype, quantize)
                net = _place(net, chosen, _TORCH_DTYPES[dtype], quantize)
        normalize = bool(config["model_conf"].get("normalize", False))
        batching, reason = choose_batching(batching, chosen, batching_mode(config["model_conf"], quantize))
        seconds = time.perf_counter() - start
        # debug: the daemon's model_loaded event says this in the journal
        log.debug("loaded %s from %s on %s as %s%s in %.1f s", model_id, model_dir, chosen, dtype,
                 " (int8-quantized)" if quantize else "", seconds)
        log.debug("clips share a forward pass: %s%s", {"padded": "at any lengths, padded",
                  "equal": "only at equal lengths", "single": "never"}[batching], f" ({reason})" if reason else "")
        return cls(net, model_id, model_dir, chosen, dtype, labels, normalize, seconds, quantize,
                   batching, reason)

    # -- inference -------------------------------------------------------------------------

    def recognize(self, audio: bytes | Audio, granularity: str = Granularity.UTTERANCE,
                  embedding: bool = False, max_seconds: float = Settings.max_seconds) -> Recognition:
        """Recognize the emotion of one clip: audio file bytes (decoded by e2vd.audio) or `Audio`.

        Raises e2vd.audio.AudioError for audio that cannot be used, ValueError for a bad option.
        """
        _check_granularity(granularity)
        clip = self._as_audio(audio, max_seconds)
        return self._run([clip], granularity, embedding)[0]

    def recognize_batch(self, clips: Sequence[Audio], granularity: str = Granularity.UTTERANCE,
                        embedding: bool = False) -> list[Recognition]:
        """Recognize several decoded clips; results equal one-by-one `recognize` calls (1e-5, fp32).

        The clips run in the forward passes `forward_passes` plans (with "padded" batching: clips
        of similar length together, padding at most `max_padding`); results keep the order of
        `clips`.
        """
        _check_granularity(granularity)
        results: list[Recognition | None] = [None] * len(clips)
        for indices in self.forward_passes(clips):
            for i, rec in zip(indices, self._run([clips[i] for i in indices], granularity, embedding)):
                results[i] = rec
        return [r for r in results if r is not None]

    def forward_passes(self, clips: Sequence[Audio]) -> list[list[int]]:
        """The indices of `clips` that `recognize_batch` runs together, one list per forward pass,
        in the order it runs them (`plan_passes` with this engine's `batching`). A pass's own
        clips, planned again, make that one pass."""
        return plan_passes([len(c.samples) for c in clips], self.batching, self.max_padding)

    def _as_audio(self, audio: bytes | Audio, max_seconds: float) -> Audio:
        """Decode bytes with e2vd.audio; check an `Audio`'s length against `max_seconds`."""
        if isinstance(audio, (bytes, bytearray, memoryview)):
            return decode(audio, max_seconds=max_seconds)
        check_duration(audio.duration_s, max_seconds)
        return audio

    def _run(self, clips: Sequence[Audio], granularity: str, embedding: bool) -> list[Recognition]:
        """Run `clips` in one forward pass; return one Recognition per clip."""
        try:
            probs, frames = self.forward([c.samples for c in clips])
        except RuntimeError as err:
            if self.device == "cpu" or not _is_out_of_memory(err):
                raise
            torch.cuda.empty_cache()   # hand back what the failed attempt cached, for the retry
            raise GpuOutOfMemory(_inference_out_of_memory(self.device, clips)) from None
        if not np.isfinite(probs).all() or (embedding and not all(np.isfinite(f).all() for f in frames)):
            raise NonFiniteResult(
                f"the model computed NaN or infinite values for this audio ({len(clips)} clip(s)): the weights "
                f"in {self.model_dir / 'model.pt'} overflow on it, so there is no answer to give; the "
                "model file is damaged or not a trained emotion2vec+ model: the operator should copy the "
                "model's model.pt again")
        results = []
        for i, clip in enumerate(clips):
            emb = None
            if embedding:
                emb = frames[i] if granularity == Granularity.FRAME else frames[i].mean(axis=0)
            results.append(Recognition(
                labels=list(LABELS),
                scores=[float(p) for p in probs[i]],
                model_labels=list(self.model_labels),
                duration_s=float(clip.duration_s),
                embedding=emb,
            ))
        return results

    def forward(self, clips: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run one forward pass over 16 kHz waveforms: 1-D float32 arrays, at least 400 samples each.

        Returns (probabilities (B, 9) float64, each clip's frame features (T_i, D) float32 at 50
        frames/s). Each clip is computed as ``Emotion2vec.inference`` computes it alone: layer-normed
        over its own samples (when config ``normalize``), encoded, features averaged over its own
        frames, ``proj``, softmax. Clips of different lengths are zero-padded to the longest and the
        padding masked (funasr's ``padding_mask`` and `PositionalConvMask`); that needs "padded"
        batching, else ValueError.
        """
        lengths = [len(c) for c in clips]
        padded = len(set(lengths)) > 1
        if padded and self.batching != "padded":
            raise ValueError(f"clips of different lengths cannot share a forward pass on this engine: "
                             f"{self.batching_reason or 'its batching is ' + self.batching}")
        n_frames = [self.frames(n) for n in lengths]
        with torch.inference_mode(), _ieee_fp32(self.device.startswith("cuda") and self.dtype == "fp32"):
            x = self._input(clips)
            if padded:
                feats = self._encode_padded(x, lengths, n_frames)
                pooled = torch.stack([feats[i, :t].mean(dim=0) for i, t in enumerate(n_frames)])
            else:
                feats = self._model.extract_features(x, padding_mask=None)["x"]
                pooled = feats.mean(dim=1)
            logits = self._model.proj(pooled)
            probs = torch.softmax(logits.float(), dim=-1)  # fp32 even for fp16/bf16 models
            feats_np = feats.float().cpu().numpy()
            return (probs.float().cpu().numpy().astype(np.float64),
                    [feats_np[i, :t] for i, t in enumerate(n_frames)])

    def frames(self, samples: int) -> int:
        """Frames (50 per second) the model makes of `samples` samples: funasr's formula for its
        convolutional feature extractor (no padding), e.g. 400 -> 1, 16000 -> 49, 80000 -> 249."""
        for _, kernel, stride in self._conv_layers:
            samples = (samples - kernel) // stride + 1
        return samples

    def _input(self, clips: Sequence[np.ndarray]) -> torch.Tensor:
        """The model's input (B, longest) on the engine's device: each clip layer-normed over its
        own samples (when config ``normalize``), then zero-padded at its end; in the model's dtype."""
        longest = max(len(c) for c in clips)
        batch = np.zeros((len(clips), longest), dtype=np.float32)
        for i, c in enumerate(clips):
            batch[i, : len(c)] = c
        x = torch.from_numpy(batch).to(self.device)
        if self.normalize:
            for i, c in enumerate(clips):
                x[i, : len(c)] = torch.nn.functional.layer_norm(x[i, : len(c)], (len(c),))
        return x if self.quantized else x.to(self._torch_dtype)

    def _encode_padded(self, x: torch.Tensor, lengths: Sequence[int], n_frames: Sequence[int]) -> torch.Tensor:
        """funasr's encoder on the zero-padded batch `x` (B, N) with its padding masked, clip i
        being lengths[i] samples long; returns features (B, T, D) of which clip i's own are the
        first n_frames[i]. funasr derives its frame mask from the sample mask with the same formula
        as `frames`; a disagreement raises RuntimeError rather than answer from padded frames."""
        if self._positional_mask is None:
            raise RuntimeError(f"internal: padded forward pass on an engine with {self.batching} batching")
        n, t = x.shape[1], max(n_frames)
        padding = torch.arange(n, device=x.device)[None, :] >= torch.as_tensor(list(lengths), device=x.device)[:, None]
        keep = torch.arange(t, device=x.device)[None, :] < torch.as_tensor(list(n_frames), device=x.device)[:, None]
        with self._positional_mask.active(keep):
            out = self._model.extract_features(x, padding_mask=padding)
        if out["x"].shape[1] != t or not torch.equal(out["padding_mask"], ~keep):
            raise RuntimeError("internal: funasr's frame padding mask differs from the engine's frame counts")
        return out["x"]

    # -- introspection ---------------------------------------------------------------------

    def release_cache(self, slack_bytes: int | None = None) -> "CacheRelease | None":
        """Hand the GPU memory PyTorch's caching allocator keeps unused back to the GPU, for the
        other processes (instances) sharing it: torch.cuda.empty_cache() when the memory reserved on
        this engine's device exceeds the memory allocated there by more than `slack_bytes` (default
        CACHE_SLACK_BYTES). After a large batch the allocator keeps its activations' blocks
        reserved until the process exits (up to ~6.7 GB reported for the large model).
        Returns what it did, or None when nothing was done: on the CPU (torch.cuda is not touched)
        or with at most `slack_bytes` unused. Call it between batches (the scheduler does, on the
        inference thread, when no job waits), never during one."""
        if not self.device.startswith("cuda"):
            return None
        slack = CACHE_SLACK_BYTES if slack_bytes is None else slack_bytes
        allocated = int(torch.cuda.memory_allocated(self.device))
        reserved = int(torch.cuda.memory_reserved(self.device))
        if reserved - allocated <= slack:
            return None
        torch.cuda.empty_cache()
        return CacheRelease(self.device, allocated, reserved, int(torch.cuda.memory_reserved(self.device)))

    def memory(self) -> dict[str, int]:
        """Bytes held: param_bytes (weights, all devices) and, on CUDA, allocated/reserved bytes."""
        out = {"param_bytes": _nbytes(list(self._model.state_dict().values()))}
        if self.device.startswith("cuda"):
            out["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(self.device))
            out["cuda_reserved_bytes"] = int(torch.cuda.memory_reserved(self.device))
        return out


#: Unused reserved GPU memory `Engine.release_cache` leaves in PyTorch's cache: up to 1 GiB stays
#: for the next batch to reuse (no cudaMalloc), the excess of a large batch (up to ~6.7 GB
#: reported for the large model) goes back to the GPU.
CACHE_SLACK_BYTES = 1 << 30


@dataclass(frozen=True)
class CacheRelease:
    """What `Engine.release_cache` handed back on `device`, in bytes: allocated (live tensors,
    the weights above all) and reserved by PyTorch's caching allocator before and after."""

    device: str
    allocated_bytes: int
    reserved_before_bytes: int
    reserved_after_bytes: int

    @property
    def released_bytes(self) -> int:
        return self.reserved_before_bytes - self.reserved_after_bytes


@contextlib.contextmanager
def _ieee_fp32(active: bool):
    """Within the block (when `active`), CUDA convolutions and matmuls run in IEEE fp32, not TF32.

    PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default on Ampere and newer, so
    "fp32" would silently be less exact there, and its results would depend on the batch size
    through the algorithm cuDNN picks. The previous settings are restored on exit (they are
    process-wide: the engine is used from one thread)."""
    if not active:
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def _nbytes(obj: object) -> int:
    """Bytes of the tensors in `obj` (a tensor, or lists/tuples of them, as quantized layers keep)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(item) for item in obj)
    return 0


def _check_granularity(granularity: str) -> None:
    """Raise ValueError unless `granularity` is a `Granularity` value ("utterance" or "frame")."""
    if granularity not in list(Granularity):
        raise ValueError(f"granularity must be one of {', '.join(Granularity)}, not {granularity!r}")


def _effective_precision(device: str, dtype: str, quantize: bool) -> tuple[str, bool]:
    """(dtype, quantize) that `device` can run: half precision needs a GPU, INT8 needs the CPU."""
    if device == "cpu" and dtype != "fp32":
        log.warning("dtype %s is for GPUs; running on the CPU in fp32", dtype)
        dtype = "fp32"
    if device != "cpu" and quantize:
        log.warning("INT8 dynamic quantization runs on the CPU only; %s runs %s unquantized",
                    device, dtype)
        quantize = False
    return dtype, quantize


def _is_out_of_memory(err: RuntimeError) -> bool:
    """Whether `err` says the GPU ran out of memory: torch.OutOfMemoryError from the caching
    allocator, or a plain RuntimeError "CUDA error: out of memory" (e.g. at CUDA start)."""
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def _inference_out_of_memory(device: str, clips: Sequence[Audio]) -> str:
    """The client's message for an inference that did not fit in the GPU's free memory."""
    longest = max(c.duration_s for c in clips)
    return (f"{device} ran out of memory running {len(clips)} clip(s) of up to {longest:.1f} s: other "
            f"processes hold most of the GPU's memory. Retry in a few seconds or send shorter clips; "
            f"the operator can lower max_batch or max_seconds, or free the GPU (`nvidia-smi`)")


def _out_of_gpu_memory(device: str) -> str:
    """The operator's message for a GPU that ran out of memory while the model was placed on it."""
    mem = None
    with contextlib.suppress(Exception):   # NVML trouble must not hide the real problem
        mem = device_memory(device)
    free = f" ({mem.free_bytes >> 20} MiB free of {mem.total_bytes >> 20} MiB now)" if mem else ""
    return (f"{device} ran out of memory while the model was put on it{free}: other processes hold "
            f"the GPU's memory (`nvidia-smi` lists them). Free it, or run on the CPU: set "
            f'device = "cpu", or busy_policy = "cpu" with a min_free_mb the model needs, in /etc/e2vd/e2vd.toml')


def _place(model: torch.nn.Module, device: str, dtype: torch.dtype, quantize: bool) -> torch.nn.Module:
    """Move `model` to `device`/`dtype`; on CPU optionally quantize its Linear layers to INT8."""
    if device != "cpu":
        try:
            return model.to(device=device, dtype=dtype)
        except RuntimeError as err:
            if not _is_out_of_memory(err):
                raise
            raise ModelError(_out_of_gpu_memory(device)) from None
    if quantize:
        with warnings.catch_warnings():  # torch.ao deprecation notices, not for an operator's log
            warnings.simplefilter("ignore")
            # inplace: the fp32 Linear weights (memory-mapped) are dropped, not deep-copied first
            return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8,
                                                          inplace=True)
    return model
