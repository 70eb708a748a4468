"""Dense value simulators (sim_dense_value_v1, issue 31): bin labels from the cache and training-row deciles,
training on them, P(active) and the expected activation read back, and correlation scoring."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import build_eval_set, load_script, make_explained_cache, sft_args

from latentsim.config import ValueEvalArguments
from latentsim.dataset import quantile_bin
from latentsim.prompts import answer_token_ids, get_format
from latentsim.simulators.base import probabilities
from latentsim.simulators.hf import DenseScorer, active_logits, naive_dense_logits
from latentsim.values import (
    bin_calibration,
    bin_values,
    expected_activation,
    latent_value_metrics,
    pearson,
    read_values,
    true_bins,
)

HOOK = "layers.1"
FMT = "sim_dense_value_v1"
FMT_K3 = "sim_dense_value_k3_v1"  # K = 3 bins: the `prompt_format` key chooses K


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A cache, a dense value mixture and a per-judgment eval set sharing its held-out latents."""
    root = tmp_path_factory.mktemp("values")
    make_explained_cache(root, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    # The value mixture: the top 3 active latents per context and one random inactive one per positive.
    build_eval_set(
        root,
        tiny_model_dir,
        out="value",
        positives="top_k",
        top_k=3,
        negatives_per_context=0,
        prompt_format=FMT,
    )
    build_eval_set(root, tiny_model_dir)  # every positive, 6 uniform negatives per context
    return root


@pytest.fixture(scope="module")
def k3_run(assets, tiny_model_dir, tmp_path_factory):
    """The value mixture in 3 bins and a simulator trained on it (12 steps)."""
    build_eval_set(
        assets,
        tiny_model_dir,
        out="value_k3",
        positives="top_k",
        top_k=3,
        negatives_per_context=0,
        prompt_format=FMT_K3,
    )
    out = tmp_path_factory.mktemp("k3") / "run_k3"
    load_script("train/sft.py").main(
        *sft_args(assets / "value_k3", tiny_model_dir, out, script={"prompt_format": FMT_K3})
    )
    return out


def test_the_value_format_answers_no_or_a_decile_in_one_token(tiny_model_dir):
    from transformers import AutoTokenizer

    fmt = get_format(FMT)
    assert fmt.dense and fmt.reads_active and not fmt.binary and fmt.value_bins == 10
    assert (
        fmt.judgment_format == "sim_v1" and fmt.answers[0] == " No" and fmt.answers[1:] == tuple("0123456789")
    )
    ids = answer_token_ids(FMT, AutoTokenizer.from_pretrained(str(tiny_model_dir)))
    assert len(set(ids)) == 11


def test_bin_labels_match_the_cache_with_deciles_of_training_rows_only(assets):
    from latentsim.cache_reader import CacheReader, load_cache
    from latentsim.latent_stats import load_statistics

    cache = load_cache(assets / "cache" / "latents", HOOK)
    value_of = {
        (int(r), int(p), int(lat)): float(a)
        for (r, p, lat), a in zip(cache.locations.tolist(), cache.activations.tolist(), strict=True)
    }
    stats = load_statistics(assets / "cache" / "stats", HOOK)
    edges = stats["quantile_edges"].numpy()
    # The deciles are those of the training rows' non-zero activations, not of every row's.
    train_rows = set(CacheReader(assets / "cache" / "latents", HOOK).row_split()["train"].tolist())
    differs = 0
    for latent in np.unique(cache.locations[:, 2].numpy())[:40]:
        mine = [a for (r, p, lat), a in value_of.items() if lat == latent and p > 0]
        train = [a for (r, p, lat), a in value_of.items() if lat == latent and p > 0 and r in train_rows]
        if len(train) >= 2:
            assert np.allclose(edges[latent], np.quantile(train, np.linspace(0, 1, 11)), atol=1e-5)
            differs += not np.allclose(edges[latent], np.quantile(mine, np.linspace(0, 1, 11)), atol=1e-5)
    assert differs > 0  # the test could tell the two apart
    rows = pd.read_parquet(assets / "value" / "train.parquet")
    checked = set()
    for r in rows.itertuples():
        for i, b in enumerate(r.token_bins):
            a = value_of.get((r.row, r.window_start + i, r.latent), 0.0)
            expected = 1 + quantile_bin(a, edges[r.latent]) if a > 0 else 0
            assert b == expected and r.token_labels[i] == int(a > 0)
            checked.add(b)
    assert 0 in checked and len(checked) >= 4  # inactive and several deciles among the sampled tokens


def test_expected_value_of_a_one_hot_prediction_is_its_bins_value():
    values = np.array([[0.1 * (k + 1) for k in range(10)], [2.0 * (k + 1) for k in range(10)]])
    probs = np.zeros((2, 11))
    probs[0, 4], probs[1, 10] = 1.0, 1.0  # latent 0: bin 4 (the digit "3"); latent 1: the top decile
    assert np.allclose(expected_activation(probs, values), [values[0, 3], values[1, 9]])
    assert np.allclose(expected_activation(np.eye(11)[[0, 0]], values), 0.0)  # " No" is worth nothing
    # Read from logits: P(active) = 1 - P(" No"); a Yes/No simulator's value is P(yes) x the median.
    logits = np.log(np.array([0.5, 0.5] + [0.0] * 9) + 1e-12)
    p, v = read_values(logits, values[0])
    assert p == pytest.approx(0.5) and v == pytest.approx(0.5 * values[0, 0], rel=1e-6)
    p2, v2 = read_values(np.log(np.array([0.25, 0.75])), values[0])
    assert p2 == pytest.approx(0.75) and v2 == pytest.approx(0.75 * np.median(values[0]))


def test_bin_values_are_medians_within_each_decile_of_the_training_sample():
    sample = torch.arange(1, 101, dtype=torch.float32)  # 1..100: decile k holds 10k+1..10k+10
    stats = {
        "sample_values": sample,
        "sample_offsets": torch.tensor([0, 0, 100]),
        "quantile_edges": torch.stack(
            [torch.linspace(0, 4, 11), torch.quantile(sample, torch.linspace(0, 1, 11))]
        ),
    }
    got = bin_values(stats, [1, 0])
    assert np.allclose(got[0], [np.quantile(np.arange(1, 101), (k + 0.5) / 10) for k in range(10)])
    assert np.allclose(got[1], np.linspace(0.2, 3.8, 10))  # no sample: the edges' midpoints


def test_pearson_of_a_perfect_predictor_is_one_and_of_a_shuffled_one_near_zero():
    rng = np.random.default_rng(0)
    true = np.where(rng.random(5000) < 0.1, rng.exponential(2.0, 5000), 0.0)
    assert pearson(true * 3 + 1, true) == pytest.approx(1.0)
    assert abs(pearson(rng.permutation(true), true)) < 0.05
    assert pearson(np.full(5000, 0.7), true) == 0.0  # a constant (the prior) says nothing about which token
    assert np.isnan(pearson(true, np.zeros(5000)))  # nothing to predict: left out
    m = latent_value_metrics((true > 0).astype(float), true, true)
    assert m["r"] == pytest.approx(1.0) and m["r_active"] == pytest.approx(1.0) and m["auc"] == 1.0


def test_active_logits_give_one_minus_p_no_and_calibration_counts_bins():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 11)).astype(np.float32)
    probs = probabilities(logits.astype(np.float64))
    two = probabilities(active_logits(logits).astype(np.float64))
    assert np.allclose(two[:, 1], 1 - probs[:, 0], atol=1e-6)
    bins = rng.integers(0, 11, 50)
    cal = bin_calibration(np.eye(11)[bins], bins)  # a one-hot oracle: perfectly calibrated
    # The true bins are the training labels' (latentsim.dataset.quantile_bin), edges and ties included.
    edges = np.linspace(0.0, 5.0, 11)
    true = np.concatenate([[0.0, 0.25, 0.5, 2.5, 4.99, 5.0, 7.0], rng.exponential(2.0, 200)])
    assert true_bins(true, edges).tolist() == [1 + quantile_bin(a, edges) if a > 0 else 0 for a in true]
    assert cal["total_variation"] == pytest.approx(0.0) and cal["top_answer_ece"] == pytest.approx(0.0)
    assert cal["observed"] == pytest.approx((np.bincount(bins, minlength=11) / 50).round(4).tolist())


