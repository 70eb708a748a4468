"""Build simulator examples (interpretation, context, label) from the cache under a data mixture.

    python data_gen/build_dataset.py --config configs/data/mix_quantiles_top5.yaml [--key value ...]

Writes `<output_dir>/{train,validation,test}.parquet` (TRL conversational prompt-completion rows plus metadata
columns: latent, row, position, the marked context, labels, the token's active count in the whole SAE,
interpretation source) and a README.md dataset card. Splits are disjoint in latents and rows (`split_mode:
latents`; twin latents on one side) or in rows only (`contexts`); the rows are the cache's row split (whole
documents, recorded by data_gen/cache_activations.py). With `confirmation_fraction` > 0 (exactly when the
cache keeps confirmation rows) also `confirmation.parquet`: the locked confirmation latents x confirmation
rows, in no other split. Same config + seed: identical bytes. An interpretation set made from any eval row is
refused (it could quote the judged context).
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from latentsim.cache_reader import CacheReader
from latentsim.cli import run
from latentsim.config import DatasetArguments
from latentsim.dataset import (
    BuildInputs,
    BuildReport,
    build_split,
    dataset_card,
    dataset_pools,
    dataset_splits,
    explained_latents,
    negative_sampling_summary,
    split_summary,
    subsample_rows,
)
from latentsim.explain import load_interpretations, refuse_eval_rows
from latentsim.hub import upload_folder
from latentsim.interpretation_scores import load_scores
from latentsim.io import atomic_save, atomic_write_json, atomic_write_text, write_run_config
from latentsim.latent_stats import load_statistics
from latentsim.models import load_tokenizer
from latentsim.prompts import answer_token_ids

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (DatasetArguments,)


def main(args: DatasetArguments, api=None) -> None:
    out = Path(args.output_dir)
    cache = CacheReader(Path(args.cache_dir) / "latents", args.hookpoint)  # read a chunk of rows at a time
    interpretations = [load_interpretations(p, args.hookpoint, cache.width) for p in args.interpretations]
    scores = load_scores(args.score_path, args.hookpoint, cache.width) if args.score_path else None
    stats = load_statistics(Path(args.cache_dir) / "stats", args.hookpoint)
    sim_tok = load_tokenizer(args.simulator_tokenizer)
    answer_token_ids(args.prompt_format, sim_tok)  # refuse formats whose answers are not single tokens
    # One generator for everything, drawn from in a fixed order (splits, then each split's rows): same bytes.
    rng = np.random.default_rng(args.seed)
    explained = explained_latents(interpretations, scores)
    latent_splits, row_splits, twins = dataset_pools(explained, cache, interpretations, args, rng)
    eval_rows = np.concatenate([rows for split, rows in row_splits.items() if split != "train"])
    interpretation_rows = refuse_eval_rows(args.interpretations, eval_rows, cache.n_rows)
    row_splits = subsample_rows(row_splits, args.max_rows_per_split, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "build_dataset", {"dataset": args}, args.seed)
    inputs = BuildInputs.load(args, cache, interpretations, scores, stats, explained)
    report, split_stats = BuildReport(), {}
    if "confirmation" not in row_splits:  # a confirmation split of an earlier build is not this one's
        (out / "confirmation.parquet").unlink(missing_ok=True)
    for split in dataset_splits(args):
        rows = build_split(split, row_splits[split], latent_splits[split], inputs, args, rng, report)
        table = pa.Table.from_pylist(rows)
        atomic_save(out / f"{split}.parquet", lambda tmp, table=table: pq.write_table(table, tmp))
        split_stats[split] = split_summary(rows, latent_splits[split], len(row_splits[split]))

    summary = {
        "width": cache.width,
        "splits": split_stats,
        "latents_with_interpretation": len(explained),
        "latents_without_interpretation": cache.width - len(explained),
        "active_without_interpretation": report.active_without_interpretation,
        "negatives_short": report.negatives_short,
        "prompt_format": args.prompt_format,
        "label": args.label,
        "candidates": args.candidates,
        "interpretation_rows": interpretation_rows,
        "row_split": {k: v for k, v in cache.row_split_record().items() if k != "row_ids"},
        "latent_twins": twins,
        **(
            {
                "contexts_per_latent": args.contexts_per_latent,
                "latents_never_active": report.latents_never_active,
            }
            if args.candidates == "per_latent"
            else {}
        ),
        **negative_sampling_summary(args, report),
    }
    atomic_write_json(out / "dataset_stats.json", summary)
    atomic_write_text(out / "README.md", dataset_card(args, cache.config, summary))
    print(
        f"[build_dataset] {out}: "
        + ", ".join(
            f"{s} {v['examples']} examples ({v['positives']} positive, {v['latents']} latents)"
            for s, v in split_stats.items()
        )
    )
    print(
        f"[build_dataset] active latents left out for lack of an interpretation: "
        f"{report.active_without_interpretation}; latents without one: "
        f"{summary['latents_without_interpretation']}"
    )
    if args.push_to_hub:
        url = upload_folder(
            out,
            args.push_to_hub,
            "dataset",
            private=args.hub_private,
            api=api,
            commit_message=f"latentsim build_dataset ({args.prompt_format})",
        )
        print(f"[build_dataset] pushed to {url}")


if __name__ == "__main__":
    run(main, DATACLASSES)
