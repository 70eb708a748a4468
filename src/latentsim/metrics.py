"""Simulator metrics on per-judgment predictions, the seed's Tables 1-2 and Figures 2, 4, 5, 6 done right.

Input: a predictions table (pandas) with one row per (context, latent) judgment: `context_id`, `latent`,
`active` (0/1), `activation`, `activation_bin`, `quantile_bin`, `n_active` (latents active at that token in
the whole SAE) and `p_yes` (binary formats) or `p_digit_0..9` (value formats).

Per-context metrics are aggregated as median and 25-75 % range (the seed's convention), next to pooled values.

Extrapolating to the whole dictionary. A context's candidates are all of its active latents in the eval pool
plus inactive latents drawn uniformly from that pool, so the scored actives estimate the simulator's hit rate
on actives, and the scored inactives its false-positive rate on inactives. When all W latents of the SAE are
scored, the expected number flagged at threshold t is

    E[flagged](t) = n_active * hit_rate(t) + (W - n_active) * fp_rate(t),

with n_active the token's true active count (from the cache, every latent, explained or not). This fixes the
seed's denominators (its inactive accuracy divided by all candidates and bootstrapped 130k draws) and assumes
the pool's latents are representative of the dictionary (they are a random split of the explained latents).

Uncertainty. Judgments of one context share its text and its candidate pool, so they are not independent: the
confidence intervals are percentile bootstraps that resample whole contexts (clusters) with replacement, never
single rows. Lift over a reference (a baseline that reads nothing, e.g. the latent's firing rate) pairs the
two on the same contexts and resamples those contexts jointly, so what both share cancels out of the interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
# Per-context metrics whose median gets a bootstrap confidence interval in `binary_metrics`.
CI_METRICS = ("auc", "recall", "precision", "f1", "precision_top_active")
N_BOOT = 1000


def summarise(values) -> dict[str, float]:
    """Median and 25/75 % percentiles over contexts (NaN-aware), with the count of defined values."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {
            "median": float("nan"),
            "q25": float("nan"),
            "q75": float("nan"),
            "mean": float("nan"),
            "n": 0,
        }
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {
        "median": float(med),
        "q25": float(q25),
        "q75": float(q75),
        "mean": float(v.mean()),
        "n": int(len(v)),
    }


def bootstrap_indices(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_clusters) cluster indices drawn uniformly with replacement: row b is bootstrap resample
    b."""
    return np.random.default_rng(seed).integers(0, n_clusters, size=(n_boot, n_clusters))


def bootstrap_counts(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_clusters): how often each cluster is drawn in each resample of `bootstrap_indices` (same
    seed, same draws), for statistics that weight a cluster's rows instead of copying them."""
    offsets = (
        np.arange(n_boot)[:, None] * n_clusters
    )  # one bincount for all resamples: resample b owns its own bins
    draws = bootstrap_indices(n_clusters, n_boot, seed) + offsets
    return np.bincount(draws.ravel(), minlength=n_boot * n_clusters).reshape(n_boot, n_clusters)


