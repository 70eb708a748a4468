"""Scale benchmark: the cache readers on seed-shaped synthetic caches, time and peak RSS per stage.

    ./launch.sh bench --scale [--sizes 1000000 3000000 10000000] [--width 131072] [--l0 50] [--n_splits 5]

For each size (tokens): a synthetic cache of the seed's shape (latentsim.scale: row shards finalised into
delphi's layout, `width` latents, L0 ~`l0`, `n_splits` split files), then the stages as their own entry
scripts read it: statistics (data_gen/cache_activations.py's, one split at a time), explanation sampling for
`explain_latents` latents (data_gen/explain.py, token-list), one mixture's dataset and an eval set
(data_gen/build_dataset.py, at most `max_rows_per_split` rows per split). Every stage runs in its own process;
its peak RSS is that process's ru_maxrss (os.wait4). Writes <output_dir>/results.json (+ provenance) and
prints the table the README quotes. The caches are deleted after each size unless --keep_caches true. ~17 min
at the default sizes on 2 cores.
"""

import json
import shutil
import sys
from pathlib import Path

from latentsim.cache_reader import CacheReader
from latentsim.cli import run
from latentsim.config import ScaleArguments
from latentsim.io import provenance, write_results
from latentsim.scale import measured, print_table

DATACLASSES = (ScaleArguments,)
HOOK = "layers.15"
ROOT = Path(__file__).resolve().parent.parent


def stage_commands(args: ScaleArguments, n_tokens: int, folder: Path) -> dict[str, list[str]]:
    py, cache = sys.executable, folder / "cache"
    tokenizer = str(cache / "tokenizer")
    shared = ["--cache_dir", str(cache), "--hookpoint", HOOK, "--seed", "22"]
    mixture = [
        "--interpretations",
        str(folder / "explanations" / "token_list"),
        "--simulator_tokenizer",
        tokenizer,
        "--prompt_format",
        "sim_v1",
        "--label",
        "active",
        "--window_min",
        "32",
        "--window_max",
        "32",
        "--max_rows_per_split",
        str(args.max_rows_per_split),
    ]
    generate = (
        "from latentsim.scale import write_synthetic_cache; "
        f"write_synthetic_cache({str(cache)!r}, {n_tokens}, {args.width}, {args.l0}, {args.n_splits}, "
        f"ctx_len={args.ctx_len}, hookpoint={HOOK!r})"
    )
    statistics = (  # as data_gen/cache_activations.py computes them: over the training rows
        "from latentsim.cache_reader import CacheReader; from latentsim.latent_stats import "
        f"save_training_statistics; print(save_training_statistics(CacheReader({str(cache / 'latents')!r}, "
        f"{HOOK!r}), {str(cache / 'stats')!r}, 64))"
    )
    return {
        "synthetic cache (shards + finalise)": [py, "-c", generate],
        "statistics": [py, "-c", statistics],
        f"explanation sampling ({args.explain_latents} latents)": [
            py,
            "data_gen/explain.py",
            *shared,
            "--explanations_dir",
            str(folder / "explanations"),
            "--set_name",
            "token_list",
            "--explainer",
            "token_list",
            "--sampling",
            "quantiles",
            "--max_latents",
            str(args.explain_latents),
            "--min_activations",
            "5",
        ],
        "dataset (top-5 positives, 1 negative each)": [
            py,
            "data_gen/build_dataset.py",
            *shared,
            *mixture,
            "--positives",
            "top_k",
            "--top_k",
            "5",
            "--output_dir",
            str(folder / "datasets" / "mixture"),
        ],
        "eval set (all positives, 10 negatives per context)": [
            py,
            "data_gen/build_dataset.py",
            *shared,
            *mixture,
            "--positives",
            "all",
            "--negatives_per_context",
            "10",
            "--output_dir",
            str(folder / "datasets" / "eval"),
        ],
    }


def main(args: ScaleArguments) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"provenance": provenance("bench_scale", {"scale": args}, args.seed), "sizes": {}}
    for n_tokens in args.sizes:
        folder = out / f"tokens_{n_tokens}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        rows = {}
        for name, cmd in stage_commands(args, n_tokens, folder).items():
            print(f"[scale] {n_tokens:,} tokens: {name} ...", flush=True)
            rows[name] = measured(cmd, folder / f"stage_{len(rows)}.log", ROOT)
            print(f"[scale]   {rows[name]['seconds']} s, peak RSS {rows[name]['peak_rss_gb']} GB", flush=True)
        latents = folder / "cache" / "latents" / HOOK
        stats = json.loads((folder / "cache" / "stats" / f"{HOOK}.json").read_text())
        results["sizes"][str(n_tokens)] = {
            "stages": rows,
            "non_zeros": CacheReader(folder / "cache" / "latents", HOOK).n_nonzero,
            "mean_l0": round(stats["mean_l0"], 2),  # of the training rows, the statistics' rows
            "cache_gb_on_disk": round(
                sum(p.stat().st_size for p in latents.glob("*.safetensors")) / 2**30, 2
            ),
        }
        write_results(out, results, "bench_scale")
        if not args.keep_caches:
            shutil.rmtree(folder / "cache")
    print_table(results)
    print(f"[scale] results in {out / 'results.json'}")


if __name__ == "__main__":
    run(main, DATACLASSES)
