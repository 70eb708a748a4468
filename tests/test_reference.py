"""Reference baselines that read nothing (latentsim.simulators.reference): features by hand, the logistic fit,
and the sweep scoring them like any simulator on a tiny eval set."""

import json

import numpy as np
import pandas as pd
import pytest
from helpers import build_eval_set, load_script, make_explained_cache
from sklearn.linear_model import LogisticRegression

from latentsim.config import ConfigError, DatasetArguments, EvalArguments, parse_baseline
from latentsim.metrics import roc_auc
from latentsim.prompts import marked_context
from latentsim.simulators.reference import ReferenceModel, features, fit_logistic, judged_token, named_tokens

HOOK = "layers.1"


def test_named_tokens_of_token_list_and_free_text_interpretations():
    assert named_tokens('the token " not" (also " no", "No"), as in "... has no"') == {"not", "no"}
    assert named_tokens('the token "\\"" (also "\\n"), as in "... say \\"hi"') == {'"', "\n"}
    assert named_tokens("Commas inside Python lists") == {"commas", "inside", "python", "lists"}
    # The richer format: the tokens it follows and the quoted contexts are not tokens it fires on.
    rich = 'the token "cat" (also " Mat", "dog"), often after "the", "a", as in "...the cat" and "...a mat"'
    assert named_tokens(rich) == {"cat", "mat", "dog"}
    assert judged_token(marked_context("x = [1, 2", ",")) == ","
    assert judged_token(marked_context("a <<b>> c", " d")) == " d"  # the last mark is the judged token


def test_features_by_hand():
    df = pd.DataFrame(
        {
            "latent": [0, 1, 2],
            "active": [1, 0, 0],
            "context": [marked_context("so", " No"), marked_context("so", " yes"), marked_context("", "x")],
            "interpretation": ['the token " no", as in "..."', 'the token " no", as in "..."', "x marks"],
        }
    )
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
    separable = fit_logistic(
        np.array([[0.0], [1.0]]), np.array([0.0, 1.0])
    )  # finite thanks to the L2 penalty
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
    build_eval_set(root, tiny_model_dir)
    return root


def token_list_names(context: str, interpretation: str) -> bool:
    """By hand: `the token "a" (also "b", "c"), as in ...` read as a JSON list, compared without case or
    space."""
    head = interpretation.split(", as in ")[0].removeprefix("the token ")
    names = json.loads("[" + head.replace(" (also ", ", ").removesuffix(")") + "]")
    norm = lambda t: t.strip().lower() or t  # noqa: E731
    return norm(judged_token(context)) in {norm(n) for n in names}