def test_value_training_and_scoring(assets, tiny_model_dir, k3_run, tmp_path):
    out = tmp_path / "run"
    load_script("train/sft.py").main(
        *sft_args(assets / "value", tiny_model_dir, out, script={"prompt_format": FMT})
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert results["prompt_format"] == FMT and "eval_auc" in results["metrics"]  # P(active) metrics
    assert results["adapter"]["reload_max_abs_diff_p_yes"] < 1e-5
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    curve = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert curve[0] == pytest.approx(np.log(11), abs=0.3)  # an 11-way CE at the start
    assert np.mean(curve[-3:]) < np.mean(curve[:3])

    from helpers import build_char_tokenizer, save_tiny_model

    prompted = save_tiny_model(tmp_path / "prompted", build_char_tokenizer())  # keeps tabs and digits
    args = ValueEvalArguments(
        eval_set=str(assets / "eval_set"),
        run_dirs=[str(out), str(k3_run)],  # value simulators of 10 and 3 bins side by side
        references=["prior", "lexical"],
        prompted=[str(prompted)],
        random_texts=2,
        top_texts=2,
        tokens=8,
        max_latents=6,
        batch_size=4,
        output_dir=str(tmp_path / "values"),
    )
    score = load_script("eval/score_values.py").main
    result = score(args)
    per_latent = pd.read_parquet(tmp_path / "values" / "per_latent.parquet")
    all_at_once = "prompted_all-at-once"
    assert set(per_latent["simulator"]) == {
        "run__final",
        "run_k3__final",
        "baseline__prior",
        "baseline__lexical",
        all_at_once,
    }
    assert per_latent[per_latent.simulator == all_at_once]["auc"].notna().any()
    prior = per_latent[per_latent.simulator == "baseline__prior"]
    assert (prior["r"].dropna() == 0).all()  # a constant per latent
    summary = result["summary"]
    sim_name = "run__final"
    assert set(summary[sim_name]) == {"random", "top_and_random"}
    assert result["calibration"][sim_name]["tokens"] > 0
    assert len(result["calibration"][sim_name]["observed"]) == 11
    assert len(result["calibration"]["run_k3__final"]["observed"]) == 4  # " No" + its own 3 bins

    # One latent's r, recomputed from one naive forward per text of the trained simulator.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentsim.eval_set import EvalSet
    from latentsim.values import row_activations
    from latentsim.whole_layer import text_of_row

    eval_set = EvalSet.open(assets / "eval_set")
    tok = AutoTokenizer.from_pretrained(str(out))
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(out)
    ).eval()
    ids = answer_token_ids(FMT, tok)
    mine = per_latent[(per_latent.simulator == sim_name) & (per_latent.set == "top_and_random")]
    row = mine.dropna(subset=["r"]).iloc[0]
    latent = int(row["latent"])
    rows = result["random_rows"] + result["top_rows"][str(latent)]
    subject_tok = eval_set.cache.subject_tokenizer()
    truth = row_activations(eval_set.cache, rows, [latent], 8)
    interp = eval_set.interpretations()[latent]
    values = bin_values(eval_set.statistics, [latent])[0]
    predicted, true = [], []
    for r in rows:
        _, text, ends = text_of_row(eval_set.tokens, r, 8, subject_tok)
        logits = naive_dense_logits(model, tok, FMT, interp, text, ends, ids)
        predicted.append(read_values(logits, values)[1])
        true.append(truth[r][:, 0])
    assert pearson(np.concatenate(predicted), np.concatenate(true)) == pytest.approx(row["r"], abs=1e-4)
    # The sweep reads a value simulator's verdicts as Yes/No on the per-judgment eval set.
    scorer = DenseScorer(model, tok, ids, batch_size=4, fmt=FMT)
    from latentsim.simulators import judgments_of

    judgments, _ = judgments_of(pd.read_parquet(assets / "eval_set" / "test.parquet").head(5))
    assert scorer.label_logits(judgments).shape == (5, 2)
    # patch_kl's `predicted` values from a dense value simulator: its expected activation given active.
    from latentsim.prompts import unmark_context
    from latentsim.rewrite import predicted_values

    test = eval_set.split("test")
    contexts = sorted(test["context_id"].unique())[:3]
    got = predicted_values(eval_set, "test", contexts, str(out), eval_set.decile_edges(), "float32", "cpu", 0)
    first = test[test["context_id"] == contexts[0]].iloc[0]
    prefix, judged = unmark_context(first["context"])
    text = prefix + judged
    logits = naive_dense_logits(model, tok, FMT, first["interpretation"].strip(), text, [len(text)], ids)[-1]
    probs = probabilities(logits.astype(np.float64))
    own = bin_values(eval_set.statistics, [int(first["latent"])])[0]
    expected = expected_activation(probs, own) / (1 - probs[0])
    assert got[(int(first["context_id"]), int(first["latent"]))] == pytest.approx(expected, rel=1e-4)
    assert len(got) == int(test["context_id"].isin(contexts).sum())
    # A rerun of the same config reads the results back.
    assert score(args)["summary"] == summary


