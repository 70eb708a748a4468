"""Every eval metric against an independent computation (sklearn / scipy / brute force / hand-worked arrays)."""

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
            rows.append({"context_id": c, "latent": int(rng.integers(0, 500)) if not active else 500 + c * 10 + k,
                         "active": active, "activation": float(rng.uniform(1, 5)) if active else 0.0,
                         "quantile_bin": int(rng.integers(0, 10)) if active else -1,
                         "activation_bin": int(rng.integers(0, 10)) if active else -1,
                         "n_active": n_act + int(rng.integers(0, 30)), "logit_0": 0.0, "logit_1": margin,
                         "p_yes": float(1 / (1 + np.exp(-margin)))})
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
    r_prec = [g.sort_values("p_yes", ascending=False)["active"].iloc[:g["active"].sum()].mean()
              for _, g in df.groupby("context_id")]
    assert out["per_context"]["precision_top_active"]["median"] == pytest.approx(np.median(r_prec))


def test_threshold_sweep_extrapolates_with_the_right_denominators():
    # One context: 2 scored actives, 4 scored inactives; 10 truly active latents in a 1000-latent dictionary.
    df = pd.DataFrame({"context_id": 0, "active": [1, 1, 0, 0, 0, 0], "n_active": 10,
                       "p_yes": [0.95, 0.6, 0.7, 0.2, 0.1, 0.96]})
    rows = {r["threshold"]: r for r in metrics.threshold_sweep(df, width=1000, thresholds=(0.5, 0.9))}
    assert rows[0.5]["active_accuracy"]["median"] == 1.0
    assert rows[0.5]["inactive_accuracy"]["median"] == pytest.approx(0.5)  # 2 of 4 inactives flagged: over inactives only
    assert rows[0.5]["expected_flagged"]["median"] == pytest.approx(10 * 1.0 + 990 * 0.5)
    assert rows[0.9]["active_accuracy"]["median"] == pytest.approx(0.5)
    assert rows[0.9]["expected_flagged"]["median"] == pytest.approx(10 * 0.5 + 990 * 0.25)


def test_precision_at_l0_budget_hand_worked():
    # Thresholds from the candidates: at t=0.95 hit 1/2 and fpr 1/4 -> E = 10*0.5 + 990*0.25 = 252.5;
    # at t=0.96: hit 0, fpr 1/4 -> 247.5; at t=0.6: hit 1, fpr 2/4 -> 505. A budget of 250 picks 252.5 (closest).
    p = metrics.precision_at_budget(np.array([0.95, 0.6]), np.array([0.7, 0.2, 0.1, 0.96]), 10, 1000, 250)
    assert p == pytest.approx(10 * 0.5 / 252.5)


def test_reliability_ece_brier_match_sklearn():
    rng = np.random.default_rng(3)
    p = rng.uniform(0, 1, 2000)
    y = (rng.uniform(0, 1, 2000) < p ** 1.5).astype(int)
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
    nll = [-np.mean(y * np.log(metrics.sigmoid(overconfident / g)) + (1 - y) * np.log(1 - metrics.sigmoid(overconfident / g)))
           for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(nll))], abs=0.02)
    assert t == pytest.approx(3.0, rel=0.1)
    df = pd.DataFrame({"context_id": np.arange(5000) // 50, "active": y, "n_active": 5, "logit_0": 0.0,
                       "logit_1": overconfident, "p_yes": metrics.sigmoid(overconfident)})
    cal = metrics.calibration(df.iloc[2500:], df.iloc[:2500], width=1000, l0=40)
    assert cal["temperature_scaled"]["ece"] < cal["raw"]["ece"] / 2


def test_l0_matched_threshold_hits_l0():
    df = synthetic(n_contexts=40, n_inactive=50, seed=2)
    t = metrics.l0_matched_threshold(df, width=2000, l0=120)
    flagged = [metrics.expected_flagged(g["p_yes"][g["active"] == 1].to_numpy(), g["p_yes"][g["active"] == 0].to_numpy(),
                                        int(g["n_active"].iloc[0]), 2000, t)[2] for _, g in df.groupby("context_id")]
    # E[flagged] is a step function of t: the bisection lands at the step that crosses L0.
    assert abs(np.mean(flagged) - 120) < 2000 / 50


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
    df = pd.DataFrame({"context_id": 0, "latent": [3, 7, 11, 20, 21, 22, 23], "active": [1, 1, 1, 0, 0, 0, 0],
                       "p_yes": [0.9, 0.2, 0.8, 0.95, 0.1, 0.3, 0.05]})
    out = metrics.decoder_alignment(df, w * 5.0, np.random.default_rng(1))  # norms do not matter: cosine
    top = [20, 3, 11]  # the 3 most probable candidates
    best = max(np.mean([unit[a] @ unit[b] for a, b in zip([3, 7, 11], perm, strict=True)])
               for perm in itertools.permutations(top))
    assert out["simulator"]["median"] == pytest.approx(best)
    perfect = df.assign(p_yes=df["active"].astype(float))
    assert metrics.decoder_alignment(perfect, w, np.random.default_rng(1))["simulator"]["median"] == pytest.approx(1.0)


def test_accuracy_vs_score_and_strength():
    df = pd.DataFrame({"context_id": [0, 0, 0, 1, 1, 1], "latent": [1, 2, 3, 1, 2, 3], "active": [1, 0, 1, 1, 1, 0],
                       "p_yes": [0.9, 0.1, 0.2, 0.8, 0.7, 0.6], "activation": [3.0, 0, 1.0, 2.0, 5.0, 0],
                       "quantile_bin": [9, -1, 1, 5, 9, -1]})
    acc = metrics.per_latent_accuracy(df).set_index("latent")
    assert acc.loc[1, "active_accuracy"] == 1.0 and acc.loc[3, "active_accuracy"] == 0.0
    assert acc.loc[3, "inactive_accuracy"] == 0.0 and acc.loc[2, "inactive_accuracy"] == 1.0
    assert acc.loc[2, "active_accuracy"] == 1.0  # its one active judgment (context 1) is a hit
    out = metrics.accuracy_vs_score(df, {1: 0.91, 2: 0.52, 3: 0.48}, "fuzz")
    assert [b["score"] for b in out["bins"]] == [0.5, 0.9] and out["n_latents"] == 3
    strength = {b["quantile_bin"]: b["active_accuracy"] for b in metrics.accuracy_vs_strength(df)["by_quantile_bin"]}
    assert strength == {1: 0.0, 5: 1.0, 9: 1.0}
