"""The scorers: prefix-shared scores equal naive full-prompt scores; label tokens renormalised; vLLM glue."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from latentsim.prompts import answer_token_ids, marked_context, prompt_token_ids, render_prompt
from latentsim.simulators import Judgment, probabilities
from latentsim.simulators.fake import FakeScorer
from latentsim.simulators.hf import HFScorer, common_prefix_length, naive_label_logits
from latentsim.simulators.vllm import VLLMScorer, lora_int_id, lora_name

CONTEXTS = [("the cat sat on a", "mat"), ("it was a big red", "house"), ("one two", "three")]
INTERPRETATIONS = [
    "cat",
    "red blue green",
    "the sun and the moon and a star",
    "one two three four five six",
    "river",
    "code data read write",
]


def judgments_for(contexts=CONTEXTS, interpretations=INTERPRETATIONS):
    # Interleaved on purpose: the scorer must regroup judgments by context and put results back in order.
    return [Judgment(marked_context(p, j), interp) for interp in interpretations for p, j in contexts]


def rendered(judgments, fmt="sim_v1"):
    return [render_prompt(fmt, j.context, j.interpretation, j.score) for j in judgments]


def load(folder, lora: bool = False):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(
            model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        ).eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("arch,lora", [("llama", False), ("llama", True), ("gemma3", False)])
def test_prefix_shared_scores_equal_naive(arch, lora, tiny_model_dir, tiny_gemma_dir):
    model, tok = load(tiny_model_dir if arch == "llama" else tiny_gemma_dir, lora)
    ids = answer_token_ids("sim_v1", tok)
    judgments = judgments_for()
    scorer = HFScorer(model, tok, ids, batch_size=4)  # several suffix batches per context
    fast = scorer.label_logits(judgments)
    naive = naive_label_logits(model, tok, rendered(judgments), ids, batch_size=5)
    margin = lambda x: x[:, 1] - x[:, 0]  # noqa: E731
    assert np.abs(margin(fast) - margin(naive)).max() < 1e-4
    assert np.abs(fast - naive).max() < 1e-4
    assert np.ptp(margin(naive)) > 1e-3  # the judgments really differ: the check can fail
    # Fewer tokens computed than the naive path: the shared prefix is computed once per context.
    assert scorer.stats["judgments"] == len(judgments)
    assert scorer.stats["computed_tokens"] < 0.7 * scorer.stats["prompt_tokens"]


def test_scores_are_the_prompt_tokens_next_token_logits(tiny_model_dir):
    """Against a plain unbatched forward of each prompt's full token ids (no padding at all)."""
    model, tok = load(tiny_model_dir)
    ids = answer_token_ids("sim_value_v1", tok)
    judgments = judgments_for()[:5]
    fast = HFScorer(model, tok, ids, fmt="sim_value_v1").label_logits(judgments)
    for i, p in enumerate(rendered(judgments, "sim_value_v1")):
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


def test_prefix_helper():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3]]) == 3


def test_fake_scorer_is_deterministic():
    judgments = judgments_for()
    a, b = FakeScorer([5, 6]).label_logits(judgments), FakeScorer([5, 6]).label_logits(judgments)
    assert a.shape == (len(judgments), 2) and np.array_equal(a, b) and np.ptp(a) > 0
    # It reads the rendered prompt: the few-shot turns change its answers.
    shots = render_prompt("sim_v1", marked_context("a", "b"), "c")
    assert not np.array_equal(FakeScorer([5, 6], prefix=shots).label_logits(judgments), a)


