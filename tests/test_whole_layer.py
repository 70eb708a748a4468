"""The whole layer rebuilt from a simulator's verdicts (latentsim.whole_layer): a perfect simulator equals the
SAE, a random one lands with the chance reference, and the statistics that say so: intervals over texts,
chance over many draws, the held-out-only and mean-update references, metrics without positions 1-2, and
reference simulators judged through the factory."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import build_eval_set, build_tiny_sae, load_script, make_explained_cache

from latentsim import whole_layer
from latentsim.metrics import roc_auc
from latentsim.models import load_model_and_tokenizer

LAYER = 1


@pytest.fixture(scope="module")
def subject(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    sae = build_tiny_sae(d_in=16, d_sae=64, k=4)
    rows = torch.randint(4, 40, (6, 14), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = 1  # BOS
    return model, sae, rows


def patched(subject, row, sources_of):
    model, sae, rows = subject
    return whole_layer.patch_text(model, sae, rows[row, :13], rows[row, 2:14], LAYER, sources_of)


def test_a_perfect_simulator_rebuilds_the_sae_exactly(subject):
    _, sae, _ = subject
    medians = torch.rand(64) + 0.1
    everything = torch.arange(64)
    half = torch.arange(0, 64, 2)

    def sources(z, explained):
        truth = z[:, explained] > 0
        return whole_layer.layer_sources(
            z, explained, {"sim@perfect": truth}, ["oracle", "median"], medians, sae
        )

    kl_ce, z, _ = patched(subject, 0, lambda z: sources(z, everything))
    assert (z > 0).sum(1).eq(4).all()
    assert np.allclose(kl_ce["sim@perfect:oracle:unexplained_zeroed"][0], kl_ce["sae"][0], atol=1e-6)
    assert kl_ce["sae"][0].mean() < kl_ce["no_latents"][0].mean()
    # Median values move the layer (the true ones were not all the medians).
    assert not np.allclose(kl_ce["sim@perfect:median:unexplained_zeroed"][0], kl_ce["sae"][0], atol=1e-4)
    # Half the latents explained: kept unexplained ones complete the SAE; zeroed ones leave its explained
    # part.
    kl_ce, _, _ = patched(subject, 0, lambda z: sources(z, half))
    assert np.allclose(kl_ce["sim@perfect:oracle:unexplained_kept"][0], kl_ce["sae"][0], atol=1e-6)
    assert np.allclose(
        kl_ce["sim@perfect:oracle:unexplained_zeroed"][0], kl_ce["sae:explained_only"][0], atol=1e-6
    )
    assert not np.allclose(kl_ce["sae:explained_only"][0], kl_ce["sae"][0], atol=1e-4)
    norms = sae.W_dec.norm(dim=1)
    assert whole_layer.controlled_share(z, everything, norms)["share_of_decoded_norm"] == pytest.approx(1.0)
    share = whole_layer.controlled_share(z, half, norms)
    assert share["share_of_active_latents"] == pytest.approx(float((z[:, half] > 0).sum() / (z > 0).sum()))
    assert 0 < share["share_of_decoded_norm"] < 1 and share["active_latents"] == 4


def test_a_random_simulator_lands_with_the_chance_reference_not_the_sae(subject):
    """P(yes) drawn at random, thresholded to flag as many latents as are active on a calibration text: its KL
    is the firing-rate reference's (both flag latents at chance), far from the SAE's."""
    _, sae, _ = subject
    rng = np.random.default_rng(0)
    everything = torch.arange(64)
    medians = torch.full((64,), 1.0)
    truths = [
        patched(subject, r, lambda z: {"sae": sae.decode(z), "no_latents": sae.decode(z * 0)})[1] > 0
        for r in range(6)
    ]
    firing_rate = torch.stack(truths).float().mean((0, 1))
    calibration_p = rng.random((12, 64))
    threshold = whole_layer.l0_matched_threshold([calibration_p], [truths[0].numpy()])
    gen = torch.Generator().manual_seed(0)
    totals = {}
    for r in range(1, 6):
        flagged = whole_layer.decisions(rng.random((12, 64)).astype(np.float32), {"l0": threshold})
        flagged |= whole_layer.chance_decisions(firing_rate, 12, 4, gen)
        kl_ce, _, _ = patched(
            subject,
            r,
            lambda z, f=flagged: whole_layer.layer_sources(z, everything, f, ["median"], medians, sae),
        )
        kl_ce, _ = whole_layer.average_draws(kl_ce)
        for k, (kl, _) in kl_ce.items():
            totals[k] = totals.get(k, 0.0) + kl.mean() / 5
    sim, chance = (
        totals["sim@l0:median:unexplained_zeroed"],
        totals["firing_rate_random:median:unexplained_zeroed"],
    )
    assert abs(sim - chance) < 0.25 * abs(sim - totals["sae"])
    assert sim > 2 * totals["sae"]


def test_chance_is_the_mean_of_independent_draws_with_their_spread(subject):
    """The chance source's KL at every position is the mean of its draws' KLs, each draw computed here on its
    own (its flags drawn from the same generator, its layer decoded by hand); the draws differ, so their
    recoveries spread, and their mean is the averaged source's recovery."""
    _, sae, _ = subject
    everything, medians, rate = torch.arange(64), torch.rand(64) + 0.5, torch.full((64,), 0.08)
    draws = 6
    flagged = whole_layer.chance_decisions(rate, 12, draws, torch.Generator().manual_seed(7))
    kl_ce, _, _ = patched(
        subject,
        1,
        lambda z: whole_layer.layer_sources(z, everything, flagged, ["median"], medians, sae),
    )
    sources, per_draw = whole_layer.average_draws(kl_ce)
    assert not any("#" in name for name in sources) and per_draw["median:unexplained_zeroed"].shape == (6, 12)
    gen = torch.Generator().manual_seed(7)
    alone = []
    for _ in range(draws):
        flags = torch.rand((12, 64), generator=gen) < rate[None, :]
        layer = sae.decode(torch.where(flags, medians.expand(12, -1), torch.zeros(12, 64)))
        alone.append(patched(subject, 1, lambda z, layer=layer: {"draw": layer})[0]["draw"][0])
    assert np.allclose(
        sources["firing_rate_random:median:unexplained_zeroed"][0], np.mean(alone, 0), atol=1e-5
    )
    assert np.allclose(per_draw["median:unexplained_zeroed"], np.stack(alone), atol=1e-5)
    positions = np.zeros(12)
    summary = whole_layer.summarise_sources(
        {k: {"kl": kl, "ce": ce} for k, (kl, ce) in sources.items()}, positions, positions, seed=0
    )
    spread = whole_layer.chance_spread(per_draw, summary)["firing_rate_random:median:unexplained_zeroed"]
    by_hand = [
        (summary["no_latents"]["kl"]["mean"] - a.mean())
        / (summary["no_latents"]["kl"]["mean"] - summary["sae"]["kl"]["mean"])
        for a in alone
    ]
    assert spread["draws"] == 6 and np.allclose(spread["recovery_per_draw"], by_hand, atol=1e-4)
    assert spread["recovery_std"] == pytest.approx(np.std(by_hand, ddof=1), abs=1e-4)
    assert spread["recovery_std"] > 0 and spread["recovery_min"] < spread["recovery_max"]
    assert spread["recovery_mean"] == pytest.approx(
        summary["firing_rate_random:median:unexplained_zeroed"]["recovery"], abs=1e-6
    )


