"""The two-stage whole layer's first stage (issue 32, latentsim.first_stage): token and interpretation vectors
read as the dense format reads, vectors computed once per dictionary, the bilinear head, proposals and
recall."""

import json

import numpy as np
import pytest
import torch
from helpers import build_eval_set, load_script, make_explained_cache, sft_args

from latentsim import first_stage
from latentsim.config import FirstStageArguments
from latentsim.prompts import dense_header_ids, dense_text_ids

FMT = "sim_dense_v1"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A cache, a dense mixture, a simulator trained on it (12 steps) and an eval set on the same cache."""
    root = tmp_path_factory.mktemp("first_stage")
    make_explained_cache(root, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    build_eval_set(root, tiny_model_dir, out="dense", positives="top_k", top_k=3, prompt_format=FMT)
    build_eval_set(root, tiny_model_dir)
    load_script("train/sft.py").main(
        *sft_args(root / "dense", tiny_model_dir, root / "run", script={"prompt_format": FMT})
    )
    return root


def encoder_of(model_dir, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    return first_stage.Encoder(model, AutoTokenizer.from_pretrained(str(model_dir)), FMT, **kw)


@pytest.mark.parametrize("layer", [-1, 1])
def test_vectors_are_the_hidden_states_of_one_pass_alone(tiny_model_dir, layer):
    enc = encoder_of(tiny_model_dir, layer=layer, batch_size=2)
    texts = [("the cat sat on the mat", [3, 7, 11]), ("a b", [1, 3]), ("on the mat the", [2, 6, 10, 14])]
    got = enc.token_vectors(texts)
    lead = first_stage.leading_ids(enc.tokenizer)
    for (text, ends), (vectors, aligned) in zip(texts, got, strict=True):
        ids, positions = dense_text_ids(enc.tokenizer, text, ends)
        with torch.no_grad():  # one text alone, no padding
            out = enc.model.model(input_ids=torch.tensor([lead + ids]), output_hidden_states=True)
        states = (out.last_hidden_state if layer == -1 else out.hidden_states[layer])[0]
        assert aligned.tolist() == [p >= 0 for p in positions] and aligned.any()
        for i, p in enumerate(positions):
            expected = states[len(lead) + p].numpy() if p >= 0 else np.zeros(states.shape[1])
            assert np.allclose(vectors[i], expected, atol=1e-5)
    header = dense_header_ids(enc.tokenizer, FMT, "commas in lists")
    with torch.no_grad():
        out = enc.model.model(input_ids=torch.tensor([header]), output_hidden_states=True)
    states = (out.last_hidden_state if layer == -1 else out.hidden_states[layer])[0]
    mean = states[len(lead) :].mean(dim=0).numpy()
    both = enc.interpretation_vectors(["a much longer interpretation of the latent", "commas in lists"])
    assert np.allclose(both[1], mean, atol=1e-5)  # padded beside a longer header, same as alone


def test_interpretation_vectors_are_computed_once_per_dictionary(tiny_model_dir, tmp_path):
    enc = encoder_of(tiny_model_dir)
    identity = {"base_model": str(tiny_model_dir), "adapter_sha256": None, "layer": -1}
    dictionary = ["the word mat", "commas", "numbers"]
    first, path = first_stage.interpretation_vectors(enc, dictionary, tmp_path, identity)
    assert enc.stats["interpretation_passes"] == 3 and path.is_file()
    again, path_again = first_stage.interpretation_vectors(enc, dictionary, tmp_path, identity)
    assert enc.stats["interpretation_passes"] == 3 and path_again == path  # read back, no pass
    assert np.array_equal(first, again)
    # Another dictionary, or another model, is another set of vectors.
    first_stage.interpretation_vectors(enc, dictionary[:2], tmp_path, identity)
    first_stage.interpretation_vectors(enc, dictionary, tmp_path, {**identity, "layer": 1})
    assert enc.stats["interpretation_passes"] == 3 + 2 + 3
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_top_k_ranks_recall_and_the_k_a_target_needs():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    truth = np.array([[True, False, False, True], [False, False, True, False]])
    ranks = first_stage.ranks_of_positives(scores, truth)
    assert ranks.tolist() == [0, 2, 1]  # latent 3 is third at token 0, latent 2 second at token 1
    assert first_stage.recall_at(ranks, [1, 2, 3]) == {"1": 1 / 3, "2": 2 / 3, "3": 1.0}
    assert first_stage.k_for_recall(ranks, 0.6, 4) == 2 and first_stage.k_for_recall(ranks, 1.0, 4) == 3
    proposed = first_stage.top_k(scores, 2, aligned=np.array([True, False]))
    assert proposed.tolist() == [[True, False, True, False], [False] * 4]
    assert first_stage.top_k(scores, 4).all() and first_stage.top_k(scores, 99).all()
    tied = first_stage.ranks_of_positives(np.zeros((1, 3)), np.array([[False, True, False]]))
    assert tied.tolist() == [2]  # ties count against the positive


def test_the_head_generalises_to_latents_it_never_saw():
    """Planted structure: a latent fires where its token vector points along its interpretation's direction.
    Fitted on 40 latents, the head ranks 40 others by their interpretation vectors alone."""
    rng = np.random.default_rng(0)
    d, n_latents, n_tokens = 24, 80, 3000
    directions = rng.normal(size=(n_latents, d))
    interpretations = directions + 0.1 * rng.normal(size=(n_latents, d))
    tokens = rng.normal(size=(n_tokens, d))
    truth = tokens @ directions.T > 2.5 * np.sqrt(d)
    seen, unseen = np.arange(40), np.arange(40, 80)
    t, j = np.nonzero(truth[:, seen])
    head, losses = first_stage.fit_head(
        tokens.astype(np.float32),
        np.column_stack([t, j]),
        interpretations[seen].astype(np.float32),
        np.zeros(40, dtype=np.float32),
        rank=d,  # the planted score is <token, direction>: full rank
        epochs=30,
        learning_rate=1e-2,
        batch_tokens=256,
        seed=0,
    )
    assert losses[-1] < losses[0]
    with torch.no_grad():
        side = head.latent_side(torch.from_numpy(interpretations[unseen].astype(np.float32)))
    scores = first_stage.text_scores(head, tokens.astype(np.float32), side, np.zeros(40))
    ranks = first_stage.ranks_of_positives(scores, truth[:, unseen])
    assert len(ranks) > 50
    chance = 4 / 40
    assert first_stage.recall_at(ranks, [4])["4"] > 5 * chance
    # The same head reading other latents' interpretations ranks at chance: it reads the interpretation.
    with torch.no_grad():
        wrong = head.latent_side(torch.from_numpy(interpretations[unseen][::-1].copy().astype(np.float32)))
    shuffled = first_stage.text_scores(head, tokens.astype(np.float32), wrong, np.zeros(40))
    assert (
        first_stage.recall_at(first_stage.ranks_of_positives(shuffled, truth[:, unseen]), [4])["4"]
        < 2 * chance
    )


def first_stage_args(assets, out) -> FirstStageArguments:
    return FirstStageArguments(
        eval_set=str(assets / "eval_set"),
        simulator=str(assets / "run"),
        rank=8,
        epochs=2,
        batch_tokens=64,
        validation_texts=2,
        tokens=8,
        batch_size=4,
        device="cpu",
        dtype="float32",
        output_dir=str(out),
    )


@pytest.fixture(scope="module")
def trained(assets):
    """The first stage of the tiny simulator and its record."""
    return load_script("train/first_stage.py").main(first_stage_args(assets, assets / "first_stage"))


def test_train_first_stage_on_the_simulators_rows_and_latents(assets, trained, tmp_path):
    from latentsim.eval_set import EvalSet
    from latentsim.held_out import training_rows_and_latents
    from latentsim.simulators import final_simulator

    args = first_stage_args(assets, tmp_path / "fs")
    train = load_script("train/first_stage.py").main
    record = train(args)
    assert record["k"] == trained["k"]  # seeded: the same head and k in another folder
    rows, latents = training_rows_and_latents(final_simulator(assets / "run"))
    eval_set = EvalSet.open(assets / "eval_set")
    explained = set(eval_set.interpretations())
    assert record["training"]["rows"] == len(rows)
    assert record["training"]["latents"] == len(explained & latents)
    assert not set(record["validation"]["rows"]) & rows  # k is chosen on held-out rows
    assert record["dictionary"] == len(explained) and 1 <= record["k"] <= len(explained)
    recall = record["validation"]["recall"]
    assert recall[str(record["k"])] >= 0.9 and recall["128"] == 1.0  # 128 > the tiny dictionary
    assert record["seconds"]["interpretation_vectors_computed"]
    head, saved = first_stage.load_head(tmp_path / "fs")
    assert saved["k"] == record["k"] and head.token_proj.out_features == 8
    # A rerun of the same config skips; a retrain reads the dictionary's vectors back.
    assert train(args) == record
    again = train(FirstStageArguments(**{**args.__dict__, "overwrite": True}))
    assert not again["seconds"]["interpretation_vectors_computed"]
    assert again["interpretation_vectors"] == record["interpretation_vectors"]
    assert json.loads((tmp_path / "fs" / "run_config.json").read_text())["stage"] == "first_stage"


def dense_scorer(model_dir, batch_size=3):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentsim.prompts import answer_token_ids
    from latentsim.simulators.hf import DenseScorer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    return DenseScorer(model, tok, answer_token_ids(FMT, tok), batch_size=batch_size, fmt=FMT)


INTERPRETATIONS = ["the word mat", "commas in lists", "the token the", "numbers", "a much longer one here"]
TEXTS = [("the cat sat on the mat", [3, 7, 11, 14, 18, 22]), ("a b, c", [1, 3, 4, 6])]


def test_the_judge_with_every_pair_proposed_is_judging_everything(tiny_model_dir):
    scorer = dense_scorer(tiny_model_dir)
    full = scorer.text_logits(INTERPRETATIONS, TEXTS)
    everything = [np.ones((len(INTERPRETATIONS), len(ends)), dtype=bool) for _, ends in TEXTS]
    again = scorer.text_logits(INTERPRETATIONS, TEXTS, proposed=everything)
    for a, b in zip(full, again, strict=True):
        assert np.array_equal(a, b, equal_nan=True)  # exactly: the same passes
    # A few pairs: those equal the full verdicts, the rest are not judged, and less is computed.
    rng = np.random.default_rng(0)
    some = [rng.random((len(INTERPRETATIONS), len(ends))) < 0.25 for _, ends in TEXTS]
    some[0][:, -1] = False  # nothing proposed at the last token: the text is cut before it
    some[1][2] = False  # latent 2 proposed nowhere in text 1: it skips the text
    before = scorer.stats["computed_tokens"]
    part = scorer.text_logits(INTERPRETATIONS, TEXTS, proposed=some)
    computed = scorer.stats["computed_tokens"] - before
    for a, b, wanted in zip(full, part, some, strict=True):
        judged = wanted & np.isfinite(a[..., 0])
        assert np.allclose(b[judged], a[judged], atol=1e-5)
        assert np.isnan(b[~judged]).all()
    ids = [len(dense_text_ids(scorer.tokenizer, t, e)[0]) for t, e in TEXTS]
    assert computed < len(INTERPRETATIONS) * sum(ids)
    # Nothing proposed: nothing computed, not even a header. One pair: its header and the text up to it.
    nothing = [np.zeros_like(w) for w in some]
    before = scorer.stats["computed_tokens"]
    assert all(np.isnan(x).all() for x in scorer.text_logits(INTERPRETATIONS, TEXTS, proposed=nothing))
    assert scorer.stats["computed_tokens"] == before
    one = [np.zeros_like(w) for w in some]
    one[0][4, 2] = True
    scorer.text_logits(INTERPRETATIONS, TEXTS, proposed=one)
    header = dense_header_ids(scorer.tokenizer, FMT, INTERPRETATIONS[4])
    position = dense_text_ids(scorer.tokenizer, *TEXTS[0])[1][2]
    assert scorer.stats["computed_tokens"] - before == len(header) + position + 1


def test_two_stage_keeps_what_only_the_judge_tells_apart(tiny_model_dir):
    """Latents 0 and 1 get the same first-stage score at every token (planted), so the first stage alone
    cannot tell them apart; proposed, each keeps the judge's own verdict, which differs."""
    from latentsim.whole_layer import simulator_p_yes

    scorer = dense_scorer(tiny_model_dir)
    enc = first_stage.Encoder(scorer.model, scorer.tokenizer, FMT)
    d = scorer.model.config.hidden_size
    head = first_stage.BilinearHead(d, d, 4)
    side = torch.zeros(len(INTERPRETATIONS), 4)
    side[:2] = 5.0  # latents 0 and 1: the same, far ahead of the others wherever the token side is positive
    stage = first_stage.FirstStage(head, {}, enc, side, np.zeros(len(INTERPRETATIONS), dtype=np.float32))
    with torch.no_grad():  # every token's side positive along the planted direction
        head.token_proj.weight.zero_()
        head.token_proj.bias.fill_(1.0)
    judge = simulator_p_yes(scorer, INTERPRETATIONS, TEXTS)
    first = stage.scores(TEXTS)
    two, timing = first_stage.two_stage_p_yes(scorer, stage, INTERPRETATIONS, TEXTS, k=2)
    for p_judge, (scores, aligned), p_two in zip(judge, first, two, strict=True):
        assert np.array_equal(scores[:, 0], scores[:, 1])  # the first stage cannot tell them apart
        assert not np.allclose(p_judge[aligned, 0], p_judge[aligned, 1])  # the judge can
        assert np.allclose(p_two[aligned][:, :2], p_judge[aligned][:, :2], atol=1e-5)  # kept
        assert (p_two[aligned][:, 2:] == 0).all() and np.isnan(p_two[~aligned]).all()  # never proposed
    assert timing["judgments"] == 2 * sum(int(a.sum()) for _, a in first) < timing["all_judgments"]
    # With k the dictionary's size the two stages are exactly the judge.
    everything, _ = first_stage.two_stage_p_yes(scorer, stage, INTERPRETATIONS, TEXTS, k=len(INTERPRETATIONS))
    for a, b in zip(judge, everything, strict=True):
        assert np.array_equal(a, b, equal_nan=True)


