"""Score simulators on an imported set: held-out latents whose interpretations were written elsewhere.

    python eval/score_external.py --config configs/eval/sweep_external.yaml [--eval_set DIR]

For every simulator (dense finetuned runs, prompted models with 0 or more solved examples, the references
string match, the explainer's recorded answers and the oracle) and every table the import holds (detection,
fuzzing, per-token activations): one answer per text, per-latent AUC and balanced accuracy at a threshold
fitted on the other latents, per-token Pearson r, each with a 95% CI over latents and paired against the
recorded answers (latentsim.external_eval). Writes <output_dir>/<set>/<simulator>/{results.json,
predictions_<kind>.parquet}, then summary.md and summary.json; a rerun skips simulators already scored with
the same spec.
"""

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from latentsim import external_eval as ext
from latentsim.cli import run
from latentsim.config import ExternalEvalArguments
from latentsim.io import (
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    read_results,
    write_results,
    write_run_config,
)
from latentsim.simulators.base import ScoringOptions
from latentsim.sweep import markdown_table

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (ExternalEvalArguments,)


def simulators(args: ExternalEvalArguments, external: ext.ExternalSet) -> list[tuple[str, str, object]]:
    """(name, kind, what runs it) of every simulator the config names, resolved and checked (never trained on
    a held-out latent of these records) before any model loads."""
    from latentsim.held_out import training_rows_and_latents
    from latentsim.simulators.spec import final_simulator

    held_out = set(external.latents.loc[external.latents["split"] == "test", "latent"].astype(int))

    out = []
    for run_dir in args.run_dirs:
        sim = final_simulator(run_dir)
        if not sim.dense:
            raise ext.BadInputError(
                f"config key `run_dirs`: {run_dir} was trained on {sim.prompt_format}; only dense simulators "
                "(sim_dense_v1) read imported texts here."
            )
        _, seen = training_rows_and_latents(sim, (external.stats["records"], "external"), strict=False)
        if seen & held_out:
            raise ext.BadInputError(
                f"config key `run_dirs`: {run_dir} trained on {len(seen & held_out)} held-out latents of "
                f"{external.path} (e.g. {sorted(seen & held_out)[:5]}); import with the same seed and "
                "held_out_fraction as its training data, or score it on other records."
            )
        out.append((sim.name, "dense", sim))
    for model in args.prompted:
        for shots in args.shots:
            out.append((f"{Path(model).name.replace(':', '-')}_{shots}-shot", "prompted", (model, shots)))
    return out + [(f"reference__{name}", "reference", name) for name in args.references]


def score(kind: str, what, external: ext.ExternalSet, data: dict, args) -> dict[str, list]:
    """Every table's answers of one simulator."""
    explanations = external.explanations
    if kind == "reference" and what == "lexical":  # fitted on the training latents' texts of each kind
        from latentsim.external_lexical import ExternalLexicalReader

        reader = ExternalLexicalReader(external, args.seed)
        return {k: reader.scores(df, k) for k, df in data.items() if reader.can_read(k)}
    if kind == "reference":
        return {k: ext.reference_scores(what, df, k, explanations) for k, df in data.items()}
    if kind == "dense":
        from latentsim.simulators.factory import ScorerFactory

        factory = ScorerFactory(
            ScoringOptions(dtype=args.dtype, device=args.device, batch_size=args.batch_size)
        )
        setup = factory.prepare(what, "sim_v1")
        scorer = factory.load(setup)
        out = {}
        for k, df in data.items():
            ext.check_tokenizer(setup.tokenizer, df, f"{what.name} on {external.path}")
            with tqdm(total=len(df), desc=f"{what.name} ({k})", unit="text") as bar:
                out[k] = ext.dense_scores(scorer, df, k, explanations, bar)
        factory.release(scorer)
        return out
    from latentsim.llm_client import load_client

    model, shots = what
    client = load_client("hf", model, args)
    out = {}
    for k, df in data.items():
        if k == "per_token":
            continue  # a prompted judge answers about whole texts; per-token simulation is the dense one's
        prompts = ext.prompts(df, k, explanations, ext.few_shot_examples(external, k, shots, args.seed))
        out[k] = [
            p
            for i in tqdm(range(0, len(prompts), args.batch_size), desc=f"{model} {shots}-shot ({k})")
            for p in client.yes_probability(prompts[i : i + args.batch_size])
        ]
    client.close()
    return out


def main(args: ExternalEvalArguments) -> None:
    external = ext.ExternalSet.open(args.eval_set)
    kinds = [k for k in args.kinds if k in external.kinds()]
    data = {k: external.held_out(k, args.max_latents, args.max_texts, args.seed) for k in kinds}
    root = Path(args.output_dir) / external.name
    root.mkdir(parents=True, exist_ok=True)
    write_run_config(root, "score_external", {"external": args}, args.seed)
    sizes = ", ".join(f"{k}: {df.latent.nunique()} latents, {len(df)} texts" for k, df in data.items())
    print(f"[external] {external.path} ({sizes})")
    results = {}
    for name, kind, what in simulators(args, external):
        folder = root / name
        spec = dict(simulator=name, kind=kind, kinds=kinds, max_latents=args.max_latents)
        spec |= dict(max_texts=args.max_texts, seed=args.seed, records=external.stats["records"])
        done = read_results(folder)
        if done is not None and done.get("spec") == spec and not args.overwrite:
            print(f"[external] {name}: scored already, skipped")
            results[name] = done["metrics"]
            continue
        answers = score(kind, what, external, data, args)
        folder.mkdir(parents=True, exist_ok=True)
        for k, values in answers.items():
            frame = data[k][["latent", "text_id"]].assign(
                answer=[np.asarray(v, dtype=float).tolist() if k == "per_token" else v for v in values]
            )
            atomic_save(folder / f"predictions_{k}.parquet", lambda p, f=frame: f.to_parquet(p, index=False))
        results[name] = ext.metrics(answers, data, args.seed)
        write_results(folder, {"spec": spec, "metrics": results[name]}, "external_scores")
    rows = ext.summary_rows(results, args.seed)
    table = markdown_table(pd.DataFrame(rows).fillna("-").to_dict("records"))
    atomic_write_json(root / "summary.json", {"eval_set": str(external.path), "kinds": kinds, "rows": rows})
    atomic_write_text(
        root / "summary.md",
        f"Held-out external latents of {external.path} ({sizes}); means over latents with 95% CIs resampling "
        "latents; `- recorded`: paired difference to the explainer's recorded answers.\n\n" + table,
    )
    print(table)
    print(f"[external] done; {root}/summary.md")


if __name__ == "__main__":
    run(main, DATACLASSES)
