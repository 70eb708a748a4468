"""Controls that read the wrong thing (latentsim.simulators.controls): the frequency-matched shuffle by hand,
the sweep scoring a simulator under `control=shuffled` / `empty` beside its real run (texts that reached the
scorer, results kept apart, the paired gap), and the sweep's L0 target read from the validation split."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import build_eval_set, load_script, make_explained_cache

from latentsim.config import ConfigError, EvalArguments, parse_baseline
from latentsim.config.eval import WholeLayerArguments, parse_run_entry
from latentsim.errors import BadInputError
from latentsim.eval_set import EvalSet
from latentsim.metrics import roc_auc
from latentsim.prompts import dense_header_ids, render_prompt
from latentsim.simulators.controls import control_interpretations, shuffled_interpretations
from latentsim.simulators.fake import FakeScorer
from latentsim.simulators.reference import FeatureReference, ReferenceModel


def test_shuffled_map_is_a_frequency_matched_derangement():
    rng = np.random.default_rng(0)
    latents = rng.choice(5000, size=120, replace=False)
    firing_rate = np.zeros(5000)
    firing_rate[latents] = np.exp(rng.uniform(np.log(1e-5), np.log(0.2), size=120))
    texts = {int(lat): f"the token {lat}" for lat in latents}
    shuffle = shuffled_interpretations(texts, firing_rate, seed=7)
    assert sorted(shuffle.texts) == sorted(texts)
    assert all(shuffle.source[lat] != lat and shuffle.texts[lat] != texts[lat] for lat in texts)
    assert sorted(shuffle.source.values()) == sorted(texts)  # a permutation: every text shown once
    assert all(shuffle.texts[lat] == texts[shuffle.source[lat]] for lat in texts)
    assert shuffle.n_bins == 10 and shuffle.matched_within_bin == 120 and shuffle.same_text == 0
    assert all(shuffle.bins[lat] == shuffle.bins[shuffle.source[lat]] for lat in texts)
    # The bins are quantiles of log firing rate: every latent of bin b fires less often than any of bin b + 1.
    by_bin = pd.Series({lat: firing_rate[lat] for lat in texts}).groupby(shuffle.bins).agg(["min", "max"])
    assert (by_bin["max"].to_numpy()[:-1] < by_bin["min"].to_numpy()[1:]).all()
    assert shuffled_interpretations(texts, firing_rate, seed=7).source == shuffle.source
    assert shuffled_interpretations(texts, firing_rate, seed=8).source != shuffle.source


def test_a_one_latent_bin_swaps_with_its_nearest_neighbouring_bin():
    # Quartile edges fall on 1e-4, 1e-2 (one latent) and 1e-1.5: the middle latent is a bin of its own,
    # nearer in log rate to the frequent bin than to the rare one.
    firing_rate = np.array([1e-4] * 4 + [1e-2] + [10**-1.5] * 4)
    texts = {lat: f"text {lat}" for lat in range(9)}
    shuffle = shuffled_interpretations(texts, firing_rate, seed=0, n_bins=4)
    assert shuffle.n_bins == 3 and shuffle.bins[4] == 1
    assert shuffle.bins[shuffle.source[4]] == 2  # the single latent takes a text of the frequent bin
    rare = range(4)
    assert all(shuffle.source[lat] in rare for lat in rare)  # the rare bin stays among itself
    taker = next(lat for lat in texts if shuffle.source[lat] == 4)
    assert shuffle.bins[taker] == 2  # and its own text goes to the bin it joined
    assert shuffle.matched_neighbouring_bin == 2 and shuffle.matched_within_bin == 7
    assert shuffle.record()["matched_within_bin"] == 7


def test_twins_never_see_their_own_text_and_one_latent_cannot_be_shuffled():
    texts = {0: "A", 1: "A", 2: "B", 3: "B", 4: "C", 5: "C"}
    shuffle = shuffled_interpretations(texts, np.full(6, 0.01), seed=1)
    assert shuffle.same_text == 0 and all(shuffle.texts[lat] != texts[lat] for lat in texts)
    assert sorted(shuffle.texts.values()) == sorted(texts.values())
    with pytest.raises(BadInputError, match="at least 2 latents"):
        shuffled_interpretations({3: "A"}, np.full(6, 0.01), seed=1)


def test_control_specs():
    assert parse_baseline("model=prior,control=shuffled")["control"] == "shuffled"
    assert parse_baseline("name=zs")["control"] is None
    with pytest.raises(ConfigError, match="control must be one of shuffled, empty"):
        parse_baseline("model=prior,control=reversed")
    assert parse_run_entry("outputs/sft/run,control=empty", "run_dirs") == ("outputs/sft/run", "empty")
    assert parse_run_entry("outputs/sft/run", "run_dirs") == ("outputs/sft/run", None)
    with pytest.raises(ConfigError, match="run_dirs"):
        parse_run_entry("outputs/sft/run,shots=2", "run_dirs")
    with pytest.raises(ConfigError, match="`control` are eval/sweep.py"):
        WholeLayerArguments(eval_set="e", output_dir="o", baseline="name=zs,control=empty")
    # A baseline and its control share a `name=`: their folders differ.
    args = EvalArguments(eval_set="e", baselines=["name=zs", "name=zs,control=empty"])
    assert [b["control"] for b in args.parsed_baselines] == [None, "empty"]


def test_prompt_formats_render_an_empty_interpretation(tiny_model_dir):
    from latentsim.models import load_tokenizer

    assert render_prompt("sim_v1", "a <<b>>", "")[0]["content"].endswith("Interpretation: ")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert dense_header_ids(tokenizer, "sim_dense_v1", "") == dense_header_ids(tokenizer, "sim_dense_v1", " ")
    assert len(dense_header_ids(tokenizer, "sim_dense_v1", "")) < len(
        dense_header_ids(tokenizer, "sim_dense_v1", "the token cat")
    )


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    root = tmp_path_factory.mktemp("controls")
    make_explained_cache(root, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    return build_eval_set(root, tiny_model_dir)


@pytest.fixture
def seen(monkeypatch):
    """{scorer class name: [(latent, interpretation) of every judgment it was asked]}."""
    seen = {}
    for cls in (FakeScorer, FeatureReference):
        original = cls.label_logits

        def recording(self, judgments, progress=None, _original=original, _name=cls.__name__):
            seen.setdefault(_name, []).append([(j.latent, j.interpretation) for j in judgments])
            return _original(self, judgments, progress)

        monkeypatch.setattr(cls, "label_logits", recording)
    return seen


def test_sweep_scores_controls_beside_the_real_simulator(eval_set, tiny_model_dir, tmp_path, seen):
    baselines = [
        f"model={tiny_model_dir},name=zero",
        f"model={tiny_model_dir},name=zero,control=shuffled",
        f"model={tiny_model_dir},name=zero,control=empty",
    ]
    args = dict(eval_set=str(eval_set), output_dir=str(tmp_path), backend="fake", seed=5)
    load_script("eval/sweep.py").main(EvalArguments(**args, baselines=baselines))
    root = tmp_path / eval_set.name
    # Scored in order, each split test then validation: the real run, shuffled, empty.
    asked = seen["FakeScorer"]
    assert len(asked) == 6
    test, validation = EvalSet.open(eval_set).split("test"), EvalSet.open(eval_set).split("validation")
    own = {
        int(lat): text
        for split in (test, validation)
        for lat, text in zip(split["latent"], split["interpretation"], strict=True)
    }
    assert asked[0] == list(zip(test["latent"], test["interpretation"], strict=True))
    shuffled_test, shuffled_validation = dict(asked[2]), dict(asked[3])
    for shown, split in ((shuffled_test, test), (shuffled_validation, validation)):
        assert len(shown) == split["latent"].nunique() >= 2
        assert all(shown[lat] != own[lat] for lat in shown)  # nobody reads its own text
        # Another latent of the same split, each text shown once.
        assert sorted(shown.values()) == sorted(own[lat] for lat in shown)
    assert {text for _, text in asked[4] + asked[5]} == {""}
    assert [lat for lat, _ in asked[2]] == [lat for lat, _ in asked[0]]  # the same judgments, in order

    # Their own folders and records; the real run's untouched.
    real = json.loads((root / "baseline__zero" / "results.json").read_text())
    assert real["simulator"]["control"] is None and "control_gap" not in real["results"]
    record = json.loads((root / "baseline__zero__shuffled" / "results.json").read_text())
    assert record["simulator"]["control"] == "shuffled" and record["simulator"]["name"].endswith("__shuffled")
    made = record["scoring"]["control"]["splits"]
    assert made["test"]["latents"] == test["latent"].nunique()
    assert (
        made["test"]["matched_within_bin"] + made["test"]["matched_neighbouring_bin"]
        == made["test"]["latents"]
    )
    # The map is the controls module's, seeded by the sweep's seed.
    expected, _ = control_interpretations("shuffled", EvalSet.open(eval_set), 5)
    assert all(expected[lat] == text for lat, text in asked[2])

    # The gap real - control, paired over the same judgments, pooled AUC by hand.
    preds = {
        name: pd.read_parquet(root / name / "predictions_test.parquet")
        for name in ("baseline__zero", "baseline__zero__shuffled", "baseline__zero__empty")
    }
    assert np.abs(preds["baseline__zero"]["p_yes"] - preds["baseline__zero__shuffled"]["p_yes"]).max() > 1e-3
    for control in ("shuffled", "empty"):
        gap = json.loads((root / f"baseline__zero__{control}" / "results.json").read_text())["results"]
        gap = gap["control_gap"]
        auc = {n: roc_auc(p["p_yes"], p["active"]) for n, p in preds.items()}
        assert gap["real"] == "baseline__zero" and gap["control"] == control
        difference = auc["baseline__zero"] - auc[f"baseline__zero__{control}"]
        assert gap["pooled_auc"]["difference"] == pytest.approx(difference)
        low, high = gap["pooled_auc"]["ci95"]
        assert low <= difference <= high and low < high
    rows = {r["simulator"]: r for r in json.loads((root / "summary.json").read_text())["rows"]}
    assert "control_gap_auc" not in rows["baseline__zero"]
    assert rows["baseline__zero__empty"]["control_gap_auc"] == pytest.approx(
        auc["baseline__zero"] - auc["baseline__zero__empty"]
    )

    # The report: the controls are rows of the metric table, and their gaps a table of their own.
    report = load_script("eval/report.py").main
    from latentsim.config import ReportArguments

    report(ReportArguments(sweep_dir=str(tmp_path), output_dir=str(tmp_path / "report")))
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| baseline__zero__shuffled |" in markdown and "real - control pooled AUC" in markdown
    gap_section = markdown.split("how much the simulators read the interpretation")[1]
    assert "| baseline__zero | shuffled |" in gap_section and "| baseline__zero | empty |" in gap_section


def test_a_reference_under_control_is_fitted_and_scored_on_the_control_texts(eval_set, tmp_path, seen):
    # The control is listed first: the lifts must still be measured over the real prior.
    baselines = ["model=prior,control=shuffled", "model=prior", "model=string_match"]
    load_script("eval/sweep.py").main(
        EvalArguments(
            eval_set=str(eval_set),
            output_dir=str(tmp_path),
            seed=2,
            baselines=[*baselines, "model=string_match,control=shuffled"],
        )
    )
    opened = EvalSet.open(eval_set)
    expected, _ = control_interpretations("shuffled", opened, 2)
    asked = seen["FeatureReference"]  # test then validation, per simulator in order
    real, control = dict(asked[4]), asked[6]
    assert all(expected[lat] == text and text != real[lat] for lat, text in control)
    root = tmp_path / eval_set.name
    record = json.loads((root / "baseline__string_match__shuffled" / "results.json").read_text())
    # Fitted on the validation split shown the control's texts: the same weights by hand.
    validation = opened.split("validation")
    shown = validation.assign(interpretation=validation["latent"].map(expected))
    by_hand = ReferenceModel("string_match", shown, opened.statistics["firing_rate"].double().numpy())
    fitted = record["scoring"]["reference_model"]
    assert fitted["fitted_on"] == {"split": "validation", "judgments": len(validation)}
    assert np.allclose(fitted["weights"], by_hand.weights)
    assert record["results"]["control_gap"]["real"] == "baseline__string_match"
    assert record["results"]["lift_over_prior"]["reference"] == "baseline__prior"
    # The prior reads no text: its control scores exactly as it does, a gap of 0 with interval [0, 0].
    gap = json.loads((root / "baseline__prior__shuffled" / "results.json").read_text())["results"]
    assert gap["control_gap"]["pooled_auc"]["difference"] == 0 and gap["control_gap"]["pooled_auc"][
        "ci95"
    ] == [0, 0]


def test_l0_target_comes_from_the_validation_split(eval_set, tmp_path):
    data = tmp_path / "eval_set"
    shutil.copytree(eval_set, data)
    validation = pd.read_parquet(data / "validation.parquet")
    validation["n_active_explained"] += 3  # a validation split whose L0 differs from the test split's
    validation.to_parquet(data / "validation.parquet", index=False)
    opened = EvalSet.open(data)
    l0_validation = opened.judged_l0(opened.split("validation"))
    l0_test = opened.judged_l0(opened.split("test"))
    assert l0_validation > l0_test + 2

    sweep = load_script("eval/sweep.py").main
    sweep(EvalArguments(eval_set=str(data), output_dir=str(tmp_path / "a"), baselines=["model=prior"]))
    summary = json.loads((tmp_path / "a" / "eval_set" / "summary.json").read_text())
    assert summary["l0"] == pytest.approx(l0_validation) and summary["l0_source"] == "validation"
    record = json.loads((tmp_path / "a" / "eval_set" / "baseline__prior" / "results.json").read_text())
    assert record["eval_set"]["l0_source"] == "validation"
    assert record["results"]["l0"] == pytest.approx(l0_validation)
    assert record["results"]["calibration"]["l0_matched"]["l0"] == pytest.approx(l0_validation)

    # Without a calibration split the test split's, labelled so.
    sweep(
        EvalArguments(
            eval_set=str(data),
            output_dir=str(tmp_path / "b"),
            baselines=["model=prior"],
            calibration_split=None,
        )
    )
    summary = json.loads((tmp_path / "b" / "eval_set" / "summary.json").read_text())
    assert summary["l0"] == pytest.approx(l0_test) and summary["l0_source"] == "test"
    assert "no calibration split" in (tmp_path / "b" / "eval_set" / "summary.md").read_text()
