"""How strongly: dense simulators' predicted activation at every token of held-out texts, per held-out latent.

    python eval/score_values.py --config configs/eval/values_quickstart.yaml [--key value ...]

Each held-out latent of the eval set's `split` (never one a simulator trained on) is read at every position
1..`tokens` of `random_texts` held-out texts shared by all latents (OpenAI's all-at-once setting, set
`random`) and of its own `top_texts` strongest held-out texts besides (`top_and_random`, OpenAI's and delphi's
samples). A value simulator (sim_dense_value_v1, K bins) predicts the expected activation over its bins, a
Yes/No one P(yes) x the latent's median (latentsim.values); the references the same from their P(yes) (the
prior: a constant, r = 0); each `prompted` model is OpenAI's all-at-once simulator (latentsim.all_at_once: the
expected digit 0-9 after each token's line, one pass per text). Per latent: Pearson r over every token, r over
the active tokens, the AUC of P(active); means with 95% CIs over latents, each simulator minus each reference
paired over latents, and a value simulator's bin calibration. Writes results.json, per_latent.parquet,
summary.md and run_config.json to `output_dir`; a rerun of the same config reads them back.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from latentsim import values, whole_layer
from latentsim.cli import run
from latentsim.config import ValueEvalArguments
from latentsim.errors import ConfigError
from latentsim.eval_set import EvalSet
from latentsim.held_out import training_rows_and_latents
from latentsim.io import (
    atomic_save,
    atomic_write_text,
    read_results,
    require_same_config,
    write_results,
    write_run_config,
)
from latentsim.models import load_model_and_tokenizer
from latentsim.simulators import ScorerFactory, ScoringOptions, final_simulator

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (ValueEvalArguments,)


def main(args: ValueEvalArguments) -> dict:
    eval_set = EvalSet.open(args.eval_set)
    eval_set.require_binary("value scoring")
    sims = [final_simulator(d) for d in args.run_dirs]
    if not_dense := [s.name for s in sims if not s.dense]:
        raise ConfigError(f"config key `run_dirs`: {not_dense} are not dense simulators.")
    references = whole_layer.reference_simulators(args.references)
    out = Path(args.output_dir)
    if (out / "run_config.json").is_file() and not args.overwrite:
        require_same_config(
            out, {"values": args}, {"values.overwrite"}, "value scores", "pass --overwrite true"
        )
        if (done := read_results(out)) is not None:
            print(f"[values] {out / 'results.json'} exists for this config; skipped")
            return done

    # Held-out rows and latents: none that any simulator trained on.
    trained_rows, trained_latents = set(), set()
    for sim in sims:
        r, lat = training_rows_and_latents(sim)
        trained_rows, trained_latents = trained_rows | r, trained_latents | lat
    random_rows = whole_layer.held_out_rows(eval_set, args.split, args.random_texts, args.seed, trained_rows)
    split = eval_set.split(args.split)
    split_rows = sorted(set(split["row"].tolist()))
    interpretations = eval_set.interpretations()
    latents = sorted((set(split["latent"].tolist()) & set(interpretations)) - trained_latents)
    if args.max_latents and len(latents) > args.max_latents:
        rng = np.random.default_rng([args.seed, 31])
        latents = sorted(rng.choice(latents, args.max_latents, replace=False).tolist())
    if not latents:
        raise ConfigError(
            f"config key `split`: the eval set's {args.split} split has no untrained explained latent."
        )
    activations = values.row_activations(eval_set.cache, split_rows, latents, args.tokens)
    tops = values.value_texts(activations, latents, random_rows, args.top_texts)
    tokenizer = eval_set.cache.subject_tokenizer()
    vt = values.ValueTexts(
        latents=latents,
        interpretations=[interpretations[i] for i in latents],
        random_rows=random_rows,
        tops=tops,
        texts={
            r: whole_layer.text_of_row(eval_set.tokens, r, args.tokens, tokenizer)
            for r in sorted(set(random_rows).union(*tops.values()))
        },
        activations=activations,
        statistics=eval_set.statistics,
    )
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "values", {"values": args}, args.seed)

    # Every simulator's and reference's answers: {name: {(latent index, row): (P(active), value, bins)}}.
    factory = ScorerFactory(ScoringOptions.from_args(args))
    answers = {}
    for sim in sims:
        scorer = factory.load(factory.prepare(sim, "sim_v1", eval_set=eval_set, seed=args.seed))
        answers[sim.name] = values.simulator_answers(scorer, vt)
        factory.release(scorer)
    for sim in references.values():
        scorer = factory.load(factory.prepare(sim, "sim_v1", eval_set=eval_set, seed=args.seed))
        answers[sim.name] = values.reference_answers(scorer, vt, tokenizer)
        factory.release(scorer)
    for ref in args.prompted:
        model, prompted_tokenizer = load_model_and_tokenizer(ref, dtype=args.dtype, device=args.device)
        name = f"{Path(ref).name.replace(':', '-')}_all-at-once"
        answers[name] = values.prompted_answers(model, prompted_tokenizer, vt, tokenizer, args.batch_size)
        del model

    records, calibration = [], {}
    for name, got in answers.items():
        scored, calibration[name] = values.score_answers(name, got, vt)
        records += scored
    per_latent = pd.DataFrame(records)
    atomic_save(out / "per_latent.parquet", lambda tmp: per_latent.to_parquet(tmp, index=False))
    summary = {}
    baselines = [name for name in answers if name not in {sim.name for sim in sims}]
    for (name, set_name), group in per_latent.groupby(["simulator", "set"], sort=False):
        entry = summary.setdefault(name, {}).setdefault(set_name, values.summarise(group, args.seed))
        same_set = per_latent[per_latent.set == set_name]
        entry["minus"] = {b: values.paired(same_set, name, b, "r", args.seed) for b in baselines if b != name}
    result = {
        "eval_set": str(eval_set.path),
        "split": args.split,
        "latents": latents,
        "random_rows": random_rows,
        "top_rows": {str(k): v for k, v in tops.items()},
        "tokens_per_text": args.tokens,
        "simulators": {s.name: {"run_dir": s.adapter, "prompt_format": s.prompt_format} for s in sims},
        "summary": summary,
        "calibration": {k: v for k, v in calibration.items() if v is not None},
    }
    write_results(out, result, "value_scores")
    table = values.summary_table(result)
    atomic_write_text(out / "summary.md", table + "\n")
    print(table)
    print(f"[values] {out / 'results.json'}")
    return read_results(out)


if __name__ == "__main__":
    run(main, DATACLASSES)
