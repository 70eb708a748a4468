"""`first_stage`: the first stage of a two-stage whole layer (latentsim.first_stage) as a simulator, and its
parts: the simulator's model read as an encoder, the bilinear head, saving and loading it.

A train/first_stage.py output folder listed in a sweep's `run_dirs` is this kind. Each judgment's context is
read alone by the dense simulator's model (one pass, the vector at the simulator token that ends where the
judged token does), its interpretation's dense header alone (one pass per distinct interpretation), and the
trained bilinear head scores the pair with the latent's log firing rate (the eval set's training-row
statistics, as in training): logits [0, score], so P(yes) = sigmoid(score). It is held to what its simulator
trained on (the same held-out checks), and refused for another simulator's model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from latentsim.errors import BadInputError
from latentsim.io import atomic_save, atomic_write_json
from latentsim.prompts import dense_header_ids, dense_text_ids, unmark_context
from latentsim.simulators.base import Judgment, Scorer, ScorerSetup, register_scorer
from latentsim.simulators.hf import _parts
from latentsim.simulators.reference import FIRING_RATE_FLOOR


def leading_ids(tokenizer) -> list[int]:
    """The tokenizer's leading special tokens (BOS where it adds one), as a dense header starts with."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return list(ids)


@dataclass
class Encoder:
    """The simulator's model read as an encoder: hidden states of `layer` (-1: the last, after the final norm)
    for texts alone and for interpretations' headers alone."""

    model: torch.nn.Module
    tokenizer: object
    fmt: str  # the dense format whose header and alignment are read
    layer: int = -1
    batch_size: int = 16
    stats: dict = field(default_factory=lambda: {"text_passes": 0, "interpretation_passes": 0})

    @torch.no_grad()
    def hidden(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Each sequence's hidden states [len, d] (float32, CPU), right-padded batches (causal attention: no
        real token sees the padding), longest first."""
        decoder = _parts(self.model)[0]
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        out: list[torch.Tensor | None] = [None] * len(sequences)
        was_training = self.model.training
        self.model.eval()
        try:
            for a in range(0, len(order), self.batch_size):
                members = order[a : a + self.batch_size]
                width = max(len(sequences[i]) for i in members)
                batch = torch.tensor(
                    [sequences[i] + [pad] * (width - len(sequences[i])) for i in members], device=device
                )
                result = decoder(input_ids=batch, output_hidden_states=self.layer != -1)
                states = result.last_hidden_state if self.layer == -1 else result.hidden_states[self.layer]
                for row, i in enumerate(members):
                    out[i] = states[row, : len(sequences[i])].float().cpu()
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    def token_vectors(self, texts: list[tuple[str, list[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text (its string, each judged token's character end): (vectors [n_tokens, d], aligned
        [n_tokens] bool), one pass over the text alone; unaligned tokens' rows are zeros."""
        lead = leading_ids(self.tokenizer)
        encoded = [dense_text_ids(self.tokenizer, text, ends) for text, ends in texts]
        states = self.hidden([lead + ids for ids, _ in encoded])
        self.stats["text_passes"] += len(texts)
        out = []
        for (_, positions), h in zip(encoded, states, strict=True):
            aligned = np.array([p >= 0 for p in positions], dtype=bool)
            vectors = np.zeros((len(positions), h.shape[1]), dtype=np.float32)
            at = [len(lead) + p for p in positions if p >= 0]
            vectors[aligned] = h[at].numpy()
            out.append((vectors, aligned))
        return out

    def interpretation_vectors(self, interpretations: list[str]) -> np.ndarray:
        """[n, d]: the mean hidden state over each interpretation's dense header (after its leading special
        tokens), one pass per header."""
        lead = len(leading_ids(self.tokenizer))
        headers = [dense_header_ids(self.tokenizer, self.fmt, x) for x in interpretations]
        states = self.hidden(headers)
        self.stats["interpretation_passes"] += len(interpretations)
        return np.stack([h[lead:].mean(dim=0).numpy() for h in states]).astype(np.float32)


