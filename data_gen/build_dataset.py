"""Build simulator examples (interpretation, context, label) from the cache under a data mixture.

    python data_gen/build_dataset.py --config configs/data/mix_quantiles_top5.yaml [--key value ...]

Writes `<output_dir>/{train,validation,test}.parquet` (TRL conversational prompt-completion rows plus metadata
columns: latent, row, position, the marked context, labels, the token's active count in the whole SAE,
interpretation source) and a README.md dataset card. Splits are disjoint
in latents and rows (`split_mode: latents`) or in rows only (`contexts`). Same config + seed: identical bytes.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from latentsim.cache import load_cache
from latentsim.cli import run
from latentsim.config import DatasetArguments
from latentsim.dataset import (
    SPLITS,
    ActiveIndex,
    BuildReport,
    activation_bin,
    choose_candidates,
    decoder_neighbours,
    quantile_bin,
    split_ids,
)
from latentsim.explain import load_interpretations
from latentsim.hub import upload_folder
from latentsim.interpretation_scores import load_score_folder
from latentsim.io import atomic_save, atomic_write_json, atomic_write_text, write_run_config
from latentsim.latent_stats import load_statistics
from latentsim.models import resolve_model_path
from latentsim.prompts import answer_token_ids, marked_context, render_completion, render_prompt

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (DatasetArguments,)


def load_scores(path: str, hookpoint: str, width: int) -> dict[int, float]:
    """{latent: score} from a JSON dict (data_gen/score.py writes one per scorer) or a per-latent score folder."""
    if Path(path).is_dir():
        scores = load_score_folder(path, hookpoint)
    else:
        data = json.loads(Path(path).read_text()) if Path(path).is_file() else None
        if not isinstance(data, dict):
            raise ValueError(f"config key `score_path`: {path} must be a JSON file {{latent: score}} or a folder "
                             "of per-latent score files (data_gen/score.py writes both).")
        scores = {int(k): float(v) for k, v in data.items()}
    if any(not 0 <= k < width for k in scores):
        raise ValueError(f"config key `score_path`: {path} scores latents outside the SAE's {width}; wrong SAE?")
    return scores


def dataset_card(args: DatasetArguments, cache_config: dict, stats: dict) -> str:
    lat = cache_config.get("latentsim", {})
    files = "\n".join(f"  - split: {s}\n    path: {s}.parquet" for s in SPLITS)
    return f"""---
configs:
- config_name: default
  data_files:
{files}
tags: [latentsim, sae, interpretability, simulator]
---
# Simulator examples: {Path(args.output_dir).name}

Built by `data_gen/build_dataset.py` (latentsim) in TRL conversational prompt-completion format.

- subject model: {lat.get('model', {}).get('model', cache_config.get('model_name'))}, hookpoint `{args.hookpoint}`
- SAE: {json.dumps(lat.get('sae'))} ({stats['width']} latents)
- interpretations: {', '.join(args.interpretations)} (weights {args.interpretation_weights or 'equal'})
- prompt format: `{args.prompt_format}`, label `{args.label}`, positives `{args.positives}`{f' (top {args.top_k})' if args.positives == 'top_k' else ''}, negatives {f'{args.negatives_per_context} per context' if args.negatives_per_context else f'{args.negatives_per_positive} per positive'} (hard: {args.hard_negatives})
- score in prompt: {args.score_path or 'no'}
- split mode: `{args.split_mode}` (train/validation/test disjoint in {'latents and rows' if args.split_mode == 'latents' else 'rows'})

| split | examples | positives | contexts | latents |
|---|---|---|---|---|
""" + "\n".join(f"| {s} | {v['examples']} | {v['positives']} | {v['contexts']} | {v['latents']} |"
                 for s, v in stats["splits"].items()) + f"""

