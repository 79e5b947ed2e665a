"""e2vd.gpu: the real no-NVML path of this machine, and selection on fake GPU lists (gpus=...)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from e2vd.gpu import (DeviceChoice, DeviceError, GpuBusyError, GpuInfo, choose_device, device_memory,
                      list_gpus, visible_gpus)

ROOT = Path(__file__).resolve().parent.parent
GB = 1024 ** 3


def card(index: int, free_gb: float, total_gb: float = 80, name: str = "NVIDIA H100 80GB HBM3") -> GpuInfo:
    return GpuInfo(index=index, name=name, total_bytes=int(total_gb * GB), free_bytes=int(free_gb * GB),
                   uuid=f"GPU-{index:08d}-aaaa-bbbb-cccc-000000000000", nvml_index=index)


# --- the real path on this machine ----------------------------------------------------------------

def test_real_nvml_path_in_a_fresh_process():
    """Here there is no NVIDIA driver: [] with one clear event (device_chosen at INFO, the NVML
    detail once at DEBUG), auto -> cpu, cuda:0 -> error."""
    code = textwrap.dedent("""
        from e2vd.log import setup_logging
        setup_logging("DEBUG", journald=False)
        from e2vd import gpu
        first, second = gpu.list_gpus(), gpu.list_gpus()
        print(len(first), len(second))
        if not first:
            print(gpu.choose_device("auto").device)
            print(gpu.device_memory("cuda:0"))
            try:
                gpu.choose_device("cuda:0")
            except gpu.DeviceError as err:
                print("DeviceError:", err)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    if out[0] != "0 0":
        pytest.skip("this machine has an NVIDIA GPU")
    assert out[1:3] == ["cpu", "None"]
    assert out[3].startswith("DeviceError: device cuda:0 was requested but there is no such GPU")
    assert "nvidia-smi" in out[3] and "auto or cpu" in out[3]
    no_gpu = [line for line in proc.stderr.splitlines() if "No GPU:" in line]
    assert len(no_gpu) == 1 and " DEBUG " in no_gpu[0], proc.stderr  # once, not per call; the
    # journal's INFO level has it from device_chosen alone
    assert "NVML" in no_gpu[0] or "nvidia-ml-py" in no_gpu[0]
    assert "device_chosen" in proc.stderr and "device=cpu" in proc.stderr


def test_device_memory_cpu_is_none():
    assert device_memory("cpu") is None
    assert device_memory("garbage") is None


def test_real_list_gpus_types():
    for g in list_gpus():  # empty here; on a GPU machine every entry is filled in
        assert g.total_bytes >= g.free_bytes >= 0 and g.name and g.uuid.startswith(("GPU-", "MIG-"))


# --- selection on fake lists ----------------------------------------------------------------------

def test_cpu_requested():
    assert choose_device("cpu", gpus=[card(0, 70)]) == DeviceChoice("cpu", "the CPU was requested (device=cpu)")


def test_auto_picks_most_free_memory():
    choice = choose_device("auto", gpus=[card(0, 10), card(1, 60), card(2, 30)])
    assert choice.device == "cuda:1"
    assert "most free memory" in choice.reason and "61440 MB free" in choice.reason


def test_auto_tie_takes_lowest_index():
    assert choose_device("auto", gpus=[card(1, 20), card(0, 20)]).device == "cuda:0"


def test_auto_without_gpus_falls_back_to_cpu(caplog):
    caplog.set_level("INFO")
    choice = choose_device("auto", gpus=[])
    assert choice.device == "cpu" and "no GPU" in choice.reason
    assert any("Using cpu" in r.getMessage() for r in caplog.records)


def test_explicit_cuda_index():
    gpus = [card(0, 70), card(1, 5)]
    assert choose_device("cuda:0", gpus=gpus).device == "cuda:0"
    assert choose_device("cuda", gpus=gpus).device == "cuda:0"
    with pytest.raises(DeviceError, match=r"cuda:3 .*visible: cuda:0 \(NVIDIA H100 80GB HBM3\), cuda:1"):
        choose_device("cuda:3", gpus=gpus)


def test_busy_refuse_names_gpu_free_needed_and_fix():
    with pytest.raises(GpuBusyError) as info:
        choose_device("auto", min_free_mb=4096, busy_policy="refuse", gpus=[card(0, 1), card(1, 2)])
    msg = str(info.value)
    assert "cuda:1" in msg and "2048 MB free" in msg and "4096 MB" in msg
    assert "nvidia-smi" in msg and "busy_policy" in msg and "min_free_mb" in msg
    assert isinstance(info.value, RuntimeError)


def test_busy_explicit_device_refused_even_if_another_is_free():
    with pytest.raises(GpuBusyError, match="cuda:1"):
        choose_device("cuda:1", min_free_mb=2048, gpus=[card(0, 70), card(1, 1)])


def test_busy_cpu_policy_falls_back(caplog):
    caplog.set_level("INFO")
    choice = choose_device("auto", min_free_mb=2048, busy_policy="cpu", gpus=[card(0, 1)])
    assert choice.device == "cpu" and "busy_policy=cpu" in choice.reason and "1024 MB free" in choice.reason
    assert any(r.levelname == "WARNING" and "Using cpu" in r.getMessage() for r in caplog.records)


def test_threshold_is_inclusive_and_zero_disables_it():
    assert choose_device("auto", min_free_mb=2048, gpus=[card(0, 2)]).device == "cuda:0"
    assert choose_device("auto", min_free_mb=0, gpus=[card(0, 0)]).device == "cuda:0"


@pytest.mark.parametrize("requested,policy", [("gpu", "refuse"), ("cuda:x", "refuse"), ("auto", "wait")])
def test_bad_arguments(requested, policy):
    with pytest.raises(ValueError):
        choose_device(requested, busy_policy=policy, gpus=[])


# --- CUDA_VISIBLE_DEVICES -------------------------------------------------------------------------

def test_visible_devices_reindexes_like_cuda():
    devices = [card(0, 10), card(1, 20), card(2, 30)]
    assert [g.index for g in visible_gpus(devices, {})] == [0, 1, 2]
    picked = visible_gpus(devices, {"CUDA_VISIBLE_DEVICES": "2,0"})
    assert [(g.index, g.nvml_index) for g in picked] == [(0, 2), (1, 0)]
    assert visible_gpus(devices, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus(devices, {"CUDA_VISIBLE_DEVICES": "-1"}) == []
    assert [g.nvml_index for g in visible_gpus(devices, {"CUDA_VISIBLE_DEVICES": "1,7,2"})] == [1]
    by_uuid = visible_gpus(devices, {"CUDA_VISIBLE_DEVICES": "GPU-00000002"})
    assert [(g.index, g.nvml_index) for g in by_uuid] == [(0, 2)]
    assert visible_gpus(devices, {"CUDA_VISIBLE_DEVICES": "GPU-0000"}) == []  # ambiguous prefix
    # auto picks the emptiest visible GPU and names it by its CUDA index
    assert choose_device("auto", gpus=picked).device == "cuda:0"


def test_gpuinfo_units():
    g = card(0, 1.5, 2)
    assert (g.free_mb, g.total_mb) == (1536, 2048)
