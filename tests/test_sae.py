"""Residual hooks, sparse encoding, SAE loading and training."""

import pytest
import torch
from helpers import build_tiny_sae

from latentsim.config import SAEArguments
from latentsim.models import load_model_and_tokenizer
from latentsim.sae import (
    check_hookpoint,
    drop_norm_outliers,
    encode_dense_nonzero,
    encode_sparse,
    fraction_variance_explained,
    load_sae,
    residual_at,
    sae_quality,
    train_topk_sae,
)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_gemma_dir"])
def test_residual_at_stops_early_and_matches_hidden_states(fixture, request):
    model, _ = load_model_and_tokenizer(str(request.getfixturevalue(fixture)))
    ids = torch.randint(4, 40, (2, 10))
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in (0, 1):  # hidden_states[i + 1] is the output of layer i (the last one is post-norm)
        assert torch.allclose(residual_at(model, ids, layer, stop=True), hidden[layer + 1], atol=1e-6)
        assert torch.allclose(residual_at(model, ids, layer, stop=False), hidden[layer + 1], atol=1e-6)
    # Stopping really skips later layers.
    ran = []
    hook = model.model.layers[2].register_forward_hook(lambda *a: ran.append(1))
    residual_at(model, ids, 1, stop=True)
    assert ran == []
    residual_at(model, ids, 1, stop=False)
    assert ran == [1]
    hook.remove()


def test_hookpoint_out_of_range(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    assert check_hookpoint(model, "layers.2") == 2
    with pytest.raises(ValueError, match="only 3 layers"):
        check_hookpoint(model, "layers.3")


def test_sparse_topk_encoding_equals_dense_nonzero():
    sae = build_tiny_sae(d_in=16, d_sae=64, k=4)
    x = torch.randn(50, 16) * 3
    tok, lat, val = encode_sparse(sae, x)
    dtok, dlat, dval = encode_dense_nonzero(sae, x)
    assert torch.equal(tok, dtok) and torch.equal(lat, dlat)
    assert torch.allclose(val, dval, atol=1e-6)
    assert torch.bincount(tok, minlength=50).max() <= 4
    dense = sae.encode(x)
    assert torch.allclose(dense[tok, lat], val, atol=1e-6) and int((dense != 0).sum()) == len(val)


def test_load_sae_checks_folder_width_and_hookpoint(tiny_sae_dir, tmp_path):
    sae = load_sae(SAEArguments(hookpoint="layers.1", sae_path=str(tiny_sae_dir)), d_model=16)
    assert sae.cfg.d_sae == 64
    with pytest.raises(ValueError, match="d_in=16 .* d_model=32"):
        load_sae(SAEArguments(hookpoint="layers.1", sae_path=str(tiny_sae_dir)), d_model=32)
    with pytest.raises(ValueError, match="trained on 'layers.1'"):
        load_sae(SAEArguments(hookpoint="layers.2", sae_path=str(tiny_sae_dir)), d_model=16)
    with pytest.raises(FileNotFoundError, match="sae_path"):
        load_sae(SAEArguments(hookpoint="layers.1", sae_path=str(tmp_path)))


def test_fve_definition():
    x = torch.randn(100, 8)
    assert fraction_variance_explained(x, x) == pytest.approx(1.0)
    assert fraction_variance_explained(x, x.mean(0, keepdim=True).expand_as(x)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_topk_training_recovers_a_sparse_dictionary(tmp_path):
    # Data built from a known sparse code: a working trainer must explain most of its variance.
    gen = torch.Generator().manual_seed(0)
    true_dec = torch.nn.functional.normalize(torch.randn(32, 16, generator=gen), dim=1)
    codes = torch.zeros(4096, 32)
    idx = torch.randint(0, 32, (4096, 2), generator=gen)
    codes.scatter_(1, idx, torch.rand(4096, 2, generator=gen) * 4 + 1)
    x = codes @ true_dec + 5.0  # an offset, like a residual stream's mean
    sae = train_topk_sae(
        x,
        d_sae=64,
        k=4,
        training_tokens=120_000,
        batch_size=256,
        lr=3.0e-3,
        lr_end_fraction=0.1,
        seed=0,
        hook_name="layers.0",
        model_name="synthetic",
    )
    sae.save_inference_model(str(tmp_path))
    from sae_lens import SAE

    loaded = SAE.load_from_disk(str(tmp_path))
    quality = sae_quality(loaded, x)
    assert quality["fve"] > 0.8
    assert quality["l0"] <= 4.0
    assert torch.allclose(loaded.decode(loaded.encode(x[:10])), sae.decode(sae.encode(x[:10])), atol=1e-4)


def test_norm_outliers_are_dropped():
    x = torch.randn(1000, 8)
    x[[3, 500]] *= 1000
    kept, dropped = drop_norm_outliers(x, factor=10.0)
    assert dropped == 2 and kept.shape == (998, 8)
    assert torch.equal(kept[:3], x[:3]) and torch.equal(kept[3], x[4])


def test_train_sae_script_end_to_end(tmp_path, tiny_model_dir, tiny_corpus):
    import importlib.util
    import json
    from pathlib import Path

    from sae_lens import SAE

    from latentsim.config import CorpusArguments, ModelArguments, TrainSAEArguments

    script_path = Path(__file__).resolve().parents[1] / "data_gen" / "train_sae.py"
    spec = importlib.util.spec_from_file_location("train_sae", script_path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "sae"
    args = (
        ModelArguments(model_name_or_path=str(tiny_model_dir)),
        CorpusArguments(corpus=str(tiny_corpus), ctx_len=16, n_rows=24, seed=1),
        TrainSAEArguments(
            output_dir=str(out),
            hookpoint="layers.1",
            d_sae=32,
            k=4,
            training_tokens=3000,
            train_batch_size_tokens=120,
            lr=3.0e-3,
            eval_rows=4,
        ),
    )
    script.main(*args)
    report = json.loads((out / "training_report.json").read_text())
    assert (
        report["distinct_training_tokens"] + report["norm_outliers_excluded"]["train"] == 24 * 15
    )  # BOS dropped
    assert report["held_out"]["n_tokens"] + report["norm_outliers_excluded"]["held_out"] == 4 * 15
    assert report["held_out"]["l0"] <= 4 and 0.0 < report["train"]["fve"] <= 1.0
    sae = SAE.load_from_disk(str(out))
    assert sae.cfg.d_sae == 32 and sae.cfg.metadata.hook_name == "layers.1"
    assert json.loads((out / "run_config.json").read_text())["config"]["train_sae"]["k"] == 4
    mtime = (out / "sae_weights.safetensors").stat().st_mtime_ns
    script.main(*args)  # finished: skipped
    assert (out / "sae_weights.safetensors").stat().st_mtime_ns == mtime
    args[2].k = 8  # a changed config is never answered with the old SAE
    with pytest.raises(ValueError, match="train_sae.k: 4 -> 8"):
        script.main(*args)