Active latents without an interpretation (left out, counted): {stats['active_without_interpretation']}.
Latents of the SAE without an interpretation: {stats['latents_without_interpretation']}.
"""


def main(args: DatasetArguments, api=None) -> None:
    out = Path(args.output_dir)
    cache = load_cache(Path(args.cache_dir) / "latents", args.hookpoint)
    sources = [load_interpretations(p, args.hookpoint, cache.width) for p in args.interpretations]
    scores = load_scores(args.score_path, args.hookpoint, cache.width) if args.score_path else None
    stats = load_statistics(Path(args.cache_dir) / "stats", args.hookpoint)
    sim_tok = AutoTokenizer.from_pretrained(resolve_model_path(args.simulator_tokenizer))
    answer_token_ids(args.prompt_format, sim_tok)  # refuse formats whose answers are not single tokens
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "build_dataset", {"dataset": args}, args.seed)

    subject_tok = cache.subject_tokenizer()
    rng = np.random.default_rng(args.seed)
    explained = np.array(sorted(set().union(*sources)), dtype=np.int64)
    if scores is not None:
        explained = explained[[lat in scores for lat in explained.tolist()]]
    explained_set = set(explained.tolist())
    weights = np.array(args.interpretation_weights or [1.0] * len(sources), dtype=float)
    latent_splits = (split_ids(explained, args.validation_fraction, args.test_fraction, rng)
                     if args.split_mode == "latents" else {s: explained for s in SPLITS})
    row_splits = split_ids(np.arange(cache.tokens.shape[0]), args.validation_fraction, args.test_fraction, rng)

    index = ActiveIndex.build(cache)
    tokens = cache.tokens.numpy()
    ctx_len = tokens.shape[1]
    if args.window_min > ctx_len - 1 or args.contexts_per_row > ctx_len - args.window_min:
        raise ValueError(f"config keys `window_min`/`contexts_per_row`: {args.contexts_per_row} windows of at least "
                         f"{args.window_min} tokens do not fit rows of {ctx_len} tokens (position 0 is never used).")
    max_act, edges = stats["max_activation"].numpy(), stats["quantile_edges"].numpy()
    same_token = None
    if args.hard_negatives == "same_token":  # latents that fire on each token id somewhere in the cache
        loc = cache.locations.numpy()
        tok_of = tokens[loc[:, 0], loc[:, 1]]
        same_token = {}
        for t, lat in zip(tok_of.tolist(), loc[:, 2].tolist(), strict=True):
            same_token.setdefault(t, set()).add(lat)
        same_token = {t: np.array(sorted(v)) for t, v in same_token.items()}
    neighbours = None
    if args.hard_negatives == "decoder":
        from latentsim.config import SAEArguments
        from latentsim.sae import load_sae

        sae_info = cache.config.get("latentsim", {}).get("sae", {})
        sae = load_sae(SAEArguments(hookpoint=args.hookpoint, **sae_info))
        neighbours = decoder_neighbours(sae.W_dec.detach(), explained)

    report, split_stats = BuildReport(), {}
    for split in SPLITS:
        pool = latent_splits[split]
        pool_set = set(pool.tolist())
        rows_out = []
        for row in tqdm(row_splits[split].tolist(), desc=f"examples ({split})", unit="row"):
            # Distinct judged positions per row; the window [end - length + 1, end] never holds position 0.
            for end in sorted(rng.choice(np.arange(args.window_min, ctx_len), size=args.contexts_per_row,
                                         replace=False).tolist()):
                length = int(rng.integers(args.window_min, min(args.window_max, end) + 1))
                window = tokens[row, end - length + 1:end + 1]
                active = index.at(row, end)
                report.active_without_interpretation += sum(1 for lat in active if lat not in explained_set)
                hard_pool = None
                if same_token is not None:
                    hard_pool = same_token.get(int(window[-1]), np.zeros(0, dtype=np.int64))
                elif neighbours is not None:
                    pos_lats = [lat for lat in active if lat in pool_set]
                    hard_pool = np.concatenate([neighbours[lat] for lat in pos_lats]) if pos_lats else np.zeros(0, np.int64)
                candidates = choose_candidates(active, pool, pool_set, args, rng, hard_pool, report)
                if not candidates:
                    continue
                context = marked_context(subject_tok.decode(window[:-1].tolist()), subject_tok.decode(window[-1:].tolist()))
                for cand in candidates:
                    usable = [i for i, src in enumerate(sources) if cand.latent in src]
                    w = weights[usable] / weights[usable].sum()
                    src = usable[int(rng.choice(len(usable), p=w))] if len(usable) > 1 else usable[0]
                    is_active = cand.kind == "positive"
                    a_bin = activation_bin(cand.activation, max_act[cand.latent]) if is_active else -1
                    q_bin = quantile_bin(cand.activation, edges[cand.latent]) if is_active else -1
                    label = {"active": int(is_active), "activation_bin": a_bin, "quantile_bin": q_bin}[args.label]
                    score = scores[cand.latent] if scores is not None else None
                    rows_out.append({
                        "prompt": render_prompt(args.prompt_format, context, sources[src][cand.latent], score),
                        "completion": render_completion(args.prompt_format, label),
                        "latent": cand.latent, "row": row, "position": end, "window_start": end - length + 1,
                        "context": context, "context_ids": window.tolist(), "n_active": len(active),
                        "active": int(is_active), "activation": float(cand.activation),
                        "activation_bin": a_bin, "quantile_bin": q_bin, "candidate": cand.kind,
                        "interpretation": sources[src][cand.latent],
                        "interpretation_source": args.interpretations[src], "score": score,
                        "prompt_format": args.prompt_format,
                    })
        table = pa.Table.from_pylist(rows_out)
        atomic_save(out / f"{split}.parquet", lambda tmp, table=table: pq.write_table(table, tmp))
        split_stats[split] = {
            "examples": len(rows_out), "positives": sum(r["active"] for r in rows_out),
            "contexts": len({(r["row"], r["position"]) for r in rows_out}), "latents": len({r["latent"] for r in rows_out}),
            "latent_pool": len(pool), "rows": len(row_splits[split]),
            "candidates": dict(Counter(r["candidate"] for r in rows_out)),
        }
    summary = {
        "width": cache.width, "splits": split_stats,
        "latents_with_interpretation": len(explained), "latents_without_interpretation": cache.width - len(explained),
        "active_without_interpretation": report.active_without_interpretation,
        "negatives_short": report.negatives_short, "prompt_format": args.prompt_format, "label": args.label,
    }
    atomic_write_json(out / "dataset_stats.json", summary)
    atomic_write_text(out / "README.md", dataset_card(args, cache.config, summary))
    print(f"[build_dataset] {out}: " + ", ".join(f"{s} {v['examples']} examples ({v['positives']} positive, "
                                                   f"{v['latents']} latents)" for s, v in split_stats.items()))
    print(f"[build_dataset] active latents left out for lack of an interpretation: "
          f"{report.active_without_interpretation}; latents without one: {summary['latents_without_interpretation']}")
    if args.push_to_hub:
        url = upload_folder(out, args.push_to_hub, "dataset", private=args.hub_private, api=api,
                            commit_message=f"latentsim build_dataset ({args.prompt_format})")
        print(f"[build_dataset] pushed to {url}")


if __name__ == "__main__":
    run(main, DATACLASSES)
