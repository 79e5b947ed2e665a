"""GPU discovery through NVML (nvidia-ml-py, imported as `pynvml`) and device selection.

`list_gpus()` lists the NVIDIA GPUs this process can use, with free memory as NVML reports it
(all processes counted). Without the NVML library or driver it returns [] and logs why, once.
NVML is initialised on first use and kept for the life of the process; it creates no CUDA
context and holds no GPU memory.

Indices: `GpuInfo.index` is the N of "cuda:N" as PyTorch will see it. With CUDA_VISIBLE_DEVICES
set, only the listed GPUs appear, in the listed order (entries are NVML indices or GPU UUIDs /
UUID prefixes; the list ends at the first entry that matches nothing, as CUDA does; MIG
instances are not supported and end the list). Without it all GPUs appear in NVML (PCI bus) order.
CUDA's own default order is "fastest first", which differs from PCI order only on machines
mixing GPU models: set CUDA_DEVICE_ORDER=PCI_BUS_ID there (the e2vd unit does not need it on
machines with one kind of GPU).

`choose_device(requested, min_free_mb, busy_policy)`:
  "cpu"     -> cpu.
  "auto"    -> the GPU with the most free memory (lowest index on ties); no GPU -> cpu (logged).
  "cuda:N"  -> that GPU ("cuda" means cuda:0); not present -> DeviceError.
  A chosen GPU with less than `min_free_mb` MB free: busy_policy "refuse" raises GpuBusyError
  (which GPU, free vs needed MB, what to do); "cpu" falls back to the CPU with a warning.
Every decision is logged as event "device_chosen" (see e2vd.log); `cpu_instead(reason)` logs it
for a GPU that could not even be looked at (e2vd.gpu_lock timed out) under busy_policy "cpu".
Daemons call choose_device while holding the GPU lock (e2vd.gpu_lock), so that two of them
starting at once cannot both see the same free memory.

`device_memory(device)` reports total/free/used bytes of a "cuda:N" device (and this process's
own share when NVML can tell), or None for the CPU or without NVML: for the daemon's status.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from e2vd.config import BUSY_POLICIES, DEVICE_PATTERN as _DEVICE
from e2vd.log import event
from e2vd.vocabulary import ExitCode

log = logging.getLogger(__name__)

MB = 1024 * 1024


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says which and what to do."""

    exit_code = ExitCode.SERVER


class GpuBusyError(DeviceError):
    """The GPU has less free memory than min_free_mb and busy_policy is "refuse"."""


class GpuOutOfMemory(DeviceError):
    """One inference did not fit in the GPU's free memory; the message names the clips and the fixes.
    The same request may succeed later (when other processes free memory) or with shorter clips."""