def test_whole_layer_in_two_stages(assets, trained, tmp_path):
    from latentsim.config import WholeLayerArguments

    whole = load_script("eval/whole_layer.py").main
    common = dict(
        eval_set=str(assets / "eval_set"),
        simulator=str(assets / "run"),
        first_stage=str(assets / "first_stage"),
        texts=2,
        tokens=8,
        calibration_texts=1,
        batch_size=4,
        thresholds=["0.5", "l0_matched"],
        references=[],
    )
    n = trained["dictionary"]
    result = whole(WholeLayerArguments(**common, first_stage_k=n, output_dir=str(tmp_path / "all")))
    sources = result["sources"]
    for label in ("0.5", "l0_matched"):  # every latent proposed: the two-stage rows are the simulator's
        for value in ("oracle", "median"):
            name = f"{label}:{value}:unexplained_zeroed"
            assert sources[f"two_stage@{name}"]["kl"]["mean"] == sources[f"sim@{name}"]["kl"]["mean"]
            assert f"first_stage@{name}" in sources
    stages = result["stages"]
    assert stages["two_stage"]["k"] == n and stages["two_stage"]["thresholds"] == result["thresholds"]
    same = stages["two_stage"]["recovery_minus_sim"]
    assert set(same) >= {"0.5:oracle:unexplained_zeroed", "l0_matched:median:unexplained_kept"}
    assert all(v["mean"] == 0 and v["ci95_texts"] == [0, 0] and v["n_texts"] == 2 for v in same.values())
    timing = stages["two_stage"]["timing"]
    assert sum(t["judgments"] for t in timing) == sum(t["all_judgments"] for t in timing)
    # The first stage's own k: fewer judgments; the scores say 0 (not flagged) where nothing was proposed.
    # Other k (1 and the whole dictionary) derived from the full judge's verdicts, no judging again.
    small = whole(
        WholeLayerArguments(
            **common,
            first_stage_ks=[1, n],
            first_stage_latents_per_text=[1, n],
            output_dir=str(tmp_path / "k"),
        )
    )
    timing = small["stages"]["two_stage"]["timing"]
    assert small["stages"]["two_stage"]["k"] == trained["k"]
    judged, every = sum(t["judgments"] for t in timing), sum(t["all_judgments"] for t in timing)
    assert judged == every * trained["k"] / n if trained["k"] < n else judged == every
    # Recall of the truly active latents and of the simulator's flags, at 8, 32, 128 and its k.
    recall = small["stages"]["first_stage"]["recall"]
    judged_rows = small["calibration_rows"] + small["rows"]
    flagged = sum(int((np.load(tmp_path / "k" / "scores" / f"row{r}.npy") >= 0.5).sum()) for r in judged_rows)
    assert recall["flagged_by_simulator@0.5"]["pairs"] == flagged
    got = recall["truly_active"]["recall"]
    assert recall["truly_active"]["pairs"] > 0
    assert set(got) == {"1", "8", "32", "128", str(n), str(trained["k"])} and got["128"] == 1.0
    assert got["8"] <= got["32"] <= got["128"]
    shard = np.load(tmp_path / "k" / "scores" / "two_stage" / f"row{small['rows'][0]}.npy")
    aligned = np.isfinite(shard).any(axis=1)
    assert ((shard[aligned] > 0).sum(axis=1) <= trained["k"]).all()
    # Derived at the real run's k they are the real run's verdicts; at k = n the simulator's own rows.
    check = small["stages"]["two_stage"]["derived_check"]
    assert check["pairs"] > 0 and check["max_abs_difference"] < 1e-4
    for name in ("0.5:oracle:unexplained_zeroed", "l0_matched:median:unexplained_zeroed"):
        full = small["sources"][f"sim@{name}"]["kl"]["mean"]
        for derived in (f"two_stage_k{n}@{name}", f"two_stage_per_text{n}@{name}"):
            assert small["sources"][derived]["kl"]["mean"] == pytest.approx(full, abs=1e-6)
    one = small["stages"]["two_stage_k1"]
    name = "l0_matched:oracle:unexplained_zeroed"  # paired over texts, the same point as the two recoveries
    apart = small["sources"][f"two_stage_k1@{name}"]["recovery"] - small["sources"][f"sim@{name}"]["recovery"]
    low, high = one["recovery_minus_sim"][name]["ci95_texts"]
    assert one["recovery_minus_sim"][name]["mean"] == pytest.approx(apart) and low <= apart <= high
    assert one["k"] == 1 and one["dense_judgments"] * n == one["all_dense_judgments"] == every
    assert 1 <= one["proposed_latents_per_text"] <= min(n, 8)
    # One latent per text, at every token: one pass of the judge per text.
    per_text = small["stages"]["two_stage_per_text1"]
    assert per_text["proposed_latents_per_text"] == 1 and per_text["dense_judgments"] * n == every
    assert small["stages"][f"two_stage_per_text{n}"]["recall_truly_active"] == 1.0
    assert 0 <= per_text["recall_truly_active"] < 1
    # The share of truly active pairs the top-1 proposes is the first stage's recall at 1, counted apart.
    assert one["recall_truly_active"] == pytest.approx(recall["truly_active"]["recall"]["1"])
    # Judged for real by text: one latent per text, one pass, its verdicts those derived from the full judge.
    by_text = whole(
        WholeLayerArguments(
            **common,
            first_stage_k=1,
            first_stage_per_text=True,
            first_stage_latents_per_text=[1],
            output_dir=str(tmp_path / "text"),
        )
    )
    real = by_text["stages"]["two_stage"]
    assert real["per_text"] and real["derived_check"]["max_abs_difference"] < 1e-4
    assert sum(t["judgments"] for t in real["timing"]) * n == every == real["all_dense_judgments"]
    assert real["recall_truly_active"] == per_text["recall_truly_active"]
    for name in ("0.5:oracle:unexplained_zeroed", "l0_matched:oracle:unexplained_zeroed"):
        derived = by_text["sources"][f"two_stage_per_text1@{name}"]["kl"]["mean"]
        assert by_text["sources"][f"two_stage@{name}"]["kl"]["mean"] == pytest.approx(derived, abs=1e-5)


