"""Run the project's benchmarks and write outputs/bench/results.json.

    ./launch.sh bench [--model embedded:smollm2-135m] [--rows 32] [--ctx_len 128]

Each entry: ratio against the naive way (same run, interleaved, median of 3), achieved GFLOP/s, % of a matmul
calibration taken in this run, and whether the exactness check passed. The SAE is the quickstart's when it
exists (outputs/quickstart/sae), else a random TopK SAE of the same shape: speed and exactness do not depend
on what the SAE learned.
"""

import argparse
from pathlib import Path

import torch

from latentsim.bench import bench_cache, matmul_gflops
from latentsim.config import SAEArguments
from latentsim.io import atomic_write_json, provenance
from latentsim.models import load_model_and_tokenizer
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
    sae_dir = Path(args.sae_path)
    if (sae_dir / "cfg.json").is_file():
        sae = load_sae(SAEArguments(hookpoint=args.hookpoint, sae_path=str(sae_dir)), d_model=d_model)
    else:
        sae = random_topk_sae(d_model, 4096, 32)
    layer = int(args.hookpoint.split(".")[-1])
    vocab = model.config.get_text_config().vocab_size
    rows = torch.randint(0, vocab, (args.rows, args.ctx_len))
    calibration = matmul_gflops()
    print(f"[bench] matmul calibration: {calibration:.1f} GFLOP/s (fp32)")
    results = [bench_cache(model, sae, rows, layer, args.batch_size, calibration_gflops=calibration)]
    for r in results:
        print(f"[bench] {r['name']}: {r['ratio_vs_naive']:.2f}x naive ({r['tokens_per_s']['ours']:.0f} vs "
              f"{r['tokens_per_s']['naive']:.0f} tok/s), {r['achieved_gflops']:.1f} GFLOP/s = "
              f"{r['pct_of_matmul']:.0f}% of matmul, exact: {r['exact']}")
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
    parser.add_argument("--output", default="outputs/bench/results.json")
    return parser


if __name__ == "__main__":
    main(make_parser().parse_args())
