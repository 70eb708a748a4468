"""Record sparse SAE latents of a subject model over corpus rows (delphi's cache layout), resumably.

    python data_gen/cache_activations.py --config configs/data/cache_smollm2-135m_l15.yaml [--key value ...]

Runs the model only up to the hookpoint, encodes the residual stream with the SAE (TopK kept sparse), and
writes row shards with completion markers under `<output_dir>/shards/`; a rerun skips finished shards and
redoes the rest. When every shard is done they are merged into `<output_dir>/latents/<hookpoint>/` (delphi's
`<start>_<end>.safetensors` + `config.json`, with each row's corpus documents). The row split (whole documents
in train / validation / test / confirmation, seeded by the corpus `seed`: latentsim.splits) goes to
`row_split.json` beside config.json, and per-latent statistics of the training rows to `<output_dir>/stats/`.
Exact duplicate documents are skipped (counted in config.json). Position 0 (BOS) is never cached. To use a
cache made by delphi, copy its `latents/` folder into `output_dir`: the run finds a finished cache, loads no
model and only records the row split (row by row: delphi records no documents) and the statistics. Changing
only the split fractions of a finished cache redoes just those two.

    accelerate launch --num_processes N data_gen/cache_activations.py --config ...

shares the row shards out across N processes (shard i to rank i % N; each loads the model on its own GPU);
rank 0 finalises once every shard is done. A killed rank loses only the shard it was writing.
"""

import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from latentsim.cache import (
    cache_is_complete,
    completed_shards,
    delphi_config,
    finalise_shards,
    record_rows,
    remove_shards,
    shard_ranges,
    stream_states,
    write_shard,
)
from latentsim.cache_reader import CacheReader
from latentsim.cli import run
from latentsim.config import CacheArguments, CorpusArguments, ModelArguments, SAEArguments
from latentsim.corpus import corpus_rows, load_corpus_from_args, streamed_rows
from latentsim.distributed import Ranks
from latentsim.errors import MissingInputError
from latentsim.io import require_same_config, write_run_config
from latentsim.latent_stats import save_training_statistics
from latentsim.models import load_model_and_tokenizer
from latentsim.sae import check_hookpoint, load_sae
from latentsim.splits import SPLIT_KEYS, cache_fractions, describe_row_split, ensure_row_split, is_row_split

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (ModelArguments, CorpusArguments, SAEArguments, CacheArguments)


