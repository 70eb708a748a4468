"""Patch decoded SAE latents into the subject model: KL(p_clean || p_patched) and CE, per source of latents.

    python eval/patch_kl.py --config configs/eval/patch_kl_quickstart.yaml [--key value ...]

For each eval context (a cache row up to the judged position: the very tokens and positions the latents were
recorded on) the residual stream after the hook layer is replaced by a vector built from latents of:
- the SAE itself (`sae`: the ceiling), the SAE plus its error term (`sae_plus_error`: must give KL ~0),
  zero ablation (`zero_ablation`: the layer's contribution removed, its input kept) and mean ablation (its
  contribution replaced by the mean over `mean_contexts` cache rows);
- a fraction f of the truly active latents with their true values, the strongest (`top`) or random (Figure 1);
- each simulator of an eval/sweep.py run (Figure 3): the latents it scored active at a threshold replace the
  truly active latents it scored, false positives included (value: `oracle` = the true value where the latent
  is really active, its median non-zero activation otherwise; `median` = the median for all: no oracle;
  `predicted` = a value simulator's 0-9 answer (sim_value_v1) mapped back through the latent's deciles).
  Latents the simulator never scored (other splits, unexplained) keep their SAE values in every variant;
  `no_simulator` (all scored latents off) is the floor the simulators start from.
The judged position is patched alone (KL/CE of the next token there); with `all_positions` the SAE variants are
also patched at every position but BOS (KL/CE averaged over positions). Writes `results.json` (medians and
25-75 % ranges per source), `per_context.parquet` and `run_config.json` to `output_dir`.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from latentsim.backends import probabilities
from latentsim.cache import load_cache
from latentsim.cli import run
from latentsim.config import PatchArguments, SAEArguments
from latentsim.io import atomic_save, atomic_write_json, require_same_config, write_run_config
from latentsim.latent_stats import load_statistics
from latentsim.metrics import summarise
from latentsim.models import load_model_and_tokenizer
from latentsim.patching import (
    all_positions_logits,
    clean_pass,
    judged_logits,
    keep_fraction,
    kl_and_ce,
    value_from_digits,
)
from latentsim.prompts import get_format, render_prompt
from latentsim.sae import load_sae
from latentsim.sweep import load_simulator_scorer, load_split

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (PatchArguments,)


def load_simulators(args: PatchArguments, sweep_root: Path) -> dict[str, dict]:
    """{simulator: {"predictions": DataFrame, "thresholds": {label: t}}} from a sweep's folders."""
    if not args.sweep_dir:
        return {}
    names = args.simulators or sorted(p.parent.name for p in sweep_root.glob(f"*/predictions_{args.split}.parquet"))
    out = {}
    for name in names:
        path = sweep_root / name / f"predictions_{args.split}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"config key `simulators`: {path} does not exist; run eval/sweep.py first.")
        results = json.loads((sweep_root / name / "results.json").read_text())["results"]
        thresholds = {}
        for t in args.thresholds:
            if t == "l0_matched":
                matched = results.get("calibration", {}).get("l0_matched")
                if matched:
                    thresholds[t] = matched["threshold"]
            else:
                thresholds[t] = float(t)
        out[name] = {"predictions": pd.read_parquet(path), "thresholds": thresholds}
    return out


@torch.no_grad()
def mean_contribution(model, tokens: torch.Tensor, layer: int, n_rows: int, device) -> torch.Tensor:
    """The hook layer's mean contribution (output - input) over positions 1.. of the first `n_rows` cache rows."""
    total, count = None, 0
    for row in tokens[:n_rows]:
        _, x_in, x_out, _ = clean_pass(model, row.to(device), layer)
        diff = (x_out - x_in)[1:].double().sum(0)
        total = diff if total is None else total + diff
        count += x_in.shape[0] - 1
    return (total / count).float()


@torch.no_grad()
def predicted_values(args: PatchArguments, eval_set: Path, contexts: list[int], edges: torch.Tensor) -> dict:
    """{(context_id, latent): activation} for every candidate of the contexts: the value simulator's expected
    digit (sim_value_v1) mapped through the latent's deciles."""
    df = load_split(eval_set, args.split, 0, args.seed)
    df = df[df["context_id"].isin(contexts)]
    scorer, _ = load_simulator_scorer(args.value_simulator, "sim_value_v1", args.dtype, args.device)
    prompts = [render_prompt("sim_value_v1", r.context, r.interpretation) for r in df.itertuples(index=False)]
    digits = probabilities(scorer.label_logits(prompts))
    lat = torch.tensor(df["latent"].to_numpy())
    values = value_from_digits(edges[lat].cpu(), torch.from_numpy(digits @ np.arange(10)))
    return dict(zip(zip(df["context_id"].tolist(), df["latent"].tolist(), strict=True), values.tolist(), strict=True))


