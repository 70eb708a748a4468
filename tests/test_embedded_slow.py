"""Slow tier: the real embedded models (converted once, minutes). Run with `./launch.sh test --slow`."""

import os
from pathlib import Path

import pytest
import torch

from latentsim.models import load_model_and_tokenizer, prepare_embedded_model
from latentsim.sae import residual_at

pytestmark = pytest.mark.slow

PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It was founded by traders who "
    "settled on the banks of the river, and it grew into a busy port."
)


# Read at import, before conftest points LATENTSIM_CACHE at a per-test folder.
USER_CACHE = os.environ.get("LATENTSIM_CACHE", str(Path.home() / ".cache" / "latentsim"))


@pytest.fixture(autouse=True)
def _shared_cache(monkeypatch):
    # Reuse the user's converted models: converting again would take minutes per test.
    monkeypatch.setenv("LATENTSIM_CACHE", USER_CACHE)


@pytest.mark.parametrize(
    "name, layers, d_model, layer", [("smollm2-135m", 30, 576, 15), ("gemma3-270m", 18, 640, 9)]
)
def test_embedded_model_loads_and_reads_english(name, layers, d_model, layer):
    prepare_embedded_model(name)
    model, tok = load_model_and_tokenizer(f"embedded:{name}")
    cfg = model.config.get_text_config()
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (layers, d_model)
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[tok.bos_token_id] + tok(PARAGRAPH, add_special_tokens=False)["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    assert loss < 4.5  # a working LM; a broken conversion gives ~log(vocab) > 10
    h = residual_at(model, ids, layer)
    assert h.shape == (1, ids.shape[1], d_model)
    norms = h[0].norm(dim=-1)
    assert norms[0] > 5 * norms[1:].median()  # the massive BOS activation we exclude everywhere


def test_smollm2_has_a_chat_template():
    _, tok = load_model_and_tokenizer("embedded:smollm2-135m")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fmt", ["sim_v1", "sim_value_v1"])
def test_answers_are_single_tokens_for_smollm2(fmt):
    from latentsim.prompts import answer_token_ids, get_format

    _, tok = load_model_and_tokenizer("embedded:smollm2-135m")
    ids = answer_token_ids(fmt, tok)
    assert [tok.decode([i]) for i in ids] == list(get_format(fmt).answers)
