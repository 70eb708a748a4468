"""Print what a quickstart-style run folder holds: the SAE's quality, the cache, and a few latents' top contexts.

    python -m latentsim.summary outputs/quickstart
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from latentsim.cache import load_cache
from latentsim.explain import load_interpretations
from latentsim.latent_stats import load_statistics


def top_contexts(cache, latent: int, tokenizer, n: int = 3, window: int = 12) -> list[str]:
    """The `n` highest activations of `latent`, each with the preceding tokens; the active token in [[ ]]."""
    idx = torch.nonzero(cache.locations[:, 2] == latent).flatten()
    best = idx[torch.argsort(cache.activations[idx], descending=True)[:n]]
    out = []
    for i in best.tolist():
        row, pos, _ = cache.locations[i].tolist()
        before = tokenizer.decode(cache.tokens[row, max(1, pos - window):pos])
        token = tokenizer.decode(cache.tokens[row, pos:pos + 1])
        out.append(f"{cache.activations[i]:6.2f}  ...{before}[[{token}]]".replace("\n", "\\n"))
    return out


def main(run_dir: str) -> None:
    run = Path(run_dir)
    report_path = run / "sae" / "training_report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        held = report["held_out"]
        print(f"\nSAE   {run / 'sae'}  ({report['d_sae']} latents, TopK k={report['k']}, {report['hookpoint']})")
        print(f"      held-out FVE {held['fve']:.3f} | L0 {held['l0']:.1f} | dead latents (training tokens) "
              f"{report['train']['dead_fraction']:.1%} | trained {report['train_seconds']:.0f} s on "
              f"{report['distinct_training_tokens']} tokens")
    latents_root = run / "cache" / "latents"
    for folder in sorted(p for p in latents_root.glob("*") if p.is_dir()):
        hookpoint = folder.name
        cache = load_cache(latents_root, hookpoint)
        stats = load_statistics(run / "cache" / "stats", hookpoint)
        summary = json.loads((run / "cache" / "stats" / f"{hookpoint}.json").read_text())
        print(f"\nCACHE {folder}  (delphi layout: {len(list(folder.glob('*.safetensors')))} split files)")
        print(f"      {cache.tokens.shape[0]} rows x {cache.tokens.shape[1]} tokens, {len(cache.activations)} non-zeros, "
              f"L0 {summary['mean_l0']:.1f}, {summary['dead_fraction']:.1%} of latents never fire")
        print(f"STATS {run / 'cache' / 'stats' / (hookpoint + '.safetensors')}")
        tokenizer = cache.subject_tokenizer()
        rate = stats["firing_rate"]
        alive = torch.nonzero((rate > 0.001) & (rate < 0.05)).flatten()
        picks = alive[torch.randperm(len(alive), generator=torch.Generator().manual_seed(0))[:4]].tolist()
        interpretation_sets = {p.name: p for p in sorted((run / "explanations").glob("*")) if p.is_dir()}
        llm_set = interpretation_sets.get("llm-quantiles")
        if llm_set is not None:  # show latents that also have an LLM interpretation
            llm_latents = sorted(load_interpretations(llm_set, hookpoint, cache.width))
            picks = (llm_latents[:2] + picks)[:4]
        for latent in picks:
            print(f"\n  latent {latent}: fires on {rate[latent]:.2%} of tokens, max {stats['max_activation'][latent]:.2f}")
            for line in top_contexts(cache, latent, tokenizer):
                print(f"    {line}")
            for name, folder in interpretation_sets.items():
                path = folder / f"{hookpoint}_latent{latent}.txt"
                if path.is_file():
                    print(f"    [{name}] {json.loads(path.read_text())}")
        print_scores(run)
        print_datasets(run)
    print_simulators(run)
    print_evaluation(run)
    print()


def print_simulators(run: Path) -> None:
    for path in sorted((run / "sft").glob("*/eval_results.json")):
        results = json.loads(path.read_text())
        m = {k.removeprefix("eval_"): v for k, v in results["metrics"].items()}
        adapter = results.get("adapter", {})
        print(f"\nSIMULATOR {path.parent}  (LoRA r={adapter.get('r')}, {adapter.get('n_parameters')} parameters, "
              f"{results['prompt_format']})")
        print(f"      validation (held-out latents): AUC {m.get('auc', float('nan')):.3f} | recall {m.get('recall', 0):.3f} | "
              f"precision {m.get('precision', 0):.3f} | F1 {m.get('f1', 0):.3f} | ECE {m.get('ece', 0):.3f} | "
              f"mean P(yes) {m.get('mean_p_yes', 0):.3f}")
        if "reload_max_abs_diff_p_yes" in adapter:
            print(f"      the saved adapter, reloaded with peft.PeftModel.from_pretrained, gives the same P(yes) "
                  f"(max |diff| {adapter['reload_max_abs_diff_p_yes']:.1e})")


EVAL_COLUMNS = {"auc": "AUC", "recall": "recall", "precision": "precision", "f1": "F1",
                "precision_top_active": "prec@|A|", "ece": "ECE", "ece_temperature_scaled": "ECE (T)",
                "expected_flagged_at_0.5": "E[flagged]@0.5", "l0_matched_active_accuracy": "recall@L0-thr",
                "alignment": "align", "alignment_random_pool": "align (rand)",
                "pearson_mean_vs_quantile_bin": "r(mean, decile)", "spearman_mean_vs_quantile_bin": "rho(mean, decile)",
                "mode_accuracy_quantile_bin": "mode acc"}


def print_evaluation(run: Path) -> None:
    """The eval sweeps' tables (eval/sweep.py) and where the HTML report is."""
    for path in sorted((run / "eval").glob("*/summary.json")):
        summary = json.loads(path.read_text())
        rows = summary["rows"]
        cols = [c for c in EVAL_COLUMNS if any(c in r for r in rows)]
        head = f"{'simulator':<44}" + "".join(f"{EVAL_COLUMNS[c]:>19}" for c in cols)
        print(f"\nEVAL {path.parent}  ({summary['prompt_format']}, {rows[0]['contexts']} held-out contexts, "
              f"dictionary {summary['width']}, L0 {summary['l0']:.1f}; per-context medians)")
        print("      " + head)
        for r in rows:
            cells = "".join(f"{r[c]:>19.3f}" if isinstance(r.get(c), float) else f"{'':>19}" for c in cols)
            print(f"      {r['simulator'][:43]:<44}{cells}")
    for path in sorted((run / "eval").glob("*/patch_kl/results.json")):
        print_patching(path)
    for path in sorted((run / "eval").glob("*/generate/results.json")):
        res = json.loads(path.read_text())
        print(f"\nGENERATE {path.parent}  (layer {res['hookpoint']} rewritten, {res['sampling']}; mean "
              f"{res['kl_direction']} per token; share of active latents recovered)")
        for g in res["generations"]:
            print(f"      {g['source'][:60]:<60} KL {np.mean(g['kl']):.3f}  rec {g['recovered']:.2f}  "
                  f"{g['prompt']!r} -> {g['text']!r}")
    report = run / "eval" / "report" / "report.html"
    if report.is_file():
        print(f"\nREPORT {report}  (figures: {report.parent / 'figures'})")


