"""vLLM paths of the LLM explainer and judge (GPU only, `[gpu]` extra), imported lazily.

Without a CUDA GPU or without vllm installed these fail with a clear message: there is no silent fallback to
the `hf` backend. Prompts go in as token ids built with the model's own chat template (so no second BOS is
added), and the judge's P(Yes) is read as the exact log-probability of each answer appended to the prompt
(`prompt_logprobs`), so an answer outside a top-k list can never read as probability 0.
"""

from __future__ import annotations

import math


def require_vllm():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("backend `vllm` needs a CUDA GPU and none is visible; use `backend: hf` (CPU or GPU).")
    try:
        import vllm
    except ImportError as err:
        raise RuntimeError("backend `vllm` needs the [gpu] extra: pip install -e '.[gpu]'.") from err
    return vllm


def load_llm(model_path: str):
    vllm = require_vllm()
    return vllm.LLM(model=model_path, enable_prefix_caching=True, seed=0)


def chat_token_ids(tokenizer, user_messages: list[str]) -> list[list[int]]:
    out = []
    for text in user_messages:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def generate(llm, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations."""
    vllm = require_vllm()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
    return [o.outputs[0].text for o in outputs]


def yes_probability(llm, prompt_ids: list[list[int]], yes_id: int, no_id: int) -> list[float]:
    """P(Yes) renormalised over {Yes, No}: the logprob of each answer token appended to the prompt."""
    vllm = require_vllm()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    requests = [{"prompt_token_ids": ids + [answer]} for ids in prompt_ids for answer in (yes_id, no_id)]
    outputs = llm.generate(requests, params)
    probs = []
    for i in range(0, len(outputs), 2):
        lp_yes = outputs[i].prompt_logprobs[-1][yes_id].logprob
        lp_no = outputs[i + 1].prompt_logprobs[-1][no_id].logprob
        probs.append(1 / (1 + math.exp(lp_no - lp_yes)))
    return probs