def test_the_first_stage_is_a_registered_simulator(assets, trained, tiny_model_dir, tmp_path):
    """A first-stage folder in a sweep's run_dirs is scored as a simulator of kind `first_stage`: each
    judgment's verdict is the head's score of its text read alone against its interpretation's header."""
    import shutil

    import pandas as pd
    from peft import PeftModel

    from latentsim.config import EvalArguments
    from latentsim.errors import BadInputError
    from latentsim.eval_set import EvalSet
    from latentsim.prompts import unmark_context
    from latentsim.simulators import judgments_of, run_simulators

    (sim,) = run_simulators(assets / "first_stage")
    assert sim.kind == "first_stage" and sim.first_stage == str(assets / "first_stage") and sim.adapter
    sweep = load_script("eval/sweep.py").main
    args = dict(eval_set=str(assets / "eval_set"), batch_size=4, include_checkpoints=False)
    sweep(EvalArguments(**args, run_dirs=[str(assets / "first_stage")], output_dir=str(tmp_path / "eval")))
    root = tmp_path / "eval" / "eval_set" / "first_stage"
    assert json.loads((root / "results.json").read_text())["simulator"]["kind"] == "first_stage"
    preds = pd.read_parquet(root / "predictions_test.parquet")
    test = pd.read_parquet(assets / "eval_set" / "test.parquet")
    assert len(preds) == len(test) and (preds["logit_0"] == 0).all()
    # Naive: the head's full score matrix of the text's tokens against the dictionary, read at the pair.
    eval_set = EvalSet.open(assets / "eval_set")
    head, _ = first_stage.load_head(assets / "first_stage")
    encoder = encoder_of(tiny_model_dir)
    encoder.model = PeftModel.from_pretrained(encoder.model, str(assets / "run")).eval()
    judgments, _ = judgments_of(test.iloc[:5])
    for i, j in enumerate(judgments):
        text = "".join(unmark_context(j.context))
        ((vec, aligned),) = encoder.token_vectors([(text, [len(text)])])
        with torch.no_grad():
            side = head.latent_side(
                torch.from_numpy(encoder.interpretation_vectors([j.interpretation.strip()]))
            )
        rate = first_stage.log_firing_rate(eval_set.statistics, [j.latent])
        expected = first_stage.text_scores(head, vec, side, rate)[0, 0]
        assert aligned[0] and preds.loc[i, "logit_1"] == pytest.approx(float(expected), abs=1e-4)
    # Refused for another simulator's weights (the head records the adapter it read).
    other = tmp_path / "other"
    shutil.copytree(assets / "first_stage", other)
    record = json.loads((other / "first_stage.json").read_text())
    record["identity"]["adapter_sha256"] = "0" * 64
    (other / "first_stage.json").write_text(json.dumps(record))
    with pytest.raises(BadInputError, match="trained for another simulator"):
        sweep(EvalArguments(**args, run_dirs=[str(other)], output_dir=str(tmp_path / "eval2")))