def simulator_vectors(z: torch.Tensor, preds: pd.DataFrame, sims: dict, values: list[str], medians: torch.Tensor,
                      sae, value_of: dict | None = None) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Latent vectors at the judged position for every simulator x threshold x value mode (and the floor), with
    counts of what each inserts."""
    out, info = {}, {}
    for name, sim in sims.items():
        rows = preds[name]
        lat = torch.tensor(rows["latent"].to_numpy())
        active = torch.tensor(rows["active"].to_numpy()) == 1
        floor = z.clone()
        floor[lat[active]] = 0  # the simulator replaces exactly the latents it scored
        out["no_simulator"] = sae.decode(floor[None])[0]
        for label, t in sim["thresholds"].items():
            predicted = lat[torch.tensor(rows["p_yes"].to_numpy()) >= t]
            for mode in values:
                zs = floor.clone()
                if mode == "oracle":
                    zs[predicted] = torch.where(z[predicted] > 0, z[predicted], medians[predicted])
                elif mode == "median":
                    zs[predicted] = medians[predicted]
                else:  # the value simulator's prediction for this context
                    cid = int(rows["context_id"].iloc[0])
                    zs[predicted] = torch.tensor([value_of[(cid, int(i))] for i in predicted], dtype=zs.dtype,
                                                 device=zs.device)
                key = f"sim:{name}@{label}:{mode}"
                out[key] = sae.decode(zs[None])[0]
                true_pos = int((z[predicted] > 0).sum())
                info[key] = {"predicted": len(predicted), "true_positives": true_pos,
                             "false_positives": len(predicted) - true_pos}
    return out, info


def main(args: PatchArguments) -> dict:
    eval_set = Path(args.eval_set)
    stats = json.loads((eval_set / "dataset_stats.json").read_text())
    build = json.loads((eval_set / "run_config.json").read_text())["config"]["dataset"]
    if get_format(stats["prompt_format"]).label != "active":
        raise ValueError(f"config key `eval_set`: {eval_set} is a value eval set; patching needs the binary one.")
    sweep_root = Path(args.sweep_dir or ".") / eval_set.name
    sims = load_simulators(args, sweep_root)
    out = Path(args.output_dir or sweep_root / "patch_kl")
    if args.overwrite:
        for name in ("results.json", "per_context.parquet"):
            (out / name).unlink(missing_ok=True)
    if (out / "results.json").is_file():
        require_same_config(out, {"patch": args}, {"overwrite"}, "patching results",
                            "pass --overwrite true or choose another output_dir")
        print(f"[patch_kl] {out / 'results.json'} exists for this config; skipped")
        return json.loads((out / "results.json").read_text())

    if sims:  # the contexts every simulator scored
        ids = set.intersection(*(set(s["predictions"]["context_id"]) for s in sims.values()))
    else:
        ids = set(load_split(eval_set, args.split, args.max_contexts, args.seed)["context_id"])
    contexts = sorted(ids)
    if args.max_contexts and len(contexts) > args.max_contexts:
        contexts = sorted(np.random.default_rng(args.seed).choice(contexts, args.max_contexts, replace=False).tolist())

    hookpoint, layer = build["hookpoint"], int(build["hookpoint"].split(".")[-1])
    cache = load_cache(Path(build["cache_dir"]) / "latents", hookpoint)
    info = cache.config["latentsim"]
    model, _ = load_model_and_tokenizer(info["model"]["model"], dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    sae = load_sae(SAEArguments(hookpoint=hookpoint, **info["sae"]), device=device)
    edges = load_statistics(Path(build["cache_dir"]) / "stats", hookpoint)["quantile_edges"].to(device)
    medians = edges[:, 5]
    value_of = predicted_values(args, eval_set, contexts, edges) if "predicted" in args.values else None
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "patch_kl", {"patch": args}, args.seed)
    tokens = cache.tokens
    mean_vec = mean_contribution(model, tokens, layer, args.mean_contexts, device)
    gen = torch.Generator().manual_seed(args.seed)
    fraction_keys = [(m, f) for m in args.fraction_modes for f in args.fractions]
    records, sim_counts = [], {}
    by_context = {n: dict(tuple(s["predictions"].groupby("context_id"))) for n, s in sims.items()}
    for cid in tqdm(contexts, desc="patching", unit="context"):
        row, pos = divmod(int(cid), 1_000_000)
        ids = tokens[row, :pos + 1].to(device).long()
        nxt = tokens[row, pos + 1].to(device).long() if pos + 1 < tokens.shape[1] else None
        logits, x_in, x_out, kv = clean_pass(model, ids, layer)
        z = sae.encode(x_out[1:].to(sae.W_dec.dtype))  # [T-1, W]: position 0 is never encoded
        recon = sae.decode(z)
        judged = {"sae": recon[-1], "sae_plus_error": recon[-1] + (x_out[-1] - recon[-1]),
                  "zero_ablation": x_in[-1], "mean_ablation": x_in[-1] + mean_vec}
        for mode, f in fraction_keys:
            judged[f"fraction:{mode}:{f:g}"] = sae.decode(keep_fraction(z[-1:], f, mode, gen))[0]
        preds = {n: by_context[n][cid] for n in sims}
        sim_vecs, counts = simulator_vectors(z[-1], preds, sims, args.values, medians, sae, value_of)
        judged.update(sim_vecs)
        for k, v in counts.items():
            sim_counts.setdefault(k, []).append(v)
        names = list(judged)
        kl, ce = kl_and_ce(logits[-1], judged_logits(model, ids, layer, kv, torch.stack([judged[n] for n in names])), nxt)
        nan = float("nan")
        per_source = {"clean": {"kl_judged": 0.0, "ce_judged": float(kl_and_ce(logits[-1], logits[-1:], nxt)[1][0])
                                if nxt is not None else nan}}
        for i, n in enumerate(names):
            per_source[n] = {"kl_judged": float(kl[i]), "ce_judged": float(ce[i]) if ce is not None else nan}
        if args.all_positions:
            targets = ids[2:] if nxt is None else torch.cat([ids[2:], nxt[None]])  # next tokens of positions 1..
            scored = slice(1, len(targets) + 1)
            every = {"sae": recon, "sae_plus_error": recon + (x_out[1:] - recon), "zero_ablation": x_in[1:],
                     "mean_ablation": x_in[1:] + mean_vec}
            for mode, f in fraction_keys:
                every[f"fraction:{mode}:{f:g}"] = sae.decode(keep_fraction(z, f, mode, gen))
            per_source["clean"].update(kl_all=0.0, ce_all=float(kl_and_ce(logits[scored], logits[None, scored],
                                                                          targets)[1].mean()))
            keys = list(every)
            for a in range(0, len(keys), 4):  # 4 full passes at a time: [4, T, V] logits
                chunk = keys[a:a + 4]
                patched = all_positions_logits(model, ids, layer, torch.stack([every[k] for k in chunk]))
                kl_all, _ = kl_and_ce(logits[1:], patched[:, 1:], None)
                _, ce_all = kl_and_ce(logits[scored], patched[:, scored], targets)
                for j, k in enumerate(chunk):
                    per_source[k].update(kl_all=float(kl_all[j].mean()), ce_all=float(ce_all[j].mean()))
        records += [{"context_id": int(cid), "row": row, "position": pos, "source": n, **v} for n, v in per_source.items()]

    table = pd.DataFrame(records)
    atomic_save(out / "per_context.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    summary = {}
    for source, g in table.groupby("source", sort=False):
        summary[source] = {k: summarise(g[k]) for k in ("kl_judged", "ce_judged", "kl_all", "ce_all") if k in g}
        if source in sim_counts:
            summary[source]["inserted"] = {k: float(np.mean([c[k] for c in sim_counts[source]]))
                                           for k in ("predicted", "true_positives", "false_positives")}
    result = {"eval_set": str(eval_set), "split": args.split, "hookpoint": hookpoint, "n_contexts": len(contexts),
              "kl_direction": "KL(p_clean || p_patched), nats", "sources": summary,
              "fractions": {"modes": args.fraction_modes, "values": args.fractions}}
    atomic_write_json(out / "results.json", result)
    print(f"[patch_kl] {len(contexts)} contexts, {hookpoint}: median KL(clean || patched) at the judged position")
    for source, s in summary.items():
        kl = s["kl_judged"]
        extra = f", all positions {s['kl_all']['median']:.4f}" if "kl_all" in s and s["kl_all"]["n"] else ""
        print(f"  {source:<60} {kl['median']:.4f} ({kl['q25']:.4f}-{kl['q75']:.4f}){extra}")
    print(f"[patch_kl] {out / 'results.json'}")
    return result


if __name__ == "__main__":
    run(main, DATACLASSES)