def percentile_interval(replicates, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap replicates (resamples where the statistic is undefined,
    e.g. an AUC with one class only, are left out); (nan, nan) when none is defined."""
    r = np.asarray(replicates, dtype=float)
    r = r[np.isfinite(r)]
    if not len(r):
        return float("nan"), float("nan")
    low, high = np.percentile(r, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def bootstrap_ci(
    values_by_cluster, statistic=np.median, *, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic` over one value per cluster (context), resampling the
    clusters with replacement. NaN-aware like `summarise`: clusters where the value is undefined are left out
    before resampling, so the interval is about the same defined contexts the point estimate is. `statistic`
    is a numpy reduction taking `axis` (np.median, np.mean, ...); all resamples are drawn at once,
    n_boot x n_clusters values."""
    v = np.asarray(values_by_cluster, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return float("nan"), float("nan")
    return percentile_interval(statistic(v[bootstrap_indices(len(v), n_boot, seed)], axis=1), level)


def mean_ci(values, seed: int, n_boot: int = N_BOOT) -> dict:
    """Mean (and median) of one value per latent with a 95% percentile-bootstrap CI of the mean resampling
    latents; undefined (NaN) latents are left out and the defined ones counted."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return {"mean": float("nan"), "ci95": [float("nan")] * 2, "latents": 0}
    low, high = bootstrap_ci(v, np.mean, n_boot=n_boot, seed=seed)
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "ci95": [low, high],
        "latents": int(len(v)),
    }


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan with one class only."""
    from scipy.stats import rankdata

    scores, truth = np.asarray(scores, dtype=float), np.asarray(truth)
    n_pos, n_neg = int((truth == 1).sum()), int((truth == 0).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[truth == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pooled_auc_replicates(
    scores: np.ndarray, truth: np.ndarray, cluster: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Pooled AUC of every bootstrap resample, without copying rows: resample b repeats each row of cluster c
    counts[b, c] times (`cluster`: each row's cluster code, 0..n_clusters-1). With rows grouped by score
    level, the weighted Mann-Whitney AUC is the sum over levels of (negatives' weight) x (positives' weight
    above + half the positives' weight tied), over (total positive weight) x (total negative weight); nan
    without both classes."""
    from scipy import sparse

    levels, level_of_row = np.unique(np.asarray(scores, dtype=float), return_inverse=True)
    positive, cluster = np.asarray(truth) == 1, np.asarray(cluster)
    shape = (counts.shape[1], len(levels))

    def rows_per_cluster_and_level(mask):  # duplicate (cluster, level) entries are summed: row counts
        return sparse.csr_matrix(
            (np.ones(int(mask.sum())), (cluster[mask], level_of_row[mask])), shape=shape
        ).T.tocsr()

    pos_rows, neg_rows = rows_per_cluster_and_level(positive), rows_per_cluster_and_level(~positive)
    out = np.empty(len(counts))
    chunk = max(1, 1_000_000 // len(levels))  # resamples per step: bounds the (resamples x levels) arrays
    for start in range(0, len(counts), chunk):
        weights = counts[start : start + chunk].T.astype(float)
        pos, neg = (pos_rows @ weights).T, (neg_rows @ weights).T  # (resamples, levels) weights
        pos_total, neg_total = pos.sum(axis=1), neg.sum(axis=1)
        pos_above = pos_total[:, None] - np.cumsum(pos, axis=1)
        wins = (neg * (pos_above + 0.5 * pos)).sum(axis=1)
        pairs = pos_total * neg_total
        out[start : start + chunk] = np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1), np.nan)
    return out


def cluster_codes(df: pd.DataFrame, by: str = "context_id") -> tuple[np.ndarray, int]:
    """Each row's cluster (its context, or its latent with by="latent") as a code 0..n-1 (sorted), and n."""
    codes, uniques = pd.factorize(df[by], sort=True)
    return codes, len(uniques)


def pooled_auc_ci(
    df: pd.DataFrame, *, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95, by: str = "context_id"
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the pooled AUC, resampling contexts (all of a context's rows
    together), or latents with by="latent"."""
    codes, n_contexts = cluster_codes(df, by)
    counts = bootstrap_counts(n_contexts, n_boot, seed)
    return percentile_interval(
        pooled_auc_replicates(df["p_yes"].to_numpy(), df["active"].to_numpy(), codes, counts), level
    )


def confusion_metrics(p: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Recall, precision, F1, balanced accuracy, accuracy at p >= threshold (NaN where undefined)."""
    pred, truth = np.asarray(p) >= threshold, np.asarray(truth) == 1
    tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
    fn, tn = int((~pred & truth).sum()), int((~pred & ~truth).sum())
    nan = float("nan")
    recall = tp / (tp + fn) if tp + fn else nan
    specificity = tn / (tn + fp) if tn + fp else nan
    precision = tp / (tp + fp) if tp + fp else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    return {
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "balanced_accuracy": (recall + specificity) / 2,
        "accuracy": (tp + tn) / len(truth) if len(truth) else nan,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def contexts(df: pd.DataFrame):
    """(context_id, its rows) in a stable order."""
    return df.groupby("context_id", sort=True)


def binary_metrics(
    df: pd.DataFrame, width: int, l0: float, threshold: float = 0.5, *, seed: int = 0, n_boot: int = N_BOOT
) -> dict:
    """Per-context recall/precision/F1/balanced accuracy/AUC (median, IQR) and pooled, plus precision among
    the top candidates: `precision_top_active` (the |A| most probable candidates of the pool, |A| = the
    context's scored actives) and `precision_at_l0` (among the L0 latents the simulator would rank highest in
    the whole dictionary: n_active * hit(t) / L0 at the t where E[flagged](t) = L0).

    The medians of CI_METRICS carry `ci95`, and the pooled AUC `auc_ci95`: 95 % percentile-bootstrap intervals
    resampling contexts (`n_boot` resamples drawn from `seed`).

    Precision, F1 and the pooled confusion are pool metrics: the pool is ~25% positive where the dictionary is
    ~L0/W. `dictionary` holds the same at the dictionary's base rate (dictionary_weights), with an
    interval."""
    per = {
        k: []
        for k in (
            "recall",
            "precision",
            "f1",
            "balanced_accuracy",
            "auc",
            "precision_top_active",
            "precision_at_l0",
        )
    }
    rates = PooledRates(df)
    for _, g in contexts(df):
        p, y = g["p_yes"].to_numpy(), g["active"].to_numpy()
        m = confusion_metrics(p, y, threshold)
        for k in ("recall", "precision", "f1", "balanced_accuracy"):
            per[k].append(m[k])
        per["auc"].append(roc_auc(p, y))
        n_pos = int(y.sum())
        per["precision_top_active"].append(
            float(y[np.argsort(-p, kind="stable")[:n_pos]].mean()) if n_pos else np.nan
        )
        per["precision_at_l0"].append(
            precision_at_budget(np.sort(p[y == 1]), rates, judged_active_count(g), width, l0)
        )
    pooled = confusion_metrics(df["p_yes"].to_numpy(), df["active"].to_numpy(), threshold)
    weights = dictionary_weights(df, width)
    dictionary = weighted_confusion(df["p_yes"].to_numpy(), df["active"].to_numpy(), weights, threshold)
    dictionary["precision_ci95"] = dictionary_precision_ci(df, weights, threshold, n_boot=n_boot, seed=seed)
    pooled["auc"] = roc_auc(df["p_yes"].to_numpy(), df["active"].to_numpy())
    pooled["auc_ci95"] = list(pooled_auc_ci(df, n_boot=n_boot, seed=seed))
    per_context = {k: summarise(v) for k, v in per.items()}
    for k in CI_METRICS:
        per_context[k]["ci95"] = list(bootstrap_ci(per[k], n_boot=n_boot, seed=seed))
    return {
        "per_context": per_context,
        "pooled": pooled,
        "dictionary": dictionary,
        "contexts_without_scored_active": int(sum(1 for a, _ in context_groups(df) if not len(a))),
        "n_contexts": int(df["context_id"].nunique()),
        "n_judgments": len(df),
        "threshold": threshold,
    }


def per_context_auc(df: pd.DataFrame, by: str = "context_id") -> pd.Series:
    """AUC of `p_yes` within each context (index: context_id, sorted), or within each latent with by="latent"
    (its active vs inactive contexts); nan where a group has one class only."""
    return pd.Series(
        {c: roc_auc(g["p_yes"].to_numpy(), g["active"].to_numpy()) for c, g in df.groupby(by, sort=True)},
        dtype=float,
    )


def per_latent_metrics(df: pd.DataFrame, *, seed: int = 0, n_boot: int = N_BOOT) -> dict:
    """Per-latent AUC: for each latent, its judgments where it is active against those where it is not (a
    firing-rate prior, constant per latent, gets exactly 0.5). Median over the latents where it is defined,
    its 95% bootstrap interval resampling latents, and the pooled AUC with an interval resampling latents."""
    auc = per_context_auc(df, by="latent")
    out = {
        "auc": {**summarise(auc), "ci95": list(bootstrap_ci(auc.to_numpy(), n_boot=n_boot, seed=seed))},
        "n_latents": int(df["latent"].nunique()),
        "n_latents_defined": int(np.isfinite(auc).sum()),
        "pooled_auc": roc_auc(df["p_yes"].to_numpy(), df["active"].to_numpy()),
        "pooled_auc_ci95": list(pooled_auc_ci(df, n_boot=n_boot, seed=seed, by="latent")),
    }
    return out


def lift_over_reference(
    test: pd.DataFrame,
    reference: pd.DataFrame,
    *,
    seed: int = 0,
    n_boot: int = N_BOOT,
    level: float = 0.95,
    by: str = "context_id",
) -> dict:
    """How much better the simulator (`test`) ranks than a reference that scored the same judgments (e.g. the
    latent's firing-rate prior), both prediction tables joined on (context_id, latent).

    `per_context_auc`: the paired per-context differences AUC(test) - AUC(reference) over the contexts where
    both are defined: their median (the headline, as every per-context number is a median), mean, count and a
    percentile-bootstrap interval of the median resampling those contexts (jointly: one draw serves both
    simulators, so it is an interval of the paired difference). `pooled_auc`: both pooled AUCs on the joined
    rows, their difference and its interval, resampling contexts with the same draws for both. A test
    identical to the reference gets 0 with interval [0, 0]. With by="latent" the groups are latents instead of
    contexts (latent-major eval sets: differences of per-latent AUCs, resampling latents; the keys keep their
    names)."""
    columns = ["context_id", "latent", "active", "p_yes"]
    joined = test[columns].merge(
        reference[columns], on=["context_id", "latent"], suffixes=("", "_reference"), validate="one_to_one"
    )
    if (joined["active"] != joined["active_reference"]).any():
        raise ValueError(
            "lift_over_reference: test and reference disagree on `active` for the same "
            "(context_id, latent): they are not predictions of the same eval set"
        )
    as_reference = joined.assign(p_yes=joined["p_yes_reference"])
    test_auc, reference_auc = per_context_auc(joined, by), per_context_auc(as_reference, by)
    difference = (test_auc - reference_auc).to_numpy()
    difference = difference[np.isfinite(difference)]

    codes, n_contexts = cluster_codes(joined, by)
    counts = bootstrap_counts(n_contexts, n_boot, seed)
    truth = joined["active"].to_numpy()
    pooled_test, pooled_reference = roc_auc(joined["p_yes"], truth), roc_auc(joined["p_yes_reference"], truth)
    pooled_difference = pooled_auc_replicates(
        joined["p_yes"].to_numpy(), truth, codes, counts
    ) - pooled_auc_replicates(joined["p_yes_reference"].to_numpy(), truth, codes, counts)
    nan = float("nan")
    return {
        "per_context_auc": {
            "median": float(np.median(difference)) if len(difference) else nan,
            "mean": float(difference.mean()) if len(difference) else nan,
            "n": int(len(difference)),
            "ci95": list(bootstrap_ci(difference, n_boot=n_boot, seed=seed, level=level)),
            "test_median": summarise(test_auc)["median"],
            "reference_median": summarise(reference_auc)["median"],
        },
        "pooled_auc": {
            "test": pooled_test,
            "reference": pooled_reference,
            "difference": pooled_test - pooled_reference,
            "ci95": list(percentile_interval(pooled_difference, level)),
        },
        "n_contexts": n_contexts,
        "n_judgments": len(joined),
        "by": by,
    }


def judged_active_column(df: pd.DataFrame) -> str:
    """The column counting a token's active latents that the simulator could be asked about (explained ones;
    every active latent for predictions made before eval sets recorded `n_active_explained`)."""
    return "n_active_explained" if "n_active_explained" in df else "n_active"


def judged_active_count(g: pd.DataFrame) -> int:
    return int(g[judged_active_column(g)].iloc[0])


def uniform_negative_mask(df: pd.DataFrame) -> np.ndarray:
    """The inactive candidates drawn uniformly from the pool: the only ones that estimate the dictionary's
    false-positive rate (hard negatives are chosen to be confusable, so they would overstate it; the
    frequency-matched half of a `negative_sampling: mixed` set over-represents frequent latents). Read from
    `negative_kind` where the eval set records each negative's draw, else from `candidate`."""
    if "negative_kind" in df:
        return (df["negative_kind"] == "uniform").to_numpy()
    if "candidate" in df:
        return (df["candidate"] == "random_negative").to_numpy()
    return (df["active"] == 0).to_numpy()


def share_at_or_above(sorted_p: np.ndarray, t) -> np.ndarray | float:
    """Share of `sorted_p` (ascending) that is >= t, for a threshold or an array of them (nan if empty)."""
    if not len(sorted_p):
        return np.full(np.shape(t), np.nan) if np.ndim(t) else float("nan")
    return (len(sorted_p) - np.searchsorted(sorted_p, t, side="left")) / len(sorted_p)


class PooledRates:
    """Hit rate over every scored active and false-positive rate over every uniform negative, pooled across
    the contexts. A context holds ~10 negatives, so its own rate is 0 or >= 0.1: multiplied by the ~W inactive
    latents of the dictionary, that quantisation decides every extrapolation. The pooled rate is smooth in the
    threshold (it assumes the rate varies little from one token to the next; the per-context hit rate
    stays)."""

    def __init__(self, df: pd.DataFrame):
        p = df["p_yes"].to_numpy()
        self.negatives = np.sort(p[uniform_negative_mask(df)])
        self.actives = np.sort(p[df["active"].to_numpy() == 1])

    def fpr(self, t):
        return share_at_or_above(self.negatives, t)

    def hit(self, t):
        return share_at_or_above(self.actives, t)


def pooled_fpr_ci(
    df: pd.DataFrame, threshold: float, *, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> dict:
    """The pooled false-positive rate at `threshold` with a percentile-bootstrap interval resampling
    contexts."""
    neg = uniform_negative_mask(df)
    codes, n_contexts = cluster_codes(df)
    flagged = np.bincount(
        codes[neg], weights=(df["p_yes"].to_numpy()[neg] >= threshold), minlength=n_contexts
    )
    scored = np.bincount(codes[neg], minlength=n_contexts).astype(float)
    counts = bootstrap_counts(n_contexts, n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates = (counts @ flagged) / (counts @ scored)
    return {
        "rate": float(flagged.sum() / scored.sum()) if scored.sum() else float("nan"),
        "ci95": list(percentile_interval(replicates, level)),
        "n_negatives": int(scored.sum()),
    }


def context_groups(df: pd.DataFrame) -> list[tuple[np.ndarray, int]]:
    """Per context (sorted): its scored actives' P(yes), ascending, and its judged active count."""
    return [
        (np.sort(g["p_yes"].to_numpy()[g["active"].to_numpy() == 1]), judged_active_count(g))
        for _, g in contexts(df)
    ]


def expected_flagged(hit, fpr, n_active: int, width: int):
    """E[flagged] when all `width` judged latents are scored: n_active * hit + (width - n_active) * fpr."""
    return n_active * hit + (width - n_active) * fpr


def context_hit(sorted_active: np.ndarray, rates: PooledRates, t):
    """The context's hit rate at t; the pooled one where it has no scored active (so it still counts)."""
    return share_at_or_above(sorted_active, t) if len(sorted_active) else rates.hit(t)


def precision_at_budget(
    sorted_active: np.ndarray, rates: PooledRates, n_active: int, width: int, budget: float
) -> float:
    """Expected share of true actives among the `budget` latents flagged when the whole judged dictionary is
    scored, at the threshold whose E[flagged] is closest to the budget (candidates: every scored
    probability)."""
    if not len(sorted_active) or not len(rates.negatives):
        return float("nan")
    t = np.unique(np.concatenate([sorted_active, rates.negatives]))
    hit = share_at_or_above(sorted_active, t)
    flagged = expected_flagged(hit, rates.fpr(t), n_active, width)
    ok = np.nonzero(flagged > 0)[0]
    if not len(ok):
        return float("nan")
    best = ok[np.argmin(np.abs(flagged[ok] - budget))]  # the first (lowest threshold) of equally close ones
    return float(n_active * hit[best] / flagged[best])


def threshold_sweep(
    df: pd.DataFrame, width: int, thresholds=THRESHOLDS, *, seed: int = 0, n_boot: int = N_BOOT
) -> list[dict]:
    """Figure 5: per threshold, active accuracy (hit rate, per context), inactive accuracy (1 - the context's
    own fp rate over its uniform negatives: the pool's view), the pooled false-positive rate with its
    interval, and the expected number of latents flagged in the judged dictionary (pooled fp rate); median and
    IQR over contexts."""
    rates, groups = PooledRates(df), context_groups(df)
    negatives = [np.sort(g["p_yes"].to_numpy()[uniform_negative_mask(g)]) for _, g in contexts(df)]
    rows = []
    for t in thresholds:
        hit = [share_at_or_above(a, t) for a, _ in groups]
        inactive = [1 - share_at_or_above(n, t) for n in negatives]
        flagged = [expected_flagged(context_hit(a, rates, t), rates.fpr(t), n, width) for a, n in groups]
        rows.append(
            {
                "threshold": t,
                "active_accuracy": summarise(hit),
                "inactive_accuracy": summarise(inactive),
                "false_positive_rate": pooled_fpr_ci(df, t, n_boot=n_boot, seed=seed),
                "expected_flagged": summarise(flagged),
            }
        )
    return rows


def dictionary_weights(df: pd.DataFrame, width: int) -> np.ndarray:
    """Per judgment, how many latents of the judged dictionary it stands for at its token, so that weighted
    pool metrics are dictionary metrics: a scored active stands for n_active / n_scored_actives of the token's
    actives, a uniform negative for (width - n_active) / n_uniform_negatives of its inactives, a hard negative
    for none (it is not a sample of them). The pool is ~25% positive; the dictionary ~L0 / W."""
    codes, n_contexts = cluster_codes(df)
    uniform, active = uniform_negative_mask(df), df["active"].to_numpy() == 1
    n = df[judged_active_column(df)].to_numpy(dtype=float)
    n_pos = np.bincount(codes, weights=active, minlength=n_contexts)[codes]
    n_neg = np.bincount(codes, weights=uniform, minlength=n_contexts)[codes]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(active, n / n_pos, 0.0) + np.where(uniform, (width - n) / n_neg, 0.0)


def weighted_confusion(
    p: np.ndarray, truth: np.ndarray, weights: np.ndarray, threshold: float
) -> dict[str, float]:
    """Recall, precision and F1 at p >= threshold with each judgment counted `weights` times."""
    pred, truth = np.asarray(p) >= threshold, np.asarray(truth) == 1
    tp, fp, fn = (float(weights[m].sum()) for m in (pred & truth, pred & ~truth, ~pred & truth))
    nan = float("nan")
    return {
        "recall": tp / (tp + fn) if tp + fn else nan,
        "precision": tp / (tp + fp) if tp + fp else nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan,
    }


def dictionary_precision_ci(
    df: pd.DataFrame,
    weights: np.ndarray,
    threshold: float,
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> list[float]:
    """Percentile-bootstrap interval of the dictionary-weighted precision, resampling contexts."""
    codes, n_contexts = cluster_codes(df)
    pred, truth = df["p_yes"].to_numpy() >= threshold, df["active"].to_numpy() == 1
    tp = np.bincount(codes, weights=weights * (pred & truth), minlength=n_contexts)
    flagged = np.bincount(codes, weights=weights * pred, minlength=n_contexts)
    counts = bootstrap_counts(n_contexts, n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return list(percentile_interval((counts @ tp) / (counts @ flagged), level))


def reliability(
    p: np.ndarray, truth: np.ndarray, n_bins: int = 10, weights: np.ndarray | None = None
) -> dict:
    """Uniform-bin reliability diagram, ECE (bin-weight weighted |mean p - positive rate|) and Brier score;
    each judgment counted `weights` times if given (dictionary_weights: the dictionary's base rate, not the
    pool's)."""
    p, truth = np.asarray(p, dtype=float), np.asarray(truth, dtype=float)
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    table, ece, total = [], 0.0, w.sum()
    for b in range(n_bins):
        mask = (bins == b) & (w > 0)
        if mask.any():
            mean_p, rate = np.average(p[mask], weights=w[mask]), np.average(truth[mask], weights=w[mask])
            table.append(
                {
                    "bin": b,
                    "lower": b / n_bins,
                    "upper": (b + 1) / n_bins,
                    "count": int(mask.sum()),
                    "mean_p": float(mean_p),
                    "positive_rate": float(rate),
                }
            )
            ece += w[mask].sum() / total * abs(mean_p - rate)
    return {
        "bins": table,
        "ece": float(ece),
        "brier": float(np.average((p - truth) ** 2, weights=w)),
        "n": int(len(p)),
    }


def yes_margin(df: pd.DataFrame) -> np.ndarray:
    """logit(yes) - logit(no): the renormalised P(yes) is sigmoid of it."""
    return df["logit_1"].to_numpy(dtype=float) - df["logit_0"].to_numpy(dtype=float)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(z, -500, 500)))


def fit_temperature(margin: np.ndarray, truth: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The temperature T minimising the (weighted) NLL of sigmoid(margin / T) (searched over log T)."""
    from scipy.optimize import minimize_scalar

    truth = np.asarray(truth, dtype=float)
    w = np.ones_like(truth) if weights is None else np.asarray(weights, dtype=float)

    def nll(log_t):
        p = np.clip(sigmoid(margin / np.exp(log_t)), 1e-12, 1 - 1e-12)
        return -np.average(truth * np.log(p) + (1 - truth) * np.log(1 - p), weights=w)

    return float(np.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded").x))


def l0_matched_threshold(df: pd.DataFrame, width: int, l0: float) -> float:
    """The threshold at which the mean over contexts of E[flagged] (pooled fp rate; a context with no scored
    active takes the pooled hit rate, so it is not dropped) equals `l0` (bisection in logit space; E[flagged]
    only falls as the threshold rises)."""
    rates, groups = PooledRates(df), context_groups(df)

    def mean_flagged(t):
        return float(
            np.mean([expected_flagged(context_hit(a, rates, t), rates.fpr(t), n, width) for a, n in groups])
        )

    lo, hi = -30.0, 30.0  # logit(t)
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean_flagged(float(sigmoid(np.array(mid)))) > l0:
            lo = mid
        else:
            hi = mid
    return float(sigmoid(np.array(hi)))


def calibration(test: pd.DataFrame, validation: pd.DataFrame | None, width: int, l0: float) -> dict:
    """Reliability/ECE/Brier on test, on the pool (`raw`, ~25% positive) and weighted to the dictionary's base
    rate (`dictionary`); a temperature fitted on validation (pool NLL, and dictionary-weighted NLL) with what
    each gives on test; and the threshold fitted on validation so that E[flagged] = L0, with what it gives on
    test."""
    truth = test["active"].to_numpy()
    weights = dictionary_weights(test, width)
    out = {
        "raw": reliability(test["p_yes"].to_numpy(), truth),
        "dictionary": reliability(test["p_yes"].to_numpy(), truth, weights=weights),
    }
    if validation is None or not len(validation):
        return out
    temperature = fit_temperature(yes_margin(validation), validation["active"].to_numpy())
    out["temperature"] = temperature
    out["temperature_scaled"] = reliability(sigmoid(yes_margin(test) / temperature), truth)
    dict_t = fit_temperature(
        yes_margin(validation), validation["active"].to_numpy(), dictionary_weights(validation, width)
    )
    out["temperature_dictionary"] = dict_t
    out["temperature_dictionary_scaled"] = reliability(
        sigmoid(yes_margin(test) / dict_t), truth, weights=weights
    )
    t = l0_matched_threshold(validation, width, l0)
    sweep = threshold_sweep(test, width, (t,))[0]
    pooled = confusion_metrics(test["p_yes"].to_numpy(), truth, t)
    out["l0_matched"] = {
        "threshold": t,
        "l0": l0,
        **{k: v for k, v in sweep.items() if k != "threshold"},
        **{f"pooled_{k}": pooled[k] for k in ("recall", "precision", "f1")},
        **{
            f"dictionary_{k}": v
            for k, v in weighted_confusion(test["p_yes"].to_numpy(), truth, weights, t).items()
        },
        "validation_contexts_without_scored_active": sum(
            1 for a, _ in context_groups(validation) if not len(a)
        ),
    }
    return out


def per_latent_accuracy(df: pd.DataFrame) -> pd.DataFrame:
    """Per latent: active accuracy TP/active and inactive accuracy TN/inactive over all its judgments
    (p >= 0.5)."""
    pred = df["p_yes"] >= 0.5
    frame = pd.DataFrame(
        {
            "latent": df["latent"],
            "tp": pred & (df["active"] == 1),
            "n_active": df["active"] == 1,
            "tn": ~pred & (df["active"] == 0),
            "n_inactive": df["active"] == 0,
        }
    )
    agg = frame.groupby("latent").sum()
    agg["active_accuracy"] = agg["tp"] / agg["n_active"].where(agg["n_active"] > 0)
    agg["inactive_accuracy"] = agg["tn"] / agg["n_inactive"].where(agg["n_inactive"] > 0)
    return agg.reset_index()


def accuracy_vs_score(df: pd.DataFrame, scores: dict[int, float], name: str) -> dict:
    """Figures 2 and 6: per-latent accuracies against an interpretation score (rounded to 0.1), and their
    Spearman correlation."""
    from scipy.stats import spearmanr

    acc = per_latent_accuracy(df)
    acc = acc[acc["latent"].isin(scores)].copy()
    acc["score"] = acc["latent"].map(scores)
    out = {"score": name, "n_latents": int(len(acc)), "bins": []}
    if not len(acc):
        return out
    acc["score_bin"] = acc["score"].round(1)
    for b, g in acc.groupby("score_bin"):
        out["bins"].append(
            {
                "score": float(b),
                "n_latents": int(len(g)),
                "active_accuracy": float(g["active_accuracy"].mean()),
                "inactive_accuracy": float(g["inactive_accuracy"].mean()),
            }
        )
    for k in ("active_accuracy", "inactive_accuracy"):
        ok = acc[k].notna()
        out[f"spearman_{k}"] = (
            float(spearmanr(acc.loc[ok, "score"], acc.loc[ok, k]).statistic) if ok.sum() > 2 else float("nan")
        )
    return out


def accuracy_vs_strength(df: pd.DataFrame) -> dict:
    """Hit rate of active judgments per quantile bin of the activation (0 weakest decile, 9 strongest) and per
    rank among the context's scored actives (the seed's "position": 0 strongest, 1 weakest)."""
    act = df[df["active"] == 1].copy()
    act["hit"] = act["p_yes"] >= 0.5
    by_bin = [
        {"quantile_bin": int(b), "n": int(len(g)), "active_accuracy": float(g["hit"].mean())}
        for b, g in act.groupby("quantile_bin")
    ]
    rank = act.groupby("context_id")["activation"].rank(ascending=False, method="first") - 1
    size = act.groupby("context_id")["activation"].transform("size") - 1
    act["position"] = (rank / size.where(size > 0)).fillna(0).round(1)
    by_position = [
        {"position": float(b), "n": int(len(g)), "active_accuracy": float(g["hit"].mean())}
        for b, g in act.groupby("position")
    ]
    return {"by_quantile_bin": by_bin, "by_position": by_position}


def value_metrics(df: pd.DataFrame) -> dict:
    """Table 2 / Figure 4: mean and mode of the digit distribution vs activation bin and quantile bin
    (Pearson, Spearman), exact-bin accuracy, and the mean label per rounded predicted mean."""
    from scipy.stats import pearsonr, spearmanr

    probs = df[[f"p_digit_{d}" for d in range(10)]].to_numpy(dtype=float)
    mean, mode = probs @ np.arange(10), probs.argmax(axis=1)
    out = {"n": int(len(df))}
    for label in ("activation_bin", "quantile_bin"):
        y = df[label].to_numpy(dtype=float)
        for name, pred in (("mean", mean), ("mode", mode.astype(float))):
            const = np.ptp(pred) == 0 or np.ptp(y) == 0
            out[f"{name}_vs_{label}"] = {
                "pearson": float("nan") if const else float(pearsonr(pred, y).statistic),
                "spearman": float("nan") if const else float(spearmanr(pred, y).statistic),
                "mae": float(np.abs(pred - y).mean()),
            }
        out[f"mode_accuracy_{label}"] = float((mode == y).mean())
        out[f"mean_{label}_by_predicted"] = [
            {
                "predicted": int(b),
                "n": int((np.round(mean) == b).sum()),
                "mean_label": float(y[np.round(mean) == b].mean()),
            }
            for b in range(10)
            if (np.round(mean) == b).any()
        ]
    return out


def decoder_alignment(df: pd.DataFrame, w_dec: np.ndarray, rng: np.random.Generator) -> dict:
    """Figure 2 right: per context, Hungarian-match the truly active latents A with the |A| most probable
    candidates T by decoder cosine (linear_sum_assignment, maximise); mean matched cosine. Baselines: |A|
    latents drawn uniformly from the whole dictionary (the seed's), and from the context's own candidate pool
    (what a random ranking of the same pool would get)."""
    from scipy.optimize import linear_sum_assignment

    unit = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True).clip(1e-12)

    def matched(a, b):
        sims = unit[a] @ unit[b].T
        r, c = linear_sum_assignment(sims, maximize=True)
        return float(sims[r, c].mean())

    sim, dictionary, pool = [], [], []
    for _, g in contexts(df):
        lat, y, p = g["latent"].to_numpy(), g["active"].to_numpy(), g["p_yes"].to_numpy()
        a = lat[y == 1]
        if not len(a):
            continue
        sim.append(matched(a, lat[np.argsort(-p, kind="stable")[: len(a)]]))
        dictionary.append(matched(a, rng.choice(len(unit), size=len(a), replace=False)))
        pool.append(matched(a, rng.choice(lat, size=len(a), replace=False)))
    return {
        "simulator": summarise(sim),
        "random_dictionary": summarise(dictionary),
        "random_pool": summarise(pool),
    }


def evaluate(
    test: pd.DataFrame,
    validation: pd.DataFrame | None,
    *,
    binary: bool,
    width: int,
    l0: float,
    w_dec: np.ndarray | None,
    scores: dict[str, dict[int, float]],
    seed: int,
    latent_major: bool = False,
) -> dict:
    """Every metric of one simulator on one eval set, from its predictions. A latent-major eval set (each
    latent judged on a fixed number of contexts where it fires and where it does not) gets the per-latent
    metrics, the pooled confusion and calibration: its contexts hold one judgment each, so no per-context
    metric and no dictionary-wide extrapolation is defined on it."""
    if not binary:
        return {
            "value": value_metrics(test),
            "n_judgments": len(test),
            "n_contexts": int(test["context_id"].nunique()),
        }
    if latent_major:
        pooled = confusion_metrics(test["p_yes"].to_numpy(), test["active"].to_numpy())
        return {
            "per_latent": per_latent_metrics(test, seed=seed),
            "pooled": pooled,
            "reliability": reliability(test["p_yes"].to_numpy(), test["active"].to_numpy()),
            "n_judgments": len(test),
            "n_contexts": int(test["context_id"].nunique()),
            "n_latents": int(test["latent"].nunique()),
        }
    out = {
        "binary": binary_metrics(test, width, l0, seed=seed),
        "per_latent": per_latent_metrics(test, seed=seed),
        "threshold_sweep": threshold_sweep(test, width, seed=seed),
        "calibration": calibration(test, validation, width, l0),
        "accuracy_vs_strength": accuracy_vs_strength(test),
        "accuracy_vs_score": [accuracy_vs_score(test, s, name) for name, s in scores.items()],
        "width": width,
        "l0": l0,
        "n_judgments": len(test),
        "n_contexts": int(test["context_id"].nunique()),
    }
    if w_dec is not None:
        out["decoder_alignment"] = decoder_alignment(test, w_dec, np.random.default_rng(seed))
    return out


def add_lift_columns(row: dict, results: dict) -> None:
    """The paired per-context (per-latent) AUC lifts a sweep wrote (eval/sweep.py: `lift_over_prior`, and
    `lift_over_prior_string_match` over the best reference that reads nothing) as summary columns with their
    CIs; for a control (latentsim.simulators.controls), `control_gap_auc`: its real simulator's pooled AUC
    minus its own, with the paired CI."""
    for key, column in (("lift_over_prior", "lift_auc"), ("lift_over_prior_string_match", "lift_psm_auc")):
        if key in results:
            lift = results[key]["per_context_auc"]
            row[column] = lift["median"]
            row[f"{column}_ci_low"], row[f"{column}_ci_high"] = lift["ci95"]
    add_lexical_lift_columns(row, results)
    if "control_gap" in results:
        gap = results["control_gap"]["pooled_auc"]
        row["control_gap_auc"] = gap["difference"]
        row["control_gap_auc_ci_low"], row["control_gap_auc_ci_high"] = gap["ci95"]


def add_lexical_lift_columns(row: dict, results: dict) -> None:
    """`lift_lexical_pooled_auc`: the pooled-AUC lift over the STRONGER lexical reader on these judgments
    (`lexical` or `lexical_gbm`, whichever has the higher pooled AUC: the harder bar, so choosing it cannot
    flatter the simulator; `lexical_reference` names it), its paired CI over contexts and, with
    `_other_ci_low/high`, over latents (for a latent-major set the main interval is over latents and the
    other over contexts); `lift_lexical_auc`: the median of the paired per-context (per-latent) differences
    against the same reader."""
    lifts = [results[k] for k in ("lift_over_lexical", "lift_over_lexical_gbm") if k in results]
    if not lifts:
        return
    lift = min(lifts, key=lambda x: x["pooled_auc"]["difference"])
    row["lexical_reference"] = lift["reference"]
    row["lift_lexical_pooled_auc"] = lift["pooled_auc"]["difference"]
    row["lift_lexical_pooled_auc_ci_low"], row["lift_lexical_pooled_auc_ci_high"] = lift["pooled_auc"]["ci95"]
    other = next((lift[k] for k in ("pooled_auc_by_latent", "pooled_auc_by_context_id") if k in lift), None)
    if other is not None:
        row["lift_lexical_pooled_auc_other_ci_low"], row["lift_lexical_pooled_auc_other_ci_high"] = other[
            "ci95"
        ]
    per = lift["per_context_auc"]
    row["lift_lexical_auc"] = per["median"]
    row["lift_lexical_auc_ci_low"], row["lift_lexical_auc_ci_high"] = per["ci95"]


def summary_row(name: str, kind: str, step, results: dict) -> dict:
    """One line of the sweep's table: the headline numbers (per-context medians unless named pooled)."""
    row = {
        "simulator": name,
        "kind": kind,
        "step": step,
        "judgments": results["n_judgments"],
        "contexts": results["n_contexts"],
    }
    if "value" in results:
        v = results["value"]
        row.update(
            {
                "pearson_mean_vs_quantile_bin": v["mean_vs_quantile_bin"]["pearson"],
                "spearman_mean_vs_quantile_bin": v["mean_vs_quantile_bin"]["spearman"],
                "pearson_mean_vs_activation_bin": v["mean_vs_activation_bin"]["pearson"],
                "mode_accuracy_quantile_bin": v["mode_accuracy_quantile_bin"],
            }
        )
        return row
    if "binary" not in results:  # a latent-major eval set: per-latent numbers only
        per = results["per_latent"]
        row.update(
            {
                "per_latent_auc": per["auc"]["median"],
                "per_latent_auc_ci_low": per["auc"]["ci95"][0],
                "per_latent_auc_ci_high": per["auc"]["ci95"][1],
                "latents_defined": per["n_latents_defined"],
                "pooled_auc": per["pooled_auc"],
                "recall": results["pooled"]["recall"],
                "precision": results["pooled"]["precision"],
                "ece": results["reliability"]["ece"],
            }
        )
        add_lift_columns(row, results)
        return row
    per = results["binary"]["per_context"]
    row.update(
        {
            k: per[k]["median"]
            for k in (
                "recall",
                "precision",
                "f1",
                "balanced_accuracy",
                "auc",
                "precision_top_active",
                "precision_at_l0",
            )
        }
    )
    if "ci95" in per["auc"]:  # results.json files written before the intervals existed have none
        row["auc_ci_low"], row["auc_ci_high"] = per["auc"]["ci95"]
    row["pooled_auc"] = results["binary"]["pooled"]["auc"]
    if "dictionary" in results["binary"]:  # base-rate corrected, next to the pool's precision and F1
        d = results["binary"]["dictionary"]
        row["precision_dictionary"], row["f1_dictionary"] = d["precision"], d["f1"]
        row["precision_dictionary_ci_low"], row["precision_dictionary_ci_high"] = d["precision_ci95"]
    add_lift_columns(row, results)
    cal = results["calibration"]
    row["ece"], row["brier"] = cal["raw"]["ece"], cal["raw"]["brier"]
    if "dictionary" in cal:
        row["ece_dictionary"], row["brier_dictionary"] = cal["dictionary"]["ece"], cal["dictionary"]["brier"]
    if "temperature" in cal:
        row["ece_temperature_scaled"] = cal["temperature_scaled"]["ece"]
        row["l0_matched_threshold"] = cal["l0_matched"]["threshold"]
        row["l0_matched_expected_flagged"] = cal["l0_matched"]["expected_flagged"]["median"]
        row["l0_matched_active_accuracy"] = cal["l0_matched"]["active_accuracy"]["median"]
    row["expected_flagged_at_0.5"] = results["threshold_sweep"][0]["expected_flagged"]["median"]
    if "decoder_alignment" in results:
        row["alignment"] = results["decoder_alignment"]["simulator"]["median"]
        row["alignment_random_pool"] = results["decoder_alignment"]["random_pool"]["median"]
    return row
