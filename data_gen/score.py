"""Score an interpretation set with delphi's detection or fuzzing test, an LLM judging from Yes/No logits.

    python data_gen/score.py --config configs/data/score_detection.yaml [--key value ...]

For each latent: `n_activating` windows (one per quantile of its activating windows, delphi's test examples)
and `n_non_activating` windows, one judge prompt each; the judge's P(Yes) > 0.5 is its prediction. Writes the
per-latent classifier outputs to `<scores_dir>/<scorer>/<hookpoint>_latent<id>.txt` (delphi's layout; a rerun
scores only missing latents) and `<scores_dir>/<scorer>.json` = {latent: balanced accuracy}, which
build_dataset's `score_path` reads. Windows come from the training rows of the cache's row split
(`rows: train`: the split data_gen/cache_activations.py recorded), as the interpretations' examples do. Under
`accelerate launch --num_processes N` the latents are shared out across the processes (as data_gen/explain.py
does); rank 0 writes `<scorer>.json` when all are done.
"""

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from latentsim import explain, llm_client
from latentsim.cache_reader import CacheReader
from latentsim.cli import run
from latentsim.config import ScoreArguments
from latentsim.distributed import Ranks
from latentsim.interpretation_scores import load_score_folder, scorer_items
from latentsim.io import atomic_write_json, atomic_write_text, require_same_config, write_run_config

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (ScoreArguments,)


def latent_items(
    args: ScoreArguments, index, interpretation: str, latent: int, subject_tokenizer
) -> list[dict]:
    """The scorer's items (prompt, text, activating) for one latent, from its own seeded examples."""
    rng = np.random.default_rng([args.seed, latent])
    activating = explain.sample_examples(
        index, latent, "quantiles", rng, n_quantiles=args.n_activating, per_quantile=1
    )
    non_activating = explain.non_activating_examples(index, latent, args.n_non_activating, rng)
    return scorer_items(args.scorer, interpretation, activating, non_activating, subject_tokenizer, rng)


def main(args: ScoreArguments) -> None:
    out = Path(args.scores_dir) / args.scorer
    require_same_config(
        out,
        {"score": args},
        {"score.batch_size", "score.device"},
        "scores",
        "choose another scores_dir or delete the folder",
        finished="*.txt",
    )
    if args.backend == "vllm":
        llm_client.require_vllm()  # fail before any work, never fall back silently
    ranks = Ranks.from_env()
    cache = CacheReader(Path(args.cache_dir) / "latents", args.hookpoint)  # read one latent split at a time
    interpretations = explain.load_interpretations(args.interpretations, args.hookpoint, cache.width)
    out.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        write_run_config(out, "score", {"score": args}, args.seed)

    latents = np.array(sorted(interpretations))
    if args.max_latents:
        latents = np.sort(
            np.random.default_rng(args.seed).choice(
                latents, size=min(args.max_latents, len(latents)), replace=False
            )
        )
    mine = ranks.share(
        [int(lat) for lat in latents]
    )  # by position: the ranks need not talk to split the work
    todo = [lat for lat in mine if not explain.explanation_path(out, args.hookpoint, lat).exists()]
    who = f" ({ranks.who})" if ranks.who else ""
    print(
        f"[score] {args.scorer} of {args.interpretations}{who}: {len(mine)} latents "
        f"({len(mine) - len(todo)} done)"
    )
    subject_tokenizer = cache.subject_tokenizer()
    indexes = explain.SplitLatentIndexes(cache, args.window, explain.example_rows(args, cache))
    judge = llm_client.load_client(args.backend, args.judge_model, args, ranks)
    # Whole latents per call: hf one at a time (its prompts batched by batch_size), vLLM enough latents
    # for the engine to batch across them.
    per_call = max(1, judge.prompts_per_call // (args.n_activating + args.n_non_activating))
    with tqdm(total=len(todo), desc=f"score ({args.scorer})", unit="latent") as bar:
        for start in range(0, len(todo), per_call):
            chunk = todo[start : start + per_call]
            items = {
                latent: latent_items(
                    args, indexes.of(latent), interpretations[latent], latent, subject_tokenizer
                )
                for latent in chunk
            }
            probs = iter(judge.yes_probability([it["prompt"] for latent in chunk for it in items[latent]]))
            # Each latent's file written atomically: a rerun judges only the missing ones.
            for latent in chunk:
                records = [
                    {
                        "str_tokens": it["text"],
                        "activating": it["activating"],
                        "probability": (p := next(probs)),
                        "prediction": int(p > 0.5),
                        "correct": int(p > 0.5) == int(it["activating"]),
                    }
                    for it in items[latent]
                ]
                atomic_write_text(explain.explanation_path(out, args.hookpoint, latent), json.dumps(records))
            bar.update(len(chunk))
    judge.close()
    ranks.wait_for_all()
    if not ranks.is_main:
        return
    scores = load_score_folder(out, args.hookpoint)
    atomic_write_json(
        Path(args.scores_dir) / f"{args.scorer}.json", {str(k): v for k, v in sorted(scores.items())}
    )
    values = np.array(list(scores.values()))
    print(
        f"[score] {args.scorer}: {len(scores)} latents, balanced accuracy median {np.median(values):.3f} "
        f"(25-75%: {np.percentile(values, 25):.3f}-{np.percentile(values, 75):.3f}); "
        f"{Path(args.scores_dir) / (args.scorer + '.json')}"
    )


if __name__ == "__main__":
    run(main, DATACLASSES)
