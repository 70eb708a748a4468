"""The whole layer rewritten by a dense simulator, per held-out text (eval/whole_layer.py).

For one text (a cache row's positions 1..n; BOS is never encoded) the simulator judges every explained latent
at every position (`DenseScorer.text_logits`), and the layer output at every position is rebuilt from its
verdicts alone: no latent keeps an SAE value because the simulator was not asked about it. Sources (each a
[n, d] layer output, patched in at all positions at once):

- `sae`: the SAE reconstruction (the ceiling); `sae:explained_only`: only the explained latents' true values
  (the ceiling of any simulator when unexplained latents are zeroed); `no_latents`: every latent 0, i.e. b_dec
  (the floor of a layer rebuilt from latents);
- `sim@<threshold>:<value>:<unexplained>`: the latents with P(yes) >= threshold at that position, valued
  `oracle` (the true value where truly active, else the latent's median activation) or `median`; unexplained
  latents `zeroed` or `kept` at their SAE values (labelled: kept ones are not the simulator's work);
- `firing_rate_random:...`: each explained latent flagged at random with its firing rate (reads nothing; the
  "everything flagged at chance" reference), valued and completed the same way.

Verdicts at tokens the simulator's tokenizer cannot align are "not flagged". `l0_matched` is the threshold at
which the simulator flags as many (position, latent) pairs on the calibration texts as the SAE has explained
active ones there.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from latentsim.dataset import dense_window
from latentsim.errors import BadInputError, ConfigError
from latentsim.io import atomic_write_bytes, atomic_write_json
from latentsim.metrics import N_BOOT, bootstrap_ci, bootstrap_counts, percentile_interval, roc_auc
from latentsim.patching import all_positions_logits, clean_pass, kl_and_ce

if TYPE_CHECKING:
    from latentsim.eval_set import EvalSet

PATCH_CHUNK = 4  # full patched passes at a time: [4, T, V] logits
BLOCK = 8  # bootstrap clusters: blocks of 8 consecutive positions of one text (neighbours are correlated)


def simulator_for(args):
    """The simulator of a WholeLayerArguments: a train/sft.py run's final adapter (a dense format or sim_v1)
    or a prompted sim_v1 baseline (eval/sweep.py's `name=...,model=...` spec)."""
    from latentsim.config.eval import parse_baseline
    from latentsim.prompts import get_format
    from latentsim.simulators import baseline_simulator, final_simulator

    if args.baseline:
        return baseline_simulator(parse_baseline(args.baseline))
    sim = final_simulator(args.simulator)
    if not get_format(sim.prompt_format).binary or get_format(sim.prompt_format).judgment_format != "sim_v1":
        raise ConfigError(
            f"config key `simulator`: {args.simulator} was trained on {sim.prompt_format!r}; the whole "
            "layer needs Yes/No verdicts (sim_v1 or a dense format that judges like it)."
        )
    return sim


def text_of_row(tokens: torch.Tensor, row: int, n_tokens: int, tokenizer):
    """(subject ids [1 + n] with BOS, the decoded text of positions 1..n, each position's character end)."""
    ids = tokens[row, : n_tokens + 1].long()
    window = dense_window(tokenizer, ids[1:].numpy(), [{}] * n_tokens)
    return ids, window.text, window.token_ends


def simulator_p_yes(
    scorer, interpretations: list[str], texts: list[tuple[str, list[int]]], progress=None
) -> list[np.ndarray]:
    """Per text, P(yes) [n_tokens, n_latents] of a dense simulator (renormalised over No/Yes); NaN where
    unaligned. Each interpretation's header is computed once for all the texts."""
    # A token without a character end (-1) matches no simulator token: text_logits leaves it NaN.
    return [
        (1 / (1 + np.exp(logits[..., 0] - logits[..., 1]))).T.astype(np.float32)
        for logits in scorer.text_logits(interpretations, texts, progress)
    ]


def sim_v1_p_yes(
    scorer,
    interpretations: list[str],
    tokens: torch.Tensor,
    rows: list[int],
    n_tokens: int,
    judged: np.ndarray,
    context_tokens: int,
    tokenizer,
    progress=None,
) -> list[np.ndarray]:
    """Per text, P(yes) [n_tokens, n_latents] of a sim_v1 simulator: one judgment per (judged position,
    latent), the context the `context_tokens` tokens up to the judged one (never BOS), marked as in the eval
    sets; NaN at the positions not judged. Judgments of one position share its context prefix (HFScorer)."""
    from latentsim.prompts import marked_context
    from latentsim.simulators import Judgment, probabilities

    out = []
    for row in rows:
        p = np.full((n_tokens, len(interpretations)), np.nan, dtype=np.float32)
        for j in judged:
            pos = int(j) + 1  # positions 1..n of the row
            window = tokens[row, max(1, pos - context_tokens + 1) : pos + 1].tolist()
            context = marked_context(tokenizer.decode(window[:-1]), tokenizer.decode(window[-1:]))
            logits = scorer.label_logits([Judgment(context, i) for i in interpretations], progress)
            p[j] = probabilities(logits)[:, 1]
        out.append(p)
    return out


def judge_texts(
    scorer,
    interpretations: list[str],
    tokens: torch.Tensor,
    rows: list[int],
    n_tokens: int,
    tokenizer,
    shard_dir: Path,
    sim_v1: dict | None = None,
) -> dict[int, np.ndarray]:
    """{row: P(yes) [n_tokens, latents]} of texts, each saved to `shard_dir/row<r>.npy` with the timing of the
    run that judged it (`.json`: the rows judged together, seconds, judgments, judgments/s, tokens computed
    per judgment); finished rows are read back, the others judged together (a dense simulator: each header
    once). `sim_v1` (judged, context_tokens): judged by a sim_v1 simulator at those positions only."""
    shard_dir = Path(shard_dir)
    out = {r: np.load(shard_dir / f"row{r}.npy") for r in rows if (shard_dir / f"row{r}.npy").is_file()}
    todo = [r for r in rows if r not in out]
    if not todo:
        return out
    before = dict(scorer.stats)
    start = time.perf_counter()
    if sim_v1 is None:
        texts = [text_of_row(tokens, r, n_tokens, tokenizer)[1:] for r in todo]
        total = len(interpretations) * sum(e >= 0 for _, ends in texts for e in ends)
        with tqdm(total=total, desc=f"judging {len(todo)} texts", unit="judgment") as bar:
            scores = simulator_p_yes(scorer, interpretations, texts, bar)
    else:
        total = len(interpretations) * len(sim_v1["judged"]) * len(todo)
        with tqdm(total=total, desc=f"judging {len(todo)} texts (sim_v1)", unit="judgment") as bar:
            scores = sim_v1_p_yes(
                scorer,
                interpretations,
                tokens,
                todo,
                n_tokens,
                sim_v1["judged"],
                sim_v1["context_tokens"],
                tokenizer,
                bar,
            )
    seconds = time.perf_counter() - start
    judged = scorer.stats["judgments"] - before["judgments"]
    timing = {
        "rows": todo,
        "seconds": seconds,
        "judgments": judged,
        "judgments_per_s": judged / seconds,
        "computed_tokens_per_judgment": (scorer.stats["computed_tokens"] - before["computed_tokens"])
        / max(judged, 1),
    }
    for r, p in zip(todo, scores, strict=True):
        atomic_write_bytes(shard_dir / f"row{r}.npy", npy_bytes(p))
        atomic_write_json(shard_dir / f"row{r}.json", timing)
        out[r] = p
    return out


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of an array (np.save on a path would add its own suffix to a temporary name)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def l0_matched_threshold(p_yes: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """The threshold at which the simulator flags as many pairs as are truly active (over all texts given)."""
    p = np.concatenate([np.nan_to_num(x, nan=-1.0).ravel() for x in p_yes])
    k = int(sum(t.sum() for t in truth))
    if k == 0:
        return 1.0
    return float(np.sort(p)[::-1][min(k, len(p)) - 1])


def decisions(
    p_yes: np.ndarray, thresholds: dict[str, float], firing_rate: torch.Tensor, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """{decision source: flagged [n, n_explained] bool}: the simulator at each threshold, and the random
    reference."""
    p = torch.from_numpy(np.nan_to_num(p_yes, nan=-1.0))
    out = {f"sim@{label}": p >= t for label, t in thresholds.items()}
    out["firing_rate_random"] = torch.rand(p.shape, generator=generator) < firing_rate[None, :]
    return out


def layer_sources(
    z: torch.Tensor,
    explained: torch.Tensor,
    flagged: dict[str, torch.Tensor],
    values: list[str],
    medians: torch.Tensor,
    sae,
) -> dict[str, torch.Tensor]:
    """{source: layer output [n, d]} (module docstring); z [n, W] the true latents, `explained` the latent ids
    the simulator judges, flagged[...] [n, len(explained)]."""
    unexplained = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
    unexplained[explained] = False
    kept = z * unexplained
    out = {
        "sae": sae.decode(z),
        "sae:explained_only": sae.decode(z - kept),
        "no_latents": sae.decode(torch.zeros_like(z)),
    }
    for name, f in flagged.items():
        for value in values:
            zs = torch.zeros_like(z)
            true, median = z[:, explained], medians[explained].expand_as(f)
            chosen = torch.where(true > 0, true, median) if value == "oracle" else median
            zs[:, explained] = torch.where(f.to(z.device), chosen, torch.zeros_like(chosen))
            out[f"{name}:{value}:unexplained_zeroed"] = sae.decode(zs)
            out[f"{name}:{value}:unexplained_kept"] = sae.decode(zs + kept)
    return out


@torch.no_grad()
def patch_text(
    model,
    sae,
    ids: torch.Tensor,
    next_ids: torch.Tensor,
    layer: int,
    build_sources,
    judged: np.ndarray | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], torch.Tensor, np.ndarray]:
    """KL(p_clean || p_patched) and CE of the next token at positions 1..n for every source;
    `build_sources(z)` gives {source: [n, d]} from the true latents z [n, W]. Returns
    ({source: (kl [n], ce [n])}, z, clean CE [n]). With `judged` (indices into 0..n-1) only those positions
    are patched (the others keep the clean layer output) and measured: kl, ce and clean CE are
    [len(judged)]."""
    logits, _, x_out, _ = clean_pass(model, ids, layer)
    z = sae.encode(x_out[1:].to(sae.W_dec.dtype))
    sources = build_sources(z)
    if judged is not None:
        clean, at = x_out[1:], torch.as_tensor(judged, device=x_out.device)
        sources = {k: clean.clone().index_copy_(0, at, v[at].to(clean.dtype)) for k, v in sources.items()}
    names = list(sources)
    out = {}
    for a in range(0, len(names), PATCH_CHUNK):
        chunk = names[a : a + PATCH_CHUNK]
        patched = all_positions_logits(model, ids, layer, torch.stack([sources[k] for k in chunk]))[:, 1:]
        kl, ce = kl_and_ce(logits[1:], patched, next_ids)
        for j, k in enumerate(chunk):
            out[k] = (kl[j].cpu().numpy(), ce[j].cpu().numpy())
    clean_ce = kl_and_ce(logits[1:], logits[None, 1:], next_ids)[1][0].cpu().numpy()
    if judged is not None:
        out = {k: (kl[judged], ce[judged]) for k, (kl, ce) in out.items()}
        clean_ce = clean_ce[judged]
    return out, z, clean_ce


def controlled_share(
    z: torch.Tensor, explained: torch.Tensor, decoder_norms: torch.Tensor
) -> dict[str, float]:
    """Of the SAE's active latents (mean over positions): the share the simulator judges (explained), by count
    and by decoded norm (sum of activation x |decoder row|)."""
    active = z > 0
    mask = torch.zeros(z.shape[1], dtype=torch.bool, device=z.device)
    mask[explained] = True
    weight = z * decoder_norms[None, :]
    return {
        "active_latents": float(active.sum(1).float().mean()),
        "share_of_active_latents": float((active & mask).sum() / active.sum().clamp(min=1)),
        "share_of_decoded_norm": float(weight[:, mask].sum() / weight.sum().clamp(min=1e-12)),
    }


def mean_ci(values: np.ndarray, clusters: np.ndarray, seed: int) -> dict:
    """Mean over positions with a 95% bootstrap interval resampling `clusters` (blocks of positions)."""
    codes = np.unique(clusters, return_inverse=True)[1]
    sums, counts = np.bincount(codes, weights=values), np.bincount(codes).astype(float)
    drawn = bootstrap_counts(len(sums), N_BOOT, seed)  # [resamples, clusters]: the metrics module's draws
    low, high = percentile_interval(drawn @ sums / (drawn @ counts))
    return {"mean": float(values.mean()), "ci95": [low, high], "n_positions": int(len(values))}


def judgment_metrics(
    p_yes: np.ndarray,
    truth: np.ndarray,
    trained: np.ndarray,
    firing_rate: np.ndarray,
    thresholds: dict[str, float],
    seed: int,
) -> dict:
    """Over every (position, explained latent) of the texts: pooled AUC of the simulator and of the
    firing-rate prior, per-latent AUC (positions where a latent fires vs those where it does not; the prior's
    is 0.5 by construction), recall / precision / flagged per position at each threshold; for all latents and
    split by whether the simulator trained on them. p_yes, truth [positions, latents]; trained [latents]
    bool."""
    out = {}
    for group, cols in (("all", np.ones_like(trained)), ("trained_on", trained), ("held_out", ~trained)):
        if not cols.any():
            continue
        p, t = p_yes[:, cols], truth[:, cols]
        finite = np.isfinite(p)
        prior = np.broadcast_to(firing_rate[cols][None, :], p.shape)
        per_latent = np.array([roc_auc(p[finite[:, j], j], t[finite[:, j], j]) for j in range(p.shape[1])])
        defined = per_latent[np.isfinite(per_latent)]
        rec = {
            "latents": int(cols.sum()),
            "pairs": int(finite.sum()),
            "positives": int(t[finite].sum()),
            "auc_pooled": roc_auc(p[finite], t[finite]),
            "prior_auc_pooled": roc_auc(prior[finite], t[finite]),
            "per_latent_auc": {
                "median": float(np.median(defined)) if len(defined) else float("nan"),
                "ci95": list(bootstrap_ci(defined, seed=seed)),
                "latents": int(len(defined)),
            },
            "thresholds": {},
        }
        for label, th in thresholds.items():
            flagged = np.nan_to_num(p, nan=-1.0) >= th
            tp = int((flagged & (t == 1)).sum())
            rec["thresholds"][label] = {
                "threshold": th,
                "flagged_per_position": float(flagged.sum(1).mean()),
                "active_per_position": float(t.sum(1).mean()),
                "recall": tp / max(int(t.sum()), 1),
                "precision": tp / int(flagged.sum()) if flagged.any() else float("nan"),
            }
        out[group] = rec
    return out


def summarise_sources(kl_ce: dict[str, dict[str, np.ndarray]], clusters: np.ndarray, seed: int) -> dict:
    """Per source: mean KL and CE over all positions of all texts (95% CI over blocks of positions) and the
    recovery (KL_no_latents - KL) / (KL_no_latents - KL_sae)."""
    out = {}
    for name, v in kl_ce.items():
        out[name] = {"kl": mean_ci(v["kl"], clusters, seed), "ce": mean_ci(v["ce"], clusters, seed)}
    floor, ceiling = out["no_latents"]["kl"]["mean"], out["sae"]["kl"]["mean"]
    for rec in out.values():
        rec["recovery"] = (
            (floor - rec["kl"]["mean"]) / (floor - ceiling) if floor != ceiling else float("nan")
        )
    return out


def held_out_rows(eval_set: EvalSet, split: str, n: int, seed: int, trained_rows: set[int]) -> list[int]:
    """A seeded choice of `n` of the eval set's `split` rows, refused if any of its rows trained the
    simulator."""
    rows = sorted(set(eval_set.split(split)["row"].tolist()))
    if overlap := sorted(set(rows) & trained_rows):
        raise BadInputError(
            f"config key `eval_set`: {len(overlap)} of its {split} rows (e.g. {overlap[:5]}) are in the "
            "simulator's training data; build both with the same cache, seed and split fractions."
        )
    if len(rows) < n:
        raise ConfigError(
            f"config key `{'texts' if split != 'validation' else 'calibration_texts'}`: the eval set has "
            f"{len(rows)} {split} rows, fewer than {n}."
        )
    return sorted(np.random.default_rng(seed).choice(rows, n, replace=False).tolist())


def format_table(result: dict) -> str:
    """What eval/whole_layer.py prints: the timing, the controlled share, KL/CE per source, the judgments."""
    t, c = result["timing"], result["controlled"]
    at = "its last position" if result.get("positions") == "last" else "every position"
    lines = [
        f"[whole_layer] {len(result['rows'])} held-out texts x {result['tokens_per_text']} positions; "
        "every one of "
        f"{result['explained_latents']} explained latents judged by {result['prompt_format']} at {at} "
        f"({sum(x['seconds'] for x in t) / sum(len(x['rows']) for x in t):.0f} s per text, "
        f"{sum(x['judgments'] for x in t) / sum(x['seconds'] for x in t):.0f} judgments/s, "
        f"{np.mean([x['computed_tokens_per_judgment'] for x in t]):.2f} tokens computed per judgment)",
        f"  the simulator judges {100 * c['share_of_active_latents']:.0f}% of the SAE's active latents "
        f"({100 * c['share_of_decoded_norm']:.0f}% of their decoded norm; "
        f"{c['active_latents']:.1f} active per "
        "position); KL(p_clean || p_patched) and CE, mean over positions [95% CI over blocks of 8]",
        f"  {'source':<56} {'KL [95% CI]':<22} {'CE':>7} {'recovery':>9}",
    ]
    for name, s in result["sources"].items():
        kl = s["kl"]
        recovery = f"{s['recovery']:9.2f}" if name != "clean" else f"{'':>9}"
        lines.append(
            f"  {name:<56} {kl['mean']:.3f} [{kl['ci95'][0]:.3f}, {kl['ci95'][1]:.3f}] "
            f"{s['ce']['mean']:7.3f} {recovery}"
        )
    for group, g in result["judgments"].items():
        at = ", ".join(
            f"{k} (p >= {v['threshold']:.3g}): {v['flagged_per_position']:.1f} flagged per position for "
            f"{v['active_per_position']:.1f} active, recall {v['recall']:.2f}"
            for k, v in g["thresholds"].items()
        )
        per = g["per_latent_auc"]
        lines.append(
            f"  judgments of {group} latents ({g['latents']}): pooled AUC {g['auc_pooled']:.3f} (firing-rate "
            f"prior {g['prior_auc_pooled']:.3f}); per-latent AUC {per['median']:.3f} [{per['ci95'][0]:.3f}, "
            f"{per['ci95'][1]:.3f}] over {per['latents']} latents that fire (prior: 0.5); {at}"
        )
    return "\n".join(lines)


def finished_results(out: Path, args) -> dict | None:
    """The results of a finished run of the same WholeLayerArguments in `out` (None when there are none yet;
    finished texts' scores stay for the rerun); `overwrite` empties the folder first, another config is
    refused."""
    from latentsim.io import read_results, require_same_config

    if args.overwrite:
        for path in [out / "results.json", out / "per_position.parquet", out / "run_config.json"]:
            path.unlink(missing_ok=True)
        for path in (out / "scores").glob("*"):
            path.unlink()
    if not (out / "run_config.json").is_file():
        return None
    require_same_config(
        out,
        {"whole_layer": args},
        {"whole_layer.overwrite"},
        "whole-layer results",
        "pass --overwrite true or choose another output_dir",
    )
    return read_results(out)


def summarise_table(table, seed: int) -> dict:
    """summarise_sources of the per-position table (row, position, source, kl, ce), positions clustered in
    blocks of BLOCK consecutive positions of one text."""
    kl_ce = {
        s: {"kl": g["kl"].to_numpy(), "ce": g["ce"].to_numpy()}
        for s, g in table.groupby("source", sort=False)
    }
    blocks = table[table["source"] == "clean"]
    clusters = (blocks["row"] * 10_000 + (blocks["position"] - 1) // BLOCK).to_numpy()
    return summarise_sources(kl_ce, clusters, seed)
