"""Score simulators (every checkpoint of finetuning runs, Hub branches, prompting baselines) on one eval set.

    python eval/sweep.py --config configs/eval/sweep_smollm2-135m_quickstart.yaml [--key value ...]

For each simulator writes `<output_dir>/<eval set>/<simulator>/`: `spec.json` (what is scored), one
`predictions_<split>.parquet` per split (context, latent, labels, activation, bins, answer logits and
P(yes) or the digit distribution: every metric can be recomputed from it) and `results.json` (metrics +
config, git sha, versions, seed, prompt format, backend). Finished simulators are skipped unless `--overwrite`;
an interrupted one resumes at the next unscored split. Then `summary.json` / `summary.md` across simulators.
"""

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from latentsim.backends import FakeScorer, HFScorer, VLLMScorer, chat_template_sha256
from latentsim.cli import run
from latentsim.config import EvalArguments, SAEArguments
from latentsim.explain import load_interpretations
from latentsim.hub import download_adapter_branches
from latentsim.io import atomic_save, atomic_write_json, atomic_write_text, provenance, write_run_config
from latentsim.metrics import evaluate, summary_row
from latentsim.prompts import answer_token_ids, get_format
from latentsim.sweep import (
    baseline_simulator,
    check_simulator,
    few_shot_messages,
    judgment_prompts,
    load_scores,
    load_split,
    predictions_table,
    run_simulators,
    seen_latents,
)

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (EvalArguments,)


class Scorers:
    """One loaded base model at a time; adapters attach unmerged (PEFT) and detach again after scoring."""

    def __init__(self, args: EvalArguments):
        self.args, self.ref, self.model, self.vllm = args, None, None, None

    def tokenizer_for(self, sim):
        from transformers import AutoTokenizer

        from latentsim.models import resolve_model_path

        own = sim.adapter and (Path(sim.adapter) / "tokenizer_config.json").is_file()
        return AutoTokenizer.from_pretrained(sim.adapter if own else resolve_model_path(sim.base_model))

    def scorer(self, sim, tokenizer, answer_ids):
        if self.args.backend == "fake":
            return FakeScorer(answer_ids)
        if self.args.backend == "vllm":
            from latentsim.models import resolve_model_path

            if self.ref != sim.base_model:
                self.vllm = VLLMScorer(resolve_model_path(sim.base_model), tokenizer, answer_ids,
                                       max_lora_rank=self.args.max_lora_rank)
                self.ref = sim.base_model
            self.vllm.tokenizer, self.vllm.answer_ids = tokenizer, list(answer_ids)
            self.vllm.use_adapter(sim.adapter)
            return self.vllm
        from latentsim.models import load_model_and_tokenizer

        if self.ref != sim.base_model:
            self.model = None  # free the previous base model first
            self.model, _ = load_model_and_tokenizer(sim.base_model, dtype=self.args.dtype, device=self.args.device)
            self.ref = sim.base_model
        model = self.model
        if sim.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(self.model, sim.adapter).eval()  # LoRA layers stay unmerged
        return HFScorer(model, tokenizer, answer_ids, self.args.batch_size)

    def release(self, scorer):
        if self.args.backend == "hf" and hasattr(scorer.model, "unload"):
            self.model = scorer.model.unload()  # remove the LoRA layers, keep the base weights untouched


def simulators(args: EvalArguments, api=None) -> list:
    sims = [s for run in args.run_dirs for s in run_simulators(run, args.include_checkpoints)]
    for repo in args.hub_runs:
        for branch, folder in download_adapter_branches(repo, Path(args.output_dir) / "hub", api=api):
            sim = run_simulators(folder, include_checkpoints=False)[-1]
            sim.name = f"{repo.replace('/', '--')}@{branch}"
            sims.append(sim)
    return sims + [baseline_simulator(b) for b in args.parsed_baselines]


def decoder_weights(build_config: dict) -> np.ndarray | None:
    """W_dec of the SAE the eval set's cache was made with (for the decoder alignment)."""
    from latentsim.cache import load_cache
    from latentsim.sae import load_sae

    cache = load_cache(Path(build_config["cache_dir"]) / "latents", build_config["hookpoint"])
    sae_info = cache.config.get("latentsim", {}).get("sae")
    if not sae_info:
        return None
    return load_sae(SAEArguments(hookpoint=build_config["hookpoint"], **sae_info)).W_dec.detach().float().numpy()


def sae_l0(build_config: dict, test: pd.DataFrame) -> float:
    """The SAE's mean number of active latents per token: over the whole cache (its statistics), else over the
    eval contexts."""
    stats = Path(build_config["cache_dir"]) / "stats" / f"{build_config['hookpoint']}.json"
    if stats.is_file() and "mean_l0" in json.loads(stats.read_text()):
        return float(json.loads(stats.read_text())["mean_l0"])
    return float(test.groupby("context_id")["n_active"].first().mean())