def test_k_is_the_prompt_format_key_bins_edges_labels_training_and_values(assets, tiny_model_dir, k3_run):
    from transformers import AutoTokenizer

    from latentsim.eval_set import EvalSet
    from latentsim.latent_stats import bin_edges
    from latentsim.prompts import SIM_DENSE_VALUE_K_V1
    from latentsim.rewrite import predicted_values

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for k, fmt in SIM_DENSE_VALUE_K_V1.items():
        assert fmt.value_bins == k and fmt.answers == (" No",) + tuple(str(d) for d in range(k))
        assert len(set(answer_token_ids(fmt.name, tok))) == k + 1
    eval_set = EvalSet.open(assets / "eval_set")
    stats = eval_set.statistics
    offsets, sample = stats["sample_offsets"].numpy(), stats["sample_values"].numpy()
    alive = [i for i in range(len(offsets) - 1) if offsets[i + 1] - offsets[i] >= 2][:20]
    dead = [i for i in range(len(offsets) - 1) if offsets[i + 1] == offsets[i]][:3]
    # K = 10: the exact deciles; other K: the sample's quantiles (the deciles interpolated without a sample).
    assert np.array_equal(bin_edges(stats, alive, 10), stats["quantile_edges"].numpy()[alive])
    got = bin_edges(stats, alive + dead, 3)
    for i, latent in enumerate(alive):
        own = sample[offsets[latent] : offsets[latent + 1]]
        assert np.allclose(got[i], np.quantile(own, np.linspace(0, 1, 4)))
    for i, latent in enumerate(dead, start=len(alive)):
        deciles = stats["quantile_edges"].numpy()[latent]
        assert np.allclose(got[i], np.interp(np.linspace(0, 1, 4), np.linspace(0, 1, 11), deciles))
    # The labels: 0 inactive, else 1 + the activation's bin among the latent's 3 (never 4..10).
    rows = pd.read_parquet(assets / "value_k3" / "train.parquet")
    seen = set()
    for r in rows.itertuples():
        edges = bin_edges(stats, [r.latent], 3)[0]
        expected = [
            -1 if y < 0 else (1 + quantile_bin(a, edges) if y else 0)
            for a, y in zip(r.token_activations, r.token_labels, strict=True)
        ]
        assert list(r.token_bins) == expected
        seen |= set(expected)
    assert seen == {-1, 0, 1, 2, 3} or seen == {0, 1, 2, 3}
    # Training reads 4 answers: the loss starts at a 4-way cross-entropy.
    state = json.loads((k3_run / "checkpoint-12" / "trainer_state.json").read_text())
    curve = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert curve[0] == pytest.approx(np.log(4), abs=0.3)
    # patch_kl's predicted values: the latent valued through its own 3 bins (one naive forward).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from latentsim.prompts import unmark_context

    test = eval_set.split("test")
    contexts = sorted(test["context_id"].unique())[:2]
    got = predicted_values(
        eval_set, "test", contexts, str(k3_run), eval_set.decile_edges(), "float32", "cpu", 0
    )
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(k3_run)
    ).eval()
    first = test[test["context_id"] == contexts[0]].iloc[0]
    prefix, judged = unmark_context(first["context"])
    text = prefix + judged
    ids = answer_token_ids(FMT_K3, tok)
    logits = naive_dense_logits(model, tok, FMT_K3, first["interpretation"].strip(), text, [len(text)], ids)[
        -1
    ]
    probs = probabilities(logits.astype(np.float64))
    assert probs.shape == (4,)
    own = bin_values(stats, [int(first["latent"])], 3)[0]
    expected = expected_activation(probs, own) / (1 - probs[0])
    assert got[(int(first["context_id"]), int(first["latent"]))] == pytest.approx(expected, rel=1e-4)


