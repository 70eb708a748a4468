"""Run the project's benchmarks and write outputs/bench/results.json.

    ./launch.sh bench [--model embedded:smollm2-135m] [--rows 32] [--ctx_len 128]

Caching (stop at the hook + sparse TopK vs delphi's full forward + dense latents) and one SFT step (LoRA vs full
finetuning, against the 4N / 6N FLOP bounds). Each entry: ratio against the naive way (same run, interleaved, median of 3), achieved GFLOP/s, % of a matmul
calibration taken in this run, and whether the exactness check passed. Two SAEs: the quickstart's when it
exists (outputs/quickstart/sae, else a random TopK SAE of its shape) and a random 32k-wide TopK SAE, the width
of delphi's SmolLM2 SAEs; and a random 4k SAE at a shallower hookpoint (layers.7). Speed and exactness do not
depend on what an SAE learned. Each entry also gives the FLOP ratio that bounds the speed-up: for layer 15 of 30
and a 4k SAE it is 2.3x (naive: 30 layers + lm_head + encoder; ours: 16 layers + encoder).
"""

import argparse
from pathlib import Path

import torch

from latentsim.bench import bench_cache, bench_sft, matmul_gflops
from latentsim.config import SAEArguments
from latentsim.io import atomic_write_json, provenance
from latentsim.models import load_model_and_tokenizer, resolve_model_path
from latentsim.sae import load_sae


def random_topk_sae(d_in: int, d_sae: int, k: int):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name="random")))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn_like(p) / d_in**0.5)
    return sae.eval()


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(args.model)
    d_model = model.config.get_text_config().hidden_size
    layer = int(args.hookpoint.split(".")[-1])
    sae_dir = Path(args.sae_path)
    cases = []  # (hookpoint layer, SAE name, SAE)
    if (sae_dir / "cfg.json").is_file():
        cases.append((layer, f"{sae_dir} (d_sae 4096)",
                      load_sae(SAEArguments(hookpoint=args.hookpoint, sae_path=str(sae_dir)), d_model=d_model)))
    else:
        cases.append((layer, "random TopK (d_sae 4096, k 32)", random_topk_sae(d_model, 4096, 32)))
    # delphi's SmolLM2 SAEs are ~32k wide: the shared encoder matmul grows, so the ratio shrinks.
    cases.append((layer, f"random TopK (d_sae {args.wide_d_sae}, k 32)", random_topk_sae(d_model, args.wide_d_sae, 32)))
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
        print(f"[bench] {result['name']}: {result['ratio_vs_naive']:.2f}x naive (FLOP bound "
              f"{result['flop_ratio_bound']:.2f}x) ({result['tokens_per_s']['ours']:.0f} "
              f"vs {result['tokens_per_s']['naive']:.0f} tok/s), {result['achieved_gflops']:.1f} GFLOP/s = "
              f"{result['pct_of_matmul']:.0f}% of matmul, exact: {result['exact']}", flush=True)
    sft = bench_sft(resolve_model_path(args.model), seq_len=args.ctx_len, batch_size=4, calibration_gflops=calibration)
    results.append(sft)
    print(f"[bench] {sft['name']}: LoRA {sft['ratio_vs_naive']:.2f}x full finetuning ({sft['tokens_per_s']['lora']:.0f} vs "
          f"{sft['tokens_per_s']['full']:.0f} tok/s); LoRA at {sft['achieved_gflops']:.1f} GFLOP/s of its 4N bound = "
          f"{sft['pct_of_matmul']:.0f}% of matmul, full at {sft['pct_of_matmul_full']:.0f}% (6N); exact: {sft['exact']}")
    out = Path(args.output)
    atomic_write_json(out, {"provenance": provenance("bench", vars(args), seed=0), "results": results})
    print(f"[bench] wrote {out}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--hookpoint", default="layers.15")
    parser.add_argument("--sae_path", default="outputs/quickstart/sae")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--ctx_len", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--wide_d_sae", type=int, default=32768)
    parser.add_argument("--shallow_layer", type=int, default=7)
    parser.add_argument("--output", default="outputs/bench/results.json")
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())
