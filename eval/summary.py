"""Print what a quickstart-style run folder holds: the SAE's quality, the cache, a few latents' top contexts,
interpretation scores, datasets, simulators, and the eval sweeps, patching and generation results.

    python eval/summary.py --run_dir outputs/quickstart

The layout is launch.sh quickstart's: <run_dir>/{sae,cache,explanations,scores,datasets,sft,eval}; absent
parts are skipped."""

import json
from pathlib import Path

import numpy as np
import torch

from latentsim.cache_reader import CacheReader
from latentsim.cli import run
from latentsim.config import SummaryArguments
from latentsim.explain import load_interpretations
from latentsim.io import read_results
from latentsim.latent_stats import load_statistics
from latentsim.run_summary import print_datasets, print_scores, print_simulators, top_contexts
from latentsim.sweep import read_summary
from latentsim.tables import patch_cell, patch_lines, sweep_lines
from latentsim.whole_layer import format_table

DATACLASSES = (SummaryArguments,)


def main(args: SummaryArguments) -> None:
    run_dir = Path(args.run_dir)
    report_path = run_dir / "sae" / "training_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        held = report["held_out"]
        print(
            f"\nSAE   {run_dir / 'sae'}  "
            f"({report['d_sae']} latents, TopK k={report['k']}, {report['hookpoint']})"
        )
        print(
            f"      held-out FVE {held['fve']:.3f} | L0 {held['l0']:.1f} | dead latents (training tokens) "
            f"{report['train']['dead_fraction']:.1%} | trained {report['train_seconds']:.0f} s on "
            f"{report['distinct_training_tokens']} tokens"
        )
    latents_root = run_dir / "cache" / "latents"
    for folder in sorted(p for p in latents_root.glob("*") if p.is_dir()):
        hookpoint = folder.name
        cache = CacheReader(latents_root, hookpoint)
        stats = load_statistics(run_dir / "cache" / "stats", hookpoint)
        summary = json.loads((run_dir / "cache" / "stats" / f"{hookpoint}.json").read_text())
        print(f"\nCACHE {folder}  (delphi layout: {len(list(folder.glob('*.safetensors')))} split files)")
        print(
            f"      {cache.n_rows} rows x {cache.ctx_len} tokens, {cache.n_nonzero} non-zeros, "
            f"L0 {summary['mean_l0']:.1f}, {summary['dead_fraction']:.1%} of latents never fire"
        )
        print(f"STATS {run_dir / 'cache' / 'stats' / (hookpoint + '.safetensors')}")
        tokenizer = cache.subject_tokenizer()
        rate = stats["firing_rate"]
        alive = torch.nonzero((rate > 0.001) & (rate < 0.05)).flatten()
        picks = alive[torch.randperm(len(alive), generator=torch.Generator().manual_seed(0))[:4]].tolist()
        interpretation_sets = {p.name: p for p in sorted((run_dir / "explanations").glob("*")) if p.is_dir()}
        llm_set = interpretation_sets.get("llm-quantiles")
        if llm_set is not None:  # show latents that also have an LLM interpretation
            llm_latents = sorted(load_interpretations(llm_set, hookpoint, cache.width))
            picks = (llm_latents[:2] + picks)[:4]
        for latent in picks:
            print(
                f"\n  latent {latent}: fires on {rate[latent]:.2%} of tokens, max "
                f"{stats['max_activation'][latent]:.2f}"
            )
            for line in top_contexts(cache, latent, tokenizer):
                print(f"    {line}")
            for name, interpretations in interpretation_sets.items():
                path = interpretations / f"{hookpoint}_latent{latent}.txt"
                if path.is_file():
                    print(f"    [{name}] {json.loads(path.read_text())}")
        print_scores(run_dir)
        print_datasets(run_dir)
    print_simulators(run_dir)
    print_evaluation(run_dir)
    print()


def print_table(header: str, lines: list[str]) -> None:
    print(header)
    for line in lines:
        print(f"      {line}")


def print_evaluation(run_dir: Path) -> None:
    """The eval sweeps' tables (eval/sweep.py), patching (eval/patch_kl.py), generations (eval/generate.py)
    and where the HTML report is."""
    eval_sets = sorted(p for p in (run_dir / "eval").glob("*") if p.is_dir())
    for folder in eval_sets:
        if (summary := read_summary(folder)) is not None:
            rows = summary["rows"]
            per = "per-latent" if summary.get("candidates") == "per_latent" else "per-context"
            print_table(
                f"\nEVAL {folder}  ({summary['prompt_format']}, {rows[0]['contexts']} held-out contexts, "
                f"judged dictionary {summary.get('judged_width', summary['width'])} explained latents, L0 "
                f"{summary['l0']:.1f} of them; {per} medians)",
                sweep_lines(rows),
            )
    for folder in (s / "patch_kl" for s in eval_sets):
        if (patch := read_results(folder)) is not None:
            print_table(
                f"\nPATCH {folder}  ({patch['n_contexts']} contexts, {patch['hookpoint']}; "
                f"{patch['kl_direction']}, median; CE of the next token; the clean model's CE: "
                f"{patch_cell(patch, 'clean', 'ce_judged')} judged, "
                f"{patch_cell(patch, 'clean', 'ce_all')} all)",
                patch_lines(patch),
            )
    for folder in (s / "generate" for s in eval_sets):
        if (generation := read_results(folder)) is not None:
            print_table(
                f"\nGENERATE {folder}  (layer {generation['hookpoint']} rewritten, {generation['sampling']}; "
                f"mean {generation['kl_direction']} per token; share of active latents recovered)",
                [
                    f"{g['source'][:60]:<60} KL {np.mean(g['kl']):.3f}  rec {g['recovered']:.2f}  "
                    f"{g['prompt']!r} -> {g['text']!r}"
                    for g in generation["generations"]
                ],
            )
    for folder in sorted((run_dir / "eval").glob("whole_layer*")):  # the end-to-end numbers, last
        if (whole := read_results(folder)) is not None:
            print(
                f"\nWHOLE LAYER {folder}  (every explained latent judged by {whole['simulator']}; the layer "
                "rebuilt from its verdicts alone)"
            )
            print(format_table(whole))
    report = run_dir / "eval" / "report" / "report.html"
    if report.is_file():
        print(f"\nREPORT {report}  (figures: {report.parent / 'figures'})")


if __name__ == "__main__":
    run(main, DATACLASSES)