def test_held_out_only_sources_keep_or_zero_the_latents_the_simulator_trained_on():
    """Every explained latent trained on: kept, the simulator decides nothing (`sae:explained_only`, or the
    SAE with unexplained latents kept); zeroed, nothing is left (`no_latents`). None trained on: the
    simulator's own sources. In between, kept minus zeroed is the trained latents' decoded contribution."""
    sae = build_tiny_sae(d_in=16, d_sae=64, k=4)
    z = sae.encode(torch.randn(10, 16, generator=torch.Generator().manual_seed(1)))
    explained = torch.arange(0, 64, 2)
    flagged = {
        "sim@0.5": torch.rand(10, 32, generator=torch.Generator().manual_seed(2)) < 0.3,
        "ref:prior@0.5": torch.rand(10, 32) < 0.3,
    }
    medians = torch.rand(64) + 0.2

    def sources(trained):
        return whole_layer.layer_sources(z, explained, flagged, ["median"], medians, sae, trained)

    def same(a, b):
        return torch.allclose(a, b, atol=1e-6)

    every = sources(torch.ones(32, dtype=torch.bool))
    head = "sim@0.5:median:unexplained"
    assert same(every[f"{head}_zeroed:held_out_only:trained_kept"], every["sae:explained_only"])
    assert same(every[f"{head}_kept:held_out_only:trained_kept"], every["sae"])
    assert same(every[f"{head}_zeroed:held_out_only:trained_zeroed"], every["no_latents"])
    assert same(every["sae:held_out_only"], every["no_latents"])
    none = sources(torch.zeros(32, dtype=torch.bool))
    for unexplained in ("zeroed", "kept"):
        for trained in ("kept", "zeroed"):
            assert same(
                none[f"{head}_{unexplained}:held_out_only:trained_{trained}"], none[f"{head}_{unexplained}"]
            )
    assert same(none["sae:held_out_only"], none["sae:explained_only"])
    assert not any(
        "held_out_only" in name for name in none if name.startswith("ref:")
    )  # the simulator's only
    some = torch.arange(32) % 3 == 0
    mixed = sources(some)
    trained_part = torch.zeros_like(z)
    trained_part[:, explained[some]] = z[:, explained[some]]
    difference = (
        mixed[f"{head}_zeroed:held_out_only:trained_kept"]
        - mixed[f"{head}_zeroed:held_out_only:trained_zeroed"]
    )
    assert (trained_part > 0).any() and same(difference, sae.decode(trained_part) - sae.decode(z * 0))
    assert "sim@0.5:median:unexplained_zeroed:held_out_only:trained_kept" not in sources(None)


