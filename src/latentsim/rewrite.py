"""The layer rewritten from latents, measured per eval context (eval/patch_kl.py): what each source patches.

For one context (a cache row up to its judged position) `patch_context` builds the layer-output vector of
every source (the SAE, SAE + error, zero and mean ablation, fractions of the true latents, and each simulator
at each threshold x value mode), patches it in with latentsim.patching, and returns KL(p_clean || p_patched)
and the CE of the next token per source. Simulators replace exactly the latents they scored (false positives
included); latents they never scored keep their SAE values. `summarise_patching` and the results.json
writer/reader close the stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from latentsim.errors import MissingInputError
from latentsim.eval_set import EvalSet, context_row_position
from latentsim.io import read_results
from latentsim.metrics import summarise
from latentsim.patching import (
    all_positions_logits,
    clean_pass,
    judged_logits,
    keep_fraction,
    kl_and_ce,
    value_from_digits,
)
from latentsim.simulators import Judgment, ScoringOptions, load_scorer, probabilities

ALL_POSITIONS_CHUNK = 4  # full patched passes at a time: [4, T, V] logits


def sweep_simulators(
    sweep_root: Path, split: str, names: list[str], thresholds: list[str]
) -> dict[str, dict]:
    """{simulator: {"predictions": DataFrame, "thresholds": {label: t}}} from a sweep's folders (all of them
    when `names` is empty); `l0_matched` is the threshold the sweep fitted on validation (skipped if none)."""
    names = names or sorted(p.parent.name for p in sweep_root.glob(f"*/predictions_{split}.parquet"))
    out = {}
    for name in names:
        path = sweep_root / name / f"predictions_{split}.parquet"
        if not path.is_file():
            raise MissingInputError(
                f"config key `simulators`: {path} does not exist; run eval/sweep.py first."
            )
        results = read_results(sweep_root / name)["results"]
        chosen = {}
        for t in thresholds:
            if t == "l0_matched":
                matched = results.get("calibration", {}).get("l0_matched")
                if matched:
                    chosen[t] = matched["threshold"]
            else:
                chosen[t] = float(t)
        out[name] = {"predictions": pd.read_parquet(path), "thresholds": chosen}
    return out


@torch.no_grad()
def mean_contribution(model, tokens: torch.Tensor, layer: int, n_rows: int, device) -> torch.Tensor:
    """The hook layer's mean contribution (output - input) over positions 1.. of the first `n_rows` cache
    rows."""
    total, count = None, 0
    for row in tokens[:n_rows]:
        _, x_in, x_out, _ = clean_pass(model, row.to(device), layer)
        diff = (x_out - x_in)[1:].double().sum(0)
        total = diff if total is None else total + diff
        count += x_in.shape[0] - 1
    return (total / count).float()


@torch.no_grad()
def predicted_values(
    eval_set: EvalSet,
    split: str,
    contexts: list[int],
    value_simulator: str,
    edges: torch.Tensor,
    dtype: str,
    device: str,
    seed: int,
) -> dict:
    """{(context_id, latent): activation} for every candidate of the contexts: a sim_value_v1 simulator's
    expected digit mapped through the latent's deciles, or a dense value simulator's (sim_dense_value_v1)
    expected activation given active (latentsim.values: each decile's value from the training rows)."""
    from latentsim.prompts import get_format
    from latentsim.simulators import model_simulator
    from latentsim.values import bin_values, expected_given_active

    df = eval_set.split(split, 0, seed)
    df = df[df["context_id"].isin(contexts)]
    n_bins = get_format(model_simulator(value_simulator).prompt_format or "sim_v1").value_bins
    options = ScoringOptions(dtype=dtype, device=device)
    scorer, _ = load_scorer(value_simulator, "sim_v1" if n_bins else "sim_value_v1", options)
    judgments = [Judgment(r.context, r.interpretation, latent=r.latent) for r in df.itertuples(index=False)]
    lat = torch.tensor(df["latent"].to_numpy())
    if n_bins:
        probs = probabilities(scorer.answer_logits(judgments).astype(np.float64))
        per_latent = bin_values(eval_set.statistics, df["latent"].tolist(), n_bins)
        values = torch.from_numpy(expected_given_active(probs, per_latent))
    else:
        digits = probabilities(scorer.label_logits(judgments))
        values = value_from_digits(edges[lat].cpu(), torch.from_numpy(digits @ np.arange(10)))
    return dict(
        zip(zip(df["context_id"].tolist(), df["latent"].tolist(), strict=True), values.tolist(), strict=True)
    )


def simulator_vectors(
    z: torch.Tensor,
    preds: dict[str, pd.DataFrame],
    sims: dict,
    values: list[str],
    medians: torch.Tensor,
    sae,
    value_of: dict | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Latent vectors at the judged position for every simulator x threshold x value mode (and the floor),
    with counts of what each inserts."""
    out, info, floors = {}, {}, {}
    for name, sim in sims.items():
        rows = preds[name]
        lat = torch.tensor(rows["latent"].to_numpy())
        active = torch.tensor(rows["active"].to_numpy()) == 1
        floor = z.clone()
        floor[lat[active]] = 0  # the simulator replaces exactly the latents it scored
        floors[name] = (tuple(sorted(lat[active].tolist())), floor)
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
                    zs[predicted] = torch.tensor(
                        [value_of[(cid, int(i))] for i in predicted], dtype=zs.dtype, device=zs.device
                    )
                key = f"sim:{name}@{label}:{mode}"
                out[key] = sae.decode(zs[None])[0]
                true_pos = int((z[predicted] > 0).sum())
                info[key] = {
                    "predicted": len(predicted),
                    "true_positives": true_pos,
                    "false_positives": len(predicted) - true_pos,
                }
    # `no_simulator`: the scored active latents off. One floor when every simulator scored the same latents
    # here (one eval set), else one per simulator: never one simulator's floor reported for another.
    if len({scored for scored, _ in floors.values()}) == 1:
        out["no_simulator"] = sae.decode(next(iter(floors.values()))[1][None])[0]
    else:
        out.update(
            {f"no_simulator:{name}": sae.decode(floor[None])[0] for name, (_, floor) in floors.items()}
        )
    return out, info


@torch.no_grad()
def patch_context(
    model,
    sae,
    tokens: torch.Tensor,
    cid: int,
    layer: int,
    mean_vec: torch.Tensor,
    fraction_keys: list,
    gen: torch.Generator,
    sims: dict,
    preds: dict,
    values: list[str],
    medians: torch.Tensor,
    value_of: dict | None,
    all_positions: bool,
) -> tuple[dict[str, dict], dict]:
    """KL/CE per source for one context (judged position, and every position with `all_positions`), and what
    each simulator variant inserted."""
    device = next(model.parameters()).device
    row, pos = context_row_position(cid)
    ids = tokens[row, : pos + 1].to(device).long()
    nxt = tokens[row, pos + 1].to(device).long() if pos + 1 < tokens.shape[1] else None
    logits, x_in, x_out, kv = clean_pass(model, ids, layer)
    z = sae.encode(x_out[1:].to(sae.W_dec.dtype))  # [T-1, W]: position 0 is never encoded
    recon = sae.decode(z)
    no_latents = sae.decode(torch.zeros_like(z[-1:]))[0]  # b_dec: the floor of a layer rebuilt from latents
    judged = {
        "sae": recon[-1],
        "sae_plus_error": recon[-1] + (x_out[-1] - recon[-1]),
        "no_latents": no_latents,
        "skip_layer_update": x_in[-1],
        "mean_layer_update": x_in[-1] + mean_vec,
    }
    for mode, f in fraction_keys:
        judged[f"fraction:{mode}:{f:g}"] = sae.decode(keep_fraction(z[-1:], f, mode, gen))[0]
    sim_vecs, counts = simulator_vectors(z[-1], preds, sims, values, medians, sae, value_of)
    judged.update(sim_vecs)
    names = list(judged)
    kl, ce = kl_and_ce(
        logits[-1], judged_logits(model, ids, layer, kv, torch.stack([judged[n] for n in names])), nxt
    )
    nan = float("nan")
    per_source = {
        "clean": {
            "kl_judged": 0.0,
            "ce_judged": float(kl_and_ce(logits[-1], logits[-1:], nxt)[1][0]) if nxt is not None else nan,
        }
    }
    for i, n in enumerate(names):
        per_source[n] = {"kl_judged": float(kl[i]), "ce_judged": float(ce[i]) if ce is not None else nan}
    if all_positions:
        targets = ids[2:] if nxt is None else torch.cat([ids[2:], nxt[None]])  # next tokens of positions 1..
        scored = slice(1, len(targets) + 1)
        every = {
            "sae": recon,
            "sae_plus_error": recon + (x_out[1:] - recon),
            "no_latents": no_latents.expand_as(recon),
            "skip_layer_update": x_in[1:],
            "mean_layer_update": x_in[1:] + mean_vec,
        }
        for mode, f in fraction_keys:
            every[f"fraction:{mode}:{f:g}"] = sae.decode(keep_fraction(z, f, mode, gen))
        per_source["clean"].update(
            kl_all=0.0, ce_all=float(kl_and_ce(logits[scored], logits[None, scored], targets)[1].mean())
        )
        keys = list(every)
        for a in range(0, len(keys), ALL_POSITIONS_CHUNK):
            chunk = keys[a : a + ALL_POSITIONS_CHUNK]
            patched = all_positions_logits(model, ids, layer, torch.stack([every[k] for k in chunk]))
            kl_all, _ = kl_and_ce(logits[1:], patched[:, 1:], None)
            _, ce_all = kl_and_ce(logits[scored], patched[:, scored], targets)
            for j, k in enumerate(chunk):
                per_source[k].update(kl_all=float(kl_all[j].mean()), ce_all=float(ce_all[j].mean()))
    return per_source, counts


def summarise_patching(table: pd.DataFrame, sim_counts: dict[str, list[dict]]) -> dict:
    """Per source: median and 25-75 % of each measure over contexts, and the mean counts each variant
    inserted."""
    summary = {}
    for source, g in table.groupby("source", sort=False):
        summary[source] = {
            k: summarise(g[k]) for k in ("kl_judged", "ce_judged", "kl_all", "ce_all") if k in g
        }
        if source in sim_counts:
            summary[source]["inserted"] = {
                k: float(np.mean([c[k] for c in sim_counts[source]]))
                for k in ("predicted", "true_positives", "false_positives")
            }
    return summary
