"""The files of a model directory, checked before anything reads them: one place for what the
daemon (`e2vd.engine`) and `e2vd check-config` / `e2vd install` (`e2vd.config.model_problem`)
say about a model directory's files. Light: no torch, no funasr.

A model directory is hostile input (docs/design.md, "A model directory is data"): each of
MODEL_FILES must be a readable, non-empty regular file, or a symbolic link to one (hub caches
link to blobs). A FIFO would make open() wait for ever, /dev/zero never ends, and procfs or
sysfs files claim sizes that are not their contents; each is refused with a ModelError that
says what the path is and what to do.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from e2vd.vocabulary import ExitCode

#: The files a model directory must hold, and what each holds (as error messages name it).
MODEL_FILES: dict[str, str] = {"config.yaml": "the model's config", "model.pt": "the weights",
                               "tokens.txt": "the label list"}
#: Where a symbolic link in a model directory must not lead: kernel interfaces whose "files" are
#: no model's (procfs and sysfs files claim a size of 0 or 4096 whatever they hold; /proc/self/mem
#: reads fail; /dev holds devices).
KERNEL_TREES = ("/proc/", "/sys/", "/dev/")


class ModelError(RuntimeError):
    """The model cannot be resolved, validated or loaded; the message names the file and the fix."""

    exit_code = ExitCode.SERVER


def model_file(path: Path, what: str) -> os.stat_result:
    """The `os.stat` of `path`, a file of the model directory holding `what`, once it is known to be
    a readable, non-empty regular file (a symbolic link to one is fine: hub caches link to blobs).

    Anything else is a ModelError saying what `path` is and what to do: missing, a dangling
    symbolic link or a loop, a directory, a FIFO (opening it would wait forever), a device
    (/dev/zero never ends), a socket, a file in /proc, /sys or /dev, unreadable, or empty."""
    directory = path.parent
    fix = "copy the model's files again (config.yaml, model.pt, tokens.txt are plain files)"
    if not os.access(directory, os.X_OK) and directory.exists():
        raise unreadable(path, directory)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ModelError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist: "
                             f"it should hold {what}; {fix}") from None
        extra = " (funasr would silently run with random weights)" if path.name == "model.pt" else ""
        raise ModelError(f"{path} is missing: it holds {what}{extra}. Point E2VD_MODEL at a "
                         "complete emotion2vec+ directory (config.yaml, model.pt, tokens.txt)") from None
    except PermissionError:
        raise unreadable(path, directory) from None
    except OSError as err:
        kind = "a symbolic link loop" if err.errno == errno.ELOOP else f"not usable ({err.strerror})"
        raise ModelError(f"{path} is {kind}: it should hold {what}; {fix}") from None
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device")
        target = f" (it leads to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise ModelError(f"{path} is {kind}{target}, not a file: it should hold {what}; {fix}")
    real = os.path.realpath(path)
    if real.startswith(KERNEL_TREES):
        raise ModelError(f"{path} leads to {real}, a kernel interface, not a file: it should hold {what}; {fix}")
    if not os.access(path, os.R_OK):
        raise unreadable(path, directory)
    if info.st_size == 0:
        raise ModelError(f"{path} is empty: the download or copy was interrupted; {fix}")
    return info


def check_model_files(directory: Path) -> None:
    """ModelError for the first of MODEL_FILES in `directory` that `model_file` refuses."""
    for name, what in MODEL_FILES.items():
        model_file(directory / name, what)


def unreadable(path: Path, directory: Path) -> ModelError:
    """The error for a model file this process may not read."""
    return ModelError(f"{path} cannot be read by uid {os.geteuid()} (permission denied): the service "
                      f"runs as its own user; make the model readable by everyone, e.g. "
                      f"`sudo chmod -R a+rX {directory}`")
