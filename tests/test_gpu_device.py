"""The GPU paths on a real NVIDIA GPU: NVML's choice, IEEE fp32 parity with the CPU, batching, and
GPU failures (too little free memory, CUDA out of memory at load) ending in 503 model_unavailable
and a clean exit, never a crash loop. Skipped, with the reason, where torch sees no CUDA device
(CI has none); run on a GPU machine with `python -m pytest tests/test_gpu_device.py`.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import wav_clip
from daemon_proc import DaemonProcess

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)")


def test_auto_picks_a_gpu_through_nvml_and_reads_its_memory():
    from e2vd import gpu

    choice = gpu.choose_device("auto", min_free_mb=0)
    assert choice.device.startswith("cuda:"), choice.reason
    mem = gpu.device_memory(choice.device)
    assert mem is not None and 0 < mem.free_bytes <= mem.total_bytes


def test_fp32_on_the_gpu_equals_the_cpu_and_batches_equal_one_by_one(tiny_model):
    from e2vd.audio import decode
    from e2vd.engine import Engine

    clips = [decode(wav_clip(3.0, seed=i)) for i in range(4)]
    cpu = Engine.load(str(tiny_model), device="cpu")
    gpu = Engine.load(str(tiny_model), device="cuda:0", dtype="fp32")
    want = np.array([cpu.recognize(c).scores for c in clips])
    one = np.array([gpu.recognize(c).scores for c in clips])
    batch = np.array([r.scores for r in gpu.recognize_batch(clips)])
    np.testing.assert_allclose(one, want, atol=1e-5)
    np.testing.assert_allclose(batch, one, atol=1e-5)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precisions_run_on_the_gpu(tiny_model, dtype):
    from e2vd.engine import Engine

    engine = Engine.load(str(tiny_model), device="cuda:0", dtype=dtype)
    r = engine.recognize(wav_clip(3.0))
    assert engine.dtype == dtype and abs(sum(r.scores) - 1.0) < 1e-3


def test_a_gpu_below_min_free_mb_is_refused_with_the_reason_then_the_daemon_exits(tiny_model, tmp_path):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, device="auto", min_free_mb=10**9,
                      busy_policy="refuse", unavailable_grace=3)
    with d:
        status, body = d.settled_health()
        assert status == 503 and body["error"]["code"] == "model_unavailable"
        assert "min_free_mb" in body["error"]["message"]
        assert d.wait(60) == 5


def test_busy_policy_cpu_falls_back_to_the_cpu(tiny_model, tmp_path):
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, device="auto", min_free_mb=10**9,
                      busy_policy="cpu", wait_ready=True, idle_timeout=600)
    with d:
        status, _, body = d.request("GET", "/v1/status")
        assert status == 200 and body["device"] == "cpu"
        assert d.request("POST", "/v1/recognize", wav_clip(2.0))[0] == 200


def _hog_gpu(leave_mib: int = 64) -> subprocess.Popen:
    """Another process that holds all but `leave_mib` MiB of the GPU's free memory until killed."""
    hog = subprocess.Popen([sys.executable, "-c", (
        "import time, torch\n"
        "free, _ = torch.cuda.mem_get_info(0)\n"
        f"x = torch.empty(free - ({leave_mib} << 20), dtype=torch.uint8, device='cuda:0')\n"
        "print('holding', free >> 20, flush=True)\n"
        "time.sleep(300)\n")], stdout=subprocess.PIPE, text=True)
    assert hog.stdout is not None and hog.stdout.readline().startswith("holding")
    return hog


def test_cuda_out_of_memory_at_load_is_model_unavailable_not_a_crash(tiny_model, tmp_path):
    """Another process holds all but 64 MiB of the GPU: the daemon's CUDA start or its weights
    cannot fit. Clients get 503 model_unavailable naming the problem; the daemon exits 5 after
    its grace period (systemd's socket then stays usable: see test_systemd's broken-model case)."""
    hog = _hog_gpu()
    try:
        d = DaemonProcess(tmp_path / "s.sock", tiny_model, device="cuda:0", min_free_mb=0,
                          unavailable_grace=3)
        with d:
            status, body = d.settled_health()
            assert status == 503 and body["error"]["code"] == "model_unavailable", body
            assert "memory" in body["error"]["message"].lower()
            assert d.wait(60) == 5
    finally:
        hog.kill()
        hog.wait()


def test_cuda_out_of_memory_during_a_request_is_busy_and_the_daemon_keeps_serving(tiny_model, tmp_path):
    """Loaded, then another process fills the GPU: a 120 s clip (attention over 6000 frames) no
    longer fits. The client gets 503 busy with Retry-After and the reason; once the memory is
    free again the same request succeeds, from the same daemon."""
    long_clip = wav_clip(120.0)
    d = DaemonProcess(tmp_path / "s.sock", tiny_model, device="cuda:0", min_free_mb=0, max_seconds=150,
                      wait_ready=True, idle_timeout=600)
    with d:
        hog = _hog_gpu()
        try:
            status, headers, body = d.request("POST", "/v1/recognize", long_clip)
            assert status == 503 and body["error"]["code"] == "busy", body
            assert "ran out of memory" in body["error"]["message"] and int(headers["retry-after"]) >= 1
        finally:
            hog.kill()
            hog.wait()
        status, _, body = d.request("POST", "/v1/recognize", long_clip)
        assert status == 200 and abs(sum(body["scores"]) - 1.0) < 1e-4
        assert d.proc.poll() is None
