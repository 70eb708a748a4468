"""The run summary's sections that read one kind of output each (eval/summary.py prints them in order):
a latent's top contexts, interpretation scores, datasets, simulators."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def top_contexts(reader, latent: int, tokenizer, n: int = 3, window: int = 12) -> list[str]:
    """The `n` highest activations of `latent`, each with the preceding tokens; the active token in [[ ]]."""
    cache = reader.select(splits=[reader.split_of(latent)])  # only the latent's split file
    idx = torch.nonzero(cache.locations[:, 2] == latent).flatten()
    best = idx[torch.argsort(cache.activations[idx], descending=True)[:n]]
    out = []
    for i in best.tolist():
        row, pos, _ = cache.locations[i].tolist()
        before = tokenizer.decode(cache.tokens[row, max(1, pos - window) : pos])
        token = tokenizer.decode(cache.tokens[row, pos : pos + 1])
        out.append(f"{cache.activations[i]:6.2f}  ...{before}[[{token}]]".replace("\n", "\\n"))
    return out


def print_simulators(run_dir: Path) -> None:
    for path in sorted((run_dir / "sft").glob("*/eval_results.json")):
        results = json.loads(path.read_text())
        m = {k.removeprefix("eval_"): v for k, v in results["metrics"].items()}
        adapter = results.get("adapter", {})
        print(
            f"\nSIMULATOR {path.parent}  (LoRA r={adapter.get('r')}, {adapter.get('n_parameters')} "
            f"parameters, {results['prompt_format']})"
        )
        print(
            f"      validation (held-out latents): AUC {m.get('auc', float('nan')):.3f} | recall "
            f"{m.get('recall', 0):.3f} | precision {m.get('precision', 0):.3f} | F1 {m.get('f1', 0):.3f} | "
            f"ECE {m.get('ece', 0):.3f} | mean P(yes) {m.get('mean_p_yes', 0):.3f}"
        )
        if "reload_max_abs_diff_p_yes" in adapter:
            print(
                "      the saved adapter, reloaded with peft.PeftModel.from_pretrained, gives the same "
                f"P(yes) (max |diff| {adapter['reload_max_abs_diff_p_yes']:.1e})"
            )


def print_scores(run_dir: Path) -> None:
    for path in sorted((run_dir / "scores").glob("*/*.json")):
        values = np.array(list(json.loads(path.read_text()).values()))
        print(
            f"\nSCORES {path}: {path.stem} balanced accuracy of {path.parent.name} interpretations over "
            f"{len(values)} latents: median {np.median(values):.3f} (25-75%: {np.percentile(values, 25):.3f}-"
            f"{np.percentile(values, 75):.3f}; 0.5 is chance)"
        )


def print_datasets(run_dir: Path) -> None:
    for stats_path in sorted((run_dir / "datasets").glob("*/dataset_stats.json")):
        stats = json.loads(stats_path.read_text())
        print(
            f"\nDATASET {stats_path.parent}  "
            f"({stats['prompt_format']}, label {stats['label']}; card in README.md)"
        )
        for split, v in stats["splits"].items():
            print(
                f"      {split:<10} {v['examples']:>6} examples, {v['positives']:>5} positive, "
                f"{v['latents']:>5} latents, {v['rows']:>4} rows"
            )
        print(
            f"      latents without an interpretation: {stats['latents_without_interpretation']} of "
            f"{stats['width']}; active latents left out for lack of one: "
            f"{stats['active_without_interpretation']}"
        )
