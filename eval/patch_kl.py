"""Patch decoded SAE latents into the subject model: KL(p_clean || p_patched) and CE, per source of latents.

    python eval/patch_kl.py --config configs/eval/patch_kl_quickstart.yaml [--key value ...]

For each eval context (a cache row up to the judged position: the very tokens and positions the latents were
recorded on) the residual stream after the hook layer is replaced by a vector built from latents of:
- the SAE itself (`sae`: the ceiling), the SAE plus its error term (`sae_plus_error`: must give KL ~0), no
  latent at all (`no_latents`: b_dec, the floor of any layer rebuilt from latents), and two references that
  are not built from latents: the layer's update skipped (`skip_layer_update`: its input passed on) or
  replaced by its mean over `mean_contexts` cache rows (`mean_layer_update`);
- a fraction f of the truly active latents with their true values, the strongest (`top`) or random (Figure 1);
- each simulator of an eval/sweep.py run (Figure 3): the latents it scored active at a threshold replace the
  truly active latents it scored, false positives included (value: `oracle` = the true value where the latent
  is really active, its median non-zero activation otherwise; `median` = the median for all: no oracle;
  `predicted` = a value simulator's 0-9 answer (sim_value_v1) mapped back through the latent's deciles, or a
  dense value simulator's expected activation given active (sim_dense_value_v1)).
  Latents the simulator never scored (other splits, unexplained) keep their SAE values in every variant;
  `no_simulator` (all scored latents off) is the floor the simulators start from.
The judged position is patched alone (KL/CE of the next token there); with `all_positions` the SAE variants
are also patched at every position but BOS (KL/CE averaged over positions). Writes `results.json` (medians and
25-75 % ranges per source), `per_context.parquet` and `run_config.json` to `output_dir`.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from latentsim import rewrite
from latentsim.cli import run
from latentsim.config import PatchArguments
from latentsim.confirmation import record_look
from latentsim.eval_set import EvalSet, context_row_position
from latentsim.io import atomic_save, read_results, require_same_config, write_results, write_run_config
from latentsim.models import load_model_and_tokenizer

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (PatchArguments,)


def main(args: PatchArguments) -> dict:
    eval_set = EvalSet.open(args.eval_set)
    eval_set.require_binary("patching")
    sweep_root = Path(args.sweep_dir or ".") / eval_set.name
    sims = (
        rewrite.sweep_simulators(sweep_root, args.split, args.simulators, args.thresholds)
        if args.sweep_dir
        else {}
    )
    out = Path(args.output_dir or sweep_root / "patch_kl")
    if args.overwrite:
        for name in ("results.json", "per_context.parquet"):
            (out / name).unlink(missing_ok=True)
    if (finished := read_results(out)) is not None:
        require_same_config(
            out,
            {"patch": args},
            {"patch.overwrite"},
            "patching results",
            "pass --overwrite true or choose another output_dir",
        )
        print(f"[patch_kl] {out / 'results.json'} exists for this config; skipped")
        return finished

    if sims:  # the contexts every simulator scored
        ids = set.intersection(*(set(s["predictions"]["context_id"]) for s in sims.values()))
    else:
        ids = set(eval_set.split(args.split, args.max_contexts, args.seed)["context_id"])
    contexts = sorted(ids)
    if args.max_contexts and len(contexts) > args.max_contexts:
        contexts = sorted(
            np.random.default_rng(args.seed).choice(contexts, args.max_contexts, replace=False).tolist()
        )

    model, _ = load_model_and_tokenizer(eval_set.subject_model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    sae = eval_set.load_sae(device)
    edges = eval_set.decile_edges(device)
    medians = edges[:, 5]
    value_of = (
        rewrite.predicted_values(
            eval_set, args.split, contexts, args.value_simulator, edges, args.dtype, args.device, args.seed
        )
        if "predicted" in args.values
        else None
    )
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "patch_kl", {"patch": args}, args.seed)
    look = record_look(eval_set.path, "patch_kl", out, sorted(sims)) if args.confirm else None
    tokens = eval_set.tokens
    mean_vec = rewrite.mean_contribution(model, tokens, eval_set.layer, args.mean_contexts, device)
    gen = torch.Generator().manual_seed(args.seed)
    fraction_keys = [(m, f) for m in args.fraction_modes for f in args.fractions]
    records, sim_counts = [], {}
    by_context = {n: dict(tuple(s["predictions"].groupby("context_id"))) for n, s in sims.items()}
    for cid in tqdm(contexts, desc="patching", unit="context"):
        per_source, counts = rewrite.patch_context(
            model,
            sae,
            tokens,
            cid,
            eval_set.layer,
            mean_vec,
            fraction_keys,
            gen,
            sims,
            {n: by_context[n][cid] for n in sims},
            args.values,
            medians,
            value_of,
            args.all_positions,
        )
        for k, v in counts.items():
            sim_counts.setdefault(k, []).append(v)
        row, pos = context_row_position(cid)
        records += [
            {"context_id": int(cid), "row": row, "position": pos, "source": n, **v}
            for n, v in per_source.items()
        ]

    table = pd.DataFrame(records)
    atomic_save(out / "per_context.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    summary = rewrite.summarise_patching(table, sim_counts)
    result = {
        "eval_set": str(eval_set.path),
        "split": args.split,
        "confirmation_look": look,  # latentsim.confirmation
        "hookpoint": eval_set.hookpoint,
        "n_contexts": len(contexts),
        "kl_direction": "KL(p_clean || p_patched), nats",
        "sources": summary,
        "fractions": {"modes": args.fraction_modes, "values": args.fractions},
    }
    write_results(out, result, "patch_kl")
    print(
        f"[patch_kl] {len(contexts)} contexts, {eval_set.hookpoint}: median KL(clean || patched) "
        "at the judged position"
    )
    for source, s in summary.items():
        kl = s["kl_judged"]
        extra = f", all positions {s['kl_all']['median']:.4f}" if "kl_all" in s and s["kl_all"]["n"] else ""
        print(f"  {source:<60} {kl['median']:.4f} ({kl['q25']:.4f}-{kl['q75']:.4f}){extra}")
    print(f"[patch_kl] {out / 'results.json'}")
    return result


if __name__ == "__main__":
    run(main, DATACLASSES)
