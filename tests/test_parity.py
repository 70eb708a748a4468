"""The answer rows in fp32 on the hf backends, and the P(yes) bound derived from the dtype (parity.py)."""

import copy
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latentsim.parity import FAILURE_PROBABILITY, forward_roundings, layer_count, p_yes_bound
from latentsim.prompts import answer_token_ids, marked_context, prompt_token_ids, render_prompt
from latentsim.simulators import Judgment, probabilities
from latentsim.simulators.hf import HFScorer, naive_label_logits
from latentsim.training import answer_probabilities

CONTEXTS = [
    ("the cat sat on a", "mat"),
    ("it was a big red", "house"),
    ("one two", "three"),
    ("a b c d", "e"),
]
INTERPRETATIONS = [
    "cat",
    "red blue green",
    "the sun and the moon",
    "one two three",
    "river",
    "code data read",
]


def judgments() -> list[Judgment]:
    return [Judgment(marked_context(p, j), i) for i in INTERPRETATIONS for p, j in CONTEXTS]


def prompts() -> list:
    return [render_prompt("sim_v1", j.context, j.interpretation) for j in judgments()]


def load(folder):
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fp32_answer_rows_equal_the_full_logits(arch, tiny_model_dir, tiny_gemma_dir):
    model, tok = load(tiny_model_dir if arch == "llama" else tiny_gemma_dir)
    ids = answer_token_ids("sim_v1", tok)
    scorer = HFScorer(model, tok, ids)
    rows = scorer.label_logits(judgments())
    full = naive_label_logits(model, tok, prompts(), ids)
    assert np.abs(rows - full).max() < 1e-5
    assert np.abs(answer_probabilities(model, tok, judgments(), ids) - probabilities(full)).max() < 1e-6
    # The sensitivity is ||(w_yes - w_no) * h||, h the final hidden state at the answer position.
    hidden = model.model(input_ids=torch.tensor([prompt_token_ids(tok, prompts()[0])])).last_hidden_state[
        0, -1
    ]
    w = model.lm_head.weight[ids].detach()
    assert scorer.sensitivity[0] == pytest.approx(((w[1] - w[0]) * hidden).norm().item(), rel=1e-5)


def loud_answers(model, tok, ids) -> None:
    """Give both answers' rows a common part that puts their logits near 30 at every judgment (as a trained
    LM's answers sit, e.g. Yes at 21 and No at 20), leaving their difference, and P(yes), to the random rows;
    every weight made exactly representable in bf16, so that a bf16 copy differs only in how it computes."""
    with torch.no_grad():
        hidden = torch.stack(
            [
                model.model(input_ids=torch.tensor([prompt_token_ids(tok, p)])).last_hidden_state[0, -1]
                for p in prompts()
            ]
        )
        mean = hidden.mean(0)
        model.lm_head.weight[ids] += 30 * mean / mean.dot(mean)
        for param in model.parameters():
            param.copy_(param.bfloat16().float())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_bf16_answer_rows_hold_the_bound_that_bf16_logits_break(arch, tiny_model_dir, tiny_gemma_dir):
    """A bf16 model's P(yes) against its fp32 twin: with the answer rows in fp32, within the bf16 bound on the
    mean and the max; read from bf16 logits (a step of 0.125 at 30), far outside it."""
    fp32, tok = load(tiny_model_dir if arch == "llama" else tiny_gemma_dir)
    ids = answer_token_ids("sim_v1", tok)
    loud_answers(fp32, tok, ids)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    reference = HFScorer(fp32, tok, ids)
    logits = reference.label_logits(judgments())
    assert np.abs(logits).min() > 20  # the answers' logits are loud
    p32 = probabilities(logits)[:, 1]
    rows = probabilities(HFScorer(bf16, tok, ids).label_logits(judgments()))[:, 1] - p32
    bf16_logits = probabilities(naive_label_logits(bf16, tok, prompts(), ids))[:, 1] - p32
    bound = p_yes_bound(torch.bfloat16, reference.sensitivity, forward_roundings(layer_count(fp32)))
    assert bound.check(rows)["ok"], (bound, np.abs(rows).max())
    assert not bound.check(bf16_logits)["ok"]
    assert np.abs(rows).max() < np.abs(bf16_logits).max() / 3
    assert np.abs(rows).mean() < np.abs(bf16_logits).mean() / 3


def test_p_yes_bound_by_hand():
    """The derivation's numbers: u = eps / 2; E|ΔP| <= sqrt(roundings) u s / 4; the max is that times
    sqrt(2 ln(2N / δ)); the mean adds the max times sqrt(ln(1/δ) / 2N); rounded logits add u |z| / 4."""
    u = 2.0**-8  # bfloat16: eps 2^-7
    n, s, k = 1000, 0.8, 9
    spread = math.sqrt(k) * u * s / 4
    worst = spread * math.sqrt(2 * math.log(2 * n / FAILURE_PROBABILITY))
    bound = p_yes_bound(torch.bfloat16, [s] * n, k)
    assert bound.max == pytest.approx(worst)
    assert bound.mean == pytest.approx(
        spread + worst * math.sqrt(math.log(1 / FAILURE_PROBABILITY) / (2 * n))
    )
    assert p_yes_bound(torch.bfloat16, [s] * n, k, [40.0] * n).max == pytest.approx(worst + u * 40 / 4)
    fp32 = p_yes_bound(torch.float32, [s] * n, k)
    assert fp32.max == pytest.approx(worst * 2.0**-16)  # eps 2^-23: the same forward in fp32
    assert forward_roundings(32) == 65
    few = p_yes_bound(torch.bfloat16, [s] * 3, k)
    assert few.mean == few.max  # three judgments bound their mean no tighter than their max
    found = bound.check(np.full(n, bound.mean * 1.01))
    assert (
        not found["ok"] and found["max_abs_diff"] < bound.max
    )  # every judgment a little off: the mean fails
