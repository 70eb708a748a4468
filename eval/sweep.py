"""Score simulators (every checkpoint of finetuning runs, Hub branches, prompting baselines) on one eval set.

    python eval/sweep.py --config configs/eval/sweep_smollm2-135m_quickstart.yaml [--key value ...]

For each simulator writes `<output_dir>/<eval set>/<simulator>/`: `spec.json` (what is scored), one
`predictions_<split>.parquet` per split (context, latent, labels, activation, bins, answer logits and
P(yes) or the digit distribution: every metric can be recomputed from it) and `results.json` (metrics +
config, git sha, versions, seed, prompt format, backend). Finished simulators are skipped unless
`--overwrite`; an interrupted one resumes at the next unscored split. Then `summary.json` / `summary.md`
across simulators.
`accelerate launch --num_processes N eval/sweep.py ...` shares the simulators out across N processes (each its
own GPU, or its own vLLM engine on its own GPUs); rank 0 writes the summary once all are scored.
"""

from dataclasses import asdict
from pathlib import Path

from latentsim.cli import run
from latentsim.config import EvalArguments
from latentsim.confirmation import record_look
from latentsim.distributed import Ranks
from latentsim.eval_set import EvalSet
from latentsim.interpretation_scores import load_scores
from latentsim.io import (
    atomic_write_json,
    provenance,
    read_results,
    write_results,
    write_run_config,
)
from latentsim.metrics import evaluate, summary_row
from latentsim.simulators import ScorerFactory, ScoringOptions, simulators_to_score
from latentsim.sweep import (
    add_lifts,
    eval_splits,
    gpus_per_rank,
    l0_target,
    open_simulator_folder,
    score_simulator,
    simulator_spec,
    write_summary,
)
from latentsim.tables import progress_line

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (EvalArguments,)


def main(args: EvalArguments, api=None) -> None:
    eval_set = EvalSet.open(args.eval_set)
    if not eval_set.latent_major:  # latent-major sets have no dictionary-wide extrapolation to protect
        eval_set.require_uniform_negatives()
    ranks = Ranks.from_env()
    sims = simulators_to_score(args, api)
    factory = ScorerFactory(ScoringOptions.from_args(args), ranks, gpus_per_rank(sims, args))
    for sim in sims:  # every run and baseline is refused before any model loads
        factory.check(sim, eval_set.prompt_format)
    splits = eval_splits(eval_set, args)
    # Dictionary-wide extrapolations are over the latents a simulator can be asked about: the explained ones;
    # their L0 target comes from the calibration split (the test split only when there is none).
    width, (l0, l0_source) = eval_set.judged_width, l0_target(eval_set, splits, args)
    w_dec = eval_set.decoder_weights() if eval_set.binary else None
    scores = {
        Path(p).stem: load_scores(p, eval_set.hookpoint, eval_set.width, key="score_files")
        for p in args.score_files
    }
    root = Path(args.output_dir) / eval_set.name
    root.mkdir(parents=True, exist_ok=True)
    if ranks.is_main:
        write_run_config(root, "eval_sweep", {"eval": args}, args.seed)
    look = (  # every read of the locked confirmation split is recorded (latentsim.confirmation)
        record_look(eval_set.path, "eval_sweep", root, [s.name for s in sims])
        if args.confirm and ranks.is_main
        else None
    )
    sizes = ", ".join(
        f"{s}: {len(d)} judgments, {d.context_id.nunique()} contexts" for s, d in splits.items()
    )
    print(
        f"[sweep] {len(sims)} simulators x {eval_set.path} ({eval_set.prompt_format}; {sizes}; judged "
        f"dictionary: {width} explained of {eval_set.width} latents, {l0:.1f} of them active per judged "
        f"token in {l0_source})"
    )

    for sim in ranks.share(sims):  # by position: the ranks need not talk to split the work
        folder = root / sim.name
        spec = simulator_spec(sim, args, splits)
        if open_simulator_folder(folder, spec, args.overwrite) is not None:
            print(f"[sweep] {sim.name}: finished earlier, skipped")
            continue
        setup = factory.prepare(
            sim,
            eval_set.prompt_format,
            eval_set=eval_set,
            seed=args.seed,
            frames=splits,
            allow_seen_latents=args.allow_seen_latents,
        )
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "spec.json", spec)
        scored = score_simulator(setup, eval_set, splits, factory, folder)
        preds = scored["predictions"]
        results = evaluate(
            preds[args.eval_split],
            preds.get(args.calibration_split),
            binary=eval_set.binary,
            width=width,
            l0=l0,
            w_dec=w_dec,
            scores=scores,
            seed=args.seed,
            latent_major=eval_set.latent_major,
        )
        write_results(
            folder,
            {
                "results": results,
                "simulator": asdict(sim),
                "eval_set": {
                    "path": str(eval_set.path),
                    "split": args.eval_split,
                    "calibration_split": args.calibration_split,
                    "l0_source": l0_source,
                    "prompt_format": eval_set.prompt_format,
                    "build_config": eval_set.build,
                },
                "scoring": {
                    "backend": "reference" if sim.kind == "reference" else args.backend,
                    "timing": scored["timing"],
                    "chat_template_sha256": scored["chat_template_sha256"],
                    "answer_token_ids": scored["answer_token_ids"],
                    "reference_model": scored.get("reference"),
                    "control": scored["control"],
                },
                "provenance": provenance("eval_sweep", {"eval": args}, args.seed),
            },
            "simulator_sweep",
        )
        row = summary_row(sim.name, sim.kind, sim.step, results)
        who = f" ({ranks.who})" if ranks.who else ""
        print(f"[sweep] {sim.name}{who}: {progress_line(row)}")
    ranks.wait_for_all()
    if not ranks.is_main:
        return  # rank 0 merges every rank's simulators into the summary
    rows = [
        summary_row(sim.name, sim.kind, sim.step, read_results(root / sim.name)["results"]) for sim in sims
    ]
    if eval_set.binary:  # beside the seed's AUC: how much of it the latent's frequency alone already gives
        rows = add_lifts(
            root,
            sims,
            rows,
            args.eval_split,
            args.seed,
            by="latent" if eval_set.latent_major else "context_id",
        )
    write_summary(root, eval_set, args.eval_split, rows, width, l0, l0_source, look)
    print(f"[sweep] {len(rows)} simulators: {root / 'summary.md'} (every metric: */results.json)")


if __name__ == "__main__":
    run(main, DATACLASSES)
