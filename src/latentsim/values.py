"""How strongly, not only whether: activations read from dense simulators and scored by correlation.

A dense value format (prompts.py: `sim_dense_value_v1`, or `sim_dense_value_k{K}_v1` for K = 2..9 bins)
answers at every token " No" or the bin (decile for K = 10) of the latent's activation among its non-zero
training activations. Here:

- `bin_values`: each bin's value, the median of the latent's training activations in it (the statistics'
  sorted sample: latentsim.latent_stats, training rows only);
- `read_values`: P(active) and the expected activation from any dense simulator's answer probabilities: a
  value format's sum over bins of P(bin) x its value; a Yes/No format's P(yes) x the latent's median, so that
  per-latent r measures the same ranking its P(yes) gives;
- `pearson`, `latent_value_metrics`: per latent, Pearson r between predicted and true activation over every
  token of its texts (OpenAI's all-at-once scoring), over its active tokens only, and the AUC of P(active);
- `bin_calibration`: each bin's mean predicted probability against how often it is the true bin;
- `value_texts`: which held-out texts each latent is scored on (random texts shared by all, plus its own
  strongest texts: OpenAI's and delphi's top-and-random samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from latentsim.latent_stats import bin_edges
from latentsim.metrics import mean_ci, roc_auc
from latentsim.simulators.base import probabilities


def bin_values(statistics: dict, latents: list[int], n_bins: int = 10) -> np.ndarray:
    """[len(latents), n_bins]: the median of each latent's non-zero training activations within each of its
    n_bins equal-mass bins (the sample quantile at (k + 0.5) / n_bins), the edges' midpoint for a latent
    without a sample."""
    values_all = statistics["sample_values"].numpy()
    offsets = statistics["sample_offsets"].numpy()
    at = (np.arange(n_bins) + 0.5) / n_bins
    out = np.zeros((len(latents), n_bins), dtype=np.float64)
    for i, latent in enumerate(latents):
        sample = values_all[offsets[latent] : offsets[latent + 1]]
        if len(sample):
            out[i] = np.quantile(sample, at)
        else:
            edges = bin_edges(statistics, [latent], n_bins)[0]
            out[i] = (edges[:-1] + edges[1:]) / 2
    return out


def expected_activation(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Σ_k P(bin k) value_k over the active bins: probs [..., 1 + K] (" No" first), values [..., K] (one row
    per latent, broadcast against probs' leading axes)."""
    return np.sum(probs[..., 1:] * values, axis=-1)


