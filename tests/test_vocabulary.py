"""e2vd.vocabulary is the one home of the shared words: every module that speaks them agrees with it.

The labels are checked against the model's tokens.txt mapping: the real file is not in the
repository, so its content is written out here (the 9 lines of iic/emotion2vec_plus_large's
tokens.txt) and, where ../shared/reference holds the real file, read from there too.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from e2vd import cli, protocol, standin, vocabulary
from e2vd.vocabulary import DTYPES, FALSE_WORDS, LABELS, TRUE_WORDS, ExitCode, Granularity, State, parse_bool_word

#: tokens.txt of iic/emotion2vec_plus_large, line by line, and the label each line stands for.
REAL_TOKENS = ("生气/angry", "厌恶/disgusted", "恐惧/fearful", "开心/happy", "中立/neutral",
               "其他/other", "难过/sad", "吃惊/surprised", "<unk>")
REAL_LABELS = ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown")
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "emotion2vec_plus_large"


# -- labels -------------------------------------------------------------------------------------

def test_labels_are_the_models_tokens_in_the_models_order() -> None:
    from e2vd.engine import english_label

    assert LABELS == REAL_LABELS
    assert tuple(english_label(token) for token in REAL_TOKENS) == LABELS


@pytest.mark.skipif(not (REFERENCE / "tokens.txt").is_file(), reason="../shared/reference is not available")
def test_labels_match_the_real_tokens_txt() -> None:
    from e2vd.engine import english_label

    lines = (REFERENCE / "tokens.txt").read_text(encoding="utf-8").splitlines()
    assert tuple(lines) == REAL_TOKENS
    assert tuple(english_label(line) for line in lines) == LABELS


def test_standin_writes_the_real_tokens() -> None:
    assert standin.TOKENS == REAL_TOKENS


def test_read_tokens_of_a_built_standin_maps_to_the_labels(tiny_model: Path) -> None:
    """What the engine reads from a model directory is what the daemon answers with."""
    from e2vd.engine import english_label, read_tokens

    tokens = read_tokens(tiny_model)
    assert tuple(tokens) == REAL_TOKENS
    assert tuple(english_label(t) for t in tokens) == LABELS


def test_openapi_lists_the_labels() -> None:
    labels = protocol.openapi()["components"]["schemas"]["Recognition"]["properties"]["labels"]
    assert labels["items"]["enum"] == list(LABELS)
    assert labels["minItems"] == labels["maxItems"] == len(LABELS)


# -- granularities, precisions, states ----------------------------------------------------------

def test_granularities_agree_everywhere() -> None:
    words = [g.value for g in Granularity]
    assert words == ["utterance", "frame"]
    assert list(protocol.GRANULARITY.choices) == words and protocol.GRANULARITY.default == Granularity.UTTERANCE
    parser = cli.build_parser()
    assert parser.parse_args(["recognize", "a.wav"]).granularity == Granularity.UTTERANCE
    for word in words:
        assert parser.parse_args(["recognize", "a.wav", "--granularity", word]).granularity == word
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(["recognize", "a.wav", "--granularity", "word"])
    assert refused.value.code == ExitCode.USAGE


def test_engine_refuses_other_granularities_with_the_vocabularys_words() -> None:
    from e2vd.engine import _check_granularity

    for g in Granularity:
        _check_granularity(g)
        _check_granularity(g.value)
    with pytest.raises(ValueError, match="granularity must be one of utterance, frame, not 'word'"):
        _check_granularity("word")


def test_dtypes_agree_everywhere() -> None:
    import torch

    from e2vd import config, engine

    assert DTYPES == ("fp32", "fp16", "bf16")
    assert engine._TORCH_DTYPES == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert tuple(engine._TORCH_DTYPES) == DTYPES
    for name in DTYPES:
        assert config.load_settings(env={"E2VD_DTYPE": name, "E2VD_CONFIG": "/dev/null"}).dtype == name
    with pytest.raises(config.ConfigError, match="fp32, fp16, bf16"):
        config.load_settings(env={"E2VD_DTYPE": "fp64", "E2VD_CONFIG": "/dev/null"})
    with pytest.raises(engine.ModelError, match="unknown dtype 'fp64': use one of fp32, fp16, bf16"):
        engine.Engine.load("/nonexistent", dtype="fp64")


def test_every_state_is_in_the_openapi_document() -> None:
    schemas = protocol.openapi()["components"]["schemas"]
    for state in State:
        assert state.value in schemas["Health"]["properties"]["status"]["enum"]
        assert state.value in schemas["Status"]["properties"]["state"]["enum"]


# -- boolean spellings ----------------------------------------------------------------------------

@pytest.mark.parametrize("word", TRUE_WORDS + FALSE_WORDS)
def test_parse_bool_word_any_case_and_outer_spaces(word: str) -> None:
    expected = word in TRUE_WORDS
    for spelling in (word, word.upper(), word.title(), f"  {word}\t"):
        assert parse_bool_word(spelling) is expected


@pytest.mark.parametrize("text", ["", " ", "2", "y", "n", "truee", "o n", "enabled", "-1", "1.0", "nan"])
def test_parse_bool_word_is_none_for_anything_else(text: str) -> None:
    assert parse_bool_word(text) is None


def test_true_and_false_words_are_disjoint_and_lower_case() -> None:
    assert not set(TRUE_WORDS) & set(FALSE_WORDS)
    assert all(w == w.strip().lower() for w in TRUE_WORDS + FALSE_WORDS)


def test_config_reads_every_boolean_spelling() -> None:
    from e2vd import config

    for word in TRUE_WORDS + FALSE_WORDS:
        for spelling in (word, word.upper()):
            got = config.load_settings(env={"E2VD_QUANTIZE": spelling, "E2VD_CONFIG": "/dev/null"}).quantize
            assert got is (word in TRUE_WORDS), spelling


def test_query_options_read_every_boolean_spelling_and_refuse_others() -> None:
    """The config file's environment and the HTTP query accept the same words."""
    for word in TRUE_WORDS + FALSE_WORDS:
        for spelling in (word, word.upper()):
            assert protocol.EMBEDDING.parse(spelling) is (word in TRUE_WORDS), spelling
    for other in ("2", "y", "enabled", ""):
        with pytest.raises(protocol.ApiError) as refused:
            protocol.EMBEDDING.parse(other)
        assert refused.value.code == "bad_option"


