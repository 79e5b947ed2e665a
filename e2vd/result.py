"""The result of one recognition: what `Engine.recognize` returns and `Client.recognize` rebuilds.

Lightweight on purpose (numpy only): the client uses it without importing torch or funasr.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


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
        """The label with the highest score."""
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
