"""The lexical reader (latentsim.simulators.lexical): its features by hand on both interpretation formats and
free text, a planted cue only it reads, its fit on the train split alone, its dense text API, and the sweep
scoring it like any reference."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import WORDS, build_eval_set, build_tiny_tokenizer, load_script, make_explained_cache

from latentsim.config import EvalArguments, ExplainArguments, parse_baseline
from latentsim.config.eval import reference_names
from latentsim.eval_set import EvalSet
from latentsim.metrics import roc_auc
from latentsim.prompts import marked_context
from latentsim.simulators import (
    Judgment,
    ScorerFactory,
    ScoringOptions,
    baseline_simulator,
    judgments_of,
    probabilities,
)
from latentsim.simulators.lexical import FEATURES, LexicalFeatures, LexicalReader
from latentsim.simulators.reference import ReferenceModel

HOOK = "layers.1"
RICH = "token_list-rich"


def test_both_lexical_references_are_registered():
    assert {"lexical", "lexical_gbm"} <= set(reference_names())
    assert parse_baseline("model=lexical_gbm")["name"] == "lexical_gbm"


def test_features_by_hand_on_both_formats_and_free_text():
    tok = build_tiny_tokenizer()
    text = "the cat sat on a mat".split()
    ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(text)
    feats = LexicalFeatures(np.array([0.1, 0.0, 0.02]), tok, np.array([ids]))

    def judgment(position, interpretation, latent=0, located=True):
        # Rendered as a BPE tokenizer decodes: each token after the first with its leading space.
        judged = (" " if position > 1 else "") + text[position - 1]
        context = marked_context(" ".join(text[: position - 1]), judged)
        return Judgment(
            context, interpretation, latent=latent, **({"row": 0, "position": position} if located else {})
        )

    rich = (
        'the token "cat" (also " Mat", "dog"), often after "the", " A", as in "...the cat" and "...on a mat"'
    )
    plain = 'the token "sat", as in "...cat sat"'
    judgments = [
        judgment(2, rich),  # "cat" after "the": first named token, first `often after` token
        judgment(6, rich),  # "mat" after "a": second of each; the quote "on a mat" ends the context
        judgment(6, rich, located=False),  # the previous token from the context's text: the same
        judgment(1, rich),  # "the" right after BOS: no previous token
        judgment(3, plain, latent=1),  # "sat": no `often after` tokens; the quote shares "cat sat"
        judgment(3, "Cats that sat on mats", latent=2),  # free text naming the judged token
        judgment(3, "a cat sitting", latent=2),  # free text naming the previous token
    ]
    x = pd.DataFrame(feats.matrix(judgments), columns=FEATURES)
    assert np.allclose(x["log_firing_rate"], np.log([0.1, 0.1, 0.1, 0.1, 1e-7, 0.02, 0.02]))
    assert x["token_list"].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert x["token_match"].tolist() == [1, 1, 1, 0, 1, 0, 0]
    assert x["token_rank"].tolist() == [1, 0.5, 0.5, 0, 1, 0, 0]
    assert x["previous_match"].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert x["previous_rank"].tolist() == [1, 0.5, 0.5, 0, 0, 0, 0]
    assert x["context_suffix"].tolist() == [2, 3, 3, 0, 2, 0, 0]
    # Distinct words of the tail found in the quotes: {the, cat} 2/2; {the, cat, sat, on, a, mat} 5/6;
    # "the" alone 1/1; {the, cat, sat} against {cat, sat} 2/3.
    assert x["context_overlap"].tolist() == pytest.approx([1, 5 / 6, 5 / 6, 1, 2 / 3, 0, 0])
    assert x["free_text_token_match"].tolist() == [0, 0, 0, 0, 0, 1, 0]
    assert x["free_text_previous_match"].tolist() == [0, 0, 0, 0, 0, 0, 1]
    # The previous token read from the cache row, not the text: a row that differs there changes it.
    other = LexicalFeatures(np.array([0.1]), tok, np.array([ids[:5] + [ids[1]] + ids[6:]]))  # "the" at 5
    assert other.matrix([judgments[1]])[0, FEATURES.index("previous_rank")] == 1.0


def planted_set(tok, rng, n_rows=300, n_latents=30, contexts_per_row=2):
    """Cache-like rows of random words and latents that fire exactly where the previous token is their `often
    after` token: each latent names three random tokens (unrelated to where it fires) and follows its own
    word."""
    vocab = [w for w in WORDS if w.isalpha() and w.islower()]
    vocab_ids = np.array(tok.convert_tokens_to_ids(vocab))
    tokens = rng.choice(vocab_ids, size=(n_rows, 12))
    tokens[:, 0] = tok.bos_token_id
    after = vocab_ids[:n_latents]
    texts = []
    for latent in range(n_latents):
        named = [json.dumps(" " + w) for w in rng.choice(vocab, 3, replace=False)]
        texts.append(
            f"the token {named[0]} (also {named[1]}, {named[2]}), often after {json.dumps(vocab[latent])}, "
            f'as in "...{vocab[latent]}{json.loads(named[0])}"'
        )
    rows = []
    for row in range(n_rows):
        for position in rng.choice(np.arange(2, 12), contexts_per_row, replace=False):
            # The words space-separated, as a BPE tokenizer decodes them (the WordLevel one drops the space).
            context = marked_context(
                tok.decode(tokens[row, 1:position]), " " + tok.decode(tokens[row, position : position + 1])
            )
            for latent in range(n_latents):
                active = int(tokens[row, position - 1] == after[latent])
                rows.append((latent, row, int(position), context, texts[latent], active))
    df = pd.DataFrame(rows, columns=["latent", "row", "position", "context", "interpretation", "active"])
    rate = np.array([(tokens[:, 1:-1] == a).mean() for a in after])
    return tokens, df, rate


def test_planted_previous_token_cue_is_read_by_the_lexical_reader_only():
    tok = build_tiny_tokenizer()
    tokens, df, rate = planted_set(tok, np.random.default_rng(0))
    train, test = df[df["row"] < 200], df[df["row"] >= 200]  # held-out rows
    assert 0.01 < test["active"].mean() < 0.1
    features = LexicalFeatures(rate, tok, tokens)
    train_judgments, _ = judgments_of(train)
    test_judgments, _ = judgments_of(test)
    sm = ReferenceModel("string_match", train, rate)
    sm_auc = roc_auc(sm.label_logits(test)[:, 1], test["active"])
    assert abs(sm_auc - 0.5) < 0.1  # the named tokens say nothing of where it fires
    for name in ("lexical", "lexical_gbm"):
        reader = LexicalReader.fit(name, features, train_judgments, train["active"].to_numpy())
        auc = roc_auc(probabilities(reader.label_logits(test_judgments))[:, 1], test["active"])
        assert auc > 0.95 and auc > sm_auc + 0.3, (name, auc, sm_auc)
    # The logistic reader weighs the previous-token cues above every other feature.
    described = LexicalReader.fit("lexical", features, train_judgments, train["active"]).describe()
    weights = described["learner"]["coefficients"]
    previous = min(weights["previous_match"], weights["previous_rank"])
    assert all(previous > abs(w) for k, w in weights.items() if not k.startswith("previous_"))


@pytest.fixture(scope="module")
def rich_eval_set(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A tiny eval set whose interpretations are the richer token lists (`often after` tokens, two quotes)."""
    root = tmp_path_factory.mktemp("lexical")
    make_explained_cache(root, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    # The plain set's explain run, naming the tokens they follow and quoting two contexts.
    plain = json.loads((root / "expl" / "token_list-quantiles" / "run_config.json").read_text())
    explain = {
        k: v for k, v in plain["config"]["explain"].items() if k in ExplainArguments.__dataclass_fields__
    }
    load_script("data_gen/explain.py").main(
        ExplainArguments(**{**explain, "set_name": RICH, "n_preceding": 2, "n_contexts": 2})
    )
    build_eval_set(root, tiny_model_dir, RICH)
    return root


def lexical_scorer(path, name="lexical", calibration_split="validation"):
    eval_set = EvalSet.open(path)
    factory = ScorerFactory(ScoringOptions(fit_split=calibration_split))
    setup = factory.prepare(baseline_simulator(parse_baseline(f"model={name}")), "sim_v1", eval_set=eval_set)
    return factory.load(setup)


def test_fitted_on_the_train_split_only(rich_eval_set, tmp_path):
    original = rich_eval_set / "eval_set"
    test = pd.read_parquet(original / "test.parquet")
    assert test["interpretation"].str.contains("often after").all()
    judgments, _ = judgments_of(test)
    assert all(j.row is not None and j.position >= 4 for j in judgments)

    def relabelled(folder, splits):
        shutil.copytree(original, tmp_path / folder)
        for split in splits:
            df = pd.read_parquet(original / f"{split}.parquet")
            df.assign(active=1 - df["active"]).to_parquet(tmp_path / folder / f"{split}.parquet")
        return tmp_path / folder

    for name in ("lexical", "lexical_gbm"):
        scorer = lexical_scorer(original, name)
        before = scorer.label_logits(judgments)
        described = scorer.describe()
        train = pd.read_parquet(original / "train.parquet")
        assert described["fitted_on"] == {
            "split": "train",
            "split_judgments": len(train),
            "judgments": len(train),
            "positives": int(train["active"].sum()),
        }
        # The test and calibration splits' labels do not reach it; the train split's do.
        held_out = lexical_scorer(relabelled(f"{name}_held_out", ("test", "validation")), name)
        assert np.array_equal(held_out.label_logits(judgments), before)
        trained = lexical_scorer(relabelled(f"{name}_train", ("train",)), name)
        assert not np.allclose(trained.label_logits(judgments), before)


def test_text_p_yes_equals_label_logits_at_every_position(rich_eval_set):
    eval_set = EvalSet.open(rich_eval_set / "eval_set")
    tok = eval_set.cache.subject_tokenizer()
    interpretations = eval_set.interpretations()
    latents = sorted(interpretations)[:6]
    row, n = 5, 12
    ids = eval_set.tokens[row, : n + 1]
    # One hand-made text whose `often after` token is the row's 3rd: its cue fires at position 4 only if the
    # previous token is read where it should be.
    named = [json.dumps(tok.decode(ids[p : p + 1].tolist())) for p in (4, 3)]
    texts = [f'the token {named[0]}, often after {named[1]}, as in "...x"'] + [
        interpretations[lat] for lat in latents[1:]
    ]
    judgments = [
        Judgment(
            marked_context(tok.decode(ids[1:p].tolist()), tok.decode(ids[p : p + 1].tolist())),
            text,
            latent=lat,
            row=row,
            position=p,
        )
        for p in range(1, n + 1)
        for lat, text in zip(latents, texts, strict=True)
    ]
    for name in ("lexical", "lexical_gbm", "prior+string_match"):
        scorer = lexical_scorer(rich_eval_set / "eval_set", name)
        dense = scorer.text_p_yes(latents, texts, ids, tok)
        assert dense.shape == (n, len(latents))
        expected = probabilities(scorer.label_logits(judgments))[:, 1].reshape(n, len(latents))
        assert np.abs(dense - expected).max() < 1e-6
        assert np.unique(dense).size > 2  # positions and latents answered apart
    x = lexical_scorer(rich_eval_set / "eval_set").features.matrix(judgments)
    assert x[(4 - 1) * len(latents), FEATURES.index("previous_match")] == 1  # position 4, the hand-made text


def test_sweep_scores_the_lexical_readers_like_any_reference(rich_eval_set, tiny_model_dir, tmp_path):
    baselines = ["model=string_match", "model=lexical", "model=lexical_gbm"]
    load_script("eval/sweep.py").main(
        EvalArguments(eval_set=str(rich_eval_set / "eval_set"), output_dir=str(tmp_path), baselines=baselines)
    )
    root = tmp_path / "eval_set"
    rows = {r["simulator"]: r for r in json.loads((root / "summary.json").read_text())["rows"]}
    assert {"baseline__lexical", "baseline__lexical_gbm"} <= set(rows)
    test = pd.read_parquet(rich_eval_set / "eval_set" / "test.parquet")
    judgments, _ = judgments_of(test)
    for name in ("lexical", "lexical_gbm"):
        folder = root / f"baseline__{name}"
        assert rows[folder.name]["kind"] == "reference"
        preds = pd.read_parquet(folder / "predictions_test.parquet")
        direct = probabilities(lexical_scorer(rich_eval_set / "eval_set", name).label_logits(judgments))[:, 1]
        assert np.allclose(preds["p_yes"], direct, atol=1e-6)
        record = json.loads((folder / "results.json").read_text())
        reference = record["scoring"]["reference_model"]
        assert reference["features"] == list(FEATURES) and reference["fitted_on"]["split"] == "train"
        assert 0 <= record["results"]["binary"]["pooled"]["auc"] <= 1
    # Every row's lift over the stronger lexical reader on these judgments (the higher pooled AUC: the harder
    # bar), with paired intervals over contexts and over latents.
    pooled = {
        n: json.loads((root / f"baseline__{n}" / "results.json").read_text())["results"]["binary"]["pooled"][
            "auc"
        ]
        for n in ("string_match", "lexical", "lexical_gbm")
    }
    stronger = max(("lexical", "lexical_gbm"), key=pooled.get)
    sm = rows["baseline__string_match"]
    assert sm["lexical_reference"] == f"baseline__{stronger}"
    assert sm["lift_lexical_pooled_auc"] == pytest.approx(pooled["string_match"] - pooled[stronger])
    for suffix in ("", "_other"):
        low, high = (
            sm[f"lift_lexical_pooled_auc{suffix}_ci_low"],
            sm[f"lift_lexical_pooled_auc{suffix}_ci_high"],
        )
        assert low <= sm["lift_lexical_pooled_auc"] <= high and low < high
    assert rows[f"baseline__{stronger}"]["lift_lexical_pooled_auc"] == 0  # its lift over itself
    # A latent-major eval set: the same reader, per-latent metrics.
    per_latent_set = build_eval_set(
        rich_eval_set,
        tiny_model_dir,
        RICH,
        "per_latent",
        candidates="per_latent",
        contexts_per_latent=3,
        negatives_per_context=0,
    )
    load_script("eval/sweep.py").main(
        EvalArguments(eval_set=str(per_latent_set), output_dir=str(tmp_path), baselines=["model=lexical"])
    )
    per_latent = pd.read_parquet(tmp_path / "per_latent" / "baseline__lexical" / "predictions_test.parquet")
    record = json.loads((tmp_path / "per_latent" / "baseline__lexical" / "results.json").read_text())
    by_hand = [roc_auc(g["p_yes"], g["active"]) for _, g in per_latent.groupby("latent")]
    assert record["results"]["per_latent"]["auc"]["median"] == pytest.approx(np.nanmedian(by_hand))
