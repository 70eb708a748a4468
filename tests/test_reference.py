"""Reference baselines that read nothing (latentsim.reference): features by hand, the logistic fit, and the sweep
scoring them like any simulator on a tiny eval set."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import load_script, make_explained_cache
from sklearn.linear_model import LogisticRegression

from latentsim.config import ConfigError, DatasetArguments, EvalArguments, parse_baseline
from latentsim.metrics import roc_auc
from latentsim.prompts import marked_context
from latentsim.reference import ReferenceModel, features, fit_logistic, judged_token, named_tokens

HOOK = "layers.1"


def test_named_tokens_of_token_list_and_free_text_interpretations():
    assert named_tokens('the token " not" (also " no", "No"), as in "... has no"') == {"not", "no"}
    assert named_tokens('the token "\\"" (also "\\n"), as in "... say \\"hi"') == {'"', "\n"}
    assert named_tokens("Commas inside Python lists") == {"commas", "inside", "python", "lists"}
    assert judged_token(marked_context("x = [1, 2", ",")) == ","
    assert judged_token(marked_context("a <<b>> c", " d")) == " d"  # the last mark is the judged token


def test_features_by_hand():
    df = pd.DataFrame({"latent": [0, 1, 2], "active": [1, 0, 0],
                       "context": [marked_context("so", " No"), marked_context("so", " yes"), marked_context("", "x")],
                       "interpretation": ['the token " no", as in "..."', 'the token " no", as in "..."', "x marks"]})
    rate = np.array([0.1, 0.0, 0.02])
    f = features(df, rate)
    assert f["string_match"].tolist() == [1.0, 0.0, 1.0]
    assert np.allclose(f["log_firing_rate"], np.log([0.1, 1e-7, 0.02]))
    override = features(df, rate, {0: "nothing", 1: 'the token "yes"'})
    assert override["string_match"].tolist() == [0.0, 1.0, 0.0]  # latent 2 has no text in the override


def test_logistic_fit_matches_sklearn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 2))
    y = (rng.random(400) < 1 / (1 + np.exp(-(0.5 + 2 * x[:, 0] - x[:, 1])))).astype(float)
    ours = fit_logistic(x, y, l2=0.0)
    ref = LogisticRegression(C=1e6, tol=1e-10, max_iter=1000).fit(x, y)
    assert np.allclose(ours, [ref.intercept_[0], *ref.coef_[0]], atol=1e-3)
    separable = fit_logistic(np.array([[0.0], [1.0]]), np.array([0.0, 1.0]))  # finite thanks to the L2 penalty
    assert np.isfinite(separable).all() and separable[1] > 0


def test_reference_baseline_specs():
    assert parse_baseline("model=prior")["name"] == "prior"
    assert parse_baseline("model=prior+string_match")["name"] == "prior_string_match"
    with pytest.raises(ConfigError, match="reads no prompt"):
        parse_baseline("model=prior,shots=2")


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    root = tmp_path_factory.mktemp("reference")
    make_explained_cache(root, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    load_script("data_gen/build_dataset.py").main(DatasetArguments(
        cache_dir=str(root / "cache"), hookpoint=HOOK, simulator_tokenizer=str(tiny_model_dir),
        interpretations=[str(root / "expl" / "token_list-quantiles")], window_min=4, window_max=6, contexts_per_row=2,
        validation_fraction=0.2, test_fraction=0.2, seed=3, positives="all", negatives_per_context=6,
        output_dir=str(root / "eval_set")))
    return root


def token_list_names(context: str, interpretation: str) -> bool:
    """By hand: `the token "a" (also "b", "c"), as in ...` read as a JSON list, compared without case or space."""
    head = interpretation.split(", as in ")[0].removeprefix("the token ")
    names = json.loads("[" + head.replace(" (also ", ", ").removesuffix(")") + "]")
    norm = lambda t: t.strip().lower() or t  # noqa: E731
    return norm(judged_token(context)) in {norm(n) for n in names}


def test_sweep_scores_reference_baselines_like_simulators(eval_set, tmp_path):
    load_script("eval/sweep.py").main(EvalArguments(
        eval_set=str(eval_set / "eval_set"), output_dir=str(tmp_path),
        baselines=["model=prior", "model=string_match", "model=prior+string_match"]))
    root = tmp_path / "eval_set"
    summary = json.loads((root / "summary.json").read_text())
    assert [r["simulator"] for r in summary["rows"]] == ["baseline__prior", "baseline__string_match",
                                                         "baseline__prior_string_match"]
    assert all(r["kind"] == "reference" for r in summary["rows"])

    # The prior by hand: each latent's share of the cache's tokens (position 0 never cached) it is active on.
    from safetensors.numpy import load_file

    latents_dir = eval_set / "cache" / "latents" / HOOK
    counts, n_tokens = np.zeros(64), None
    for path in sorted(latents_dir.glob("*.safetensors")):
        data = load_file(str(path))
        np.add.at(counts, data["locations"][:, 2].astype(np.int64) + int(path.stem.split("_")[0]), 1)
        n_tokens = data["tokens"].shape[0] * (data["tokens"].shape[1] - 1)
    rate = counts / n_tokens
    prior = pd.read_parquet(root / "baseline__prior" / "predictions_test.parquet")
    record = json.loads((root / "baseline__prior" / "results.json").read_text())
    assert record["scoring"]["reference_model"]["weights"][1] > 0  # frequent latents are likelier to be active
    by_hand = [roc_auc(rate[g["latent"]], g["active"]) for _, g in prior.groupby("context_id")]
    assert record["results"]["binary"]["per_context"]["auc"]["median"] == pytest.approx(np.nanmedian(by_hand))
    assert roc_auc(prior["p_yes"], prior["active"]) == pytest.approx(roc_auc(rate[prior["latent"]], prior["active"]))
    # The prior's lift over itself is 0 exactly (a simulator that returns the firing rate gains nothing).
    lift = json.loads((root / "baseline__prior" / "results.json").read_text())["results"]["lift_over_prior"]
    assert lift["reference"] == "baseline__prior"
    assert lift["per_context_auc"]["median"] == 0 and lift["per_context_auc"]["ci95"] == [0, 0]
    rows = {r["simulator"]: r for r in summary["rows"]}
    assert rows["baseline__prior"]["lift_auc"] == 0

    # string_match: two P(yes) values, the higher one exactly where the interpretation names the judged token.
    test = pd.read_parquet(eval_set / "eval_set" / "test.parquet")
    match = np.array([token_list_names(c, i) for c, i in zip(test["context"], test["interpretation"], strict=True)])
    sm = pd.read_parquet(root / "baseline__string_match" / "predictions_test.parquet")
    assert sm["p_yes"].nunique() <= 2 and 0 < match.sum() < len(match)
    assert ((sm["p_yes"] > sm["p_yes"].min()).to_numpy() == match).all()


def test_reference_model_calibrated_on_train():
    rng = np.random.default_rng(1)
    n = 3000
    rate = 10 ** rng.uniform(-5, -1, size=200)
    latent = rng.integers(0, 200, size=n)
    active = (rng.random(n) < np.clip(rate[latent] * 8, 0, 1)).astype(int)
    df = pd.DataFrame({"latent": latent, "active": active, "context": [marked_context("a", " b")] * n,
                       "interpretation": ["nothing"] * n})
    model = ReferenceModel("prior", df, rate)
    p = 1 / (1 + np.exp(-model.label_logits(df)[:, 1]))
    assert abs(p.mean() - active.mean()) < 0.01  # a logistic fit with a bias reproduces the base rate


def test_sweep_refuses_extrapolating_from_frequency_matched_negatives(eval_set, tiny_model_dir, tmp_path):
    """Dictionary-wide numbers read the negatives as a uniform sample of the inactive latents."""
    from latentsim.errors import BadInputError

    build = json.loads((eval_set / "eval_set" / "run_config.json").read_text())["config"]["dataset"]
    load_script("data_gen/build_dataset.py").main(DatasetArguments(**{
        **{k: v for k, v in build.items() if k in DatasetArguments.__dataclass_fields__},
        "negative_sampling": "frequency_matched", "output_dir": str(tmp_path / "matched")}))
    with pytest.raises(BadInputError, match="negative_sampling: uniform"):
        load_script("eval/sweep.py").main(EvalArguments(eval_set=str(tmp_path / "matched"), output_dir=str(tmp_path),
                                                        baselines=["model=prior"]))
    assert not (tmp_path / "matched" / "summary.json").exists()