def test_all_at_once_reads_every_position_in_one_pass_equal_to_one_at_a_time(tmp_path):
    from helpers import build_char_tokenizer, save_tiny_model
    from transformers import AutoModelForCausalLM

    from latentsim.all_at_once import digit_logits, naive_digit_logits, prompt_ids, read_digits

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(save_tiny_model(tmp_path / "m", tok))).eval()
    texts = [["the", " cat", "\n", " sat"], [" a", " dog"]]
    ids, reads = prompt_ids(tok, "cats", texts[0])
    # Each read position is the tab right after its token's line, "\n" shown escaped.
    assert [tok.decode(ids[p]) for p in reads] == ["\t"] * 4
    assert "".join(tok.convert_ids_to_tokens(ids[reads[2] - 2 : reads[2]])) == "\\n"
    fast = digit_logits(model, tok, "cats", texts, batch_size=2)  # batched, right-padded
    for tokens, got in zip(texts, fast, strict=True):
        assert got.shape == (len(tokens), 10)
        assert np.abs(got - naive_digit_logits(model, tok, "cats", tokens)).max() < 1e-4
    p, v = read_digits(np.log(np.array([[0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0.5]]) + 1e-12))
    assert p[0] == pytest.approx(0.5) and v[0] == pytest.approx(4.5)