def test_sweep_scores_reference_baselines_like_simulators(eval_set, tmp_path):
    load_script("eval/sweep.py").main(
        EvalArguments(
            eval_set=str(eval_set / "eval_set"),
            output_dir=str(tmp_path),
            baselines=["model=prior", "model=string_match", "model=prior+string_match"],
        )
    )
    root = tmp_path / "eval_set"
    summary = json.loads((root / "summary.json").read_text())
    assert [r["simulator"] for r in summary["rows"]] == [
        "baseline__prior",
        "baseline__string_match",
        "baseline__prior_string_match",
    ]
    assert all(r["kind"] == "reference" for r in summary["rows"])

    # The prior by hand: each latent's share of the cache's training tokens (the statistics' rows; position 0
    # never cached) it is active on.
    from safetensors.numpy import load_file

    latents_dir = eval_set / "cache" / "latents" / HOOK
    train = json.loads((latents_dir / "row_split.json").read_text())["row_ids"]["train"]
    counts, n_tokens = np.zeros(64), None
    for path in sorted(latents_dir.glob("*.safetensors")):
        data = load_file(str(path))
        loc = data["locations"][np.isin(data["locations"][:, 0], train)]
        np.add.at(counts, loc[:, 2].astype(np.int64) + int(path.stem.split("_")[0]), 1)
        n_tokens = len(train) * (data["tokens"].shape[1] - 1)
    rate = counts / n_tokens
    prior = pd.read_parquet(root / "baseline__prior" / "predictions_test.parquet")
    record = json.loads((root / "baseline__prior" / "results.json").read_text())
    assert (
        record["scoring"]["reference_model"]["weights"][1] > 0
    )  # frequent latents are likelier to be active
    by_hand = [roc_auc(rate[g["latent"]], g["active"]) for _, g in prior.groupby("context_id")]
    assert record["results"]["binary"]["per_context"]["auc"]["median"] == pytest.approx(np.nanmedian(by_hand))
    assert roc_auc(prior["p_yes"], prior["active"]) == pytest.approx(
        roc_auc(rate[prior["latent"]], prior["active"])
    )
    # The prior's lift over itself is 0 exactly (a simulator that returns the firing rate gains nothing).
    lift = json.loads((root / "baseline__prior" / "results.json").read_text())["results"]["lift_over_prior"]
    assert lift["reference"] == "baseline__prior"
    assert lift["per_context_auc"]["median"] == 0 and lift["per_context_auc"]["ci95"] == [0, 0]
    rows = {r["simulator"]: r for r in summary["rows"]}
    assert rows["baseline__prior"]["lift_auc"] == 0
    # Beside it, every row's lift over the best reference that reads nothing (prior+string_match): 0 for
    # itself, and the prior's is minus the combination's own lift over the prior, context by context.
    assert rows["baseline__prior_string_match"]["lift_psm_auc"] == 0
    psm = json.loads((root / "baseline__prior_string_match" / "results.json").read_text())["results"]
    prior_psm = record["results"]["lift_over_prior_string_match"]
    assert prior_psm["reference"] == "baseline__prior_string_match"
    assert prior_psm["pooled_auc"]["difference"] == pytest.approx(
        -psm["lift_over_prior"]["pooled_auc"]["difference"]
    )

    # string_match: two P(yes) values, the higher one exactly where the interpretation names the judged token.
    test = pd.read_parquet(eval_set / "eval_set" / "test.parquet")
    match = np.array(
        [token_list_names(c, i) for c, i in zip(test["context"], test["interpretation"], strict=True)]
    )
    sm = pd.read_parquet(root / "baseline__string_match" / "predictions_test.parquet")
    assert sm["p_yes"].nunique() <= 2 and 0 < match.sum() < len(match)
    assert ((sm["p_yes"] > sm["p_yes"].min()).to_numpy() == match).all()


def test_the_extending_guide_reference_runs_in_a_sweep(eval_set, tmp_path):
    """docs/extending.md's example, run exactly as the page shows it: registered, named in a baseline spec,
    scored by the sweep beside the prior on the same judgments."""
    import re
    from pathlib import Path

    from latentsim.simulators import REFERENCES

    page = (Path(__file__).resolve().parents[1] / "docs" / "extending.md").read_text()
    (code,) = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "register_reference" in b]
    try:
        exec(compile(code, "docs/extending.md", "exec"), {"__name__": "extending_example"})
        assert "base_rate" in REFERENCES
        load_script("eval/sweep.py").main(
            EvalArguments(
                eval_set=str(eval_set / "eval_set"),
                output_dir=str(tmp_path),
                baselines=["model=prior", "model=base_rate"],
            )
        )
    finally:
        REFERENCES.pop("base_rate", None)
    root = tmp_path / "eval_set"
    preds = pd.read_parquet(root / "baseline__base_rate" / "predictions_test.parquet")
    prior = pd.read_parquet(root / "baseline__prior" / "predictions_test.parquet")
    from latentsim.eval_set import EvalSet

    # Fitted on the calibration split (the sweep's default: validation).
    share = float(EvalSet.open(eval_set / "eval_set").split("validation")["active"].mean())
    assert preds["p_yes"].to_numpy() == pytest.approx(np.full(len(preds), share))
    assert preds[["context_id", "latent"]].equals(prior[["context_id", "latent"]])  # the same judgments
    record = json.loads((root / "baseline__base_rate" / "results.json").read_text())
    assert record["simulator"]["kind"] == "reference"
    assert record["scoring"]["reference_model"] == {"share_of_positives": share, "fitted_on": "validation"}
    assert roc_auc(preds["p_yes"], preds["active"]) == 0.5


