"""The scoring engine: prefix-shared scores equal naive full-prompt scores; label tokens renormalised."""

import sys
import types

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latentsim.backends import (
    FakeScorer,
    HFScorer,
    VLLMScorer,
    common_prefix_length,
    context_key,
    lora_int_id,
    naive_label_logits,
    probabilities,
    prompt_token_ids,
)
from latentsim.prompts import answer_token_ids, marked_context, render_prompt

CONTEXTS = [("the cat sat on a", "mat"), ("it was a big red", "house"), ("one two", "three")]
INTERPRETATIONS = ["cat", "red blue green", "the sun and the moon and a star", "one two three four five six",
                   "river", "code data read write"]


def prompts_for(contexts=CONTEXTS, interpretations=INTERPRETATIONS, fmt="sim_v1"):
    # Interleaved on purpose: the scorer must regroup judgments by context and put results back in order.
    return [render_prompt(fmt, marked_context(p, j), interp) for interp in interpretations for p, j in contexts]


def load(folder, lora: bool = False):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("arch,lora", [("llama", False), ("llama", True), ("gemma3", False)])
def test_prefix_shared_scores_equal_naive(arch, lora, tiny_model_dir, tiny_gemma_dir):
    model, tok = load(tiny_model_dir if arch == "llama" else tiny_gemma_dir, lora)
    ids = answer_token_ids("sim_v1", tok)
    prompts = prompts_for()
    scorer = HFScorer(model, tok, ids, batch_size=4)  # several suffix batches per context
    fast = scorer.label_logits(prompts)
    naive = naive_label_logits(model, tok, prompts, ids, batch_size=5)
    margin = lambda x: x[:, 1] - x[:, 0]  # noqa: E731
    assert np.abs(margin(fast) - margin(naive)).max() < 1e-4
    assert np.abs(fast - naive).max() < 1e-4
    assert np.ptp(margin(naive)) > 1e-3  # the judgments really differ: the check can fail
    # Fewer tokens computed than the naive path: the shared prefix is computed once per context.
    assert scorer.stats["judgments"] == len(prompts)
    assert scorer.stats["computed_tokens"] < 0.7 * scorer.stats["prompt_tokens"]


def test_scores_are_the_prompt_tokens_next_token_logits(tiny_model_dir):
    """Against a plain unbatched forward of each prompt's full token ids (no padding at all)."""
    model, tok = load(tiny_model_dir)
    ids = answer_token_ids("sim_value_v1", tok)
    prompts = prompts_for(fmt="sim_value_v1")[:5]
    fast = HFScorer(model, tok, ids).label_logits(prompts)
    for i, p in enumerate(prompts):
        full = model(input_ids=torch.tensor([prompt_token_ids(tok, p)])).logits[0, -1, ids]
        assert torch.allclose(torch.from_numpy(fast[i]), full.detach(), atol=1e-5)


def test_probabilities_renormalise_over_the_labels():
    logits = np.array([[2.0, 0.0], [-1.0, 3.0], [1000.0, 999.0]])
    p = probabilities(logits)
    assert np.allclose(p.sum(axis=1), 1)
    assert p[0, 1] == pytest.approx(1 / (1 + np.exp(2.0)))
    assert p[2, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))  # no overflow
    # A vocabulary-wide log-softmax shift (what vLLM returns) gives the same renormalised probabilities.
    assert np.allclose(probabilities(logits - 7.5), p)


def test_grouping_and_prefix_helpers():
    a, b = prompts_for()[0], prompts_for()[3]  # same context, other interpretation
    assert context_key(a) == context_key(b)
    assert context_key(a) != context_key(prompts_for()[1])
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3]]) == 3


def test_fake_scorer_is_deterministic():
    prompts = prompts_for()
    a, b = FakeScorer([5, 6]).label_logits(prompts), FakeScorer([5, 6]).label_logits(prompts)
    assert a.shape == (len(prompts), 2) and np.array_equal(a, b) and np.ptp(a) > 0


def test_vllm_scorer_sends_our_token_ids_and_reads_labels_by_id(monkeypatch, tiny_model_dir, tmp_path):
    """The vLLM glue against a stand-in module: same token ids as the hf backend, the adapter as a LoRARequest
    with a stable id, label log-probs read by token id, and a missing label is an error, never probability 0."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = answer_token_ids("sim_v1", tok)
    sent = {}

    class SamplingParams:
        __annotations__ = {"logprob_token_ids": list}

        def __init__(self, **kw):
            sent["params"] = kw

    class LLM:
        def __init__(self, **kw):
            sent["llm"] = kw

        def generate(self, requests, params, lora_request=None, use_tqdm=False):
            sent.setdefault("requests", []).extend(r["prompt_token_ids"] for r in requests)
            sent["lora"] = lora_request
            lp = lambda v: types.SimpleNamespace(logprob=v)  # noqa: E731
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(logprobs=[
                {answer[0]: lp(-1.0 - len(r["prompt_token_ids"]) / 100), answer[1]: lp(-2.0)}])]) for r in requests]

    lora_mod = types.ModuleType("vllm.lora.request")
    lora_mod.LoRARequest = lambda name, int_id, path: (name, int_id, path)
    fake = types.SimpleNamespace(SamplingParams=SamplingParams, LLM=LLM)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora_mod)
    monkeypatch.setattr("latentsim.backends.require_vllm", lambda: fake)
    adapter = tmp_path / "checkpoint-6"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    prompts = prompts_for()
    scorer = VLLMScorer(str(tiny_model_dir), tok, answer, max_lora_rank=64)
    scorer.use_adapter(str(adapter))
    logits = scorer.label_logits(prompts)
    assert sent["llm"]["enable_prefix_caching"] and sent["llm"]["enable_lora"]
    assert sent["params"]["logprob_token_ids"] == answer and sent["params"]["temperature"] == 0.0
    assert sorted(sent["requests"]) == sorted(prompt_token_ids(tok, p) for p in prompts)
    assert sent["lora"] == ("checkpoint-6", lora_int_id(str(adapter)), str(adapter))
    assert lora_int_id(str(adapter)) == lora_int_id(str(tmp_path / "." / "checkpoint-6"))  # stable per path
    for i, p in enumerate(prompts):  # results come back in the caller's order
        assert logits[i, 0] == pytest.approx(-1.0 - len(prompt_token_ids(tok, p)) / 100)
    # The first wave holds one judgment per context (its prefix is then cached for the rest).
    assert len({tuple(r) for r in sent["requests"][:len(CONTEXTS)]}) == len(CONTEXTS)

    def missing(self, requests, params, lora_request=None, use_tqdm=False):
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(logprobs=[{answer[1]: None}])]) for _ in requests]

    monkeypatch.setattr(LLM, "generate", missing)
    with pytest.raises(RuntimeError, match="refusing to read"):
        scorer.label_logits(prompts[:2])
    (adapter / "adapter_config.json").write_text('{"r": 128}')
    with pytest.raises(ValueError, match="max_lora_rank"):
        scorer.use_adapter(str(adapter))
