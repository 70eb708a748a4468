"""The whole layer rewritten by a dense simulator: every explained latent judged at every position of held-out texts.

    python eval/whole_layer.py --config configs/eval/whole_layer_quickstart.yaml [--key value ...]

For each held-out text (a cache row of the eval set's `split`, positions 1..`tokens`; never a row the simulator
trained on) the dense simulator judges every explained latent of the SAE at every position, the layer output is
rebuilt from its verdicts alone and patched in at every position, and KL(p_clean || p_patched) and the CE of the
next token are measured per position against the SAE (ceiling), `no_latents` (b_dec: floor) and a reference that
flags latents at random with their firing rates (latentsim.whole_layer). `l0_matched` is fitted on validation
rows. Writes `scores/<row>.npy` per text (P(yes) [tokens, explained latents]; a rerun reuses them),
`per_position.parquet`, `results.json` (KL/CE with 95% CIs, recovery, the share of the active latents the
simulator controls, judgment metrics, judgments/s) and `run_config.json` to `output_dir`.
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
from latentsim.io import atomic_save, read_results, require_same_config, write_results, write_run_config
from latentsim.models import load_model_and_tokenizer
from latentsim.patching import clean_pass

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (WholeLayerArguments,)


def main(args: WholeLayerArguments) -> dict:
    eval_set = EvalSet.open(args.eval_set)
    eval_set.require_binary("whole-layer patching")
    sim = whole_layer.dense_simulator(args.simulator)
    out = Path(args.output_dir)
    if args.overwrite:
        for path in [out / "results.json", out / "per_position.parquet", out / "run_config.json",
                     *(out / "scores").glob("*")]:
            path.unlink(missing_ok=True)
    if (out / "run_config.json").is_file():  # same config: finished texts are reused, finished results returned
        require_same_config(out, {"whole_layer": args}, {"whole_layer.overwrite"}, "whole-layer results",
                            "pass --overwrite true or choose another output_dir")
        if (finished := read_results(out)) is not None:
            print(f"[whole_layer] {out / 'results.json'} exists for this config; skipped")
            return finished
    tokens = eval_set.cache.tokens
    if args.tokens > tokens.shape[1] - 2:
        raise ConfigError(f"config key `tokens`: cache rows have {tokens.shape[1]} tokens; at most "
                          f"{tokens.shape[1] - 2} positions have a next token to score.")
    trained_rows, trained_latents = training_rows_and_latents(sim)
    rows = whole_layer.held_out_rows(eval_set, args.split, args.texts, args.seed, trained_rows)
    calibration = whole_layer.held_out_rows(eval_set, "validation", args.calibration_texts, args.seed, trained_rows) \
        if args.calibration_texts else []
    interpretations = eval_set.interpretations()
    explained = sorted(interpretations)

    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "whole_layer", {"whole_layer": args}, args.seed)
    subject, subject_tok = load_model_and_tokenizer(eval_set.subject_model, dtype=args.dtype, device=args.device)
    device = next(subject.parameters()).device
    sae = eval_set.load_sae(device)
    scorer = whole_layer.load_dense_scorer(sim, args.dtype, args.device, args.batch_size, args.merge_adapter)
    listed = [interpretations[i] for i in explained]
    # Every text judged in one pass over the latents: each interpretation's header is computed once.
    scores = whole_layer.judge_texts(scorer, listed, tokens, calibration + rows, args.tokens, subject_tok, out / "scores")

    explained_t = torch.tensor(explained, device=device)
    stats = eval_set.statistics
    firing_rate = stats["firing_rate"].to(device)
    medians = eval_set.decile_edges(device)[:, 5]

    def true_latents(row: int) -> torch.Tensor:
        ids = tokens[row, :args.tokens + 1].long().to(device)
        _, _, x_out, _ = clean_pass(subject, ids, eval_set.layer)
        return sae.encode(x_out[1:].to(sae.W_dec.dtype))

    thresholds = {t: float(t) for t in args.thresholds if t != "l0_matched"}
    if "l0_matched" in args.thresholds:
        cal_p = [scores[r] for r in calibration]
        cal_truth = [(true_latents(r)[:, explained_t] > 0).cpu().numpy() for r in calibration]
        thresholds["l0_matched"] = whole_layer.l0_matched_threshold(cal_p, cal_truth)

    gen = torch.Generator().manual_seed(args.seed)
    decoder_norms = sae.W_dec.norm(dim=1)
    records, p_all, truth_all, shares = [], [], [], []
    for row in rows:
        p = scores[row]
        ids = tokens[row, :args.tokens + 1].long().to(device)
        next_ids = tokens[row, 2:args.tokens + 2].long().to(device)
        flagged = whole_layer.decisions(p, thresholds, firing_rate[explained_t].cpu(), gen)
        per_source, z, clean_ce = whole_layer.patch_text(
            subject, sae, ids, next_ids, eval_set.layer,
            lambda z, flagged=flagged: whole_layer.layer_sources(z, explained_t, flagged, args.values, medians, sae))
        p_all.append(p)
        truth_all.append((z[:, explained_t] > 0).cpu().numpy())
        shares.append(whole_layer.controlled_share(z, explained_t, decoder_norms))
        for source, (kl, ce) in {"clean": (np.zeros(args.tokens), clean_ce), **per_source}.items():
            records += [{"row": row, "position": j + 1, "source": source, "kl": float(kl[j]), "ce": float(ce[j])}
                        for j in range(args.tokens)]

    table = pd.DataFrame(records)
    atomic_save(out / "per_position.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    kl_ce = {s: {"kl": g["kl"].to_numpy(), "ce": g["ce"].to_numpy()} for s, g in table.groupby("source", sort=False)}
    blocks = table[table["source"] == "clean"]
    clusters = (blocks["row"] * 10_000 + (blocks["position"] - 1) // whole_layer.BLOCK).to_numpy()
    trained = np.array([lat in trained_latents for lat in explained])
    p_stack, truth_stack = np.concatenate(p_all), np.concatenate(truth_all)
    timing = {json.dumps(t): t for t in (json.loads((out / "scores" / f"row{r}.json").read_text())
                                         for r in calibration + rows)}
    result = {
        "eval_set": str(eval_set.path), "simulator": sim.adapter, "prompt_format": sim.prompt_format,
        "hookpoint": eval_set.hookpoint, "split": args.split, "rows": rows, "calibration_rows": calibration,
        "tokens_per_text": args.tokens, "explained_latents": len(explained), "width": eval_set.width,
        "kl_direction": "KL(p_clean || p_patched), nats, mean over positions 1..tokens of every text",
        "thresholds": thresholds,
        "sources": whole_layer.summarise_sources(kl_ce, clusters, args.seed),
        "controlled": {k: float(np.mean([s[k] for s in shares])) for k in shares[0]},
        "judgments": whole_layer.judgment_metrics(p_stack, truth_stack, trained,
                                                  firing_rate[explained_t].cpu().numpy(), thresholds, args.seed),
        "timing": list(timing.values()),
    }
    write_results(out, result)
    print(whole_layer.format_table(result))
    print(f"[whole_layer] {out / 'results.json'}")
    return result


if __name__ == "__main__":
    run(main, DATACLASSES)
