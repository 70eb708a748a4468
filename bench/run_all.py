"""Run the project's benchmarks and write outputs/bench/results.json.

    ./launch.sh bench [--model embedded:smollm2-135m] [--rows 32] [--ctx_len 128]

Caching (stop at the hook + sparse TopK vs delphi's full forward + dense latents) and one SFT step (LoRA vs
full finetuning, against the 4N / 6N FLOP bounds). Each entry: ratio against the naive way (same run,
interleaved, median of 3), achieved GFLOP/s, % of a matmul calibration taken in this run, and whether the
exactness check passed. Two SAEs: the quickstart's when it exists (outputs/quickstart/sae, else a random TopK
SAE of its shape) and a random 32k-wide TopK SAE, the width of delphi's SmolLM2 SAEs; and a random 4k SAE at a
shallower hookpoint (layers.7). Speed and exactness do not depend on what an SAE learned. Each entry also
gives the FLOP ratio that bounds the speed-up: for layer 15 of 30 and a 4k SAE it is 2.3x (naive: 30
layers + lm_head + encoder; ours: 16 layers + encoder).
"""

from pathlib import Path

import torch

from latentsim.bench import (
    TEXT,
    bench_cache,
    bench_dense_scoring,
    bench_patch_kl,
    bench_scoring,
    bench_sft,
    matmul_gflops,
    random_topk_sae,
    scoring_judgments,
    whole_layer_inputs,
)
from latentsim.cli import run
from latentsim.config import BenchArguments, SAEArguments
from latentsim.io import atomic_write_json, provenance
from latentsim.models import load_model_and_tokenizer, resolve_model_path
from latentsim.prompts import answer_token_ids
from latentsim.sae import load_sae

# The config dataclasses this script parses.
DATACLASSES = (BenchArguments,)


