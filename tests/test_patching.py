"""Patching: exact against naive full passes, KL direction and zero, error term restores the clean model."""

import pytest
import torch
from helpers import build_tiny_sae

from latentsim.models import load_model_and_tokenizer
from latentsim.patching import all_positions_logits, clean_pass, judged_logits, keep_fraction, kl_and_ce
from latentsim.sae import decoder_layers


def naive_patched_logits(model, ids, layer, vector, position):
    """A full forward with the layer output at one position replaced (the reference)."""

    def hook(_m, _i, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[0, position] = vector
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        return model(input_ids=ids[None], use_cache=False).logits[0].float()
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_judged_and_all_position_patches_equal_naive_forwards(arch, tiny_model_dir, tiny_gemma_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir if arch == "llama" else tiny_gemma_dir))
    ids = torch.randint(4, 40, (12,), generator=torch.Generator().manual_seed(0))
    ids[0] = 1
    logits, x_in, x_out, cache = clean_pass(model, ids, layer=1)
    assert torch.allclose(logits, model(input_ids=ids[None]).logits[0].float(), atol=1e-5)
    vectors = torch.stack([x_out[-1], x_in[-1], torch.randn(16), 3 * torch.randn(16)])
    fast = judged_logits(model, ids, 1, cache, vectors)
    for i, v in enumerate(vectors):
        assert torch.allclose(fast[i], naive_patched_logits(model, ids, 1, v, len(ids) - 1)[-1], atol=1e-4)
    assert torch.allclose(fast[0], logits[-1], atol=1e-4)  # patching in the clean vector changes nothing
    assert (fast[2] - logits[-1]).abs().max() > 1e-3  # a random vector does: the check can fail
    assert cache.get_seq_length() == len(ids) - 1  # the clean prefix cache was not consumed
    per_pos = torch.stack([x_out[1:], x_in[1:]])
    full = all_positions_logits(model, ids, 1, per_pos)
    assert torch.allclose(full[0], logits, atol=1e-4)
    assert (full[1] - logits).abs().max() > 1e-3


def test_sae_plus_error_restores_the_clean_logits(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    sae = build_tiny_sae(d_in=16, d_sae=64, k=4)
    ids = torch.tensor([1, 5, 9, 12, 7, 30, 22])
    logits, _, x_out, cache = clean_pass(model, ids, 1)
    recon = sae.decode(sae.encode(x_out))
    error = x_out - recon
    patched = judged_logits(model, ids, 1, cache, torch.stack([recon[-1] + error[-1], recon[-1]]))
    kl, ce = kl_and_ce(logits[-1], patched, torch.tensor(3))
    assert kl[0].abs() < 1e-6 and kl[1] > 1e-6


def test_kl_direction_zero_and_ce():
    p = torch.tensor([[2.0, 0.0, -1.0]])
    q = torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, -1.0]])
    kl, ce = kl_and_ce(p, q, torch.tensor(1), chunk=1)
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    assert kl[0] == pytest.approx(float((lp.exp() * (lp - lq[0])).sum()))  # KL(clean || patched)
    assert kl[0] != pytest.approx(float((lq[0].exp() * (lq[0] - lp)).sum()))  # not the reverse
    assert kl[1] == pytest.approx(0.0, abs=1e-12)
    assert ce[0] == pytest.approx(float(-lq[0, 1]))


def test_keep_fraction_top_and_random():
    z = torch.tensor([[0.0, 5.0, 1.0, 3.0, 0.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert keep_fraction(z, 0.5, "top", g).tolist() == [[0.0, 5.0, 0.0, 3.0, 0.0, 0.0]]
    assert torch.equal(keep_fraction(z, 1.0, "random", g), z) and not keep_fraction(z, 0.0, "top", g).any()
    kept = keep_fraction(z, 0.5, "random", g)
    assert (kept > 0).sum() == 2 and torch.equal(kept[kept > 0], z[kept > 0])  # true values of real actives


def test_value_from_digits_maps_through_deciles():
    from latentsim.patching import value_from_digits

    edges = torch.tensor([[float(i) for i in range(11)], [0.0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 10]])
    out = value_from_digits(edges, torch.tensor([0.0, 9.0]))
    assert out.tolist() == [0.5, 7.5]  # an exact digit d: the middle of decile d
    assert value_from_digits(edges[:1], torch.tensor([4.5])).item() == pytest.approx(5.0)
    assert value_from_digits(edges[1:], torch.tensor([8.0])).item() == pytest.approx(4.5)
    assert value_from_digits(edges[1:], torch.tensor([12.0])).item() == pytest.approx(7.5)  # clamped to 9