@dataclass(frozen=True)
class GpuInfo:
    """One usable GPU. index: N of "cuda:N" for this process; bytes as NVML reports them."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    uuid: str = ""
    nvml_index: int | None = None   # NVML (PCI bus order) index; differs from `index` under CUDA_VISIBLE_DEVICES

    @property
    def free_mb(self) -> int:
        return self.free_bytes // MB

    @property
    def total_mb(self) -> int:
        return self.total_bytes // MB


@dataclass(frozen=True)
class DeviceChoice:
    """The device to load the model on ("cpu" or "cuda:N") and a sentence saying why."""

    device: str
    reason: str


@dataclass(frozen=True)
class GpuMemory:
    """Memory of one GPU in bytes. process_bytes: this process's share, None when NVML can't tell."""

    total_bytes: int
    free_bytes: int
    used_bytes: int
    process_bytes: int | None = None


# ----------------------------------------------------------------------------------------------
# NVML

_lock = threading.Lock()
_nvml = None              # the pynvml module once nvmlInit succeeded
_nvml_problem: str | None = None


def nvml_problem() -> str | None:
    """Why NVML is unusable in this process (None if it works or was not tried yet)."""
    return _nvml_problem


def _get_nvml():
    """pynvml after a successful nvmlInit, or None (the reason logged once, kept in _nvml_problem)."""
    global _nvml, _nvml_problem
    with _lock:
        if _nvml is not None or _nvml_problem is not None:
            return _nvml
        try:
            import pynvml
        except ImportError as err:
            _nvml_problem = f"the NVML bindings are not installed ({err}; pip install nvidia-ml-py)"
        else:
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as err:
                _nvml_problem = _describe_init_error(pynvml, err)
            except OSError as err:
                _nvml_problem = f"NVML could not be loaded ({err})"
            else:
                _nvml = pynvml
                return _nvml
        log.debug("No GPU: %s; using the CPU.", _nvml_problem)   # device_chosen says it once
        return None


def _describe_init_error(pynvml, err: Exception) -> str:
    code = getattr(err, "value", None)
    if code == getattr(pynvml, "NVML_ERROR_LIBRARY_NOT_FOUND", object()):
        return "NVML (libnvidia-ml.so.1) not found, so no NVIDIA driver is visible here"
    if code == getattr(pynvml, "NVML_ERROR_DRIVER_NOT_LOADED", object()):
        return "the NVIDIA kernel driver is not loaded (check `nvidia-smi`)"
    if code == getattr(pynvml, "NVML_ERROR_NO_PERMISSION", object()):
        return "no permission to open the NVIDIA device files (/dev/nvidia*)"
    return f"NVML failed to initialise: {err}"


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _nvml_devices(nvml) -> list[GpuInfo]:
    """All GPUs NVML sees, in NVML order (index = NVML index); unreadable ones logged and skipped."""
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(GpuInfo(index=i, name=_text(nvml.nvmlDeviceGetName(handle)),
                               total_bytes=int(mem.total), free_bytes=int(mem.free),
                               uuid=_text(nvml.nvmlDeviceGetUUID(handle)), nvml_index=i))
        except nvml.NVMLError as err:
            log.warning("GPU %d cannot be queried through NVML (%s); skipping it.", i, err)
    return out


def visible_gpus(devices: Sequence[GpuInfo], env: Mapping[str, str] | None = None) -> list[GpuInfo]:
    """The GPUs of `devices` (NVML order) that CUDA_VISIBLE_DEVICES in `env` exposes, re-indexed
    as CUDA numbers them (0, 1, ... in the listed order). Unset: all of them, in NVML order."""
    env = os.environ if env is None else env
    spec = env.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return [_reindex(d, d.index) for d in devices]
    chosen: list[GpuInfo] = []
    for token in (t.strip() for t in spec.split(",")):
        match: GpuInfo | None = None
        if re.fullmatch(r"\d+", token):
            match = next((d for d in devices if d.nvml_index == int(token) or
                          (d.nvml_index is None and d.index == int(token))), None)
        elif token.startswith("GPU-"):
            hits = [d for d in devices if d.uuid.startswith(token)]
            match = hits[0] if len(hits) == 1 else None
        if match is None or any(c.nvml_index == (match.nvml_index if match.nvml_index is not None
                                                 else match.index) for c in chosen):
            break  # CUDA stops at the first entry it cannot use
        chosen.append(_reindex(match, len(chosen)))
    return chosen


def _reindex(d: GpuInfo, index: int) -> GpuInfo:
    return GpuInfo(index=index, name=d.name, total_bytes=d.total_bytes, free_bytes=d.free_bytes,
                   uuid=d.uuid, nvml_index=d.index if d.nvml_index is None else d.nvml_index)


def list_gpus() -> list[GpuInfo]:
    """The GPUs this process may use, free memory fresh from NVML; [] without NVML or driver."""
    nvml = _get_nvml()
    if nvml is None:
        return []
    try:
        devices = _nvml_devices(nvml)
    except nvml.NVMLError as err:
        log.warning("NVML could not list the GPUs (%s); using the CPU.", err)
        return []
    return visible_gpus(devices)


# ----------------------------------------------------------------------------------------------
# Selection

def choose_device(requested: str = "auto", min_free_mb: int = 2048, busy_policy: str = "refuse",
                  gpus: list[GpuInfo] | None = None) -> DeviceChoice:
    """Pick the device for the model (see the module docstring). `gpus`: the GPU list to choose
    from (default: list_gpus()). Raises ValueError for a malformed `requested`/`busy_policy`,
    DeviceError for a missing GPU, GpuBusyError when a GPU is too full and the policy refuses."""
    m = _DEVICE.fullmatch(requested.strip()) if isinstance(requested, str) else None
    if m is None:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    if busy_policy not in BUSY_POLICIES:
        raise ValueError(f"busy_policy must be one of {', '.join(BUSY_POLICIES)}, got {busy_policy!r}")
    if min_free_mb < 0:
        raise ValueError(f"min_free_mb must be >= 0, got {min_free_mb}")
    requested = requested.strip()
    if requested == "cpu":
        return _chosen(DeviceChoice("cpu", "the CPU was requested (device=cpu)"), None, min_free_mb)
    if gpus is None:
        gpus = list_gpus()
    if requested == "auto":
        if not gpus:
            why = nvml_problem() or "NVML lists no usable GPU"
            return _chosen(DeviceChoice("cpu", f"no GPU available: {why}"), None, min_free_mb)
        gpu = min(gpus, key=lambda g: (-g.free_bytes, g.index))
        how = f"the GPU with the most free memory of {len(gpus)}" if len(gpus) > 1 else "the only GPU"
    else:
        index = int(m.group(1) or 0)
        gpu = next((g for g in gpus if g.index == index), None)
        if gpu is None:
            seen = ", ".join(f"cuda:{g.index} ({g.name})" for g in gpus) or (
                f"none — {nvml_problem() or 'NVML lists no usable GPU'}")
            raise DeviceError(f"device {requested} was requested but there is no such GPU (visible: "
                              f"{seen}). Set device to auto or cpu, or check the GPU with `nvidia-smi` "
                              f"and CUDA_VISIBLE_DEVICES.")
        how = "requested"
    if gpu.free_mb >= min_free_mb:
        return _chosen(DeviceChoice(f"cuda:{gpu.index}", (
            f"{how}: cuda:{gpu.index} ({gpu.name}) has {gpu.free_mb} MB free of {gpu.total_mb} MB, "
            f"at least {min_free_mb} MB needed")), gpu, min_free_mb)
    busy = (f"GPU cuda:{gpu.index} ({gpu.name}) has only {gpu.free_mb} MB free of {gpu.total_mb} MB; "
            f"e2vd needs at least {min_free_mb} MB (min_free_mb)")
    if busy_policy == "cpu":
        return _chosen(DeviceChoice("cpu", f"{busy}; busy_policy=cpu, so using the CPU"), gpu,
                       min_free_mb, logging.WARNING)
    others = "" if requested != "auto" or len(gpus) == 1 else " (it is the emptiest of the GPUs)"
    raise GpuBusyError(f"{busy}{others}. Free GPU memory (see `nvidia-smi` for who holds it), "
                       f"lower min_free_mb, or set busy_policy = \"cpu\" to run on the CPU instead.")


def cpu_instead(reason: str, min_free_mb: int) -> DeviceChoice:
    """The CPU, for a GPU that could not be used for `reason` (a sentence) under busy_policy "cpu";
    logged like every choice (event device_chosen, at WARNING)."""
    return _chosen(DeviceChoice("cpu", f"{reason}; busy_policy=cpu, so using the CPU"), None,
                   min_free_mb, logging.WARNING)


def _chosen(choice: DeviceChoice, gpu: GpuInfo | None, min_free_mb: int,
            level: int = logging.INFO) -> DeviceChoice:
    event("device_chosen", f"Using {choice.device}: {choice.reason}.", level, device=choice.device,
          reason=choice.reason, gpu_name=gpu.name if gpu else None,
          free_mb=gpu.free_mb if gpu else None, min_free_mb=min_free_mb)
    return choice


# ----------------------------------------------------------------------------------------------
# Status

def device_memory(device: str, pid: int | None = None) -> GpuMemory | None:
    """Memory of the GPU behind "cuda:N" (whole device; process_bytes: the share of process `pid`,
    default this one, when NVML lists it), or None for "cpu", without NVML, or when the GPU is
    not listed."""
    m = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if m is None or not device.startswith("cuda"):
        return None
    index = int(m.group(1) or 0)
    nvml = _get_nvml()
    if nvml is None:
        return None
    gpu = next((g for g in list_gpus() if g.index == index), None)
    if gpu is None or gpu.nvml_index is None:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(gpu.nvml_index)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError as err:
        log.warning("NVML could not read the memory of %s (%s).", device, err)
        return None
    return GpuMemory(total_bytes=int(mem.total), free_bytes=int(mem.free), used_bytes=int(mem.used),
                     process_bytes=_process_bytes(nvml, handle, os.getpid() if pid is None else pid))


def _process_bytes(nvml, handle, pid: int) -> int | None:
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except (nvml.NVMLError, AttributeError):
        return None
    for proc in procs:
        if proc.pid == pid:
            used = getattr(proc, "usedGpuMemory", None)
            return int(used) if isinstance(used, int) else None
    return None  # no CUDA context here yet, or NVML reports host PIDs (containers)