def print_patching(path: Path) -> None:
    """The patched-KL table: ceiling, checks, ablations, fraction curves, simulators (judged position)."""
    res = json.loads(path.read_text())
    src = res["sources"]

    def cell(name, key="kl_judged"):
        s = src.get(name, {}).get(key)
        return f"{s['median']:.3f}" if s and s["n"] else "-"

    print(f"\nPATCH {path.parent}  ({res['n_contexts']} contexts, {res['hookpoint']}; {res['kl_direction']}, median; "
          f"CE of the next token; the clean model's CE: {cell('clean', 'ce_judged')} judged, {cell('clean', 'ce_all')} all)")
    print(f"      {'source':<44}{'KL judged':>12}{'CE judged':>12}{'KL all pos':>12}{'CE all pos':>12}")
    for name in ("sae", "sae_plus_error", "zero_ablation", "mean_ablation", "no_simulator"):
        if name in src:
            print(f"      {name:<44}{cell(name):>12}{cell(name, 'ce_judged'):>12}{cell(name, 'kl_all'):>12}"
                  f"{cell(name, 'ce_all'):>12}")
    fr = res["fractions"]
    for mode in fr["modes"]:
        curve = "  ".join(f"f={f:g}: {cell(f'fraction:{mode}:{f:g}')}" for f in fr["values"])
        print(f"      fraction ({mode}) KL judged   {curve}")
    sims = sorted({k.split("@")[0][4:] for k in src if k.startswith("sim:")})
    variants = sorted({k.split("@")[1] for k in src if k.startswith("sim:")})
    if sims:
        print(f"      {'simulator (KL judged)':<44}" + "".join(f"{v:>24}" for v in variants))
        for sim in sims:
            print(f"      {sim[:43]:<44}" + "".join(f"{cell(f'sim:{sim}@{v}'):>24}" for v in variants))


def print_scores(run: Path) -> None:
    for path in sorted((run / "scores").glob("*/*.json")):
        values = np.array(list(json.loads(path.read_text()).values()))
        print(f"\nSCORES {path}: {path.stem} balanced accuracy of {path.parent.name} interpretations over "
              f"{len(values)} latents: median {np.median(values):.3f} (25-75%: {np.percentile(values, 25):.3f}-"
              f"{np.percentile(values, 75):.3f}; 0.5 is chance)")


def print_datasets(run: Path) -> None:
    for stats_path in sorted((run / "datasets").glob("*/dataset_stats.json")):
        stats = json.loads(stats_path.read_text())
        print(f"\nDATASET {stats_path.parent}  ({stats['prompt_format']}, label {stats['label']}; card in README.md)")
        for split, v in stats["splits"].items():
            print(f"      {split:<10} {v['examples']:>6} examples, {v['positives']:>5} positive, {v['latents']:>5} latents, "
                  f"{v['rows']:>4} rows")
        print(f"      latents without an interpretation: {stats['latents_without_interpretation']} of {stats['width']}; "
              f"active latents left out for lack of one: {stats['active_without_interpretation']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "outputs/quickstart")
