"""Closed-loop generation with the subject model's hook layer rewritten from latents (eval/generate.py).

A source maps the SAE latents of the newest position (and the token ids so far) to the latents that replace
them: the SAE's own, a fraction of the truly active ones (`FractionSource`), or a simulator's judgments of the
text so far (`SimulatorSource`). `generate` lets the patched model continue from its own predictions while a
clean copy follows the same tokens, so every generated token has KL(p_clean || p_patched).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from latentsim.config import GenerateArguments
from latentsim.errors import BadInputError
from latentsim.held_out import training_rows_and_latents
from latentsim.models import cache_keyword
from latentsim.patching import keep_fraction, kl_and_ce
from latentsim.prompts import marked_context
from latentsim.sae import decoder_layers
from latentsim.simulators import Judgment, ScoringOptions, final_simulator, load_scorer, probabilities


class SimulatorSource:
    """Rewrites the explained latents of one position from a simulator's judgments of the text so far."""

    def __init__(
        self, args: GenerateArguments, interpretations: dict[int, str], medians: torch.Tensor, subject_tok
    ):
        self.scorer, self.name = load_scorer(
            args.simulator_run or args.simulator_model, "sim_v1", ScoringOptions.from_args(args)
        )
        self.args, self.medians, self.subject_tok = args, medians, subject_tok
        # A finetuned simulator judges only latents it never trained on; the others keep their SAE values, as
        # unexplained latents do (`allow_seen_latents` lifts this).
        trained = (
            set()
            if not args.simulator_run or args.allow_seen_latents
            else training_rows_and_latents(final_simulator(args.simulator_run))[1]
        )
        self.interpretations = {lat: text for lat, text in interpretations.items() if lat not in trained}
        self.seen_latents_kept = len(interpretations) - len(self.interpretations)
        if not self.interpretations:
            raise BadInputError(
                f"{self.name} trained on every explained latent of the eval set; give an eval set "
                "with held-out latents or set allow_seen_latents: true."
            )
        self.explained = torch.tensor(sorted(self.interpretations))
        self.rng = np.random.default_rng(args.seed)

    def __call__(self, z: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, float]:
        window = ids[max(1, len(ids) - self.args.window) :]  # never BOS, as in the eval sets
        context = marked_context(self.subject_tok.decode(window[:-1]), self.subject_tok.decode(window[-1:]))
        active = [int(i) for i in torch.nonzero(z > 0).flatten() if int(i) in self.interpretations]
        inactive = self.explained[(z[self.explained.to(z.device)] <= 0).cpu()].numpy()
        drawn = self.rng.choice(
            inactive, size=min(self.args.n_inactive, len(inactive)), replace=False
        ).tolist()
        candidates = active + [int(i) for i in drawn]
        judgments = [Judgment(context, self.interpretations[c], latent=c) for c in candidates]
        p_yes = probabilities(self.scorer.label_logits(judgments))[:, 1]
        predicted = torch.tensor(
            [c for c, p in zip(candidates, p_yes, strict=True) if p >= self.args.threshold],
            dtype=torch.long,
            device=z.device,
        )
        out = z.clone()
        out[torch.tensor(active, dtype=torch.long, device=z.device)] = 0
        if len(predicted):
            real = z[predicted]
            out[predicted] = (
                torch.where(real > 0, real, self.medians[predicted])
                if self.args.values == "oracle"
                else self.medians[predicted]
            )
        n_true = int((z > 0).sum())
        kept = len(set(predicted.tolist()) & set(active)) + n_true - len(active)  # unexplained actives stay
        return out, kept / max(n_true, 1)


class FractionSource:
    """Keeps a fraction of the truly active latents (true values): the strongest or a random subset."""

    def __init__(self, mode: str, fraction: float, generator: torch.Generator):
        self.mode, self.fraction, self.generator = mode, fraction, generator

    def __call__(self, z: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, float]:
        kept = keep_fraction(z[None], self.fraction, self.mode, self.generator)[0]
        return kept, float((kept > 0).sum()) / max(int((z > 0).sum()), 1)


@torch.no_grad()
def generate(
    model, layer: int, sae, prompt_ids: list[int], source, n_new: int, sampler: torch.Generator | None
):
    """(generated ids, per-token KL(clean || patched), mean share of active latents recovered)."""
    key, device = cache_keyword(model), next(model.parameters()).device
    prefix = model(input_ids=torch.tensor([prompt_ids[:-1]], device=device), use_cache=True)
    clean_cache = prefix.cache if "cache" in prefix else prefix.past_key_values
    patched_cache = copy.deepcopy(clean_cache)
    ids, kls, recovered = list(prompt_ids), [], []

    def rewrite(_module, _inputs, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        z = sae.encode(hidden[0, -1:].to(sae.W_dec.dtype))[0]
        z_new, share = source(z, ids)
        recovered.append(share)
        hidden[0, -1] = sae.decode(z_new[None])[0].to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for _ in range(n_new):
        position = torch.tensor([[len(ids) - 1]], device=device)
        cur = torch.tensor([ids[-1:]], device=device)
        clean = model(input_ids=cur, position_ids=position, use_cache=True, **{key: clean_cache}).logits[
            0, -1
        ]
        handle = decoder_layers(model)[layer].register_forward_hook(rewrite) if source is not None else None
        try:
            patched = model(
                input_ids=cur, position_ids=position, use_cache=True, **{key: patched_cache}
            ).logits[0, -1]
        finally:
            if handle is not None:
                handle.remove()
        kls.append(float(kl_and_ce(clean.float(), patched[None].float(), None)[0][0]))
        if sampler is None:
            nxt = int(patched.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(patched.float(), -1), 1, generator=sampler))
        ids.append(nxt)
    return ids[len(prompt_ids) :], kls, float(np.mean(recovered)) if recovered else 1.0


def make_sources(
    args: GenerateArguments, interpretations: dict[int, str], medians: torch.Tensor, subject_tok
) -> dict:
    """{name: source} for `args.sources` (GenerateArguments): None for `clean`, callables otherwise."""
    fraction_gen = torch.Generator().manual_seed(args.seed)
    sources = {}
    for name in args.sources:
        if name == "clean":
            sources[name] = None
        elif name == "sae":
            sources[name] = lambda z, ids: (z, 1.0)
        elif name == "simulator":
            sim = SimulatorSource(args, interpretations, medians, subject_tok)
            held_out = f", {len(sim.interpretations)} held-out latents" if sim.seen_latents_kept else ""
            sources[f"simulator{held_out} ({sim.name})"] = sim
        else:
            _, mode, f = name.split(":")
            sources[name] = FractionSource(mode, float(f), fraction_gen)
    return sources
