"""Simulator models run with transformers: the prefix-shared chat scorer (`hf`) and the dense scorer
(`dense`).

- `HFScorer`: renders each judgment as its chat prompt (few-shot turns first). Judgments of one context share
  their leading tokens (formats put the context before the interpretation, see prompts.py): each context's
  common prefix goes through the model once, its KV cache is repeated over a batch of right-padded suffixes
  (causal attention never lets a real token see right padding), and only the last real position's hidden state
  meets only the answer rows of the output embedding.
- `DenseScorer`: a dense simulator (`sim_dense_v1`, `sim_dense_value_v1`) reads each judgment as its
  interpretation's header + the context up to the judged token, or every token of whole texts at once
  (`text_logits`, the whole layer). A value format's bins are summed into Yes/No wherever a verdict is asked
  for (`active_logits`); `text_logits(..., bins=True)` keeps them.
- `naive_label_logits`, `naive_dense_logits`: one full forward per prompt; the benchmarks' baseline and the
  exactness reference.

Every path is deterministic and keeps PEFT adapters unmerged unless `merge_adapter` is set.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from latentsim.errors import BadInputError
from latentsim.models import cache_keyword
from latentsim.prompts import (
    dense_header_ids,
    dense_text_ids,
    dense_token_ids,
    get_format,
    prompt_token_ids,
    render_prompt,
    unmark_context,
)
from latentsim.simulators.base import Judgment, Scorer, ScorerSetup, register_scorer


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
) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(head.weight, "ds_id"):  # a ZeRO-3 partitioned weight: gather it to read the answer rows
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in (head.weight, head.bias) if p is not None]):
            return _answer_rows(hidden, head, answer_ids, softcap)
    return _answer_rows(hidden, head, answer_ids, softcap)


def _answer_rows(
    hidden: torch.Tensor, head: torch.nn.Linear, answer_ids: torch.Tensor, softcap
) -> tuple[torch.Tensor, torch.Tensor]:
    """(answer logits, rounding sensitivity), both fp32, from final hidden states in the model's dtype.

    The answer rows are upcast and multiplied in fp32: bf16 logits would round each logit to 2^-8 of its size
    (a step of 0.125 for a logit in [16, 32): up to 0.03 in P(yes)), below which no parity check could see.
    The sensitivity of a judgment is max over answers a of ||(w_a - w_0) * h||_2, the size of what rounding h
    does to the answers' logit differences (latentsim.parity.p_yes_bound)."""
    rows, h = head.weight[answer_ids].float(), hidden.float()
    logits = h @ rows.T
    if head.bias is not None:
        logits = logits + head.bias[answer_ids].float()
    if softcap:  # tanh's slope is at most 1: the sensitivity below bounds the capped logits too
        logits = torch.tanh(logits / softcap) * softcap
    spread = (rows[1:] - rows[:1]) * h[..., None, :]  # [..., answers - 1, hidden]
    return logits, spread.norm(dim=-1).amax(dim=-1)


