"""The whole layer judged two ways against dictionary size, and what it costs at the seed's scale.

    ./launch.sh bench --two_stage [--sizes 2048 8192 32768] [--k 32]

For each dictionary size, seconds per 64-token text of the dense simulator judging every latent at every
token, against the two-stage way (latentsim.first_stage: one pass over the text and a bilinear score against
every latent propose k latents per token; the simulator judges only those): measured on a sample of the
proposed latents and scaled by how many there are (latentsim.bench.bench_two_stage; interpretations beyond the
embedded SAE's are synthetic, for timing only), and at most (every proposal another latent). Then the cost
model of a 131k dictionary with an 8B simulator on one H200, from the measured tokens each way computes per
latent: FLOPs = 2 x non-embedding parameters x tokens. Writes outputs/bench/two_stage.json.
"""

from pathlib import Path

import torch

from latentsim.bench import TEXT, bench_two_stage, two_stage_cost_model, whole_layer_inputs
from latentsim.cli import run
from latentsim.config import TwoStageBenchArguments
from latentsim.io import atomic_write_json, provenance
from latentsim.models import load_model_and_tokenizer

# The config dataclasses this script parses.
DATACLASSES = (TwoStageBenchArguments,)


def main(args: TwoStageBenchArguments) -> dict:
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype="float32", device="cpu")
    interpretations, text, ends = whole_layer_inputs(Path(args.eval_set), tokenizer, 10**9, args.tokens, TEXT)
    results = bench_two_stage(
        model,
        tokenizer,
        interpretations,
        text,
        ends,
        args.sizes,
        args.k,
        args.sample_latents,
        batch_size=args.batch_size,
    )
    for r in results:
        s = r["seconds_per_text"]
        print(
            f"[bench] {r['name']}: judging every latent {s['judge_every_latent']:.0f} s per text, two stages "
            f"{s['two_stage']:.1f} s ({r['ratio_vs_naive']:.1f}x; at most {s['two_stage_at_most']:.0f} s, "
            f"{r['ratio_vs_naive_at_least']:.1f}x, with every proposal another latent; first stage "
            f"{100 * r['first_stage_share']:.1f}% of it; {r['judgments']['two_stage']} of "
            f"{r['judgments']['every_latent']} judgments, "
            f"{r['proposed_latents']} latents proposed); exact: {r['exact']}",
            flush=True,
        )
    model_131k = two_stage_cost_model(
        args.target_latents, args.target_parameters, args.target_tflops, args.tokens, args.k, results[-1]
    )
    print(
        f"[bench] cost model, {args.target_latents} latents, {args.target_parameters / 1e9:.1f}B "
        f"non-embedding parameters, {args.target_tflops:.0f} TFLOP/s at full use: judging every latent "
        f"{model_131k['seconds_per_text']['judge_every_latent']:.1f} s per text, two stages "
        f"{model_131k['seconds_per_text']['two_stage']:.2f} s ({model_131k['ratio']:.0f}x)"
    )
    out = {
        "provenance": provenance("bench_two_stage", vars(args), seed=0),
        "results": results,
        "cost_model": model_131k,
    }
    atomic_write_json(Path(args.output), out)
    print(f"[bench] wrote {args.output}")
    return out


if __name__ == "__main__":
    run(main, DATACLASSES)
