"""Closed-loop generation with the subject model's hook layer rewritten from SAE latents or a simulator.

    python eval/generate.py --config configs/eval/generate_quickstart.yaml [--key value ...]

The subject model reads each prompt clean; from its last token on, every position's residual stream after the
hook layer is replaced by a vector decoded from latents of the source, and the model continues from its own
patched predictions (greedy, or seeded sampling). Sources: `clean`, `sae` (the SAE reconstruction),
`fraction:<top|random>:<f>` (a fraction of the truly active latents, true values) and `simulator`: at every
step the simulator judges, from the text so far, each explained latent that is truly active plus `n_inactive`
random explained inactive ones; the latents it calls active (false positives included) replace the explained
active latents (values: `oracle` or `median`, as in eval/patch_kl.py); unexplained latents keep their SAE
values. A clean copy of the model follows the same tokens, so each generated token has
KL(p_clean || p_patched) of its prediction. Writes results.json and generation.html to `output_dir`.
"""

import copy
import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentsim.backends import cache_keyword, probabilities
from latentsim.cache import load_cache
from latentsim.cli import run
from latentsim.config import GenerateArguments, SAEArguments
from latentsim.explain import load_interpretations
from latentsim.htmlpage import STYLE, generation_fragment
from latentsim.io import atomic_write_json, atomic_write_text, write_run_config
from latentsim.latent_stats import load_statistics
from latentsim.models import load_model_and_tokenizer
from latentsim.patching import keep_fraction, kl_and_ce
from latentsim.prompts import marked_context, render_prompt
from latentsim.sae import decoder_layers, load_sae
from latentsim.sweep import load_simulator_scorer

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (GenerateArguments,)


class SimulatorSource:
    """Rewrites the explained latents of one position from a simulator's judgments of the text so far."""

    def __init__(self, args: GenerateArguments, interpretations: dict[int, str], medians: torch.Tensor, subject_tok):
        self.scorer, self.name = load_simulator_scorer(args.simulator_run or args.simulator_model, "sim_v1",
                                                       args.dtype, args.device, args.batch_size)
        self.args, self.medians, self.subject_tok = args, medians, subject_tok
        self.explained = torch.tensor(sorted(interpretations))
        self.interpretations = interpretations
        self.rng = np.random.default_rng(args.seed)

    def __call__(self, z: torch.Tensor, ids: list[int]) -> tuple[torch.Tensor, float]:
        window = ids[max(1, len(ids) - self.args.window):]  # never BOS, as in the eval sets
        context = marked_context(self.subject_tok.decode(window[:-1]), self.subject_tok.decode(window[-1:]))
        active = [int(i) for i in torch.nonzero(z > 0).flatten() if int(i) in self.interpretations]
        inactive = self.explained[(z[self.explained.to(z.device)] <= 0).cpu()].numpy()
        drawn = self.rng.choice(inactive, size=min(self.args.n_inactive, len(inactive)), replace=False).tolist()
        candidates = active + [int(i) for i in drawn]
        prompts = [render_prompt("sim_v1", context, self.interpretations[c]) for c in candidates]
        p_yes = probabilities(self.scorer.label_logits(prompts))[:, 1]
        predicted = torch.tensor([c for c, p in zip(candidates, p_yes, strict=True) if p >= self.args.threshold],
                                 dtype=torch.long, device=z.device)
        out = z.clone()
        out[torch.tensor(active, dtype=torch.long, device=z.device)] = 0
        if len(predicted):
            real = z[predicted]
            out[predicted] = torch.where(real > 0, real, self.medians[predicted]) if self.args.values == "oracle" \
                else self.medians[predicted]
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
def generate(model, layer: int, sae, prompt_ids: list[int], source, n_new: int, sampler: torch.Generator | None):
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
        clean = model(input_ids=cur, position_ids=position, use_cache=True, **{key: clean_cache}).logits[0, -1]
        handle = decoder_layers(model)[layer].register_forward_hook(rewrite) if source is not None else None
        try:
            patched = model(input_ids=cur, position_ids=position, use_cache=True, **{key: patched_cache}).logits[0, -1]
        finally:
            if handle is not None:
                handle.remove()
        kls.append(float(kl_and_ce(clean.float(), patched[None].float(), None)[0][0]))
        if sampler is None:
            nxt = int(patched.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(patched.float(), -1), 1, generator=sampler))
        ids.append(nxt)
    return ids[len(prompt_ids):], kls, float(np.mean(recovered)) if recovered else 1.0


def main(args: GenerateArguments) -> dict:
    eval_set = Path(args.eval_set)
    build = json.loads((eval_set / "run_config.json").read_text())["config"]["dataset"]
    hookpoint, layer = build["hookpoint"], int(build["hookpoint"].split(".")[-1])
    cache = load_cache(Path(build["cache_dir"]) / "latents", hookpoint)
    info = cache.config["latentsim"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "generate", {"generate": args}, args.seed)
    model, tok = load_model_and_tokenizer(info["model"]["model"], dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    sae = load_sae(SAEArguments(hookpoint=hookpoint, **info["sae"]), device=device)
    medians = load_statistics(Path(build["cache_dir"]) / "stats", hookpoint)["quantile_edges"][:, 5].to(device)
    interpretations = load_interpretations(build["interpretations"][0], hookpoint, cache.width)
    fraction_gen = torch.Generator().manual_seed(args.seed)
    sources = {}
    for name in args.sources:
        if name == "clean":
            sources[name] = None
        elif name == "sae":
            sources[name] = lambda z, ids: (z, 1.0)
        elif name == "simulator":
            sim = SimulatorSource(args, interpretations, medians, tok)
            sources[f"simulator ({sim.name})"] = sim
        else:
            _, mode, f = name.split(":")
            sources[name] = FractionSource(mode, float(f), fraction_gen)
    generations = []
    for prompt in args.prompts:
        prompt_ids = tok(prompt)["input_ids"]
        if tok.bos_token_id is not None and prompt_ids[:1] != [tok.bos_token_id]:
            prompt_ids = [tok.bos_token_id] + prompt_ids  # the cache's rows start with BOS too
        for name, source in tqdm(sources.items(), desc=f"generating from {prompt!r}", unit="source"):
            sampler = torch.Generator().manual_seed(args.seed) if args.do_sample else None
            new, kls, recovered = generate(model, layer, sae, prompt_ids, source, args.max_new_tokens, sampler)
            generations.append({"prompt": prompt, "source": name, "token_ids": new, "kl": kls, "recovered": recovered,
                                "tokens": [tok.decode([t]) for t in new], "text": tok.decode(new)})
    result = {"eval_set": str(eval_set), "hookpoint": hookpoint, "prompts": args.prompts,
              "kl_direction": "KL(p_clean || p_patched), nats", "sampling": "seeded" if args.do_sample else "greedy",
              "generations": generations}
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "generation.html", f"<!doctype html><html><head><meta charset=\"utf-8\"><title>latentsim "
                      f"generation</title><style>{STYLE}</style></head><body><h1>Generation with {hookpoint} rewritten"
                      f"</h1>{generation_fragment(result)}</body></html>")
    for g in generations:
        print(f"[generate] {g['source']:<48} mean KL {np.mean(g['kl']):.3f}  recovered {g['recovered']:.2f}  "
              f"{g['prompt']!r} -> {g['text']!r}")
    print(f"[generate] {out / 'generation.html'}")
    return result


if __name__ == "__main__":
    run(main, DATACLASSES)
