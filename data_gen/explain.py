"""Interpret SAE latents from examples sampled out of the activation cache (delphi's file layout).

    python data_gen/explain.py --config configs/data/explain_token_list_quantiles.yaml [--key value ...]

Samples each latent's examples `top` or `quantiles` (delphi's schemes), explains them with the token-list
explainer (no LLM) or a chat LLM (any HF model, greedy), and writes `<explanations_dir>/<set_name>/
<hookpoint>_latent<id>.txt` one latent at a time, atomically: a rerun explains only the latents still missing.
Latents firing fewer than `min_activations` times are counted in `explain_report.json`, never silently
skipped. Examples come from the training rows of the cache's row split only (`rows: train`: the split
data_gen/cache_activations.py recorded, whole documents per split; recorded in source_rows.json), so an
interpretation never quotes an eval context nor text of an eval row's document; build_dataset.py refuses sets
that could. Under `accelerate launch --num_processes N` the latents are shared out across the processes
(each its own GPU, or its own vLLM engine over `tensor_parallel_size` GPUs); rank 0 writes the report when all
are done.
"""

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from latentsim import llm_client
from latentsim.cache_reader import CacheReader
from latentsim.cli import run
from latentsim.config import ExplainArguments
from latentsim.distributed import Ranks
from latentsim.explain import (
    SplitLatentIndexes,
    example_rows,
    explainer_messages,
    explanation_path,
    first_line,
    sample_examples,
    token_list_explanation,
    write_explanation,
    write_source_rows,
)
from latentsim.io import atomic_write_json, require_same_config, write_run_config

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (ExplainArguments,)


def main(args: ExplainArguments) -> None:
    set_dir = Path(args.explanations_dir) / args.set_name
    require_same_config(
        set_dir,
        {"explain": args},
        {"explain.batch_size", "explain.device"},
        "interpretations",
        "choose another set_name or delete the folder",
        finished="*.txt",
    )
    if args.explainer == "llm" and args.backend == "vllm":
        llm_client.require_vllm()  # fail before any work, never fall back silently
    ranks = Ranks.from_env()
    cache = CacheReader(Path(args.cache_dir) / "latents", args.hookpoint)  # read one latent split at a time
    set_dir.mkdir(parents=True, exist_ok=True)
    subject_tokenizer = cache.subject_tokenizer()
    rows = example_rows(args, cache)  # `rows: train`: never an eval row (build_dataset checks)
    if ranks.is_main:
        write_run_config(set_dir, "explain", {"explain": args}, args.seed)
        write_source_rows(set_dir, args, rows, cache)
    indexes = SplitLatentIndexes(cache, args.window, rows)
    counts = indexes.counts()
    eligible = np.nonzero(counts >= args.min_activations)[0]
    if args.max_latents:
        rng = np.random.default_rng(args.seed)
        eligible = np.sort(rng.choice(eligible, size=min(args.max_latents, len(eligible)), replace=False))
    mine = ranks.share(
        [int(lat) for lat in eligible]
    )  # by position: the ranks need not talk to split the work
    todo = [lat for lat in mine if not explanation_path(set_dir, args.hookpoint, lat).exists()]
    who = f" {ranks.who}:" if ranks.who else ""
    print(
        f"[explain] {set_dir}:{who} {len(mine)} latents to explain ({len(mine) - len(todo)} done), "
        f"{int((counts < args.min_activations).sum())} fire fewer than {args.min_activations} times"
    )

    def examples_of(latent: int):
        rng = np.random.default_rng(
            [args.seed, latent]
        )  # per latent: same examples whatever the resume point
        return sample_examples(
            indexes.of(latent), latent, args.sampling, rng, args.n_top, args.n_quantiles, args.per_quantile
        )

    empty = []
    if args.explainer == "token_list":
        for latent in tqdm(todo, desc=f"explain ({args.set_name})", unit="latent"):
            write_explanation(
                set_dir,
                args.hookpoint,
                latent,
                token_list_explanation(
                    examples_of(latent),
                    subject_tokenizer,
                    args.n_tokens,
                    args.context_tokens,
                    args.n_contexts,
                    args.n_preceding,
                ),
            )
    else:  # a chat LLM, one message per latent (transformers or a vLLM engine: llm_client)
        client = llm_client.load_client(args.backend, args.explainer_model, args, ranks)
        per_call = client.prompts_per_call
        for i in tqdm(range(0, len(todo), per_call), desc=f"explain ({args.set_name})", unit="call"):
            chunk = todo[i : i + per_call]
            messages = explainer_messages([examples_of(lat) for lat in chunk], subject_tokenizer)
            for latent, text in zip(chunk, client.generate(messages, args.max_new_tokens), strict=True):
                if text := first_line(text):
                    write_explanation(set_dir, args.hookpoint, latent, text)
                else:
                    empty.append(latent)
        client.close()
    empty = sorted(lat for rank_empty in ranks.gather(empty) for lat in rank_empty)  # waits for every rank
    if not ranks.is_main:
        return
    explained = sum(explanation_path(set_dir, args.hookpoint, int(lat)).exists() for lat in eligible)
    report = {
        "set": args.set_name,
        "explainer": args.explainer,
        "sampling": args.sampling,
        "width": cache.width,
        "eligible": len(eligible),
        "explained": explained,
        "empty_outputs": empty,
        "too_rare": int((counts < args.min_activations).sum()),
        "min_activations": args.min_activations,
    }
    atomic_write_json(set_dir / "explain_report.json", report)
    print(
        f"[explain] {explained} of {len(eligible)} latents explained in {set_dir}"
        + (f"; {len(empty)} produced no text (listed in explain_report.json)" if empty else "")
    )


if __name__ == "__main__":
    run(main, DATACLASSES)
