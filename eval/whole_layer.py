"""The whole layer rewritten by a simulator: every explained latent judged at the judged positions of held-out
texts.

    python eval/whole_layer.py --config configs/eval/whole_layer_quickstart.yaml [--key value ...]

For each of `texts` held-out texts (a cache row of the eval set's `split`, positions 1..`tokens`; never a row
the simulator trained on) the simulator judges every explained latent of the SAE at every position
(`positions: all`) or at the last one only (`last`: the seed's setting), the layer output is rebuilt from its
verdicts alone and patched in there, and KL(p_clean || p_patched) and the CE of the next token are measured
per judged position against the SAE (ceiling), `no_latents` (b_dec: floor), `mean_update` (the SAE's mean
output over the calibration texts: a stronger floor), a reference that flags latents at random with their
firing rates (the mean of `chance_draws` draws), the simulator deciding only the latents it did not train
on, and each of `references` (prior, string_match, the lexical reader...) deciding every latent from its own
P(yes) at its own thresholds (latentsim.whole_layer). A dense simulator reads every position in one pass; a
sim_v1 simulator (finetuned, or a prompted `baseline`) costs one prompt per (position, latent), sharing each
position's context prefix. `l0_matched` is fitted on `calibration_texts` validation rows, which also give
`mean_update`. Writes `scores/row<r>.npy` per text (P(yes) [tokens, explained latents], NaN where not judged;
each reference's under `scores/<name>/`; a rerun reuses them), `per_position.parquet`, `results.json` (KL/CE
with 95% CIs over texts and over blocks of positions, recovery with CIs over texts, chance's spread over its
draws, the share of the active latents the simulator controls, judgment metrics with and without positions
1-2, judgments/s) and `run_config.json` to `output_dir`. With `first_stage` (train/first_stage.py) the layer
is also rewritten in two stages: the simulator judges only the `first_stage_k` latents per token the first
stage proposes (`two_stage@...` rows, scores/two_stage/), and by the first stage alone (`first_stage@...`).
"""

from pathlib import Path

import numpy as np
import torch

from latentsim import first_stage, values, whole_layer
from latentsim.cli import run
from latentsim.config import WholeLayerArguments
from latentsim.confirmation import record_look
from latentsim.errors import ConfigError
from latentsim.eval_set import EvalSet
from latentsim.held_out import training_rows_and_latents
from latentsim.io import atomic_save, read_results, write_results, write_run_config
from latentsim.models import load_model_and_tokenizer
from latentsim.prompts import get_format
from latentsim.simulators import ScorerFactory, ScoringOptions

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (WholeLayerArguments,)


def main(args: WholeLayerArguments) -> dict:
    eval_set = EvalSet.open(args.eval_set)
    eval_set.require_binary("whole-layer patching")
    sim = whole_layer.simulator_for(args)
    references = whole_layer.reference_simulators(args.references)
    out = Path(args.output_dir)
    if (finished := whole_layer.finished_results(out, args)) is not None:
        print(f"[whole_layer] {out / 'results.json'} exists for this config; skipped")
        return finished
    tokens = eval_set.tokens
    if args.tokens > tokens.shape[1] - 2:
        raise ConfigError(
            f"config key `tokens`: cache rows have {tokens.shape[1]} tokens; at most "
            f"{tokens.shape[1] - 2} positions have a next token to score."
        )
    trained_rows, trained_latents = training_rows_and_latents(sim)
    rows = whole_layer.held_out_rows(eval_set, args.split, args.texts, args.seed, trained_rows)
    calibration = (
        whole_layer.held_out_rows(eval_set, "validation", args.calibration_texts, args.seed, trained_rows)
        if args.calibration_texts
        else []
    )
    # Calibration texts are judged only to fit `l0_matched`; `mean_update` needs their clean pass alone.
    judged_rows = calibration + rows if "l0_matched" in args.thresholds else rows
    interpretations = eval_set.interpretations()
    explained = sorted(interpretations)

    out.mkdir(parents=True, exist_ok=True)
    names = [sim.name, *args.references]
    look = record_look(eval_set.path, "whole_layer", out, names) if args.confirm else None
    write_run_config(out, "whole_layer", {"whole_layer": args}, args.seed)
    subject, subject_tok = load_model_and_tokenizer(
        eval_set.subject_model, dtype=args.dtype, device=args.device
    )
    sae = eval_set.load_sae(next(subject.parameters()).device)
    factory = ScorerFactory(ScoringOptions.from_args(args))
    ref_scores, about = whole_layer.judge_references(
        factory,
        references,
        eval_set,
        interpretations,
        judged_rows,
        args.tokens,
        subject_tok,
        out / "scores",
        args.seed,
    )
    scorer = factory.load(factory.prepare(sim, "sim_v1", eval_set=eval_set, seed=args.seed))
    judged = np.arange(args.tokens) if args.positions == "all" else np.array([args.tokens - 1])
    sim_v1 = None if sim.dense else {"judged": judged, "context_tokens": args.context_tokens}
    # A value simulator's rows hold P(yes) and its predicted value (latentsim.values: K training-row bins).
    n_bins = get_format(sim.prompt_format).value_bins if sim.dense else 0
    bins = values.bin_values(eval_set.statistics, explained, n_bins) if n_bins else None
    # A dense simulator judges every text in one pass over the latents: each interpretation's header once.
    scores = whole_layer.judge_texts(
        scorer,
        [interpretations[i] for i in explained],
        tokens,
        judged_rows,
        args.tokens,
        subject_tok,
        out / "scores",
        sim_v1,
        bins,
    )
    predicted = {r: a[..., 1] for r, a in scores.items()} if n_bins else None
    scores = {r: a[..., 0] for r, a in scores.items()} if n_bins else scores
    stages, about_stages = {}, {}
    if args.first_stage:  # the simulator again, judging only what the first stage proposes
        stages, about_stages = first_stage.judge_whole_layer(
            scorer, sim, args, eval_set, explained, judged_rows, subject_tok, out / "scores", scores
        )
    factory.release(scorer)

    with torch.no_grad():
        table, measured = whole_layer.measure(
            args,
            subject,
            sae,
            eval_set,
            rows,
            calibration,
            explained,
            {whole_layer.SIMULATOR: scores, **ref_scores, **stages},
            trained_latents,
            {**about, **about_stages},
            predicted,
        )
    atomic_save(out / "per_position.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    result = {
        "eval_set": str(eval_set.path),
        "simulator": sim.adapter or sim.name,
        "prompt_format": sim.prompt_format or "sim_v1",
        "hookpoint": eval_set.hookpoint,
        "split": args.split,
        "confirmation_look": look,  # latentsim.confirmation
        "rows": rows,
        "calibration_rows": calibration,
        "tokens_per_text": args.tokens,
        "positions": args.positions,
        "explained_latents": len(explained),
        "width": eval_set.width,
        "kl_direction": "KL(p_clean || p_patched), nats, mean over positions 1..tokens of every text",
        **measured,
        "timing": whole_layer.timings(out / "scores", judged_rows),
    }
    write_results(out, result, "whole_layer")
    print(whole_layer.format_table(result))
    print(f"[whole_layer] {out / 'results.json'}")
    return read_results(out)


if __name__ == "__main__":
    run(main, DATACLASSES)
