"""e2vd.model_files: what a model directory's files must be, said the same way by the daemon
(e2vd.engine) and by `e2vd check-config` / `e2vd install` (e2vd.config.model_problem).
(Every hostile kind of file through a real Engine load: tests/test_hostile_model.py.)"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from e2vd.config import model_problem
from e2vd.model_files import MODEL_FILES, ModelError, check_model_files, model_file


def directory(tmp_path: Path) -> Path:
    """A directory holding the three files (their contents do not matter here)."""
    d = tmp_path / "model"
    d.mkdir()
    for name in MODEL_FILES:
        (d / name).write_bytes(b"x")
    return d


def replace(path: Path, how: str) -> None:
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    elif how == "dangling":
        path.symlink_to(path.parent / "gone")
    elif how == "loop":
        path.symlink_to(path)
    elif how == "directory":
        path.mkdir()
    elif how == "empty":
        path.write_bytes(b"")
    else:
        path.symlink_to(how)


@pytest.mark.parametrize("how, says", [
    ("fifo", "is a FIFO (named pipe), not a file"),
    ("socket", "is a socket, not a file"),
    ("/dev/zero", "is a device (it leads to /dev/zero), not a file"),
    ("/proc/self/environ", "a kernel interface, not a file"),
    ("dangling", "is a symbolic link to"),
    ("loop", "is a symbolic link loop"),
    ("directory", "is a directory, not a file"),
    ("empty", "is empty: the download or copy was interrupted"),
])
def test_the_daemon_and_check_config_say_the_same_about_a_file_that_is_not_one(tmp_path, how, says):
    d = directory(tmp_path)
    replace(d / "model.pt", how)
    with pytest.raises(ModelError) as info:
        check_model_files(d)
    assert says in str(info.value) and str(d / "model.pt") in str(info.value)
    assert model_problem(str(d)) == str(info.value)          # e2vd check-config / install


def test_a_link_to_a_regular_file_elsewhere_is_fine(tmp_path):
    """Hub caches lay a model out as links to blobs."""
    d = directory(tmp_path)
    blob = tmp_path / "blob"
    blob.write_bytes(b"weights")
    replace(d / "model.pt", str(blob))
    assert model_file(d / "model.pt", "the weights").st_size == len(b"weights")
    assert model_problem(str(d)) is None


def test_missing_files_are_listed_together_by_check_config(tmp_path):
    d = directory(tmp_path)
    (d / "config.yaml").unlink()
    (d / "tokens.txt").unlink()
    assert "lacks config.yaml, tokens.txt" in model_problem(str(d))
    with pytest.raises(ModelError, match="config.yaml is missing: it holds the model's config"):
        check_model_files(d)


def test_an_unreadable_file_names_the_uid_and_the_fix(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file: a permission denial cannot be shown as root")
    d = directory(tmp_path)
    (d / "tokens.txt").chmod(0)
    try:
        with pytest.raises(ModelError, match=r"cannot be read by uid \d+ .*chmod -R a\+rX"):
            check_model_files(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