def test_vllm_scorer_sends_our_token_ids_and_reads_labels_by_id(monkeypatch, tiny_model_dir, tmp_path):
    """The vLLM glue against a stand-in module: same token ids as the hf backend, the adapter as a LoRARequest
    with a stable id, label log-probs read by token id, and a missing label is an error, never
    probability 0."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = answer_token_ids("sim_v1", tok)
    sent = {}

    class SamplingParams:
        def __init__(self, **kw):
            sent["params"] = kw

    class LLM:
        def __init__(self, **kw):
            sent["llm"] = kw

        def generate(self, requests, params, lora_request=None, use_tqdm=False):
            sent.setdefault("requests", []).extend(r["prompt_token_ids"] for r in requests)
            sent["lora"] = lora_request
            lp = lambda v: types.SimpleNamespace(logprob=v)  # noqa: E731
            return [
                types.SimpleNamespace(
                    outputs=[
                        types.SimpleNamespace(
                            logprobs=[
                                {answer[0]: lp(-1.0 - len(r["prompt_token_ids"]) / 100), answer[1]: lp(-2.0)}
                            ]
                        )
                    ]
                )
                for r in requests
            ]

    lora_mod = types.ModuleType("vllm.lora.request")
    lora_mod.LoRARequest = lambda name, int_id, path: (name, int_id, path)
    fake = types.SimpleNamespace(SamplingParams=SamplingParams, LLM=LLM)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora_mod)
    monkeypatch.setattr("latentsim.simulators.vllm.require_vllm", lambda: fake)
    adapter = tmp_path / "checkpoint-6"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    judgments = judgments_for()
    prompts = rendered(judgments)
    scorer = VLLMScorer(str(tiny_model_dir), tok, answer, max_lora_rank=64)
    scorer.use_adapter(str(adapter))
    logits = scorer.label_logits(judgments)
    assert sent["llm"]["enable_prefix_caching"] and sent["llm"]["enable_lora"]
    assert sent["params"]["logprob_token_ids"] == answer and sent["params"]["temperature"] == 0.0
    assert sorted(sent["requests"]) == sorted(prompt_token_ids(tok, p) for p in prompts)
    assert sent["lora"] == (str(adapter.resolve()), lora_int_id(str(adapter)), str(adapter))
    assert lora_int_id(str(adapter)) == lora_int_id(str(tmp_path / "." / "checkpoint-6"))  # stable per path
    # Two runs' checkpoint-6 never share a LoRA name or id: vLLM keys its prefix cache on the name (#30931).
    other = tmp_path / "another_run" / "checkpoint-6"
    other.mkdir(parents=True)
    (other / "adapter_config.json").write_text('{"r": 8}')
    scorer.use_adapter(str(other))
    assert scorer.lora[0] != str(adapter.resolve()) and scorer.lora[1] != lora_int_id(str(adapter))
    assert lora_name(str(other)) == scorer.lora[0] and Path(scorer.lora[0]).name == "checkpoint-6"
    scorer.use_adapter(str(adapter))
    for i, p in enumerate(prompts):  # results come back in the caller's order
        assert logits[i, 0] == pytest.approx(-1.0 - len(prompt_token_ids(tok, p)) / 100)
    # The first wave holds one judgment per context (its prefix is then cached for the rest).
    assert len({tuple(r) for r in sent["requests"][: len(CONTEXTS)]}) == len(CONTEXTS)

    def missing(self, requests, params, lora_request=None, use_tqdm=False):
        return [
            types.SimpleNamespace(outputs=[types.SimpleNamespace(logprobs=[{answer[1]: None}])])
            for _ in requests
        ]

    monkeypatch.setattr(LLM, "generate", missing)
    with pytest.raises(RuntimeError, match="refusing to read"):
        scorer.label_logits(judgments[:2])
    (adapter / "adapter_config.json").write_text('{"r": 128}')
    with pytest.raises(ValueError, match="max_lora_rank"):
        scorer.use_adapter(str(adapter))


def test_a_sweep_that_switches_base_model_shuts_the_old_engine_down_first(monkeypatch):
    """Defect: the next base model's engine was built while the old one still held its GPU memory (an 8B, then
    a 70B baseline). The factory now shuts the old engine down before it builds the new one, with each model's
    own tensor_parallel_size where the baseline names one."""
    from latentsim.config import EvalArguments
    from latentsim.simulators import SCORERS, ScorerFactory, ScorerSetup, ScoringOptions, baseline_simulator

    events = []

    class Engine(VLLMScorer):
        def __init__(self, base_model, tokenizer, answer_ids, **kw):
            events.append(("build", base_model, kw["tensor_parallel_size"]))
            self.base = base_model

        def shutdown(self):
            events.append(("shutdown", self.base))

        def use_adapter(self, adapter):
            pass

    monkeypatch.setitem(SCORERS, "vllm", Engine)
    monkeypatch.setattr("latentsim.models.resolve_model_path", lambda ref: ref)
    args = EvalArguments(
        eval_set="x",
        backend="vllm",
        tensor_parallel_size=2,
        baselines=["name=small,model=org/small", "name=big,model=org/big,tensor_parallel_size=4"],
    )
    factory = ScorerFactory(ScoringOptions.from_args(args))
    small, big = (baseline_simulator(b) for b in args.parsed_baselines)

    def load(sim):
        setup = ScorerSetup(sim, "sim_v1", "sim_v1", None, [1, 2], [], None, factory.options, factory)
        return factory.load(setup)

    first = load(small)
    assert load(small) is first  # same base model: the engine is reused
    load(big)
    assert events == [("build", "org/small", 2), ("shutdown", "org/small"), ("build", "org/big", 4)]


def test_vllm_judge_sends_one_request_per_judgment_and_reads_both_answers_by_id(monkeypatch):
    """Defect: the LLM judge sent two prompts per judgment with prompt_logprobs (no prefix-cache reads). Now
    one request each, Yes/No log-probs read by id; a missing one is an error, never probability 0."""
    from latentsim.llm_client import vllm_yes_probability

    sent = {}

    class SamplingParams:
        def __init__(self, **kw):
            sent["params"] = kw

    class LLM:
        def generate(self, requests, params, use_tqdm=False):
            sent["requests"] = [r["prompt_token_ids"] for r in requests]
            lp = lambda v: types.SimpleNamespace(logprob=v)  # noqa: E731
            return [
                types.SimpleNamespace(
                    outputs=[types.SimpleNamespace(logprobs=[{7: lp(-0.5 * len(ids)), 9: lp(-1.0)}])]
                )
                for ids in sent["requests"]
            ]

    monkeypatch.setattr(
        "latentsim.llm_client.require_vllm", lambda: types.SimpleNamespace(SamplingParams=SamplingParams)
    )
    probs = vllm_yes_probability(LLM(), [[1, 2], [1, 2, 3, 4]], yes_id=7, no_id=9)
    assert sent["requests"] == [[1, 2], [1, 2, 3, 4]] and sent["params"]["logprob_token_ids"] == [7, 9]
    assert "prompt_logprobs" not in sent["params"] and sent["params"]["max_tokens"] == 1
    assert probs == pytest.approx([1 / (1 + np.exp(-1.0 + 1.0)), 1 / (1 + np.exp(-1.0 + 2.0))])
    with pytest.raises(RuntimeError, match="refusing"):
        vllm_yes_probability(
            types.SimpleNamespace(
                generate=lambda r, p, use_tqdm=False: [
                    types.SimpleNamespace(outputs=[types.SimpleNamespace(logprobs=[{7: None}])])
                ]
            ),
            [[1]],
            7,
            9,
        )
