"""e2vd.result: Recognition and Top, the top label, the ranking, to_dict/from_dict, embedding shapes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from e2vd.result import Recognition, Top
from e2vd.vocabulary import LABELS

SCORES = [0.01, 0.02, 0.03, 0.60, 0.20, 0.04, 0.05, 0.03, 0.02]
MODEL_LABELS = ["生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral",
                "其他/other", "难过/sad", "吃惊/surprised", "<unk>"]


def rec(scores: list[float] = SCORES, embedding: np.ndarray | None = None) -> Recognition:
    return Recognition(labels=list(LABELS), scores=list(scores), model_labels=list(MODEL_LABELS),
                       duration_s=2.5, embedding=embedding)


def through_json(r: Recognition, embedding: bool = True) -> Recognition:
    """to_dict, JSON text and back, as a result travels from the daemon to the client."""
    return Recognition.from_dict(json.loads(json.dumps(r.to_dict(embedding=embedding))))


# -- top and ranking ------------------------------------------------------------------------------

def test_top_is_the_highest_score() -> None:
    assert rec().top == Top("happy", 0.60)
    assert isinstance(rec().top.score, float)


def test_top_of_a_tie_is_the_first_label_in_model_order() -> None:
    tied = [0.0, 0.0, 0.4, 0.0, 0.4, 0.2, 0.0, 0.0, 0.0]
    assert rec(tied).top == Top("fearful", 0.4)


def test_ranked_lists_every_label_most_probable_first_ties_in_model_order() -> None:
    ranked = rec().ranked()
    assert [t.label for t in ranked] == ["happy", "neutral", "sad", "other", "fearful", "surprised",
                                         "disgusted", "unknown", "angry"]
    assert [t.score for t in ranked] == sorted(SCORES, reverse=True)
    assert ranked[0] == rec().top


def test_results_are_frozen() -> None:
    with pytest.raises(AttributeError):
        rec().duration_s = 1.0  # type: ignore[misc]


# -- to_dict / from_dict --------------------------------------------------------------------------

def test_to_dict_has_the_http_fields_and_no_embedding_unless_asked() -> None:
    d = rec(embedding=np.ones(4, np.float32)).to_dict(embedding=False)
    assert d == {"labels": list(LABELS), "scores": SCORES, "top": {"label": "happy", "score": 0.60},
                 "model_labels": MODEL_LABELS, "duration_s": 2.5}
    assert "embedding" not in rec().to_dict()          # none to give
    assert "embedding" in rec(embedding=np.ones(4, np.float32)).to_dict()


def test_round_trip_without_embedding() -> None:
    back = through_json(rec())
    assert (back.labels, back.scores, back.model_labels, back.duration_s) == (list(LABELS), SCORES, MODEL_LABELS, 2.5)
    assert back.embedding is None and back.top == rec().top


@pytest.mark.parametrize("shape", [(1024,), (150, 1024), (1, 64)], ids=["utterance", "frame", "one-frame"])
def test_round_trip_keeps_the_embedding_shape_and_float32_values(shape: tuple[int, ...]) -> None:
    """Utterance embeddings are (D,), frame embeddings (T, D) at 50 frames/s; JSON nests lists."""
    emb = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    back = through_json(rec(embedding=emb))
    assert back.embedding is not None and back.embedding.dtype == np.float32
    assert back.embedding.shape == shape
    np.testing.assert_array_equal(back.embedding, emb)    # float32 -> JSON -> float32 is exact
    assert through_json(rec(embedding=emb), embedding=False).embedding is None


def test_from_dict_recomputes_top_rather_than_trusting_it() -> None:
    d = rec().to_dict()
    d["top"] = {"label": "angry", "score": 1.0}
    assert Recognition.from_dict(d).top == Top("happy", 0.60)


def test_from_dict_fills_optional_fields() -> None:
    r = Recognition.from_dict({"labels": ["a", "b"], "scores": [0.25, 0.75], "duration_s": 1})
    assert r.model_labels == [] and r.embedding is None and r.duration_s == 1.0 and r.top == Top("b", 0.75)


@pytest.mark.parametrize("doc, field", [
    ({"scores": [1.0], "duration_s": 1.0}, "labels"),
    ({"labels": ["a"], "duration_s": 1.0}, "scores"),
    ({"labels": ["a"], "scores": [1.0]}, "duration_s"),
    ({"labels": [], "scores": [], "duration_s": 1.0}, "at least one"),
    ({"labels": "ab", "scores": [0.5, 0.5], "duration_s": 1.0}, "'labels' must be strings"),
    ({"labels": [1, 2], "scores": [0.5, 0.5], "duration_s": 1.0}, "'labels' must be strings"),
    ({"labels": ["a", "b"], "scores": [1.0], "duration_s": 1.0}, "as many as 'scores'"),
    ({"labels": ["a"], "scores": [float("nan")], "duration_s": 1.0}, "'scores' must be finite"),
    ({"labels": ["a"], "scores": [float("inf")], "duration_s": 1.0}, "'scores' must be finite"),
    ({"labels": ["a"], "scores": ["x"], "duration_s": 1.0}, "could not convert"),
    ({"labels": ["a"], "scores": 1.0, "duration_s": 1.0}, "not iterable"),
    ({"labels": ["a"], "scores": [1.0], "duration_s": float("inf")}, "'duration_s' must be a finite"),
    ({"labels": ["a"], "scores": [1.0], "duration_s": None}, "NoneType"),
    ({"labels": ["a"], "scores": [1.0], "duration_s": 1.0, "embedding": [[1.0], [1.0, 2.0]]}, "inhomogeneous"),
    ({"labels": ["a"], "scores": [1.0], "duration_s": 1.0, "embedding": [1.0, float("nan")]}, "'embedding' must"),
    ({"labels": ["a"], "scores": [1.0], "duration_s": 1.0, "embedding": [1e39]}, "'embedding' must"),
    ({"labels": ["a"], "scores": [1.0], "duration_s": 1.0, "embedding": {"a": 1}}, "float"),
])
def test_from_dict_refuses_a_malformed_document_naming_the_field(doc: dict, field: str) -> None:
    with pytest.raises(ValueError) as e:
        Recognition.from_dict(doc)
    assert "the recognition lacks or mangles field" in str(e.value) and field in str(e.value)


def test_from_dict_of_a_subclass_builds_the_subclass() -> None:
    """e2vd.client.Recognition adds model and timing_ms through the same from_dict."""
    from e2vd.client import Recognition as Served

    d = {**rec().to_dict(), "model": "iic/emotion2vec_plus_large", "timing_ms": {"queue": 1, "infer": 9.5}}
    served = Served.from_dict(json.loads(json.dumps(d)))
    assert isinstance(served, Served) and served.model == "iic/emotion2vec_plus_large"
    assert served.timing_ms == {"queue": 1.0, "infer": 9.5} and served.top == rec().top
    assert Served.from_dict(served.to_dict()) == served