def test_mean_update_is_the_mean_reconstruction_of_the_calibration_positions():
    sae = build_tiny_sae(d_in=16, d_sae=64, k=4)
    gen = torch.Generator().manual_seed(3)
    calibration = [sae.encode(torch.randn(n, 16, generator=gen)) for n in (7, 5)]
    mean = whole_layer.mean_update_vector(calibration, sae)
    assert torch.allclose(mean, sae.decode(torch.cat(calibration)).mean(0), atol=1e-6)
    z = sae.encode(torch.randn(4, 16, generator=gen))
    out = whole_layer.layer_sources(z, torch.arange(64), {}, ["median"], torch.ones(64), sae, None, mean)
    assert out["mean_update"].shape == (4, 16) and torch.equal(out["mean_update"], mean.expand(4, -1))


def test_intervals_over_texts_cover_their_spread_and_collapse_when_texts_agree():
    """Four texts of 16 positions, each recovering a known share (0.8, 0.6, 0.4, 0.2) of the way from no
    latents (KL 2) to the SAE (KL 0): the interval over texts lies within their spread around its mean 0.5;
    four identical texts give a point; one text gives none."""
    texts, positions = np.repeat(np.arange(4), 16), np.tile(np.arange(16), 4)
    blocks = texts * 100 + positions // 8

    def sources(per_text_kl):
        kl = np.asarray(per_text_kl, dtype=float)[texts]
        return {
            "sae": {"kl": np.zeros(64), "ce": np.ones(64)},
            "no_latents": {"kl": np.full(64, 2.0), "ce": np.ones(64)},
            "mean_update": {"kl": np.full(64, 1.5), "ce": np.ones(64)},
            "sim": {"kl": kl, "ce": kl + 1},
        }

    s = whole_layer.summarise_sources(sources([0.4, 0.8, 1.2, 1.6]), blocks, texts, seed=0)["sim"]
    low, high = s["recovery_ci95_texts"]
    assert s["recovery"] == pytest.approx(0.5) and 0.2 <= low < 0.5 < high <= 0.8 and high - low > 0.15
    assert s["kl"]["n_texts"] == 4 and s["kl"]["ci95_texts"][0] < 1.0 < s["kl"]["ci95_texts"][1]
    assert s["recovery_from_mean_update"] == pytest.approx((1.5 - 1.0) / 1.5)
    assert s["recovery_from_mean_update_ci95_texts"][0] < s["recovery_from_mean_update"]
    same = whole_layer.summarise_sources(sources([1.0] * 4), blocks, texts, seed=0)["sim"]
    assert same["recovery_ci95_texts"] == pytest.approx([0.5, 0.5]) and same["kl"][
        "ci95_texts"
    ] == pytest.approx([1.0, 1.0])
    one = whole_layer.summarise_sources(
        {k: {m: v[m][:16] for m in v} for k, v in sources([0.4] * 4).items()}, blocks[:16], texts[:16], seed=0
    )["sim"]
    assert (
        one["recovery_ci95_texts"] is None and one["kl"]["ci95_texts"] is None and one["kl"]["n_texts"] == 1
    )
    assert one["recovery"] == pytest.approx(0.8) and one["kl"]["ci95"] == pytest.approx([0.4, 0.4])