def expected_given_active(probs: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The expected activation given that the latent is active, expected_activation / P(active): the value of
    a latent a decider flagged (the whole layer, patched KL)."""
    return expected_activation(probs, values) / np.maximum(1.0 - probs[..., 0], 1e-12)


def read_values(logits: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P(active), expected activation) from one latent's answer logits [..., n_answers]: a value format's
    (" No" + K bins) expectation over its bins, a Yes/No format's P(yes) x the latent's median activation
    (`values`: its K bin values, the median being their middle)."""
    probs = probabilities(logits.astype(np.float64))
    p_active = 1.0 - probs[..., 0]
    if probs.shape[-1] == 2:
        return p_active, p_active * np.median(values)
    return p_active, expected_activation(probs, values)


def pearson(predicted: np.ndarray, true: np.ndarray) -> float:
    """Pearson r; NaN when the truth is constant (nothing to predict), 0 when only the prediction is (a
    constant carries no information about which tokens fire, e.g. the prior)."""
    predicted, true = np.asarray(predicted, dtype=float), np.asarray(true, dtype=float)
    if len(true) < 2 or np.ptp(true) == 0:
        return float("nan")
    if np.ptp(predicted) == 0:
        return 0.0
    return float(np.corrcoef(predicted, true)[0, 1])


def latent_value_metrics(p_active: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> dict:
    """One latent's metrics over its tokens (NaN positions dropped): r over every token, r over its active
    tokens only (at least 3), the AUC of P(active), and the counts."""
    keep = np.isfinite(predicted) & np.isfinite(p_active)
    p_active, predicted, true = p_active[keep], predicted[keep], true[keep]
    active = true > 0
    return {
        "r": pearson(predicted, true),
        "r_active": pearson(predicted[active], true[active]) if active.sum() >= 3 else float("nan"),
        "auc": roc_auc(p_active, active.astype(int)),
        "tokens": int(len(true)),
        "active_tokens": int(active.sum()),
    }


def true_bins(true: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The answer index of each true activation: 0 inactive, else 1 + its bin among the K that `edges` [K + 1]
    bound (the training labels: latentsim.dataset.quantile_bin, vectorised)."""
    bins = np.minimum(len(edges) - 2, np.searchsorted(edges[1:-1], true, side="right"))
    return np.where(np.asarray(true) > 0, 1 + bins, 0).astype(np.int64)


def bin_calibration(probs: np.ndarray, bins: np.ndarray) -> dict:
    """Pooled over tokens: each answer's mean predicted probability against its observed frequency, their
    total variation distance, and the top-answer expected calibration error (10 confidence bins)."""
    n_answers = probs.shape[1]
    predicted = probs.mean(axis=0)
    observed = np.bincount(bins, minlength=n_answers) / max(len(bins), 1)
    confidence, top = probs.max(axis=1), probs.argmax(axis=1)
    correct = (top == bins).astype(float)
    slots = np.minimum((confidence * 10).astype(int), 9)
    ece = sum(
        abs(confidence[slots == s].mean() - correct[slots == s].mean()) * (slots == s).mean()
        for s in range(10)
        if (slots == s).any()
    )
    return {
        "tokens": int(len(bins)),
        "mean_predicted": predicted.round(4).tolist(),
        "observed": observed.round(4).tolist(),
        "total_variation": float(0.5 * np.abs(predicted - observed).sum()),
        "top_answer_ece": float(ece),
        "top_answer_accuracy": float(correct.mean()) if len(correct) else float("nan"),
    }


def value_texts(
    activations: dict[int, np.ndarray], latents: list[int], random_rows: list[int], top_texts: int
) -> dict[int, list[int]]:
    """Each latent's own strongest texts: the `top_texts` rows (not among the shared random ones) where its
    largest activation is highest, from `activations` {row: [tokens, len(latents)]}."""
    shared = set(random_rows)
    candidates = [r for r in sorted(activations) if r not in shared]
    if not candidates:
        return {latent: [] for latent in latents}
    peaks = np.stack([activations[r].max(axis=0) for r in candidates])  # [rows, latents]: each row read once
    order = np.argsort(-peaks, axis=0, kind="stable")[:top_texts]
    return {
        latent: [candidates[i] for i in order[:, j] if peaks[i, j] > 0] for j, latent in enumerate(latents)
    }


def summarise(per_latent: pd.DataFrame, seed: int) -> dict:
    """Means over latents with 95% bootstrap CIs resampling latents, per metric (NaN latents left out and
    counted)."""
    return {
        "latents": int(len(per_latent)),
        **{m: mean_ci(per_latent[m], seed) for m in ("r", "r_active", "auc")},
    }


def paired(per_latent: pd.DataFrame, a: str, b: str, metric: str, seed: int) -> dict:
    """Mean over latents of a's metric minus b's (same latents and texts), 95% CI resampling latents."""
    wide = per_latent.pivot_table(index="latent", columns="simulator", values=metric)
    return mean_ci(wide[a] - wide[b] if a in wide and b in wide else [], seed)


def row_activations(cache, rows: list[int], latents: list[int], n_tokens: int) -> dict[int, np.ndarray]:
    """{row: [n_tokens, len(latents)]}: the cached activations of `latents` at positions 1..n_tokens of each
    row (a latentsim.cache_reader.CacheReader; position p is index p - 1)."""
    selected = cache.select(np.asarray(sorted(rows)))
    loc, act = selected.locations.numpy(), selected.activations.numpy()
    order = np.argsort(latents)
    sorted_latents = np.asarray(latents)[order]
    at = np.clip(np.searchsorted(sorted_latents, loc[:, 2]), 0, len(latents) - 1)
    keep = (sorted_latents[at] == loc[:, 2]) & (loc[:, 1] >= 1) & (loc[:, 1] <= n_tokens)
    out = {r: np.zeros((n_tokens, len(latents)), dtype=np.float32) for r in rows}
    for row, position, j, value in zip(loc[keep, 0], loc[keep, 1], order[at[keep]], act[keep], strict=True):
        out[int(row)][position - 1, j] = value
    return out


def _ci(entry: dict) -> str:
    lo, hi = entry["ci95"]
    return "-" if not np.isfinite(entry["mean"]) else f"{entry['mean']:.3f} [{lo:.2f}, {hi:.2f}]"


def summary_table(result: dict) -> str:
    """results.json's summary as a markdown table: per simulator, r on both text sets, r over active tokens
    and AUC (top-and-random), and r minus each reference (top-and-random, paired over latents)."""
    refs = sorted({ref for s in result["summary"].values() for ref in s["top_and_random"]["minus"]})
    head = ["simulator", "r (random)", "r (top+random)", "r active", "AUC", *[f"r - {r}" for r in refs]]
    lines = [
        f"Held-out latents of {result['eval_set']} ({result['split']}: {len(result['latents'])} latents, "
        f"{len(result['random_rows'])} shared texts + each latent's strongest, {result['tokens_per_text']} "
        "tokens each); means over latents with 95% CIs resampling latents.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, sets in result["summary"].items():
        top = sets["top_and_random"]
        minus = [_ci(top["minus"][r]) if r in top["minus"] else "-" for r in refs]
        cells = [name, _ci(sets["random"]["r"]), _ci(top["r"]), _ci(top["r_active"]), _ci(top["auc"]), *minus]
        lines.append("| " + " | ".join(cells) + " |")
    for name, cal in result.get("calibration", {}).items():
        lines.append(
            f"\n{name}: bin calibration over {cal['tokens']} tokens: total variation "
            f"{cal['total_variation']:.3f} between the mean predicted and the observed bin frequencies; "
            "top-answer ECE "
            f"{cal['top_answer_ece']:.3f}, accuracy {cal['top_answer_accuracy']:.3f}."
        )
    return "\n".join(lines)


@dataclass
class ValueTexts:
    """What every simulator is scored on: the held-out latents (their interpretations; `statistics`, the
    training rows' latent statistics their bins come from), the shared random rows, each latent's own top
    rows, every row's text (latentsim.whole_layer.text_of_row: subject ids with BOS, text, token ends) and
    true activations [tokens, latents]."""

    latents: list[int]
    interpretations: list[str]
    random_rows: list[int]
    tops: dict[int, list[int]]
    texts: dict[int, tuple]
    activations: dict[int, np.ndarray]
    statistics: dict
    _bins: dict = field(default_factory=dict)

    def rows_of(self, j: int) -> list[int]:
        return self.random_rows + self.tops[self.latents[j]]

    def bins(self, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(values [latents, K], edges [latents, K + 1]) of every latent's K bins, computed once per K: value
        simulators of different K are scored side by side."""
        if n_bins not in self._bins:
            self._bins[n_bins] = (
                bin_values(self.statistics, self.latents, n_bins),
                bin_edges(self.statistics, self.latents, n_bins),
            )
        return self._bins[n_bins]


def simulator_answers(scorer, vt: ValueTexts) -> dict:
    """{(latent index, row): (P(active), predicted activation, answer probabilities or None)} of a dense
    simulator (DenseScorer.text_logits with its bins): the random rows read by every latent at once, then
    each latent's own top rows."""
    from tqdm.auto import tqdm

    got = {}
    aligned = {r: sum(e >= 0 for e in vt.texts[r][2]) for r in vt.texts}
    total = sum(aligned[r] for j in range(len(vt.latents)) for r in vt.rows_of(j))
    with tqdm(total=total, desc="value judgments", unit="judgment") as bar:
        shared = [vt.texts[r][1:] for r in vt.random_rows]
        logits_of = scorer.text_logits(vt.interpretations, shared, bar, bins=True)
        for r, logits in zip(vt.random_rows, logits_of, strict=True):
            got |= {(j, r): logits[j] for j in range(len(vt.latents))}
        for j, latent in enumerate(vt.latents):
            own = [vt.texts[r][1:] for r in vt.tops[latent]]
            logits_of = scorer.text_logits([vt.interpretations[j]], own, bar, bins=True)
            got |= {(j, r): logits[0] for r, logits in zip(vt.tops[latent], logits_of, strict=True)}
    out = {}
    for (j, r), logits in got.items():
        # A Yes/No simulator (2 answers) is valued at the median of the deciles' values.
        p, v = read_values(logits, vt.bins(logits.shape[-1] - 1 if logits.shape[-1] > 2 else 10)[0][j])
        out[(j, r)] = (p, v, probabilities(logits.astype(np.float64)) if logits.shape[-1] > 2 else None)
    return out


def reference_answers(scorer, vt: ValueTexts, tokenizer) -> dict:
    """simulator_answers' layout for a reference with `text_p_yes` (every latent at every position of a
    row): P(yes), valued as P(yes) x the latent's median."""
    p = {
        r: scorer.text_p_yes(vt.latents, vt.interpretations, vt.texts[r][0].numpy(), tokenizer)
        for r in vt.texts
    }
    medians = np.median(vt.bins()[0], axis=1)
    return {
        (j, r): (p[r][:, j], p[r][:, j] * medians[j], None)
        for j in range(len(vt.latents))
        for r in vt.rows_of(j)
    }


def score_answers(name: str, answers: dict, vt: ValueTexts) -> tuple[list[dict], dict | None]:
    """(per latent and text set: r, r over active tokens, AUC of P(active); the pooled bin calibration of a
    value simulator over every latent's top-and-random tokens, else None)."""
    records, pooled_probs, pooled_bins = [], [], []
    for j, latent in enumerate(vt.latents):
        for set_name, rows in (("random", vt.random_rows), ("top_and_random", vt.rows_of(j))):
            p = np.concatenate([answers[(j, r)][0] for r in rows])
            v = np.concatenate([answers[(j, r)][1] for r in rows])
            truth = np.concatenate([vt.activations[r][:, j] for r in rows])
            records.append(
                {"simulator": name, "set": set_name, "latent": latent, **latent_value_metrics(p, v, truth)}
            )
        for r in vt.rows_of(j):
            probs = answers[(j, r)][2]
            if probs is not None:
                keep = np.isfinite(probs).all(axis=-1)
                pooled_probs.append(probs[keep])
                pooled_bins.append(true_bins(vt.activations[r][keep, j], vt.bins(probs.shape[-1] - 1)[1][j]))
    if not pooled_probs:
        return records, None
    return records, bin_calibration(np.concatenate(pooled_probs), np.concatenate(pooled_bins))


def prompted_answers(model, tokenizer, vt: ValueTexts, subject_tokenizer, batch_size: int) -> dict:
    """simulator_answers' layout for the prompted all-at-once simulator (latentsim.all_at_once): each
    latent's texts as subject token strings, one pass per text; P(active) = 1 - P("0"), the value the
    expected digit."""
    from tqdm.auto import tqdm

    from latentsim.all_at_once import digit_logits, read_digits

    out = {}
    for j in tqdm(range(len(vt.latents)), desc="all-at-once", unit="latent"):
        rows = vt.rows_of(j)
        tokens = [[subject_tokenizer.decode([i]) for i in vt.texts[r][0][1:].tolist()] for r in rows]
        for r, logits in zip(
            rows, digit_logits(model, tokenizer, vt.interpretations[j], tokens, batch_size), strict=True
        ):
            p, v = read_digits(logits.astype(np.float64))
            out[(j, r)] = (p, v, None)
    return out
