"""Every eval metric against an independent computation (sklearn / scipy / brute force / hand-worked
arrays)."""

import itertools

import numpy as np
import pandas as pd
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from latentsim import metrics


def synthetic(n_contexts=30, n_inactive=20, seed=0, separation=1.5):
    """Contexts with 1-6 actives and `n_inactive` inactives; P(yes) = sigmoid(margin) with signal."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_contexts):
        n_act = int(rng.integers(1, 7))
        for k in range(n_act + n_inactive):
            active = int(k < n_act)
            margin = rng.normal(separation * (2 * active - 1), 1.5)
            rows.append(
                {
                    "context_id": c,
                    "latent": int(rng.integers(0, 500)) if not active else 500 + c * 10 + k,
                    "active": active,
                    "activation": float(rng.uniform(1, 5)) if active else 0.0,
                    "quantile_bin": int(rng.integers(0, 10)) if active else -1,
                    "activation_bin": int(rng.integers(0, 10)) if active else -1,
                    "n_active": n_act + int(rng.integers(0, 30)),
                    "logit_0": 0.0,
                    "logit_1": margin,
                    "p_yes": float(1 / (1 + np.exp(-margin))),
                }
            )
    df = pd.DataFrame(rows)
    return df.drop_duplicates(["context_id", "latent"]).reset_index(drop=True)


def test_confusion_metrics_and_auc_match_sklearn():
    df = synthetic()
    p, y = df["p_yes"].to_numpy(), df["active"].to_numpy()
    m = metrics.confusion_metrics(p, y, 0.5)
    pred = (p >= 0.5).astype(int)
    assert m["recall"] == pytest.approx(recall_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert metrics.roc_auc(p, y) == pytest.approx(roc_auc_score(y, p))
    ties = np.array([0.5, 0.5, 0.2, 0.9, 0.5])
    truth = np.array([1, 0, 0, 1, 1])
    assert metrics.roc_auc(ties, truth) == pytest.approx(roc_auc_score(truth, ties))
    assert np.isnan(metrics.roc_auc(ties, np.ones(5)))


def test_per_context_medians_and_iqr():
    df = synthetic()
    out = metrics.binary_metrics(df, width=4096, l0=32)
    per_context_auc = [roc_auc_score(g["active"], g["p_yes"]) for _, g in df.groupby("context_id")]
    assert out["per_context"]["auc"]["median"] == pytest.approx(np.median(per_context_auc))
    assert out["per_context"]["auc"]["q25"] == pytest.approx(np.percentile(per_context_auc, 25))
    assert out["per_context"]["auc"]["q75"] == pytest.approx(np.percentile(per_context_auc, 75))
    recalls = [recall_score(g["active"], g["p_yes"] >= 0.5) for _, g in df.groupby("context_id")]
    assert out["per_context"]["recall"]["median"] == pytest.approx(np.median(recalls))
    assert out["pooled"]["auc"] == pytest.approx(roc_auc_score(df["active"], df["p_yes"]))
    # R-precision: the share of actives among each context's |A| most probable candidates.
    r_prec = [
        g.sort_values("p_yes", ascending=False)["active"].iloc[: g["active"].sum()].mean()
        for _, g in df.groupby("context_id")
    ]
    assert out["per_context"]["precision_top_active"]["median"] == pytest.approx(np.median(r_prec))


def test_threshold_sweep_extrapolates_with_the_right_denominators():
    # One context: 2 scored actives, 4 uniform negatives (+1 hard negative, which must not count); 10 of the
    # token's explained latents are active in a 1000-latent judged dictionary.
    df = pd.DataFrame(
        {
            "context_id": 0,
            "active": [1, 1, 0, 0, 0, 0, 0],
            "n_active": 40,
            "n_active_explained": 10,
            "candidate": ["positive"] * 2 + ["random_negative"] * 4 + ["hard_negative"],
            "p_yes": [0.95, 0.6, 0.7, 0.2, 0.1, 0.96, 0.99],
        }
    )
    rows = {r["threshold"]: r for r in metrics.threshold_sweep(df, width=1000, thresholds=(0.5, 0.9))}
    assert rows[0.5]["active_accuracy"]["median"] == 1.0
    assert rows[0.5]["inactive_accuracy"]["median"] == pytest.approx(0.5)  # 2 of 4 uniform negatives flagged
    assert rows[0.5]["false_positive_rate"]["rate"] == pytest.approx(0.5)
    assert rows[0.5]["false_positive_rate"]["n_negatives"] == 4
    assert rows[0.5]["expected_flagged"]["median"] == pytest.approx(10 * 1.0 + 990 * 0.5)
    assert rows[0.9]["active_accuracy"]["median"] == pytest.approx(0.5)
    assert rows[0.9]["expected_flagged"]["median"] == pytest.approx(10 * 0.5 + 990 * 0.25)
    # The same judgments weighted to the dictionary: an active stands for 5 latents, a uniform negative
    # for 247.5.
    w = metrics.dictionary_weights(df, 1000)
    assert w.tolist() == [5.0, 5.0, 247.5, 247.5, 247.5, 247.5, 0.0]
    d = metrics.weighted_confusion(df["p_yes"].to_numpy(), df["active"].to_numpy(), w, 0.5)
    assert d["precision"] == pytest.approx(10 / (10 * 1.0 + 990 * 0.5)) and d["recall"] == 1.0


def test_precision_at_l0_budget_hand_worked():
    # Thresholds from the candidates: at t=0.95 hit 1/2 and fpr 1/4 -> E = 10*0.5 + 990*0.25 = 252.5;
    # at t=0.96: hit 0, fpr 1/4 -> 247.5; at t=0.6: hit 1, fpr 2/4 -> 505. A budget of 250 picks 252.5
    # (closest).
    df = pd.DataFrame(
        {"context_id": 0, "active": [1, 1, 0, 0, 0, 0], "p_yes": [0.95, 0.6, 0.7, 0.2, 0.1, 0.96]}
    )
    rates = metrics.PooledRates(df)
    p = metrics.precision_at_budget(np.array([0.6, 0.95]), rates, 10, 1000, 250)
    assert p == pytest.approx(10 * 0.5 / 252.5)


def test_pooled_false_positive_rate_recovers_a_planted_rate():
    """200 contexts x 10 uniform negatives flagged at a planted 3%: each context's own rate is 0 or >= 10%,
    the pooled one recovers 3% within its interval (and hard negatives, all flagged, do not move it)."""
    rng = np.random.default_rng(0)
    n_ctx, planted = 200, 0.03
    flagged = rng.uniform(size=(n_ctx, 10)) < planted
    df = pd.DataFrame(
        {
            "context_id": np.repeat(np.arange(n_ctx), 12),
            "active": 0,
            "candidate": np.tile(["random_negative"] * 10 + ["hard_negative"] * 2, n_ctx),
            "p_yes": np.concatenate([np.r_[np.where(f, 0.9, 0.1), 0.99, 0.99] for f in flagged]),
        }
    )
    fpr = metrics.pooled_fpr_ci(df, 0.5)
    low, high = fpr["ci95"]
    assert low < planted < high and high - low < 0.03 and fpr["n_negatives"] == 2000
    assert set(np.round(flagged.mean(axis=1), 1)) <= {0.0, 0.1, 0.2, 0.3}  # what one context alone would say


def test_precision_at_l0_of_a_chance_simulator_is_the_base_rate():
    """A simulator at chance (P(yes) uniform whatever the truth) must not look precise: with 10 negatives per
    context the old per-context rate made its precision at L0 exactly 1.0 in many contexts."""
    rng = np.random.default_rng(1)
    rows = [
        {
            "context_id": c,
            "active": int(k < 8),
            "n_active": 32,
            "n_active_explained": 32,
            "candidate": "positive" if k < 8 else "random_negative",
            "p_yes": float(rng.uniform()),
        }
        for c in range(300)
        for k in range(18)
    ]
    out = metrics.binary_metrics(pd.DataFrame(rows), width=4096, l0=32, n_boot=200)
    base_rate = 32 / 4096
    assert out["per_context"]["precision_at_l0"]["q75"] < 10 * base_rate
    assert out["dictionary"]["precision"] == pytest.approx(base_rate, rel=0.3)
    assert out["dictionary"]["precision_ci95"][0] < base_rate < out["dictionary"]["precision_ci95"][1]
    assert out["pooled"]["precision"] > 0.3  # the pool's precision: 8 of 18 candidates are active


def test_weighted_reliability_equals_repeating_the_judgments():
    rng = np.random.default_rng(4)
    p, y, w = rng.uniform(size=300), rng.integers(0, 2, 300), rng.integers(0, 5, 300)
    weighted = metrics.reliability(p, y, weights=w)
    repeated = metrics.reliability(np.repeat(p, w), np.repeat(y, w))
    assert weighted["ece"] == pytest.approx(repeated["ece"]) and weighted["brier"] == pytest.approx(
        repeated["brier"]
    )
    margin = rng.normal(size=300)
    assert metrics.fit_temperature(margin, y, w) == pytest.approx(
        metrics.fit_temperature(np.repeat(margin, w), np.repeat(y, w)), rel=1e-4
    )


def test_reliability_ece_brier_match_sklearn():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 2000)
    y = (rng.uniform(0, 1, 2000) < p**1.5).astype(int)
    rel = metrics.reliability(p, y, n_bins=10)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert np.allclose([b["positive_rate"] for b in rel["bins"]], prob_true)
    assert np.allclose([b["mean_p"] for b in rel["bins"]], prob_pred)
    counts = np.array([b["count"] for b in rel["bins"]])
    assert rel["ece"] == pytest.approx(np.sum(counts / len(p) * np.abs(prob_true - prob_pred)))
    assert rel["brier"] == pytest.approx(brier_score_loss(y, p))


def test_temperature_scaling_recovers_the_temperature_and_lowers_ece():
    rng = np.random.default_rng(0)
    true_margin = rng.normal(0, 2, 5000)
    y = (rng.uniform(size=5000) < 1 / (1 + np.exp(-true_margin))).astype(int)
    overconfident = 3.0 * true_margin
    t = metrics.fit_temperature(overconfident, y)
    grid = np.linspace(1, 6, 501)
    nll = [
        -np.mean(
            y * np.log(metrics.sigmoid(overconfident / g))
            + (1 - y) * np.log(1 - metrics.sigmoid(overconfident / g))
        )
        for g in grid
    ]
    assert t == pytest.approx(grid[int(np.argmin(nll))], abs=0.02)
    assert t == pytest.approx(3.0, rel=0.1)
    df = pd.DataFrame(
        {
            "context_id": np.arange(5000) // 50,
            "active": y,
            "n_active": 5,
            "logit_0": 0.0,
            "logit_1": overconfident,
            "p_yes": metrics.sigmoid(overconfident),
        }
    )
    cal = metrics.calibration(df.iloc[2500:], df.iloc[:2500], width=1000, l0=40)
    assert cal["temperature_scaled"]["ece"] < cal["raw"]["ece"] / 2


def test_l0_matched_threshold_hits_l0():
    df = synthetic(n_contexts=40, n_inactive=50, seed=2)
    t = metrics.l0_matched_threshold(df, width=2000, l0=120)
    rates = metrics.PooledRates(df)
    flagged = [
        metrics.expected_flagged(
            metrics.share_at_or_above(np.sort(g["p_yes"][g["active"] == 1].to_numpy()), t),
            rates.fpr(t),
            int(g["n_active"].iloc[0]),
            2000,
        )
        for _, g in df.groupby("context_id")
    ]
    # E[flagged] is a step function of t (pooled over 2000 negatives, so the steps are small): it crosses L0.
    assert abs(np.mean(flagged) - 120) < 2000 / 500


def test_value_metrics_match_scipy():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(1)
    n = 300
    q = rng.integers(0, 10, n)
    logits = -0.5 * (np.arange(10)[None, :] - q[:, None] - rng.normal(0, 2, (n, 1))) ** 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    df = pd.DataFrame({f"p_digit_{d}": probs[:, d] for d in range(10)})
    df["quantile_bin"], df["activation_bin"] = q, rng.integers(0, 10, n)
    out = metrics.value_metrics(df)
    mean = probs @ np.arange(10)
    assert out["mean_vs_quantile_bin"]["pearson"] == pytest.approx(pearsonr(mean, q).statistic)
    assert out["mean_vs_quantile_bin"]["pearson"] == pytest.approx(np.corrcoef(mean, q)[0, 1])
    assert out["mode_vs_quantile_bin"]["spearman"] == pytest.approx(spearmanr(probs.argmax(1), q).statistic)
    assert out["mode_accuracy_quantile_bin"] == pytest.approx(np.mean(probs.argmax(1) == q))
    assert out["mean_vs_quantile_bin"]["pearson"] > 0.5


def test_decoder_alignment_matches_brute_force():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 8))
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    df = pd.DataFrame(
        {
            "context_id": 0,
            "latent": [3, 7, 11, 20, 21, 22, 23],
            "active": [1, 1, 1, 0, 0, 0, 0],
            "p_yes": [0.9, 0.2, 0.8, 0.95, 0.1, 0.3, 0.05],
        }
    )
    out = metrics.decoder_alignment(df, w * 5.0, np.random.default_rng(1))  # norms do not matter: cosine
    top = [20, 3, 11]  # the 3 most probable candidates
    best = max(
        np.mean([unit[a] @ unit[b] for a, b in zip([3, 7, 11], perm, strict=True)])
        for perm in itertools.permutations(top)
    )
    assert out["simulator"]["median"] == pytest.approx(best)
    perfect = df.assign(p_yes=df["active"].astype(float))
    assert metrics.decoder_alignment(perfect, w, np.random.default_rng(1))["simulator"][
        "median"
    ] == pytest.approx(1.0)


def test_accuracy_vs_score_and_strength():
    df = pd.DataFrame(
        {
            "context_id": [0, 0, 0, 1, 1, 1],
            "latent": [1, 2, 3, 1, 2, 3],
            "active": [1, 0, 1, 1, 1, 0],
            "p_yes": [0.9, 0.1, 0.2, 0.8, 0.7, 0.6],
            "activation": [3.0, 0, 1.0, 2.0, 5.0, 0],
            "quantile_bin": [9, -1, 1, 5, 9, -1],
        }
    )
    acc = metrics.per_latent_accuracy(df).set_index("latent")
    assert acc.loc[1, "active_accuracy"] == 1.0 and acc.loc[3, "active_accuracy"] == 0.0
    assert acc.loc[3, "inactive_accuracy"] == 0.0 and acc.loc[2, "inactive_accuracy"] == 1.0
    assert acc.loc[2, "active_accuracy"] == 1.0  # its one active judgment (context 1) is a hit
    out = metrics.accuracy_vs_score(df, {1: 0.91, 2: 0.52, 3: 0.48}, "fuzz")
    assert [b["score"] for b in out["bins"]] == [0.5, 0.9] and out["n_latents"] == 3
    strength = {
        b["quantile_bin"]: b["active_accuracy"] for b in metrics.accuracy_vs_strength(df)["by_quantile_bin"]
    }
    assert strength == {1: 0.0, 5: 1.0, 9: 1.0}


def test_bootstrap_ci_of_the_median_covers_the_true_median_at_its_level():
    # 200 samples of 60 per-context values from an exponential (true median ln 2): the 95 % interval should
    # cover it in ~95 % of them, and a 50 % interval in ~50 % (so the level is what sets the width).
    rng = np.random.default_rng(7)
    samples = rng.exponential(1.0, size=(200, 60))
    covered = {
        level: np.mean(
            [
                low <= np.log(2) <= high
                for low, high in (metrics.bootstrap_ci(s, seed=i, level=level) for i, s in enumerate(samples))
            ]
        )
        for level in (0.95, 0.5)
    }
    assert 0.88 <= covered[0.95] <= 0.99
    assert 0.35 <= covered[0.5] <= 0.65


def test_bootstrap_ci_ignores_undefined_values_and_is_deterministic():
    values = np.array([0.2, np.nan, 0.9, 0.4, np.inf, 0.7, 0.5, 0.6])
    defined = values[np.isfinite(values)]
    assert metrics.bootstrap_ci(values, seed=3) == metrics.bootstrap_ci(defined, seed=3)
    assert metrics.bootstrap_ci(values, seed=3) == metrics.bootstrap_ci(values, seed=3)
    assert metrics.bootstrap_ci(values, seed=3) != metrics.bootstrap_ci(values, seed=4)
    assert all(np.isnan(metrics.bootstrap_ci([np.nan, np.nan])))
    low, high = metrics.bootstrap_ci(defined, np.mean, seed=0)
    assert low < defined.mean() < high


def test_binary_metrics_intervals_bracket_the_medians_and_keep_the_numbers():
    df = synthetic(n_contexts=60)
    out = metrics.binary_metrics(df, width=4096, l0=32)
    for k in metrics.CI_METRICS:
        low, high = out["per_context"][k]["ci95"]
        assert low <= out["per_context"][k]["median"] <= high and low < high, k
        assert set(out["per_context"][k]) == {"median", "q25", "q75", "mean", "n", "ci95"}
    assert "ci95" not in out["per_context"]["balanced_accuracy"]
    low, high = out["pooled"]["auc_ci95"]
    assert low < out["pooled"]["auc"] < high
    assert out == metrics.binary_metrics(df, width=4096, l0=32, seed=0)  # deterministic from the seed
    other = metrics.binary_metrics(df, width=4096, l0=32, seed=1)
    assert other["per_context"]["auc"]["median"] == out["per_context"]["auc"]["median"]
    assert other["pooled"]["auc_ci95"] != out["pooled"]["auc_ci95"]


def test_pooled_auc_replicates_equal_the_auc_of_the_copied_rows():
    df = synthetic(n_contexts=12, n_inactive=6, seed=4)
    df["p_yes"] = df["p_yes"].round(1)  # ties across contexts
    codes, n = metrics.cluster_codes(df)
    counts = metrics.bootstrap_counts(n, 5, seed=2)
    replicates = metrics.pooled_auc_replicates(df["p_yes"].to_numpy(), df["active"].to_numpy(), codes, counts)
    groups = [g for _, g in df.groupby("context_id")]
    for b in range(5):
        copied = pd.concat([groups[c] for c in range(n) for _ in range(counts[b, c])])
        assert replicates[b] == pytest.approx(roc_auc_score(copied["active"], copied["p_yes"]))
    assert counts.sum(axis=1).tolist() == [n] * 5
    # counts and indices are the same draws
    assert (np.bincount(metrics.bootstrap_indices(n, 5, seed=2)[3], minlength=n) == counts[3]).all()


def test_clustered_interval_is_wider_than_a_row_level_one_when_rows_move_together():
    # Each context's rows share its score (plus a little noise) and its active/inactive status, so a context
    # is one observation, not 20: resampling rows pretends there are 20 times more and gives a too-narrow
    # interval.
    rng = np.random.default_rng(0)
    n_contexts, per = 40, 20
    level = rng.normal(size=n_contexts)
    context_active = (rng.uniform(size=n_contexts) < 1 / (1 + np.exp(-2 * level))).astype(int)
    scores = np.repeat(level, per) + rng.normal(0, 0.01, n_contexts * per)
    truth = np.repeat(context_active, per)
    clustered = np.repeat(np.arange(n_contexts), per)
    rows = np.arange(n_contexts * per)
    width = {}
    for name, codes in (("clustered", clustered), ("rows", rows)):
        counts = metrics.bootstrap_counts(codes.max() + 1, 1000, seed=0)
        low, high = metrics.percentile_interval(metrics.pooled_auc_replicates(scores, truth, codes, counts))
        width[name] = high - low
    assert width["clustered"] > 2.5 * width["rows"]


def test_lift_against_itself_is_exactly_zero():
    df = synthetic(n_contexts=40)
    lift = metrics.lift_over_reference(df, df.sample(frac=1, random_state=0))  # row order does not matter
    assert lift["per_context_auc"]["median"] == 0 and lift["per_context_auc"]["mean"] == 0
    assert lift["per_context_auc"]["ci95"] == [0.0, 0.0]
    assert lift["pooled_auc"]["difference"] == 0 and lift["pooled_auc"]["ci95"] == [0.0, 0.0]
    assert lift["per_context_auc"]["n"] == 40 and lift["n_judgments"] == len(df)


def test_lift_of_a_perfect_simulator_over_a_random_one_is_positive():
    df = synthetic(n_contexts=40)
    perfect = df.assign(p_yes=df["active"] * 0.5 + 0.25)
    random = df.assign(p_yes=np.random.default_rng(0).uniform(size=len(df)))
    random_auc = [roc_auc_score(g["active"], g["p_yes"]) for _, g in random.groupby("context_id")]
    lift = metrics.lift_over_reference(perfect, random)
    assert lift["per_context_auc"]["median"] == pytest.approx(np.median(1 - np.array(random_auc)))
    assert lift["per_context_auc"]["ci95"][0] > 0.2
    assert lift["pooled_auc"]["difference"] == pytest.approx(
        1 - roc_auc_score(random["active"], random["p_yes"])
    )
    assert lift["pooled_auc"]["ci95"][0] > 0.2
    low, high = lift["pooled_auc"]["ci95"]
    assert low < lift["pooled_auc"]["difference"] < high


def test_lift_pairs_only_shared_judgments_and_drops_undefined_contexts():
    df = synthetic(n_contexts=20)
    one_class = df[(df["context_id"] != 3) | (df["active"] == 0)]  # context 3 keeps inactives only: no AUC
    lift = metrics.lift_over_reference(one_class, df.iloc[5:])
    assert lift["n_judgments"] == len(one_class.merge(df.iloc[5:], on=["context_id", "latent"]))
    assert lift["per_context_auc"]["n"] == 19
    with pytest.raises(ValueError, match="disagree on `active`"):
        metrics.lift_over_reference(df, df.assign(active=1 - df["active"]))


def test_summary_row_reads_intervals_and_lift_when_present():
    df = synthetic(n_contexts=30)
    results = metrics.evaluate(df, None, binary=True, width=4096, l0=32, w_dec=None, scores={}, seed=0)
    row = metrics.summary_row("sim", "base", None, results)
    assert [row["auc_ci_low"], row["auc_ci_high"]] == results["binary"]["per_context"]["auc"]["ci95"]
    assert "lift_auc" not in row
    results["lift_over_prior"] = metrics.lift_over_reference(df, df.assign(p_yes=0.5))
    row = metrics.summary_row("sim", "base", None, results)
    assert row["lift_auc"] == pytest.approx(results["binary"]["per_context"]["auc"]["median"] - 0.5)
    assert row["lift_auc_ci_low"] < row["lift_auc"] < row["lift_auc_ci_high"]
    # a results.json from before the intervals: same row as ever, no new keys
    del results["lift_over_prior"], results["binary"]["per_context"]["auc"]["ci95"]
    old = metrics.summary_row("sim", "base", None, results)
    assert not {"auc_ci_low", "auc_ci_high", "lift_auc", "lift_auc_ci_low", "lift_auc_ci_high"} & set(old)