def main(
    model_args: ModelArguments, corpus_args: CorpusArguments, sae_args: SAEArguments, args: CacheArguments
) -> None:
    out, ranks = Path(args.output_dir), Ranks.from_env()
    latents_dir, shard_dir, stats_dir = out / "latents", out / "shards" / sae_args.hookpoint, out / "stats"
    if args.overwrite:
        if ranks.is_main:
            for path in (latents_dir / sae_args.hookpoint, shard_dir):
                shutil.rmtree(path, ignore_errors=True)
            for suffix in (".safetensors", ".json"):
                (stats_dir / f"{sae_args.hookpoint}{suffix}").unlink(missing_ok=True)
        ranks.wait_for_all()  # no rank looks for finished shards before they are gone
    configs = {"model": model_args, "corpus": corpus_args, "sae": sae_args, "cache": args}
    recorded = cache_is_complete(latents_dir, sae_args.hookpoint)
    # Finished or half-done work is reused only if it was made with the same config (a finished cache's split
    # keys may change: only its row split and statistics are redone).
    after = {"cache.shard_rows", *(f"cache.{key}" for key in SPLIT_KEYS)}
    ignore = {"cache.overwrite", "cache.batch_size"} | (after if recorded else set())
    if recorded or shard_dir.is_dir():
        require_same_config(
            out, configs, ignore, "a cache", "set --overwrite true to redo it, or choose another output_dir"
        )
    split_args = (cache_fractions(args), corpus_args.seed, args.split_group_rows)
    # A finished cache (ours, or delphi's `latents/` copied here) only needs its row split and statistics.
    if (
        recorded
        and (stats_dir / f"{sae_args.hookpoint}.json").is_file()
        and is_row_split(CacheReader(latents_dir, sae_args.hookpoint).row_split_record(False), *split_args)
    ):
        print(
            f"[cache] {latents_dir / sae_args.hookpoint} is complete; skipping "
            "(set --overwrite true to redo)."
        )
        return
    if not recorded and sae_args.sae_path and not (Path(sae_args.sae_path) / "cfg.json").is_file():
        raise MissingInputError(
            f"config key `sae_path`: {sae_args.sae_path} is not a sae-lens folder (no cfg.json); "
            "train one with data_gen/train_sae.py or fix the path."
        )
    out.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        write_run_config(out, "cache_activations", configs, corpus_args.seed)

    if not recorded:
        corpus = load_corpus_from_args(corpus_args)
        model, tokenizer = load_model_and_tokenizer(
            model_args.model_name_or_path,
            dtype=model_args.model_dtype,
            device=ranks.device(model_args.device),
            revision=model_args.model_revision,
            trust_remote_code=model_args.trust_remote_code,
        )
        layer = check_hookpoint(model, sae_args.hookpoint)
        sae = load_sae(sae_args, device=model.device, d_model=model.config.get_text_config().hidden_size)
        ranges = shard_ranges(corpus_args.n_rows, args.shard_rows)
        mine = ranks.share(ranges)  # by position, so every rank agrees on who does what without talking
        done = completed_shards(shard_dir, mine)
        todo = [r for r in mine if r not in done]
        who = f"{ranks.who}: " if ranks.who else ""
        print(
            f"[cache] {who}{len(mine)} shards of {args.shard_rows} rows: {len(done)} done, {len(todo)} to go"
        )
        streaming, first = corpus_args.corpus_streaming, corpus_args.row_start
        if streaming:  # rows read when needed, from the nearest stream position a finished shard saved
            stream, states = streamed_rows(corpus_args, tokenizer, corpus), stream_states(shard_dir, ranges)
        else:
            rows = corpus_rows(corpus_args, tokenizer, corpus)
        with tqdm(
            total=sum(b - a for a, b in todo) * corpus_args.ctx_len,
            desc="caching",
            unit="tok",
            unit_scale=True,
        ) as bar:
            for a, b in todo:
                batch = stream.rows(first + a, first + b, states) if streaming else rows[a:b]
                locations, activations = record_rows(
                    model, sae, batch.tokens, layer, args.batch_size, progress=bar
                )
                locations[:, 0] += a
                write_shard(
                    shard_dir,
                    a,
                    b,
                    locations,
                    activations,
                    batch.tokens.numpy(),
                    batch.documents,
                    batch.duplicates_removed,
                    stream.state() if streaming else None,
                )
        ranks.wait_for_all()
    if not ranks.is_main:
        return  # rank 0 finalises every rank's shards and computes the statistics
    if not recorded:
        config = delphi_config(model_args, corpus_args, sae_args, args, sae.cfg.d_sae)
        finalise_shards(
            shard_dir, ranges, latents_dir, sae_args.hookpoint, sae.cfg.d_sae, args.n_splits, config
        )
        remove_shards(shard_dir)

    reader = CacheReader(latents_dir, sae_args.hookpoint)  # read one latent split at a time
    ensure_row_split(reader, *split_args)
    # Statistics of the training rows only: no eval row informs a reference, a bin or a firing rate.
    summary = save_training_statistics(reader, stats_dir, args.quantile_sample_size)
    split = describe_row_split(reader.row_split_record())
    print(
        f"[cache] {reader.folder}: {reader.n_nonzero} non-zeros; rows split {split}; training rows: "
        f"{summary['n_tokens_excluding_bos']} tokens (L0 {summary['mean_l0']:.1f}, "
        f"{summary['dead_fraction']:.1%} of latents never fire); stats in {stats_dir}"
    )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main, DATACLASSES)
