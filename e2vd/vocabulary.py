"""The words e2vd's modules share, each defined once: labels, granularities, precisions, model
states, boolean spellings and the process exit codes.

Error codes and their HTTP statuses are HTTP vocabulary and live in `e2vd.protocol.ERRORS`.
This module imports nothing of e2vd and nothing heavy: the client, the CLI and the daemon all
use it.
"""
from __future__ import annotations

import enum

#: The 9 emotions in the model's output order (tokens.txt of emotion2vec+, "<unk>" read as
#: "unknown"). `e2vd.engine.read_tokens` checks every model directory against this order.
LABELS: tuple[str, ...] = (
    "angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown",
)


class Granularity(enum.StrEnum):
    """What a recognition's embedding covers: the whole clip, or each 20 ms frame."""

    UTTERANCE = "utterance"
    FRAME = "frame"


#: Precision names accepted by `dtype` (half precisions only take effect on a GPU).
DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")


class State(enum.StrEnum):
    """The model's state as the daemon reports it (`GET /v1/health`, `GET /v1/status`)."""

    LOADING = "loading"
    READY = "ready"
    UNAVAILABLE = "unavailable"


#: Spellings of a boolean in text (environment variables, query options), lower case.
TRUE_WORDS: tuple[str, ...] = ("1", "true", "yes", "on")
FALSE_WORDS: tuple[str, ...] = ("0", "false", "no", "off")


def parse_bool_word(text: str) -> bool | None:
    """True/False for a spelling in TRUE_WORDS/FALSE_WORDS (any case, outer spaces ignored);
    None when `text` is neither."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


class ExitCode(enum.IntEnum):
    """Exit status of every `e2vd` command, the daemon (`e2vd serve`) included.

    e2vd's own exception classes carry theirs as the class attribute `exit_code`; `e2vd.cli.main`
    is the one place that turns an exception into the process's exit status.
    """

    OK = 0
    FAILED = 1         # a system step the command needs failed: groupadd/systemctl (install,
                       # uninstall), reading the journal (report)
    USAGE = 2          # bad arguments or configuration: fix the command line or the config file
    UNREACHABLE = 3    # the daemon cannot be reached (socket missing, refused, timed out)
    REJECTED = 4       # the request was refused as bad input (audio, options, size)
    SERVER = 5         # the daemon (or the model, or the socket it needs) failed
    INTERRUPTED = 130  # stopped by Ctrl-C (SIGINT), as shells report it (128 + 2)
