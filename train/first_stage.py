"""Train the first stage of a two-stage whole layer for one dense simulator (issue 32, latentsim.first_stage).

    python train/first_stage.py --config configs/first_stage/smollm2-135m_quickstart.yaml [--key value ...]

One pass of the simulator's model over each training text alone gives a vector per token; one pass over each
interpretation's dense header alone gives a vector per latent, computed once per dictionary and saved under
`output_dir/interpretation_vectors/`. A low-rank bilinear head (plus the latent's log firing rate) is fitted
on every (token, latent) pair of the rows and latents the simulator trained on, labelled by the cache. On
`validation_texts` held-out validation rows it ranks every explained latent at every position 1..`tokens`:
the recall at k = 8, 32, 128 of the truly active latents (all explained, and held-out latents alone), and
the chosen k, the smallest whose top-k holds `recall_target` of them. Writes first_stage.safetensors,
first_stage.json and run_config.json to `output_dir`; a rerun of the same config skips.
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentsim import first_stage, whole_layer
from latentsim.cli import run
from latentsim.config import FirstStageArguments
from latentsim.errors import ConfigError
from latentsim.eval_set import EvalSet
from latentsim.held_out import training_rows_and_latents
from latentsim.io import require_same_config, write_run_config
from latentsim.simulators import ScorerFactory, ScoringOptions, final_simulator

DATACLASSES = (FirstStageArguments,)


def main(args: FirstStageArguments) -> dict:
    eval_set = EvalSet.open(args.eval_set)
    eval_set.require_binary("the first stage")
    sim = final_simulator(args.simulator)
    if not sim.dense:
        raise ConfigError(f"config key `simulator`: {args.simulator} is not a dense simulator.")
    out = Path(args.output_dir)
    if (out / "run_config.json").is_file() and not args.overwrite:
        require_same_config(
            out, {"first_stage": args}, {"first_stage.overwrite"}, "first stage", "pass --overwrite true"
        )
        if (out / "first_stage.json").is_file():
            print(f"[first_stage] {out / 'first_stage.json'} exists for this config; skipped")
            return json.loads((out / "first_stage.json").read_text())

    # What it may learn from: the rows and latents the dense simulator trained on, nothing else.
    trained_rows, trained_latents = training_rows_and_latents(sim)
    interpretations = eval_set.interpretations()
    explained = sorted(interpretations)
    train_columns = [j for j, latent in enumerate(explained) if latent in trained_latents]
    if not train_columns or not trained_rows:
        raise ConfigError(f"config key `simulator`: {args.simulator} trained on no explained latent or row.")
    train_rows = sorted(trained_rows)
    if args.max_train_rows and len(train_rows) > args.max_train_rows:
        rng = np.random.default_rng([args.seed, 32])
        train_rows = sorted(rng.choice(train_rows, args.max_train_rows, replace=False).tolist())
    validation_rows = whole_layer.held_out_rows(
        eval_set, "validation", args.validation_texts, args.seed, trained_rows
    )
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "first_stage", {"first_stage": args}, args.seed)

    factory = ScorerFactory(ScoringOptions.from_args(args))
    scorer = factory.load(factory.prepare(sim, "sim_v1", eval_set=eval_set, seed=args.seed))
    encoder = first_stage.Encoder(
        scorer.model, scorer.tokenizer, sim.prompt_format, args.layer, args.batch_size
    )
    identity = first_stage.model_identity(sim, args.layer, args.dtype)
    start = time.perf_counter()
    vectors, vectors_path = first_stage.interpretation_vectors(
        encoder, [interpretations[i] for i in explained], out / "interpretation_vectors", identity
    )
    header_seconds = time.perf_counter() - start
    log_rate = first_stage.log_firing_rate(eval_set.statistics, explained)

    # Training tokens: every aligned position of the training rows, labelled for the training latents.
    subject_tok = eval_set.cache.subject_tokenizer()
    n_train = eval_set.tokens.shape[1] - 1
    texts = [whole_layer.text_of_row(eval_set.tokens, r, n_train, subject_tok)[1:] for r in train_rows]
    start, encoded = time.perf_counter(), []
    for a in tqdm(range(0, len(texts), args.batch_size), desc="encoding training texts", unit="batch"):
        encoded += encoder.token_vectors(texts[a : a + args.batch_size])
    text_seconds = (time.perf_counter() - start) / len(texts)
    train_latents = [explained[j] for j in train_columns]
    pairs = first_stage.active_pairs(eval_set.cache, train_rows, train_latents, n_train)
    tokens, positives = first_stage.training_pairs([pairs[r] for r in train_rows], encoded)
    with tqdm(total=len(tokens) * args.epochs, desc="fitting the head", unit="token") as bar:
        head, losses = first_stage.fit_head(
            tokens,
            positives,
            vectors[train_columns],
            log_rate[train_columns],
            args.rank,
            args.epochs,
            args.learning_rate,
            args.batch_tokens,
            args.seed,
            bar,
        )

    # k on held-out validation texts: every explained latent ranked at every position.
    with torch.no_grad():
        latent_side = head.latent_side(torch.from_numpy(vectors))
    held_out = np.array([latent not in trained_latents for latent in explained])
    texts = [
        whole_layer.text_of_row(eval_set.tokens, r, args.tokens, subject_tok)[1:] for r in validation_rows
    ]
    val_pairs = first_stage.active_pairs(eval_set.cache, validation_rows, explained, args.tokens)
    ranks, ranks_held_out, active_per_token = [], [], []
    for r, (vec, aligned) in zip(validation_rows, encoder.token_vectors(texts), strict=True):
        scores = first_stage.text_scores(head, vec, latent_side, log_rate)[aligned]
        truth = first_stage.dense_truth(val_pairs[r], args.tokens, len(explained))[aligned]
        ranks.append(first_stage.ranks_of_positives(scores, truth))
        ranks_held_out.append(first_stage.ranks_of_positives(scores, truth & held_out))
        active_per_token.append(truth.sum(axis=1))
    ranks, ranks_held_out = np.concatenate(ranks), np.concatenate(ranks_held_out)
    k = first_stage.k_for_recall(ranks, args.recall_target, len(explained))
    ks = sorted({*first_stage.RECALL_KS, k})
    record = {
        "simulator": sim.adapter,
        "prompt_format": sim.prompt_format,
        "identity": identity,
        "interpretation_vectors": str(vectors_path),
        "dictionary": len(explained),
        "k": k,
        "recall_target": args.recall_target,
        "validation": {
            "rows": validation_rows,
            "tokens_per_text": args.tokens,
            "active_pairs": int(len(ranks)),
            "mean_active_per_token": float(np.concatenate(active_per_token).mean()),
            "recall": first_stage.recall_at(ranks, ks),
            "recall_held_out_latents": first_stage.recall_at(ranks_held_out, ks),
            "held_out_active_pairs": int(len(ranks_held_out)),
        },
        "training": {
            "rows": len(train_rows),
            "latents": len(train_columns),
            "tokens": int(len(tokens)),
            "positives": int(len(positives)),
            "epoch_losses": losses,
        },
        "seconds": {
            "per_text_pass": text_seconds,
            # 0 when the vectors were read back (computed once per dictionary)
            "per_interpretation": header_seconds / len(explained),
            "interpretation_vectors_computed": encoder.stats["interpretation_passes"] > 0,
        },
    }
    first_stage.save_head(head, out, record)
    factory.release(scorer)
    v = record["validation"]
    print(
        f"[first_stage] k = {k} for recall >= {args.recall_target} on {len(validation_rows)} validation texts"
    )
    for name in ("recall", "recall_held_out_latents"):
        print(f"  {name}: " + ", ".join(f"@{key} {val:.3f}" for key, val in v[name].items()))
    print(f"[first_stage] {out / 'first_stage.json'}")
    return json.loads((out / "first_stage.json").read_text())


if __name__ == "__main__":
    run(main, DATACLASSES)