def test_reference_model_calibrated_on_train():
    rng = np.random.default_rng(1)
    n = 3000
    rate = 10 ** rng.uniform(-5, -1, size=200)
    latent = rng.integers(0, 200, size=n)
    active = (rng.random(n) < np.clip(rate[latent] * 8, 0, 1)).astype(int)
    df = pd.DataFrame(
        {
            "latent": latent,
            "active": active,
            "context": [marked_context("a", " b")] * n,
            "interpretation": ["nothing"] * n,
        }
    )
    model = ReferenceModel("prior", df, rate)
    p = 1 / (1 + np.exp(-model.label_logits(df)[:, 1]))
    assert abs(p.mean() - active.mean()) < 0.01  # a logistic fit with a bias reproduces the base rate


def test_sweep_refuses_extrapolating_from_frequency_matched_negatives(eval_set, tiny_model_dir, tmp_path):
    """Dictionary-wide numbers read the negatives as a uniform sample of the inactive latents."""
    from latentsim.errors import BadInputError

    build = json.loads((eval_set / "eval_set" / "run_config.json").read_text())["config"]["dataset"]
    load_script("data_gen/build_dataset.py").main(
        DatasetArguments(
            **{
                **{k: v for k, v in build.items() if k in DatasetArguments.__dataclass_fields__},
                "negative_sampling": "frequency_matched",
                "output_dir": str(tmp_path / "matched"),
            }
        )
    )
    with pytest.raises(BadInputError, match="negative_sampling: uniform"):
        load_script("eval/sweep.py").main(
            EvalArguments(
                eval_set=str(tmp_path / "matched"), output_dir=str(tmp_path), baselines=["model=prior"]
            )
        )
    assert not (tmp_path / "matched" / "summary.json").exists()


