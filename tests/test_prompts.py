"""Prompt formats: golden renderings (a released format never changes), answers, tokenizer checks."""

import json
from pathlib import Path

import pytest
from helpers import build_char_tokenizer, build_tiny_tokenizer

from latentsim.prompts import (
    PROMPT_FORMATS,
    answer_token_ids,
    dense_header,
    marked_context,
    parse_answer,
    render_completion,
    render_prompt,
)

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("fmt", sorted(PROMPT_FORMATS))
def test_golden_rendering(fmt):
    cases = json.loads((GOLDEN / f"{fmt}.json").read_text())
    assert cases, f"no golden cases for {fmt}"
    for case in cases:
        given = case["input"]
        if PROMPT_FORMATS[fmt].dense:  # no per-judgment prompt: the header before the text, and the answers
            assert dense_header(fmt, given["interpretation"]) == case["header"]
            assert list(PROMPT_FORMATS[fmt].answers) == case["answers"]
            continue
        context = marked_context(given["prefix"], given["judged"])
        assert render_prompt(fmt, context, given["interpretation"], given["score"]) == case["prompt"]
        assert render_completion(fmt, given["label"]) == case["completion"]


def test_every_format_has_a_golden_file():
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(PROMPT_FORMATS)


def test_context_comes_before_the_interpretation():
    text = render_prompt("sim_v1", marked_context("a b", " c"), "the interpretation")[0]["content"]
    assert text.index("Text: a b<< c>>") < text.index("Interpretation: the interpretation")
    assert text.endswith("Interpretation: the interpretation")  # the per-latent part is a suffix


def test_answers_parse_back():
    assert parse_answer("sim_v1", " Yes") == 1 and parse_answer("sim_v1", "No") == 0
    assert parse_answer("sim_v1", "maybe") is None
    assert parse_answer("sim_value_v1", "7") == 7
    with pytest.raises(ValueError, match="no answer"):
        render_completion("sim_v1", 2)
    with pytest.raises(ValueError, match="unknown prompt format"):
        render_prompt("sim_v9", "x", "y")


def test_answers_are_single_tokens_for_the_tiny_tokenizer():
    tok = build_tiny_tokenizer()
    ids = answer_token_ids("sim_v1", tok)
    assert tok.convert_ids_to_tokens(ids) == ["No", "Yes"]
    assert len(set(answer_token_ids("sim_value_v1", tok))) == 10


def test_multi_token_answers_are_refused():
    with pytest.raises(ValueError, match="not one token"):
        answer_token_ids("sim_v1", build_char_tokenizer())


def test_dropping_context_tokens_keeps_the_marked_token():
    from latentsim.prompts import drop_context_tokens

    tok = build_tiny_tokenizer()
    context = marked_context("the cat sat on a", " mat")
    assert drop_context_tokens(context, 2, tok) == "sat on a<< mat>>"
    assert drop_context_tokens(context, 99, tok) == "<< mat>>"


def test_a_marked_context_unmarks_to_its_prefix_and_judged_token():
    from latentsim.errors import BadInputError
    from latentsim.prompts import unmark_context

    assert unmark_context(marked_context("x = [1, 2", ",")) == ("x = [1, 2", ",")
    assert unmark_context(marked_context("a <<b>> c", " d")) == ("a <<b>> c", " d")
    with pytest.raises(BadInputError, match="not a marked context"):
        unmark_context("no marks here")
