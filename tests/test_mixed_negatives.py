"""`negative_sampling: mixed` (latentsim.dataset.choose_candidates): half of a context's negatives uniform,
half frequency-matched, each recorded in `negative_kind`; the sweep's dictionary-wide extrapolations read only
the uniform half, the AUCs every candidate."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import build_eval_set, load_script, make_explained_cache

from latentsim import metrics
from latentsim.config import DatasetArguments, EvalArguments
from latentsim.dataset import BuildReport, FrequencyBins, choose_candidates
from latentsim.eval_set import EvalSet


def candidates(sampling: str, seed: int = 0, n_neg: int = 50):
    firing_rate = np.logspace(-5, -1, 1000)  # latent i in bin i // 100
    pool = np.arange(1000)
    active = {990: 3.0, 995: 2.0, 17: 0.5}  # two positives in the most frequent bin; 17 another bin's
    args = DatasetArguments(interpretations=["x"], negatives_per_context=n_neg, negative_sampling=sampling)
    bins = FrequencyBins.build(pool, firing_rate, 10) if sampling != "uniform" else None
    report = BuildReport()
    out = choose_candidates(
        active, pool, set(pool.tolist()), args, np.random.default_rng(seed), None, report, bins
    )
    return out, report


def test_mixed_draws_half_uniform_half_matched_without_repeats():
    out, report = candidates("mixed")
    kinds = pd.Series([c.negative_kind for c in out])
    assert kinds.value_counts().to_dict() == {"uniform": 25, "frequency_matched": 25, "": 3}
    assert all(c.kind == "positive" for c in out if c.negative_kind == "")
    latents = [c.latent for c in out]
    assert len(set(latents)) == len(latents) == 53  # no latent twice
    negatives = [c for c in out if c.negative_kind]
    assert not {c.latent for c in negatives} & {990, 995, 17} and report.negatives_short == 0
    # The matched half follows the positives' bins (2 of 3 in bin 9, 1 in bin 0); the uniform half the pool.
    matched_bins = [c.latent // 100 for c in negatives if c.negative_kind == "frequency_matched"]
    assert set(matched_bins) <= {0, 9} and matched_bins.count(9) > matched_bins.count(0)
    assert len({c.latent // 100 for c in negatives if c.negative_kind == "uniform"}) >= 6
    # Odd counts: the uniform half takes the extra one; a seed gives the same draw.
    odd, _ = candidates("mixed", n_neg=7)
    assert [c.negative_kind for c in odd].count("uniform") == 4
    assert [c.latent for c in candidates("mixed")[0]] == latents
    # The other modes: every random negative of one kind.
    assert {c.negative_kind for c in candidates("uniform")[0]} == {"", "uniform"}
    assert {c.negative_kind for c in candidates("frequency_matched")[0]} == {"", "frequency_matched"}


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    root = tmp_path_factory.mktemp("mixed")
    make_explained_cache(root, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    eval_set = build_eval_set(root, tiny_model_dir, negative_sampling="mixed", negatives_per_context=6)
    load_script("eval/sweep.py").main(
        EvalArguments(eval_set=str(eval_set), output_dir=str(root / "sweep"), baselines=["model=prior"])
    )
    return eval_set, root / "sweep" / eval_set.name / "baseline__prior"


def test_a_mixed_eval_set_holds_both_kinds_per_context(mixed_sweep):
    eval_set, _ = mixed_sweep
    stats = json.loads((eval_set / "dataset_stats.json").read_text())
    assert stats["negative_sampling"] == "mixed" and stats["negatives_short"] == 0
    assert "negative sampling: `mixed` (half of the negatives" in (eval_set / "README.md").read_text()
    for split in ("test", "validation"):
        df = EvalSet.open(eval_set).split(split)
        assert not df.duplicated(["context_id", "latent"]).any()
        assert (df["negative_kind"] == "").eq(df["active"] == 1).all()
        counts = df[df["active"] == 0].groupby("context_id")["negative_kind"].value_counts().unstack()
        assert (counts["uniform"] == 3).all() and (counts["frequency_matched"] == 3).all()


def same(a, b) -> bool:
    """Equal, nan equal to nan (as JSON writes both)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_extrapolations_of_a_mixed_set_read_its_uniform_negatives_only(mixed_sweep):
    _, folder = mixed_sweep
    rng = np.random.default_rng(0)
    scored = {}
    for split in ("test", "validation"):  # the sweep's predictions, with scores that flag something
        df = pd.read_parquet(folder / f"predictions_{split}.parquet")
        scored[split] = df.assign(p_yes=np.clip(0.5 * df["active"] + rng.uniform(0, 0.7, len(df)), 0, 1))
    preds, calibration = scored["test"], scored["validation"]
    assert set(preds["negative_kind"]) == {"", "uniform", "frequency_matched"}
    uniform_only = preds[preds["negative_kind"] != "frequency_matched"]
    calibration_uniform = calibration[calibration["negative_kind"] != "frequency_matched"]
    args = dict(width=64, l0=2.5, seed=0, n_boot=50)
    full, reduced = (metrics.binary_metrics(d, **args) for d in (preds, uniform_only))
    assert full["dictionary"]["precision"] > 0 and same(full["dictionary"], reduced["dictionary"])
    assert same(full["per_context"]["precision_at_l0"], reduced["per_context"]["precision_at_l0"])
    assert full["pooled"]["auc"] != reduced["pooled"]["auc"]  # the AUCs read every candidate
    sweep = [metrics.threshold_sweep(d, 64, seed=0, n_boot=50) for d in (preds, uniform_only)]
    for a, b in zip(*sweep, strict=True):
        for key in ("expected_flagged", "false_positive_rate", "inactive_accuracy"):
            assert same(a[key], b[key]), key
    assert sweep[0][0]["expected_flagged"]["median"] > 0
    cal = [
        metrics.calibration(test, validation, 64, 2.5)
        for test, validation in ((preds, calibration), (uniform_only, calibration_uniform))
    ]
    for key in ("threshold", "expected_flagged", "false_positive_rate", "dictionary_precision"):
        assert same(cal[0]["l0_matched"][key], cal[1]["l0_matched"][key]), key
    assert same(cal[0]["dictionary"]["ece"], cal[1]["dictionary"]["ece"])
    # The sweep accepted the mixed set and scored every candidate.
    record = json.loads((folder / "results.json").read_text())["results"]
    assert record["binary"]["n_judgments"] == len(preds)