# -- error codes and exit codes -----------------------------------------------------------------

def test_client_codes_for_bare_statuses_are_protocol_codes() -> None:
    from e2vd.client import _status_code

    for status in range(100, 600):
        assert _status_code(status) in protocol.ERRORS, status


def test_cli_hints_name_only_protocol_codes() -> None:
    """cli's hints are keyed by error code: a misspelt code would silently never show its hint."""
    assert cli.ERROR_HINTS and set(cli.ERROR_HINTS) <= set(protocol.ERRORS), set(cli.ERROR_HINTS) - set(protocol.ERRORS)


def test_config_and_systemd_errors_carry_their_exit_codes() -> None:
    from e2vd import config, systemd

    assert config.ConfigError("x").exit_code == ExitCode.USAGE
    assert systemd.SocketError("x").exit_code == ExitCode.SERVER
    assert config.DTYPES is DTYPES


def test_exit_codes_are_the_documented_contract() -> None:
    """docs/design.md §6 and the README: 0 ok, 2 usage, 3 unreachable, 4 rejected, 5 server error;
    1 a failed system step (install, uninstall, report), 130 Ctrl-C."""
    assert {c.name: int(c) for c in ExitCode} == {
        "OK": 0, "FAILED": 1, "USAGE": 2, "UNREACHABLE": 3, "REJECTED": 4, "SERVER": 5, "INTERRUPTED": 130}


def test_vocabulary_imports_nothing_of_e2vd() -> None:
    """The client, the CLI and the daemon all import it: it must stay a leaf."""
    import ast

    tree = ast.parse(Path(vocabulary.__file__).read_text(encoding="utf-8"))
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])]
    assert all(not (m or "").startswith("e2vd") for m in imported), imported