def test_latent_major_eval_set_gives_per_latent_auc_and_no_lift_to_the_prior(eval_set, tmp_path):
    """`candidates: per_latent`: each held-out latent judged on up to k contexts where it fires and as many
    where it does not, labels from the cache; the prior ranks one latent's contexts alike (per-latent AUC 0.5,
    lift 0)."""
    from latentsim.cache_reader import load_cache

    build = json.loads((eval_set / "eval_set" / "run_config.json").read_text())["config"]["dataset"]
    common = {k: v for k, v in build.items() if k in DatasetArguments.__dataclass_fields__}
    load_script("data_gen/build_dataset.py").main(
        DatasetArguments(
            **{
                **common,
                "candidates": "per_latent",
                "contexts_per_latent": 3,
                "negatives_per_context": 0,
                "output_dir": str(tmp_path / "per_latent"),
            }
        )
    )
    cache = load_cache(eval_set / "cache" / "latents", HOOK)
    active = {(int(r), int(p), int(lat)) for r, p, lat in cache.locations.tolist()}
    stats = json.loads((tmp_path / "per_latent" / "dataset_stats.json").read_text())
    assert stats["candidates"] == "per_latent"
    for split in ("test", "validation"):
        df = pd.read_parquet(tmp_path / "per_latent" / f"{split}.parquet")
        pooled = pd.read_parquet(eval_set / "eval_set" / f"{split}.parquet")  # context-major, same seed
        train = pd.read_parquet(eval_set / "eval_set" / "train.parquet")
        assert set(df["row"]) <= set(pooled["row"])  # the same held-out rows
        assert not set(df["latent"]) & set(train["latent"]) and set(df["latent"]) & set(pooled["latent"])
        assert [int((r.row, r.position, r.latent) in active) for r in df.itertuples()] == df[
            "active"
        ].tolist()
        per = df.groupby("latent")["active"].agg(["sum", "count"])
        assert (per["sum"] >= 1).all() and (per["sum"] <= 3).all() and (per["count"] == 2 * per["sum"]).all()
        assert (df["position"] >= 4).all() and not df.duplicated(["latent", "row", "position"]).any()
    # Same-token inactive contexts: the judged token is one the latent fires on in these rows, yet it is off.
    load_script("data_gen/build_dataset.py").main(
        DatasetArguments(
            **{
                **common,
                "candidates": "per_latent",
                "contexts_per_latent": 3,
                "negatives_per_context": 0,
                "hard_negatives": "same_token",
                "hard_negative_fraction": 1.0,
                "output_dir": str(tmp_path / "same_token"),
            }
        )
    )
    hard = pd.read_parquet(tmp_path / "same_token" / "test.parquet")
    tokens = cache.tokens.numpy()
    split_rows = set(pd.read_parquet(eval_set / "eval_set" / "test.parquet")["row"])
    fired_on: dict[int, set[int]] = {}
    for r, p, lat in active:
        if r in split_rows and p >= 4:  # the split's rows, judgeable positions (window_min 4)
            fired_on.setdefault(lat, set()).add(int(tokens[r, p]))
    negatives = hard[hard["candidate"] == "hard_negative"]
    assert len(negatives) > 0 and (negatives["active"] == 0).all()
    assert all(int(tokens[r.row, r.position]) in fired_on[r.latent] for r in negatives.itertuples())
    assert [int((r.row, r.position, r.latent) in active) for r in hard.itertuples()] == hard[
        "active"
    ].tolist()
    # The sweep: per-latent metrics only (no per-context ones, no dictionary-wide extrapolation).
    load_script("eval/sweep.py").main(
        EvalArguments(
            eval_set=str(tmp_path / "per_latent"),
            output_dir=str(tmp_path),
            baselines=["model=prior", "model=string_match"],
        )
    )
    root = tmp_path / "per_latent"
    record = json.loads((root / "baseline__prior" / "results.json").read_text())["results"]
    assert "binary" not in record and record["per_latent"]["auc"]["median"] == 0.5
    lift = record["lift_over_prior"]
    assert (
        lift["by"] == "latent"
        and lift["per_context_auc"]["median"] == 0
        and lift["per_context_auc"]["ci95"] == [0, 0]
    )
    sm = pd.read_parquet(root / "baseline__string_match" / "predictions_test.parquet")
    by_hand = [roc_auc(g["p_yes"], g["active"]) for _, g in sm.groupby("latent")]
    sm_record = json.loads((root / "baseline__string_match" / "results.json").read_text())["results"]
    assert sm_record["per_latent"]["auc"]["median"] == pytest.approx(np.nanmedian(by_hand))
    assert sm_record["per_latent"]["n_latents_defined"] == int(np.isfinite(by_hand).sum())
    rows = {r["simulator"]: r for r in json.loads((root / "summary.json").read_text())["rows"]}
    assert rows["baseline__string_match"]["per_latent_auc"] == pytest.approx(np.nanmedian(by_hand))
    assert "auc" not in rows["baseline__prior"]


def test_per_latent_auc_and_its_interval_on_planted_scores():
    from latentsim.metrics import lift_over_reference, per_latent_metrics

    rng = np.random.default_rng(4)
    rows = []
    for latent in range(60):
        rate = rng.uniform(0.01, 0.3)
        for c in range(8):
            y = int(c < 4)
            rows.append(
                {
                    "context_id": latent * 100 + c,
                    "latent": latent,
                    "active": y,
                    "p_yes": rate + (0.2 * y + rng.normal(0, 0.1) if latent % 2 else 0.0),
                }
            )
    df = pd.DataFrame(rows)
    m = per_latent_metrics(df, seed=0)
    assert m["n_latents"] == 60 and m["n_latents_defined"] == 60
    # Half the latents read nothing (0.5), half separate their contexts well: the median sits between.
    assert (
        0.5 <= m["auc"]["median"] <= 1.0 and m["auc"]["ci95"][0] <= m["auc"]["median"] <= m["auc"]["ci95"][1]
    )
    prior = df.assign(p_yes=df.groupby("latent")["p_yes"].transform("min"))
    lift = lift_over_reference(df, prior, by="latent", seed=0)
    assert lift["per_context_auc"]["reference_median"] == 0.5 and lift["per_context_auc"]["n"] == 60
    assert lift["per_context_auc"]["ci95"][1] >= lift["per_context_auc"]["median"] > 0
