"""The caching benchmark's exactness check (speed ratios are reported by ./launch.sh bench, never
asserted)."""

import torch
from helpers import build_tiny_sae

from latentsim.bench import bench_cache, interleaved_timings
from latentsim.models import load_model_and_tokenizer


def test_bench_cache_checks_exactness(tiny_model_dir):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    sae = build_tiny_sae(d_in=16, d_sae=64, k=4)
    result = bench_cache(
        model, sae, torch.randint(4, 40, (6, 10)), layer=1, batch_size=4, repeats=1, calibration_gflops=1.0
    )
    assert result["exact"] is True
    assert result["n_nonzero"] == 6 * 9 * 4  # BOS excluded, k latents per token (random SAE: all positive)
    assert result["ratio_vs_naive"] > 0 and result["pct_of_matmul"] > 0
    assert result["flop_ratio_bound"] > 1  # layer 1 of 3: the naive way runs one more layer and the lm_head


def test_bench_cache_detects_a_mismatch(tiny_model_dir, monkeypatch):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    sae = build_tiny_sae(d_in=16, d_sae=64, k=4)
    import latentsim.sae as sae_mod

    real = sae_mod.encode_sparse  # only the fast path uses it; the naive one encodes densely
    monkeypatch.setattr(sae_mod, "encode_sparse", lambda *a: (lambda r: (r[0], r[1], r[2] * 1.01))(real(*a)))
    result = bench_cache(
        model, sae, torch.randint(4, 40, (3, 10)), layer=1, batch_size=4, repeats=1, calibration_gflops=1.0
    )
    assert result["exact"] is False


def test_interleaved_timings_round_robin():
    calls = []
    times = interleaved_timings({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    assert all(t >= 0 for v in times.values() for t in v)


def test_bench_sft_compares_lora_with_full_finetuning(tiny_model_dir):
    from latentsim.bench import bench_sft

    result = bench_sft(
        str(tiny_model_dir), seq_len=16, batch_size=2, repeats=1, lora_r=2, calibration_gflops=1.0
    )
    assert result["exact"] is True  # LoRA starts as the identity: same first loss as the full model
    assert set(result["tokens_per_s"]) == {"full", "lora"} and result["ratio_vs_naive"] > 0
    assert result["flop_bound_per_token"]["N_nonembedding"] > 0


def test_bench_scoring_checks_exactness(tiny_model_dir):
    from latentsim.bench import bench_scoring
    from latentsim.prompts import answer_token_ids, marked_context
    from latentsim.simulators import Judgment

    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    prompts = [
        Judgment(marked_context(c, "mat"), i)
        for c in ("the cat sat on a", "a dog ran far on the")
        for i in ("cat", "red blue", "one two three four", "river tree house")
    ]
    result = bench_scoring(
        model, tok, prompts, answer_token_ids("sim_v1", tok), batch_size=3, repeats=1, calibration_gflops=1.0
    )
    assert result["exact"] is True and result["max_abs_diff_margin"] < 1e-4
    assert result["name"].endswith("8 judgments, 2 contexts]")
    # Each context's prefix is computed once: fewer tokens than the prompts hold.
    assert (
        result["flop_ratio_bound"] > 1.5
        and result["mean_computed_tokens_per_judgment"] < result["mean_prompt_tokens"]
    )
    assert set(result["judgments_per_s"]) == {"naive", "naive_last_logits", "prefix_shared"}


def test_bench_patch_kl_checks_exactness(tiny_model_dir):
    from latentsim.bench import bench_patch_kl

    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    sae = build_tiny_sae(d_in=16, d_sae=64, k=4)
    rows = torch.randint(4, 40, (2, 10), generator=torch.Generator().manual_seed(0))
    result = bench_patch_kl(model, sae, rows, layer=1, n_variants=3, repeats=1, calibration_gflops=1.0)
    assert result["exact"] is True and result["max_abs_diff_kl"] < 1e-5
    assert result["flop_ratio_bound"] > 1 and result["ratio_vs_naive"] > 0
