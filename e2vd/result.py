"""The result of one recognition: what `Engine.recognize` returns and `Client.recognize` rebuilds.

Lightweight on purpose (numpy only): the client uses it without importing torch or funasr.
`Recognition.to_dict` writes the HTTP API's fields; `Recognition.from_dict` reads them back,
checking every field, so a document from a peer can never build a malformed result.
`Primary` is the main model's answer kept beside the fallback's when the fallback decided
(e2vd.fallback; the HTTP answer's `primary` object).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

import numpy as np

_R = TypeVar("_R", bound="Recognition")


@dataclass(frozen=True)
class Top:
    """One label and its probability (0..1)."""

    label: str
    score: float


@dataclass(frozen=True)
class Recognition:
    """One clip's result.

    `scores` are softmax probabilities in the order of `labels` (the 9 English labels; sum 1).
    `model_labels` are the model's own strings in the same order (e.g. "开心/happy").
    `embedding` is the encoder output: mean over frames (D,) for "utterance", or (T, D) at
    50 frames/s for "frame"; None unless asked for. `duration_s` is the decoded audio's length in
    seconds.
    """

    labels: list[str]
    scores: list[float]
    model_labels: list[str]
    duration_s: float
    embedding: np.ndarray | None = None

    @property
    def top(self) -> Top:
        """The label with the highest score (the first of them on a tie)."""
        best = int(np.argmax(self.scores))
        return Top(self.labels[best], float(self.scores[best]))

    def ranked(self) -> list[Top]:
        """All labels with their scores, most probable first."""
        return sorted((Top(lab, float(s)) for lab, s in zip(self.labels, self.scores)), key=lambda t: -t.score)

    def to_dict(self, embedding: bool = True) -> dict[str, Any]:
        """JSON-ready dict with the HTTP API's field names: labels, scores, top, model_labels,
        duration_s, and the embedding as nested lists when there is one and `embedding` is true."""
        top = self.top
        out: dict[str, Any] = {
            "labels": list(self.labels),
            "scores": [float(s) for s in self.scores],
            "top": {"label": top.label, "score": top.score},
            "model_labels": list(self.model_labels),
            "duration_s": float(self.duration_s),
        }
        if embedding and self.embedding is not None:
            out["embedding"] = self.embedding.tolist()
        return out

    @classmethod
    def from_dict(cls: type[_R], d: Mapping[str, Any]) -> _R:
        """Rebuild a result from `to_dict`'s document (`top` is recomputed, not read).

        Raises ValueError naming the first missing or malformed field: labels must be strings,
        at least one, with one finite score each; duration_s a finite number; the embedding,
        when present, a rectangular array of finite numbers (read as float32).
        """
        try:
            return cls(**cls._fields(d))
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as e:
            raise ValueError(f"the recognition lacks or mangles field {e}: {str(d)[:200]}") from e

    @classmethod
    def _fields(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """The constructor's arguments read from `d`; subclasses add their own fields."""
        labels, scores = d["labels"], [float(x) for x in d["scores"]]
        if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
                or len(scores) != len(labels)):
            raise ValueError("'labels' must be strings, as many as 'scores' and at least one")
        if not all(math.isfinite(x) for x in scores):
            raise ValueError("'scores' must be finite numbers")
        duration = float(d["duration_s"])
        if not math.isfinite(duration):
            raise ValueError("'duration_s' must be a finite number")
        return {"labels": list(labels), "scores": scores,
                "model_labels": [str(x) for x in d.get("model_labels") or []],
                "duration_s": duration, "embedding": _embedding(d.get("embedding"))}


#: The values of an answer's `decided_by`: which model's result the answer carries.
DECIDED_BY = ("primary", "fallback")


@dataclass(frozen=True)
class Primary:
    """The main model's answer when the low-confidence fallback decided (e2vd.fallback): its
    `labels` and softmax `scores` in the same order, and `model`, the id the daemon serves it as.
    """

    labels: list[str]
    scores: list[float]
    model: str

    @property
    def top(self) -> Top:
        """The label with the highest score (the first of them on a tie)."""
        best = int(np.argmax(self.scores))
        return Top(self.labels[best], float(self.scores[best]))

    def to_dict(self) -> dict[str, Any]:
        """The HTTP answer's `primary` object: labels, scores, top {label, score}, model."""
        top = self.top
        return {"labels": list(self.labels), "scores": [float(s) for s in self.scores],
                "top": {"label": top.label, "score": top.score}, "model": self.model}

    @classmethod
    def from_dict(cls, d: Any) -> "Primary":
        """Rebuild from `to_dict`'s document (`top` recomputed); ValueError naming what is wrong."""
        if not isinstance(d, Mapping):
            raise ValueError(f"'primary' must be an object, got {type(d).__name__}")
        try:
            labels, scores = d["labels"], [float(x) for x in d["scores"]]
            model = d.get("model", "")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"'primary' lacks or mangles field {e}: {str(d)[:200]}") from e
        if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels)
                or len(scores) != len(labels) or not all(math.isfinite(x) for x in scores)):
            raise ValueError("'primary' must hold string labels, at least one, with one finite score each")
        if not isinstance(model, str):
            raise ValueError("'primary.model' must be a string")
        return cls(list(labels), scores, model)


def _embedding(value: Any) -> np.ndarray | None:
    """A document's embedding as float32 (None stays None); ValueError for ragged or
    non-finite arrays."""
    if value is None:
        return None
    with np.errstate(over="ignore"):   # beyond float32 becomes inf, refused just below
        array = np.asarray(value, dtype=np.float32)   # ragged nesting raises ValueError
    if not np.isfinite(array).all():
        raise ValueError("'embedding' must hold finite numbers")
    return array