def test_bench_two_stage_and_the_cost_model(tiny_model_dir, tmp_path):
    from latentsim.bench import bench_two_stage
    from latentsim.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(tiny_model_dir), dtype="float32", device="cpu")
    text, ends = TEXTS[0]
    results = bench_two_stage(model, tok, INTERPRETATIONS, text, ends, [10, 40], k=2, sample_latents=6)
    n_tokens = len(ends)
    for r, size in zip(results, (10, 40), strict=True):
        assert r["exact"] and r["latents"] == size
        assert r["judgments"] == {"every_latent": size * n_tokens, "two_stage": 2 * n_tokens}
        assert r["sampled_latents"] == min(6, r["proposed_latents"]) and r["proposed_latents"] <= 2 * n_tokens
        s = r["seconds_per_text"]
        assert s["two_stage"] == pytest.approx(s["first_stage"] + s["two_stage_judge"])
        # The bound: every one of the k x tokens proposals another latent, judged over the whole text.
        most = s["judge_every_latent"] * min(size, 2 * n_tokens) / size
        assert s["two_stage_at_most"] == pytest.approx(s["first_stage"] + most)
        # Cut after each latent's last proposed token: never more than judging every token computes.
        assert (
            r["two_stage_computed_tokens_per_proposed_latent"] <= r["every_latent_computed_tokens_per_latent"]
        )
    from latentsim.bench import two_stage_cost_model

    model_1000 = two_stage_cost_model(1000, 1e9, 100.0, n_tokens, 2, results[-1])
    per = results[-1]["every_latent_computed_tokens_per_latent"]
    assert model_1000["flop_per_text"]["judge_every_latent"] == pytest.approx(2e9 * 1000 * per)
    assert model_1000["proposed_latents_per_text"] == 2 * n_tokens
    assert model_1000["ratio"] > 1