def main(args: BenchArguments) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model)
    d_model = model.config.get_text_config().hidden_size
    layer = int(args.hookpoint.split(".")[-1])
    sae_dir = Path(args.sae_path)
    cases = []  # (hookpoint layer, SAE name, SAE)
    if (sae_dir / "cfg.json").is_file():
        cases.append(
            (
                layer,
                f"{sae_dir} (d_sae 4096)",
                load_sae(SAEArguments(hookpoint=args.hookpoint, sae_path=str(sae_dir)), d_model=d_model),
            )
        )
    else:
        cases.append((layer, "random TopK (d_sae 4096, k 32)", random_topk_sae(d_model, 4096, 32)))
    # delphi's SmolLM2 SAEs are ~32k wide: the shared encoder matmul grows, so the ratio shrinks.
    cases.append(
        (layer, f"random TopK (d_sae {args.wide_d_sae}, k 32)", random_topk_sae(d_model, args.wide_d_sae, 32))
    )
    # The speed-up is bounded by the layers skipped: a shallower hookpoint skips more.
    cases.append((args.shallow_layer, "random TopK (d_sae 4096, k 32)", random_topk_sae(d_model, 4096, 32)))
    vocab = model.config.get_text_config().vocab_size
    rows = torch.randint(0, vocab, (args.rows, args.ctx_len))
    calibration = matmul_gflops()
    print(f"[bench] matmul calibration: {calibration:.1f} GFLOP/s (fp32)")
    results = []
    for case_layer, sae_name, sae in cases:
        result = bench_cache(model, sae, rows, case_layer, args.batch_size, calibration_gflops=calibration)
        result["name"] = f"cache_activations[{args.model} layers.{case_layer}, SAE {sae_name}]"
        results.append(result)
        print(
            f"[bench] {result['name']}: {result['ratio_vs_naive']:.2f}x naive (FLOP bound "
            f"{result['flop_ratio_bound']:.2f}x) ({result['tokens_per_s']['ours']:.0f} "
            f"vs {result['tokens_per_s']['naive']:.0f} tok/s), {result['achieved_gflops']:.1f} GFLOP/s = "
            f"{result['pct_of_matmul']:.0f}% of matmul, exact: {result['exact']}",
            flush=True,
        )
    judgments = scoring_judgments(Path(args.eval_set), args.score_contexts, args.score_latents)
    scoring = bench_scoring(
        model, tokenizer, judgments, answer_token_ids("sim_v1", tokenizer), calibration_gflops=calibration
    )
    results.append(scoring)
    print(
        f"[bench] {scoring['name']}: prefix-shared {scoring['ratio_vs_naive']:.2f}x naive, naive+last logits "
        f"{scoring['ratio_naive_last_logits_vs_naive']:.2f}x "
        f"({scoring['judgments_per_s']['prefix_shared']:.1f} vs {scoring['judgments_per_s']['naive']:.1f} "
        f"judgments/s; {scoring['mean_prompt_tokens']:.0f} prompt tokens, "
        f"{scoring['mean_computed_tokens_per_judgment']:.0f} computed per judgment), "
        f"{scoring['achieved_gflops']:.1f} GFLOP/s = {scoring['pct_of_matmul']:.0f}% of matmul; exact: "
        f"{scoring['exact']} (max |delta margin| {scoring['max_abs_diff_margin']:.1e})",
        flush=True,
    )
    interpretations, text, ends = whole_layer_inputs(
        Path(args.eval_set), tokenizer, args.whole_layer_latents, args.whole_layer_tokens, TEXT
    )
    step = max(1, len(ends) // args.whole_layer_sim_v1_positions)
    dense = bench_dense_scoring(
        model,
        tokenizer,
        interpretations,
        text,
        ends,
        list(range(step - 1, len(ends), step))[: args.whole_layer_sim_v1_positions],
        calibration_gflops=calibration,
    )
    results.append(dense)
    print(
        f"[bench] {dense['name']}: dense with KV reuse {dense['ratio_vs_sim_v1_prefix_shared']:.1f}x "
        f"prefix-shared sim_v1, {dense['ratio_vs_naive']:.1f}x one dense forward per judgment "
        f"({dense['judgments_per_s']['dense_kv_shared']:.0f} vs "
        f"{dense['judgments_per_s']['sim_v1_prefix_shared']:.1f} vs "
        f"{dense['judgments_per_s']['dense_per_position']:.1f} judgments/s; "
        f"{dense['computed_tokens_per_judgment']['dense_kv_shared']:.2f} vs "
        f"{dense['computed_tokens_per_judgment']['sim_v1_prefix_shared']:.0f} tokens computed per judgment), "
        f"{dense['achieved_gflops']:.1f} GFLOP/s = {dense['pct_of_matmul']:.0f}% of matmul; exact: "
        f"{dense['exact']} (max |delta margin| {dense['max_abs_diff_margin']:.1e}); the value format "
        f"{dense['ratio_value_vs_binary_dense']:.2f}x the Yes/No one's judgments/s "
        f"(exact: {dense['value_exact']})",
        flush=True,
    )
    patch_rows = rows[: args.patch_rows, : args.patch_len].clone()
    patch_rows[:, 0] = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else patch_rows[:, 0]
    patch = bench_patch_kl(
        model, cases[0][2], patch_rows, layer, n_variants=args.patch_variants, calibration_gflops=calibration
    )
    results.append(patch)
    print(
        f"[bench] {patch['name']}: {patch['ratio_vs_naive']:.2f}x naive (FLOP bound "
        f"{patch['flop_ratio_bound']:.1f}x; {patch['variants_per_s']['ours']:.1f} vs "
        f"{patch['variants_per_s']['naive']:.1f} variants/s), {patch['achieved_gflops']:.1f} GFLOP/s = "
        f"{patch['pct_of_matmul']:.0f}% of matmul; exact: {patch['exact']} (max |delta KL| "
        f"{patch['max_abs_diff_kl']:.1e})",
        flush=True,
    )
    sft = bench_sft(
        resolve_model_path(args.model), seq_len=args.ctx_len, batch_size=4, calibration_gflops=calibration
    )
    results.append(sft)
    print(
        f"[bench] {sft['name']}: LoRA {sft['ratio_vs_naive']:.2f}x full finetuning "
        f"({sft['tokens_per_s']['lora']:.0f} vs {sft['tokens_per_s']['full']:.0f} tok/s); LoRA at "
        f"{sft['achieved_gflops']:.1f} GFLOP/s of its 4N bound = {sft['pct_of_matmul']:.0f}% of matmul, full "
        f"at {sft['pct_of_matmul_full']:.0f}% (6N); exact: {sft['exact']}"
    )
    out = Path(args.output)
    atomic_write_json(out, {"provenance": provenance("bench", vars(args), seed=0), "results": results})
    print(f"[bench] wrote {out}")


if __name__ == "__main__":
    run(main, DATACLASSES)
