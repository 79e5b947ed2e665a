"""The README's "containers" example, run as written where systemd is not PID 1.

A mount namespace with an empty /run stands for the container (to sd_booted(3) and to
scripts/setup.sh there is no systemd); `e2vd` is this checkout's, and the model directory in the
example is replaced by the tiny stand-in's. Needs root (for the private /run).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_audio

ROOT = Path(__file__).resolve().parent.parent
MODEL_IN_EXAMPLE = "/models/emotion2vec_plus_large"

#: The README's example, verbatim (the README section must show exactly these lines).
EXAMPLE = """\
export E2VD_SOCKET=/run/e2vd/e2vd.sock E2VD_MODEL=/models/emotion2vec_plus_large
mkdir -p /run/e2vd
e2vd serve --idle-timeout 8h &          # the daemon, a job of this shell (logs on stderr)
until [ -S "$E2VD_SOCKET" ]; do sleep 0.2; done
e2vd warmup                             # returns once the model is loaded
e2vd recognize clip.wav
kill %1; wait                           # SIGTERM: finishes what is in flight, exits 0, frees the GPU
"""


def test_the_containers_example_runs_as_written(tiny_model, tmp_path):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /run")
    write_audio(tmp_path / "clip.wav", seconds=1.5)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "e2vd").write_text(f'#!/bin/sh\nexec {sys.executable} -m e2vd "$@"\n')
    (bin_dir / "e2vd").chmod(0o755)
    script = "set -e\nmount -t tmpfs e2vd-norun /run\n" + EXAMPLE.replace(MODEL_IN_EXAMPLE, str(tiny_model))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2VD_", "NOTIFY_SOCKET", "LISTEN_"))}
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONPATH=str(ROOT),
               E2VD_CONFIG=os.devnull, E2VD_DEVICE="cpu")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("e2vd is warm: model ") and str(tiny_model) in lines[0]
    assert lines[1].startswith("clip.wav: ") and "1.50 s of audio" in lines[1]
    assert "event=start" in proc.stderr and "event=stopped" in proc.stderr and "SIGTERM" in proc.stderr


def test_the_readme_shows_the_example_verbatim():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert "```bash\n" + EXAMPLE + "```" in readme
