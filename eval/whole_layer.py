"""The whole layer rewritten by a simulator: every explained latent judged at the judged positions of held-out
texts.

    python eval/whole_layer.py --config configs/eval/whole_layer_quickstart.yaml [--key value ...]

For each held-out text (a cache row of the eval set's `split`, positions 1..`tokens`; never a row the
simulator trained on) the simulator judges every explained latent of the SAE at every position
(`positions: all`) or at the last one only (`last`: the seed's setting), the layer output is rebuilt from its
verdicts alone and patched in there, and KL(p_clean || p_patched) and the CE of the next token are measured
per judged position against the SAE (ceiling), `no_latents` (b_dec: floor) and a reference that flags latents
at random with their firing rates (latentsim.whole_layer). A dense simulator reads every position in one pass;
a sim_v1 simulator (finetuned, or a prompted `baseline`) costs one prompt per (position, latent), sharing each
position's context prefix. `l0_matched` is fitted on validation rows. Writes `scores/<row>.npy` per text
(P(yes) [tokens, explained latents], NaN where not judged; a rerun reuses them), `per_position.parquet`,
`results.json` (KL/CE with 95% CIs, recovery, the share of the active latents the simulator controls, judgment
metrics, judgments/s) and `run_config.json` to `output_dir`.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from latentsim import whole_layer
from latentsim.cli import run
from latentsim.config import WholeLayerArguments
from latentsim.errors import ConfigError
from latentsim.eval_set import EvalSet
from latentsim.held_out import training_rows_and_latents
from latentsim.io import atomic_save, read_results, write_results, write_run_config
from latentsim.models import load_model_and_tokenizer
from latentsim.patching import clean_pass
from latentsim.simulators import ScorerFactory, ScoringOptions

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (WholeLayerArguments,)


def main(args: WholeLayerArguments) -> dict:
    eval_set = EvalSet.open(args.eval_set)
    eval_set.require_binary("whole-layer patching")
    sim = whole_layer.simulator_for(args)
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
    interpretations = eval_set.interpretations()
    explained = sorted(interpretations)

    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "whole_layer", {"whole_layer": args}, args.seed)
    subject, subject_tok = load_model_and_tokenizer(
        eval_set.subject_model, dtype=args.dtype, device=args.device
    )
    device = next(subject.parameters()).device
    sae = eval_set.load_sae(device)
    factory = ScorerFactory(ScoringOptions.from_args(args))
    scorer = factory.load(factory.prepare(sim, "sim_v1", eval_set=eval_set, seed=args.seed))
    listed = [interpretations[i] for i in explained]
    judged = np.arange(args.tokens) if args.positions == "all" else np.array([args.tokens - 1])
    sim_v1 = None if sim.dense else {"judged": judged, "context_tokens": args.context_tokens}
    # A dense simulator judges every text in one pass over the latents: each interpretation's header once.
    scores = whole_layer.judge_texts(
        scorer, listed, tokens, calibration + rows, args.tokens, subject_tok, out / "scores", sim_v1
    )

    explained_t = torch.tensor(explained, device=device)
    stats = eval_set.statistics
    firing_rate = stats["firing_rate"].to(device)
    medians = eval_set.decile_edges(device)[:, 5]

    def true_latents(row: int) -> torch.Tensor:
        ids = tokens[row, : args.tokens + 1].long().to(device)
        _, _, x_out, _ = clean_pass(subject, ids, eval_set.layer)
        return sae.encode(x_out[1:].to(sae.W_dec.dtype))

    thresholds = {t: float(t) for t in args.thresholds if t != "l0_matched"}
    if "l0_matched" in args.thresholds:
        cal_p = [scores[r][judged] for r in calibration]
        cal_truth = [(true_latents(r)[judged][:, explained_t] > 0).cpu().numpy() for r in calibration]
        thresholds["l0_matched"] = whole_layer.l0_matched_threshold(cal_p, cal_truth)

    gen = torch.Generator().manual_seed(args.seed)
    decoder_norms = sae.W_dec.norm(dim=1)
    records, p_all, truth_all, shares = [], [], [], []
    for row in rows:
        p = scores[row]
        ids = tokens[row, : args.tokens + 1].long().to(device)
        next_ids = tokens[row, 2 : args.tokens + 2].long().to(device)
        flagged = whole_layer.decisions(p, thresholds, firing_rate[explained_t].cpu(), gen)
        per_source, z, clean_ce = whole_layer.patch_text(
            subject,
            sae,
            ids,
            next_ids,
            eval_set.layer,
            lambda z, flagged=flagged: whole_layer.layer_sources(
                z, explained_t, flagged, args.values, medians, sae
            ),
            None if args.positions == "all" else judged,
        )
        p_all.append(p[judged])
        truth_all.append((z[judged][:, explained_t] > 0).cpu().numpy())
        shares.append(whole_layer.controlled_share(z[judged], explained_t, decoder_norms))
        for source, (kl, ce) in {"clean": (np.zeros(len(judged)), clean_ce), **per_source}.items():
            records += [
                {"row": row, "position": int(j) + 1, "source": source, "kl": float(kl[i]), "ce": float(ce[i])}
                for i, j in enumerate(judged)
            ]

    table = pd.DataFrame(records)
    atomic_save(out / "per_position.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    trained = np.array([lat in trained_latents for lat in explained])
    p_stack, truth_stack = np.concatenate(p_all), np.concatenate(truth_all)
    timing = {
        json.dumps(t): t
        for t in (json.loads((out / "scores" / f"row{r}.json").read_text()) for r in calibration + rows)
    }
    result = {
        "eval_set": str(eval_set.path),
        "simulator": sim.adapter or sim.name,
        "prompt_format": sim.prompt_format or "sim_v1",
        "hookpoint": eval_set.hookpoint,
        "split": args.split,
        "rows": rows,
        "calibration_rows": calibration,
        "tokens_per_text": args.tokens,
        "positions": args.positions,
        "explained_latents": len(explained),
        "width": eval_set.width,
        "kl_direction": "KL(p_clean || p_patched), nats, mean over positions 1..tokens of every text",
        "thresholds": thresholds,
        "sources": whole_layer.summarise_table(table, args.seed),
        "controlled": {k: float(np.mean([s[k] for s in shares])) for k in shares[0]},
        "judgments": whole_layer.judgment_metrics(
            p_stack, truth_stack, trained, firing_rate[explained_t].cpu().numpy(), thresholds, args.seed
        ),
        "timing": list(timing.values()),
    }
    write_results(out, result, "whole_layer")
    print(whole_layer.format_table(result))
    print(f"[whole_layer] {out / 'results.json'}")
    return read_results(out)


if __name__ == "__main__":
    run(main, DATACLASSES)