def adapter_digest(folder: str | None) -> str | None:
    """sha256 of an adapter's weights (None without one): a retrained adapter gets new vectors."""
    if not folder or not (Path(folder) / "adapter_model.safetensors").is_file():
        return None
    digest = hashlib.sha256()
    with open(Path(folder) / "adapter_model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(sim, layer: int, dtype: str) -> dict:
    """What the vectors depend on besides the interpretations: a dense simulator's base model, adapter
    weights, format, the layer read and the dtype."""
    return {
        "base_model": sim.base_model,
        "adapter_sha256": adapter_digest(sim.adapter),
        "prompt_format": sim.prompt_format,
        "layer": layer,
        "dtype": dtype,
    }


def require_trained_for(record: dict, sim, dtype: str, folder) -> dict:
    """The identity of `sim` at the head's layer, refused unless the head (its `record`) was trained on this
    simulator's model: the same base model, adapter weights and prompt format."""
    identity = model_identity(sim, record["identity"]["layer"], dtype)
    trained_for = {k: record["identity"][k] for k in ("base_model", "adapter_sha256", "prompt_format")}
    if trained_for != {k: identity[k] for k in trained_for}:
        raise BadInputError(
            f"config key `first_stage`: {folder} was trained for another simulator "
            f"({trained_for['base_model']}, adapter sha256 {str(trained_for['adapter_sha256'])[:12]}); "
            f"train one for {sim.adapter}."
        )
    return identity


def log_firing_rate(statistics: dict, latents: list[int]) -> np.ndarray:
    """The latents' log firing rates in the training rows (floored for latents that never fired)."""
    rate = statistics["firing_rate"].double().numpy()[np.asarray(latents, dtype=np.int64)]
    return np.log(np.maximum(rate, FIRING_RATE_FLOOR)).astype(np.float32)


class BilinearHead(torch.nn.Module):
    """score(token t, latent i) = <U x_t, V g_i> + w log(firing rate_i) + b, with x and g standardised by the
    training vectors' mean and scale; P(yes) = sigmoid(score)."""

    def __init__(self, token_dim: int, interpretation_dim: int, rank: int):
        super().__init__()
        self.token_proj = torch.nn.Linear(token_dim, rank)
        self.interpretation_proj = torch.nn.Linear(interpretation_dim, rank, bias=False)
        self.prior_weight = torch.nn.Parameter(torch.ones(1))
        self.bias = torch.nn.Parameter(torch.zeros(1))
        for name, dim in (("token", token_dim), ("interpretation", interpretation_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_scale", torch.ones(dim))

    def standardise_from(self, tokens: torch.Tensor, interpretations: torch.Tensor) -> None:
        for name, x in (("token", tokens), ("interpretation", interpretations)):
            getattr(self, f"{name}_mean").copy_(x.mean(dim=0))
            getattr(self, f"{name}_scale").copy_(x.std(dim=0).clamp(min=1e-6))

    def latent_side(self, interpretations: torch.Tensor) -> torch.Tensor:
        """[L, rank]: the interpretations' projections (computed once per dictionary at scoring time)."""
        return self.interpretation_proj(
            (interpretations - self.interpretation_mean) / self.interpretation_scale
        )

    def forward(
        self, tokens: torch.Tensor, latent_side: torch.Tensor, log_rate: torch.Tensor
    ) -> torch.Tensor:
        """[T, L] scores of tokens [T, d] against latents (`latent_side` [L, rank], log firing rates [L])."""
        x = self.token_proj((tokens - self.token_mean) / self.token_scale)
        return x @ latent_side.T + self.prior_weight * log_rate + self.bias

    def pair_scores(
        self, tokens: torch.Tensor, latent_side: torch.Tensor, log_rate: torch.Tensor
    ) -> torch.Tensor:
        """[N] scores of N (token, latent) pairs: row i of `tokens` [N, d] against row i of `latent_side`
        [N, rank] and `log_rate` [N] (forward's diagonal, without the [N, N] matrix)."""
        x = self.token_proj((tokens - self.token_mean) / self.token_scale)
        return (x * latent_side).sum(dim=-1) + self.prior_weight * log_rate + self.bias


def save_head(head: BilinearHead, folder: Path, record: dict) -> None:
    """first_stage.safetensors (the head's tensors) and first_stage.json (its shape and what made it)."""
    shape = {
        "token_dim": head.token_proj.in_features,
        "interpretation_dim": head.interpretation_proj.in_features,
        "rank": head.token_proj.out_features,
    }
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    atomic_save(folder / "first_stage.safetensors", lambda tmp: save_file(state, tmp))
    atomic_write_json(folder / "first_stage.json", {"shape": shape, **record})


def load_head(folder: Path) -> tuple[BilinearHead, dict]:
    """A saved head (eval mode) and its record."""
    record = json.loads((Path(folder) / "first_stage.json").read_text())
    head = BilinearHead(**record["shape"])
    head.load_state_dict(load_file(Path(folder) / "first_stage.safetensors"))
    return head.eval(), record


KIND = "first_stage"


@register_scorer(KIND)
class FirstStageScorer(Scorer):
    def __init__(self, head, encoder, statistics: dict, answer_ids: list[int] | None = None):
        super().__init__()
        self.head, self.encoder, self.statistics = head, encoder, statistics
        self.answer_ids = answer_ids or []

    @classmethod
    def create(cls, setup: ScorerSetup) -> FirstStageScorer:
        sim = setup.sim
        if setup.prefix:
            raise BadInputError(f"{sim.name}: a first stage reads one judgment at a time (no few-shot).")
        if setup.eval_set is None:
            raise BadInputError(f"{sim.name}: a first stage reads the eval set's firing rates; give it one.")
        head, record = load_head(sim.first_stage)
        require_trained_for(record, sim, setup.options.dtype, sim.first_stage)
        encoder = Encoder(
            setup.factory.simulator_model(sim),
            setup.tokenizer,
            sim.prompt_format,
            record["identity"]["layer"],
            setup.options.batch_size,
        )
        scorer = cls(head, encoder, setup.eval_set.statistics, setup.answer_ids)
        scorer.setup = setup
        return scorer

    @torch.no_grad()
    def label_logits(self, judgments: list[Judgment], progress=None) -> np.ndarray:
        texts: dict[str, int] = {}  # each distinct text (the judged token last) once
        interpretations: dict[str, int] = {}
        at_text = []
        for j in judgments:
            if j.score is not None:
                raise BadInputError("a first stage reads no interpretation scores; score it without them.")
            if j.latent is None:
                raise BadInputError("a first stage reads each latent's firing rate: judgments need a latent.")
            prefix, judged = unmark_context(j.context)
            at_text.append(texts.setdefault(prefix + judged, len(texts)))
            interpretations.setdefault(j.interpretation.strip(), len(interpretations))
        listed = list(texts)
        vectors = []
        for a in range(0, len(listed), self.encoder.batch_size):
            chunk = listed[a : a + self.encoder.batch_size]
            for text, (vec, aligned) in zip(
                chunk, self.encoder.token_vectors([(t, [len(t)]) for t in chunk]), strict=True
            ):
                if not aligned[0]:
                    raise BadInputError(
                        f"no simulator token ends where the judged token does in {text[-40:]!r}; the first "
                        "stage cannot read this judgment."
                    )
                vectors.append(vec[0])
        headers = self.encoder.interpretation_vectors(list(interpretations))
        side = self.head.latent_side(torch.from_numpy(headers))
        at_interpretation = [interpretations[j.interpretation.strip()] for j in judgments]
        log_rate = log_firing_rate(self.statistics, [j.latent for j in judgments])
        scores = self.head.pair_scores(
            torch.from_numpy(np.stack(vectors)[at_text]), side[at_interpretation], torch.from_numpy(log_rate)
        )
        self.stats["judgments"] += len(judgments)
        if progress is not None:
            progress.update(len(judgments))
        return np.stack([np.zeros(len(judgments)), scores.numpy()], axis=1).astype(np.float32)