def test_l0_matched_threshold_flags_as_many_pairs_as_are_active():
    rng = np.random.default_rng(1)
    p = [rng.random((10, 30)).astype(np.float32), rng.random((5, 30)).astype(np.float32)]
    p[0][0, :4] = np.nan  # unaligned tokens are never flagged
    truth = [rng.random((10, 30)) < 0.1, rng.random((5, 30)) < 0.1]
    t = whole_layer.l0_matched_threshold(p, truth)
    flagged = sum(int((np.nan_to_num(x, nan=-1) >= t).sum()) for x in p)
    assert flagged == sum(int(x.sum()) for x in truth)
    assert whole_layer.l0_matched_threshold(p, [np.zeros((10, 30), bool), np.zeros((5, 30), bool)]) == 1.0
    # Two values only (a string match): 20 pairs truly active, 12 matched; flagging the tied non-matches too
    # (all 300 pairs) would be far further from 20 than flagging the matches alone.
    two = np.full((10, 30), 0.1)
    two.flat[:12] = 0.8
    active = np.zeros((10, 30), bool)
    active.flat[100:120] = True
    assert whole_layer.l0_matched_threshold([two], [active]) == pytest.approx(0.8)
    active.flat[100:290] = True  # 190 active: all 300 flagged is nearer than 12
    assert whole_layer.l0_matched_threshold([two], [active]) == pytest.approx(0.1)


def test_judgment_metrics_give_a_firing_rate_simulator_no_per_latent_skill():
    rng = np.random.default_rng(2)
    rate = rng.uniform(0.02, 0.4, 40)
    truth = rng.random((200, 40)) < rate[None, :]
    trained = np.arange(40) < 25
    thresholds = {"0.5": 0.5}
    prior_sim = np.broadcast_to(rate[None, :], truth.shape).astype(np.float32)
    m = whole_layer.judgment_metrics(prior_sim, truth, trained, rate, thresholds, seed=0)
    assert m["all"]["auc_pooled"] == pytest.approx(m["all"]["prior_auc_pooled"])
    assert m["all"]["auc_pooled"] > 0.6  # frequency alone ranks pooled pairs well...
    assert m["all"]["per_latent_auc"]["median"] == pytest.approx(
        0.5
    )  # ...and says nothing about when a latent fires
    assert (m["trained_on"]["latents"], m["held_out"]["latents"]) == (25, 15)
    perfect = whole_layer.judgment_metrics(truth.astype(np.float32), truth, trained, rate, thresholds, 0)
    assert perfect["all"]["per_latent_auc"]["median"] == 1.0 and perfect["all"]["auc_pooled"] == 1.0
    at = perfect["all"]["thresholds"]["0.5"]
    assert at["recall"] == 1.0 and at["precision"] == 1.0
    assert at["flagged_per_position"] == pytest.approx(truth.sum(1).mean())


def test_judgment_metrics_without_positions_1_2_drop_a_latent_that_fires_after_bos():
    """A latent that fires at position 1 of every text (and at random elsewhere), with P(yes) high there and
    uninformative elsewhere: its per-latent AUC is high over all positions, chance from position 3 on."""
    rng = np.random.default_rng(4)
    positions = np.tile(np.arange(1, 33), 8)
    truth = (positions == 1) | (rng.random(len(positions)) < 0.05)
    p = np.where(positions == 1, 0.95, rng.random(len(positions)))
    m = whole_layer.judgments_by_position(
        p[:, None], truth[:, None], positions, np.array([False]), np.array([0.2]), {"0.5": 0.5}, seed=0
    )
    every, late = m["judgments"]["all"], m["judgments_from_position_3"]["all"]
    later = positions >= 3
    assert every["pairs"] == 256 and late["pairs"] == 240
    assert every["per_latent_auc"]["median"] == pytest.approx(roc_auc(p, truth))
    assert late["per_latent_auc"]["median"] == pytest.approx(roc_auc(p[later], truth[later]))
    # 8 position-1 firings ranked first among ~20 firings: ~0.7 with them, ~0.5 (chance) without.
    assert every["per_latent_auc"]["median"] > 0.65 and abs(late["per_latent_auc"]["median"] - 0.5) < 0.12
    assert every["thresholds"]["0.5"]["recall"] > late["thresholds"]["0.5"]["recall"]
    only_early = whole_layer.judgments_by_position(
        p[:2, None], truth[:2, None], positions[:2], np.array([False]), np.array([0.2]), {}, seed=0
    )
    assert only_early["judgments_from_position_3"] is None


