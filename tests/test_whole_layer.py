"""The whole layer rebuilt from a simulator's verdicts (latentsim.whole_layer): a perfect simulator equals the
SAE, a random one lands with the chance reference, and the metrics that say so."""

import numpy as np
import pytest
import torch
from helpers import build_tiny_sae

from latentsim import whole_layer
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
        flagged = whole_layer.decisions(
            rng.random((12, 64)).astype(np.float32), {"l0": threshold}, firing_rate, gen
        )
        kl_ce, _, _ = patched(
            subject,
            r,
            lambda z, f=flagged: whole_layer.layer_sources(z, everything, f, ["median"], medians, sae),
        )
        for k, (kl, _) in kl_ce.items():
            totals[k] = totals.get(k, 0.0) + kl.mean() / 5
    sim, chance = (
        totals["sim@l0:median:unexplained_zeroed"],
        totals["firing_rate_random:median:unexplained_zeroed"],
    )
    assert abs(sim - chance) < 0.25 * abs(sim - totals["sae"])
    assert sim > 2 * totals["sae"]


def test_l0_matched_threshold_flags_as_many_pairs_as_are_active():
    rng = np.random.default_rng(1)
    p = [rng.random((10, 30)).astype(np.float32), rng.random((5, 30)).astype(np.float32)]
    p[0][0, :4] = np.nan  # unaligned tokens are never flagged
    truth = [rng.random((10, 30)) < 0.1, rng.random((5, 30)) < 0.1]
    t = whole_layer.l0_matched_threshold(p, truth)
    flagged = sum(int((np.nan_to_num(x, nan=-1) >= t).sum()) for x in p)
    assert flagged == sum(int(x.sum()) for x in truth)
    assert whole_layer.l0_matched_threshold(p, [np.zeros((10, 30), bool), np.zeros((5, 30), bool)]) == 1.0


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


def test_summaries_give_recovery_between_floor_and_ceiling():
    positions = np.arange(32)
    kl_ce = {
        "sae": {"kl": np.full(32, 0.5), "ce": np.ones(32)},
        "no_latents": {"kl": np.full(32, 2.5), "ce": np.ones(32)},
        "half": {"kl": np.full(32, 1.5), "ce": np.ones(32)},
    }
    s = whole_layer.summarise_sources(kl_ce, positions // 8, seed=0)
    assert (s["sae"]["recovery"], s["no_latents"]["recovery"], s["half"]["recovery"]) == (1.0, 0.0, 0.5)
    noisy = whole_layer.mean_ci(np.random.default_rng(0).normal(1.0, 0.5, 400), np.arange(400) // 8, seed=0)
    assert noisy["ci95"][0] < noisy["mean"] < noisy["ci95"][1] and noisy["ci95"][1] - noisy["ci95"][0] < 0.3


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