def test_whole_layer_values_flagged_latents_with_the_value_simulators_own_prediction(
    assets, tiny_model_dir, k3_run, tmp_path
):
    from latentsim.config import WholeLayerArguments
    from latentsim.errors import ConfigError
    from latentsim.eval_set import EvalSet

    out = k3_run  # a K = 3 simulator: its values come from its own 3 bins, not the deciles
    whole = load_script("eval/whole_layer.py").main
    args = dict(
        eval_set=str(assets / "eval_set"),
        simulator=str(out),
        texts=2,
        tokens=8,
        calibration_texts=1,
        batch_size=4,
        values=["oracle", "median", "predicted"],
        thresholds=["0.5", "0.1"],
        output_dir=str(tmp_path / "whole"),
    )
    result = whole(WholeLayerArguments(**args))
    for threshold in ("0.5", "0.1"):
        for value in ("oracle", "median", "predicted"):
            assert f"sim@{threshold}:{value}:unexplained_zeroed" in result["sources"]
    assert not [s for s in result["sources"] if s.startswith("firing_rate_random") and ":predicted" in s]
    # Each text's shard holds P(yes) and the value given active: a mix of the latent's 3 bins' values.
    eval_set = EvalSet.open(assets / "eval_set")
    explained = sorted(eval_set.interpretations())
    bins = bin_values(eval_set.statistics, explained, 3)
    shard = np.load(tmp_path / "whole" / "scores" / f"row{result['rows'][0]}.npy")
    assert shard.shape == (8, len(explained), 2)
    p, given = shard[..., 0], shard[..., 1]
    assert np.nanmin(p) >= 0 and np.nanmax(p) <= 1
    assert (given >= bins.min(axis=1) - 1e-5).all() and (given <= bins.max(axis=1) + 1e-5).all()
    # `predicted` needs a value simulator.
    with pytest.raises(ConfigError, match="predicted"):
        whole(
            WholeLayerArguments(
                **{**args, "baseline": "name=z,model=" + str(tiny_model_dir), "simulator": ""}
            )
        )