def score_simulator(sim, args, splits, fmt, label, hookpoint, width, scorers, folder: Path) -> dict:
    """Predictions for every split (reusing finished ones) and the scoring speed."""
    tokenizer = scorers.tokenizer_for(sim)
    check_simulator(sim, tokenizer, fmt)
    answer_ids = answer_token_ids(fmt, tokenizer)
    interpretations = load_interpretations(sim.interpretations, hookpoint, width) if sim.interpretations else None
    prefix = few_shot_messages(args.eval_set, sim.shots, fmt, label, args.seed, interpretations, sim.score)
    predictions, timing, scorer = {}, {}, None
    for split, df in splits.items():
        path = folder / f"predictions_{split}.parquet"
        if path.is_file():
            predictions[split] = pd.read_parquet(path)
            continue
        prompts, keep = judgment_prompts(df, sim, fmt, prefix, interpretations)
        if scorer is None:
            scorer = scorers.scorer(sim, tokenizer, answer_ids)
        t0 = time.perf_counter()
        with tqdm(total=len(prompts), desc=f"{sim.name} ({split})", unit="judgment") as bar:
            logits = scorer.label_logits(prompts, progress=bar)
        seconds = time.perf_counter() - t0
        timing[split] = {"judgments": len(prompts), "seconds": seconds, "judgments_per_s": len(prompts) / seconds,
                         "dropped_without_interpretation": int((~keep).sum())}
        table = predictions_table(df[keep], logits, fmt)
        atomic_save(path, lambda tmp, table=table: table.to_parquet(tmp, index=False))
        predictions[split] = table
    if scorer is not None:
        scorers.release(scorer)
    return {"predictions": predictions, "timing": timing, "chat_template_sha256": chat_template_sha256(tokenizer),
            "answer_token_ids": answer_ids}


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]) + "\n"


def main(args: EvalArguments, api=None) -> None:
    eval_set = Path(args.eval_set)
    for name in ("dataset_stats.json", "run_config.json"):
        if not (eval_set / name).is_file():
            raise FileNotFoundError(f"config key `eval_set`: {eval_set / name} is missing; build the eval set with "
                                    "data_gen/build_dataset.py.")
    stats = json.loads((eval_set / "dataset_stats.json").read_text())
    build = json.loads((eval_set / "run_config.json").read_text())["config"]["dataset"]
    fmt, width, hookpoint = stats["prompt_format"], stats["width"], build["hookpoint"]
    binary = get_format(fmt).label == "active"
    sims = simulators(args, api)  # every run/baseline is resolved (and refused) before any model loads
    splits = {s: load_split(eval_set, s, args.max_contexts, args.seed)
              for s in (args.eval_split, args.calibration_split) if s and (s == args.eval_split or binary)}
    test = splits[args.eval_split]
    l0 = sae_l0(build, test)
    w_dec = decoder_weights(build) if binary else None
    scores = load_scores(args.score_files)
    root = Path(args.output_dir) / eval_set.name
    root.mkdir(parents=True, exist_ok=True)
    write_run_config(root, "eval_sweep", {"eval": args}, args.seed)
    sizes = ", ".join(f"{s}: {len(d)} judgments, {d.context_id.nunique()} contexts" for s, d in splits.items())
    print(f"[sweep] {len(sims)} simulators x {eval_set} ({fmt}; {sizes}; width {width}, L0 {l0:.1f})")

    scorers, rows = Scorers(args), []
    for sim in sims:
        folder = root / sim.name
        spec = {"simulator": asdict(sim), "eval_set": str(eval_set), "splits": list(splits),
                "max_contexts": args.max_contexts, "seed": args.seed, "backend": args.backend, "dtype": args.dtype}
        if args.overwrite and folder.exists():
            for f in folder.iterdir():
                f.unlink()
        old = json.loads((folder / "spec.json").read_text()) if (folder / "spec.json").is_file() else None
        if old is not None and old != spec:
            diff = sorted(k for k in spec if spec[k] != old.get(k))
            raise ValueError(f"{folder} holds results of another setup (differs in {diff}); pass --overwrite true "
                             "or choose another output_dir.")
        if (folder / "results.json").is_file():
            results = json.loads((folder / "results.json").read_text())
            print(f"[sweep] {sim.name}: finished earlier, skipped")
            rows.append(summary_row(sim.name, sim.kind, sim.step, results["results"]))
            continue
        if sim.kind == "finetuned":
            seen = seen_latents(sim, set(test["latent"].tolist()))
            if seen and not args.allow_seen_latents:
                raise ValueError(f"{sim.name} was trained on {len(seen)} latents of the eval set (e.g. {sorted(seen)[:5]}); "
                                 "evaluate on held-out latents (same seed and fractions as the training mixture, "
                                 "split_mode: latents) or set allow_seen_latents: true.")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "spec.json", spec)
        scored = score_simulator(sim, args, splits, fmt, stats["label"], hookpoint, width, scorers, folder)
        preds = scored["predictions"]
        results = evaluate(preds[args.eval_split], preds.get(args.calibration_split), binary=binary, width=width,
                           l0=l0, w_dec=w_dec, scores=scores, seed=args.seed)
        record = {"results": results, "simulator": asdict(sim), "eval_set": {"path": str(eval_set),
                  "split": args.eval_split, "calibration_split": args.calibration_split, "prompt_format": fmt,
                  "build_config": build}, "scoring": {"backend": args.backend, "timing": scored["timing"],
                  "chat_template_sha256": scored["chat_template_sha256"],
                  "answer_token_ids": scored["answer_token_ids"]},
                  "provenance": provenance("eval_sweep", {"eval": args}, args.seed)}
        atomic_write_json(folder / "results.json", record)
        rows.append(summary_row(sim.name, sim.kind, sim.step, results))
        print(f"[sweep] {sim.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                                   if isinstance(v, float) and k in ("auc", "recall", "precision", "f1",
                                                                                     "ece", "pearson_mean_vs_quantile_bin")))
    atomic_write_json(root / "summary.json", {"eval_set": str(eval_set), "prompt_format": fmt, "width": width,
                                              "l0": l0, "rows": rows})
    atomic_write_text(root / "summary.md", f"# {eval_set.name} ({fmt}, split {args.eval_split})\n\n"
                      "Per-context medians unless marked pooled.\n\n" + markdown_table(rows))
    print(f"[sweep] {len(rows)} simulators: {root / 'summary.md'} (every metric: */results.json)")


if __name__ == "__main__":
    run(main, DATACLASSES)