@register_scorer("hf")
class HFScorer(Scorer):
    """Prefix-shared chat-prompt scoring with transformers (PEFT adapters stay unmerged)."""

    def __init__(
        self,
        model,
        tokenizer,
        answer_ids: list[int],
        batch_size: int = 32,
        fmt: str = "sim_v1",
        prefix: list[dict] | None = None,
    ):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.answer_ids, self.fmt, self.prefix = list(answer_ids), fmt, list(prefix or [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.setup: ScorerSetup | None = None
        # Per judgment of the last label_logits call: its rounding sensitivity (_answer_rows).
        self.sensitivity = np.zeros(0, dtype=np.float32)

    @classmethod
    def create(cls, setup: ScorerSetup) -> HFScorer:
        scorer = cls(
            setup.factory.simulator_model(setup.sim),
            setup.tokenizer,
            setup.answer_ids,
            setup.options.batch_size,
            setup.eval_format,
            setup.prefix,
        )
        scorer.setup = setup
        return scorer

    def release(self) -> None:
        if self.setup is not None:
            self.setup.factory.detach_adapter(self.model)

    def prompt(self, judgment: Judgment) -> list[dict]:
        """The chat messages of a judgment: the few-shot turns, then its prompt in the eval format."""
        return self.prefix + render_prompt(
            self.fmt, judgment.context, judgment.interpretation, judgment.score
        )

    @torch.no_grad()
    def label_logits(self, judgments: list[Judgment], progress=None) -> np.ndarray:
        groups: dict[
            str, list[int]
        ] = {}  # judgments of one context share everything before the interpretation
        for i, judgment in enumerate(judgments):
            groups.setdefault(judgment.context, []).append(i)
        out = np.zeros((len(judgments), len(self.answer_ids)), dtype=np.float32)
        self.sensitivity = np.zeros(len(judgments), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            for members in groups.values():
                ids = [prompt_token_ids(self.tokenizer, self.prompt(judgments[i])) for i in members]
                out[members], self.sensitivity[members] = self.score_group(ids)
                if progress is not None:
                    progress.update(len(members))
        finally:
            self.model.train(was_training)
        return out

    def score_group(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(label logits, sensitivities) for token sequences of one group: common prefix once, suffixes
        batched on its KV cache."""
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
        logits, sensitivity = zip(*results, strict=True)
        return torch.cat(logits).cpu().numpy(), torch.cat(sensitivity).cpu().numpy()


def active_logits(logits: np.ndarray) -> np.ndarray:
    """A dense value format's answer logits [..., 1 + K] (" No", then the K activation bins) as Yes/No logits
    [..., 2]: (" No", log of the bins' summed exp), so a softmax over them gives exactly P(inactive) and
    P(active) = 1 - P(" No")."""
    top = np.max(logits[..., 1:], axis=-1, keepdims=True)
    yes = top + np.log(np.sum(np.exp(logits[..., 1:] - top), axis=-1, keepdims=True))
    return np.concatenate([logits[..., :1], yes], axis=-1).astype(logits.dtype)


@register_scorer("dense")
class DenseScorer(HFScorer):
    """A dense simulator (prompts.py: `sim_dense_v1`) scoring per-judgment prompts: each judgment is its
    interpretation's header + the context up to the judged token, read at that token. The header comes first,
    so judgments of one latent (an eval set judges each held-out latent in several contexts) share it: its KV
    is computed once per batch of latents with headers of one length, then each judgment's text runs on a copy
    of its latent's KV, texts right-padded (causal attention never lets a real token see the padding)."""

    def __init__(
        self, model, tokenizer, answer_ids: list[int], batch_size: int = 32, fmt: str = "sim_dense_v1"
    ):
        super().__init__(model, tokenizer, answer_ids, batch_size, fmt)

    @classmethod
    def create(cls, setup: ScorerSetup) -> DenseScorer:
        if setup.prefix:
            raise BadInputError(
                f"{setup.sim.name}: a dense simulator reads one judgment at a time (no few-shot)."
            )
        scorer = cls(
            setup.factory.simulator_model(setup.sim),
            setup.tokenizer,
            setup.answer_ids,
            setup.options.batch_size,
            setup.answer_format,
        )
        scorer.setup = setup
        return scorer

    def label_logits(self, judgments: list[Judgment], progress=None) -> np.ndarray:
        logits = self.answer_logits(judgments, progress)
        return active_logits(logits) if get_format(self.fmt).value_bins else logits

    @torch.no_grad()
    def answer_logits(self, judgments: list[Judgment], progress=None) -> np.ndarray:
        """Every answer's logit at each judgment's judged token ([n, n_answers]: a value format's bins kept;
        label_logits sums them into Yes/No)."""
        read = [self.judgment_text_ids(j) for j in judgments]  # (interpretation, text ids)
        by_interpretation: dict[str, list[int]] = {}
        for i, (interpretation, _) in enumerate(read):
            by_interpretation.setdefault(interpretation, []).append(i)
        interpretations = list(by_interpretation)
        headers = [dense_header_ids(self.tokenizer, self.fmt, x) for x in interpretations]
        decoder, head, softcap = _parts(self.model)
        device = head.weight.device
        answer = torch.tensor(self.answer_ids, device=device)
        out = np.zeros((len(judgments), len(self.answer_ids)), dtype=np.float32)
        self.sensitivity = np.zeros(len(judgments), dtype=np.float32)
        was_training = self.model.training
        self.model.eval()
        try:
            for length, chunk, header_cache in self.header_batches(decoder, headers, device):
                # (row of the header batch, judgment) pairs, shortest texts together
                pairs = sorted(
                    ((c, i) for c, k in enumerate(chunk) for i in by_interpretation[interpretations[k]]),
                    key=lambda p: len(read[p[1]][1]),
                )
                for b in range(0, len(pairs), self.batch_size):
                    batch_pairs = pairs[b : b + self.batch_size]
                    texts = [read[i][1] for _, i in batch_pairs]
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
                    logits, sensitivity = _answer_logits(rows, head, answer, softcap)
                    members = [i for _, i in batch_pairs]
                    out[members], self.sensitivity[members] = logits.cpu().numpy(), sensitivity.cpu().numpy()
                    self.stats["computed_tokens"] += len(texts) * width
                    if progress is not None:
                        progress.update(len(texts))
        finally:
            self.model.train(was_training)
        self.stats["judgments"] += len(judgments)
        self.stats["prompt_tokens"] += sum(len(t) for _, t in read) + sum(
            len(h) * len(by_interpretation[x]) for x, h in zip(interpretations, headers, strict=True)
        )
        return out

    def header_batches(self, decoder, headers: list[list[int]], device):
        """(header length, the indices of a batch of headers of that length, their KV cache): every header
        once, batched by token length so that no batch holds padding."""
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

    def judgment_text_ids(self, judgment: Judgment) -> tuple[str, list[int]]:
        """(interpretation, the judgment's text ids after the header, up to and including the simulator token
        that reads the judged token)."""
        if judgment.score is not None:
            raise BadInputError(
                "a dense simulator does not read interpretation scores; score it without them."
            )
        prefix, judged = unmark_context(judgment.context)
        interpretation, text = judgment.interpretation.strip(), prefix + judged
        ids, (position,) = dense_text_ids(self.tokenizer, text, [len(text)])
        if position < 0:
            raise BadInputError(
                f"no simulator token ends where the judged token does in {text[-40:]!r}; the dense "
                "simulator cannot read this judgment."
            )
        return interpretation, ids[: position + 1]

    @torch.no_grad()
    def text_logits(
        self,
        interpretations: list[str],
        texts: list[tuple[str, list[int]]],
        progress=None,
        bins: bool = False,
        proposed: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Every latent's verdict at every judged token of every text: per text (its string and the character
        end of each judged token) an array [n_latents, n_tokens, n_answers] of answer logits, NaN where
        unaligned. A value format's answers are summed into Yes/No (`active_logits`) unless `bins`.

        Each interpretation's header goes through the model once; its KV is reused for every text. Latents
        whose headers have the same token length share a batch (no padding anywhere), the text repeated over
        the batch, and only the aligned positions meet the answer rows of the output embedding.

        `proposed` (the two-stage whole layer: per text [n_latents, n_tokens] bool, latentsim.first_stage):
        only those pairs are judged, the rest left NaN. A latent proposed in no text gets no header pass, and
        batches are formed from the others only. A latent proposed nowhere in a text skips it; the
        others of a header batch run together, the text cut after the last token any of them is proposed at
        (causal: the verdicts before it are unchanged). With every pair proposed this is the full
        computation."""
        decoder, head, softcap = _parts(self.model)
        device = head.weight.device
        answer = torch.tensor(self.answer_ids, device=device)
        encoded = [dense_text_ids(self.tokenizer, text, ends) for text, ends in texts]
        out = [
            np.full((len(interpretations), len(ends), len(self.answer_ids)), np.nan, dtype=np.float32)
            for _, ends in texts
        ]
        needed = list(range(len(interpretations)))
        if proposed is not None:  # a latent proposed in no text needs no header pass
            needed = [i for i in needed if any(p[i].any() for p in proposed)]
        headers = [dense_header_ids(self.tokenizer, self.fmt, interpretations[i]) for i in needed]
        was_training = self.model.training
        self.model.eval()
        try:
            for length, batch_rows, header_cache in self.header_batches(decoder, headers, device):
                chunk = [needed[c] for c in batch_rows]  # the latents of the header batch, in its rows' order
                for t, (ids, positions) in enumerate(encoded):
                    judged = [j for j, p in enumerate(positions) if p >= 0]
                    members, cache = list(range(len(chunk))), header_cache
                    wanted = np.ones((len(chunk), len(judged)), dtype=bool)
                    if proposed is not None:
                        wanted = proposed[t][np.ix_(chunk, judged)]
                        members = [c for c in members if wanted[c].any()]
                        if not members:
                            continue
                        if len(members) < len(chunk):
                            cache = copy.deepcopy(header_cache)
                            cache.batch_select_indices(torch.tensor(members, device=device))
                        last = max(positions[judged[j]] for j in np.nonzero(wanted[members].any(axis=0))[0])
                        if last < positions[judged[-1]]:
                            ids = ids[: last + 1]
                    batch = torch.tensor([ids], device=device).expand(len(members), -1)
                    at = torch.arange(length, length + len(ids), device=device).expand(len(members), -1)
                    hidden = decoder(
                        input_ids=batch,
                        position_ids=at,
                        use_cache=True,
                        **{cache_keyword(decoder): copy.deepcopy(cache)},
                    ).last_hidden_state
                    reads = [j for j in range(len(judged)) if positions[judged[j]] < len(ids)]
                    rows = hidden[:, [positions[judged[j]] for j in reads]]
                    logits = _answer_logits(rows, head, answer, softcap)[0].cpu().numpy()
                    keep = wanted[np.ix_(members, reads)]
                    logits[~keep] = np.nan
                    out[t][np.ix_([chunk[c] for c in members], [judged[j] for j in reads])] = logits
                    self.stats["computed_tokens"] += len(members) * len(ids)
                    self.stats["judgments"] += int(keep.sum())
                    self.stats["prompt_tokens"] += len(members) * (length + len(ids))
                    if progress is not None:
                        progress.update(int(keep.sum()))
        finally:
            self.model.train(was_training)
        if get_format(self.fmt).value_bins and not bins:
            return [active_logits(o) for o in out]
        return out


def naive_dense_logits(
    model, tokenizer, fmt: str, interpretation: str, text: str, token_ends: list[int], answer_ids: list[int]
) -> np.ndarray:
    """One full forward of a dense example; the answers' logits at every judged token ([n_tokens, n_answers],
    NaN where unaligned): the exactness reference for DenseScorer and for training's label positions."""
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
    """One full prompt per judgment: left-padded batches (positions follow the attention mask), logits at
    every position (`full_logits`) or the last only; the answers' logits at the last position."""
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