def test_patching_only_the_judged_positions_keeps_the_others_clean(subject):
    """positions: last. A source patched at the judged positions only equals patching everywhere a layer
    output that is the clean one elsewhere; the KL/CE come back for the judged positions alone."""
    model, sae, rows = subject
    from latentsim.patching import clean_pass

    judged = np.array([4, 11])
    only, _, clean_ce = whole_layer.patch_text(
        model, sae, rows[0, :13], rows[0, 2:14], LAYER, lambda z: {"sae": sae.decode(z)}, judged
    )
    _, _, x_out, _ = clean_pass(model, rows[0, :13], LAYER)
    _, z, _ = patched(subject, 0, lambda z: {"sae": sae.decode(z)})
    mixed = x_out[1:].clone()
    mixed[judged] = sae.decode(z)[judged].to(mixed.dtype)
    everywhere, _, full_ce = patched(subject, 0, lambda z: {"mixed": mixed})
    assert only["sae"][0].shape == (2,) and clean_ce.shape == (2,)
    assert np.allclose(only["sae"][0], everywhere["mixed"][0][judged], atol=1e-6)
    assert np.allclose(clean_ce, full_ce[judged]) and (only["sae"][0] > 0).all()


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    root = tmp_path_factory.mktemp("whole_layer")
    make_explained_cache(root, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    return build_eval_set(root, tiny_model_dir)


def test_references_judge_the_whole_layer_beside_the_simulator(eval_set, tiny_model_dir, tmp_path):
    """A prompted simulator at each text's last position with two references built through the factory: each
    reference's P(yes) at every position is its per-judgment P(yes) of that position's context; its sources,
    thresholds and judgment metrics sit beside the simulator's; intervals over the 2 texts, chance over its
    draws, mean_update from the calibration texts."""
    from transformers import AutoTokenizer

    from latentsim.config import WholeLayerArguments
    from latentsim.eval_set import EvalSet
    from latentsim.prompts import marked_context
    from latentsim.simulators import (
        Judgment,
        ScorerFactory,
        ScoringOptions,
        baseline_simulator,
        probabilities,
    )

    whole = load_script("eval/whole_layer.py")
    args = WholeLayerArguments(
        eval_set=str(eval_set),
        baseline=f"name=zero-shot,model={tiny_model_dir}",
        references=["prior", "string_match", "lexical"],
        positions="last",
        texts=2,
        tokens=8,
        calibration_texts=2,
        chance_draws=3,
        batch_size=8,
        output_dir=str(tmp_path / "whole"),
    )
    result = whole.main(args)
    assert set(result["references"]) == {"prior", "string_match", "lexical"}
    for name in ("prior", "string_match", "lexical"):
        ref = result["references"][name]
        assert ref["model"] == name and set(ref["thresholds"]) == {"0.5", "l0_matched"}
        assert ref["judgments"]["all"]["latents"] == result["explained_latents"]
        for source in (
            f"ref:{name}@l0_matched:median:unexplained_zeroed",
            f"ref:{name}@0.5:oracle:unexplained_kept",
        ):
            assert source in result["sources"]
    s = result["sources"]
    assert (
        s["sae"]["recovery"] == 1.0
        and s["no_latents"]["recovery"] == 0.0
        and s["mean_update"]["recovery_from_mean_update"] == 0.0
    )
    assert all(v["kl"]["n_texts"] == 2 and v["kl"]["ci95_texts"] is not None for v in s.values())
    chance = result["chance"]["firing_rate_random:median:unexplained_zeroed"]
    assert chance["draws"] == 3 and len(chance["recovery_per_draw"]) == 3
    assert result["held_out_only"] == {
        "trained_on_latents": 0,
        "held_out_latents": result["explained_latents"],
        "sources": False,
    }
    assert result["mean_update"]["calibration_positions"] == 2 * 8
    table = pd.read_parquet(tmp_path / "whole" / "per_position.parquet")
    assert len(table) == 2 * len(s) and set(table["position"]) == {8}
    printed = whole_layer.format_table(result)
    assert (
        "95% CIs resample the 2 texts" in printed
        and f"reference string_match, all latents ({result['explained_latents']})" in printed
    )

    # Each reference's saved P(yes) at every position of a text: its per-judgment P(yes) there, through the
    # factory as eval/sweep.py builds it.
    data = EvalSet.open(eval_set)
    interpretations = data.interpretations()
    explained = sorted(interpretations)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    factory = ScorerFactory(ScoringOptions())
    row = result["calibration_rows"][0]
    ids = data.tokens[row, :9].tolist()
    for name in ("prior", "string_match", "lexical"):
        from latentsim.config.eval import parse_baseline

        sim = baseline_simulator(parse_baseline(f"model={name}"))
        scorer = factory.load(factory.prepare(sim, "sim_v1", eval_set=data, seed=args.seed))
        saved = np.load(tmp_path / "whole" / "scores" / name / f"row{row}.npy")
        assert saved.shape == (8, len(explained))
        for position in (1, 5, 8):
            context = marked_context(tok.decode(ids[1:position]), tok.decode(ids[position : position + 1]))
            judgments = [  # located in the cache: the lexical reader reads the previous token there
                Judgment(context, interpretations[lat], latent=lat, row=row, position=position)
                for lat in explained
            ]
            assert np.allclose(
                saved[position - 1], probabilities(scorer.label_logits(judgments))[:, 1], atol=1e-6
            )
    # The string match flags latents by the judged token: its P(yes) varies along the text; the prior's not.
    prior = np.load(tmp_path / "whole" / "scores" / "prior" / f"row{row}.npy")
    matched = np.load(tmp_path / "whole" / "scores" / "string_match" / f"row{row}.npy")
    assert np.allclose(prior, prior[:1]) and not np.allclose(matched, matched[:1])
    # A rerun reuses every text's scores and returns the finished results.
    assert whole.main(args) == json.loads((tmp_path / "whole" / "results.json").read_text())


def test_results_written_before_texts_intervals_still_print():
    """A results.json of the one-text layout (block CIs only, no chance draws, references or positions 3+)
    still prints, with its missing intervals shown as such."""
    from latentsim.tables import whole_layer_rows

    def source(kl, recovery):
        return {
            "kl": {"mean": kl, "ci95": [kl - 0.1, kl + 0.1], "n_positions": 32},
            "ce": {"mean": 6.0},
            **recovery,
        }

    group = {
        "latents": 10,
        "auc_pooled": 0.9,
        "prior_auc_pooled": 0.7,
        "per_latent_auc": {"median": 0.95, "ci95": [0.9, 1.0], "latents": 8},
        "thresholds": {
            "0.5": {"threshold": 0.5, "flagged_per_position": 2.0, "active_per_position": 3.0, "recall": 0.4}
        },
    }
    old = {
        "rows": [7],
        "tokens_per_text": 32,
        "explained_latents": 10,
        "prompt_format": "sim_dense_v1",
        "timing": [{"rows": [3, 7], "seconds": 10.0, "judgments": 640, "computed_tokens_per_judgment": 2.0}],
        "controlled": {"share_of_active_latents": 0.5, "share_of_decoded_norm": 0.6, "active_latents": 4.0},
        "sources": {
            "clean": source(0.0, {"recovery": 9.0}),
            "sae": source(0.5, {"recovery": 1.0}),
            "no_latents": source(2.5, {"recovery": 0.0}),
        },
        "judgments": {"all": group},
    }
    rows = whole_layer_rows(old)
    assert rows[1] == {
        "source": "sae",
        "KL [95% CI texts]": "0.500 [-]",
        "KL [95% CI blocks]": "0.500 [0.400, 0.600]",
        "CE": "6.000",
        "recovery [95% CI texts]": "1.00 [-]",
        "from mean_update": "-",
    }
    printed = whole_layer.format_table(old).splitlines()
    assert "these older results have none over texts" in printed[1]
    assert printed[-1].startswith("  simulator, all latents (10): pooled AUC 0.900")
    assert "recovery = (KL_floor - KL)" in whole_layer.headline(old)
