"""Pieces eval/sweep.py composes: which simulators to score, their prompts, guards, predictions, metrics.

A simulator is a base model plus (for a finetuned one) a LoRA adapter, scored on an eval set built by
data_gen/build_dataset.py (all active latents of held-out latents per context + uniformly drawn inactive ones,
`negatives_per_context`). Every prompt is re-rendered from the row's `context`, `interpretation` and `score` by
latentsim.prompts (for the eval set's own interpretations it must reproduce the stored prompt byte for byte),
then tokenized with the simulator's own chat template.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from latentsim.backends import HFScorer, chat_template_sha256, hf_scorer, probabilities
from latentsim.config import REFERENCE_BASELINES
from latentsim.errors import BadInputError, ConfigError, MissingInputError
from latentsim.eval_set import EvalSet
from latentsim.io import atomic_write_json, read_results
from latentsim.prompts import get_format, render_completion, render_prompt
from latentsim.training import CHECKPOINT_COMPLETE

logger = logging.getLogger(__name__)
PREDICTION_COLUMNS = (
    "context_id",
    "row",
    "position",
    "latent",
    "active",
    "activation",
    "activation_bin",
    "quantile_bin",
    "n_active",
    "n_active_explained",
    "candidate",
)


@dataclass
class Simulator:
    name: str  # its results folder under <output_dir>/<eval set>/
    kind: str  # `finetuned`, `baseline` (prompted) or `reference` (reads nothing)
    base_model: str  # model reference (Hub id, folder, embedded:...)
    adapter: str | None = None  # LoRA adapter folder (finetuned)
    shots: int = 0  # few-shot examples prepended (baselines)
    score: bool = False  # show the interpretation score in the prompt
    interpretations: str | None = None  # another interpretation set than the eval set's
    prompt_format: str | None = None  # recorded by training (finetuned)
    chat_template_sha256: str | None = None
    train_datasets: list[str] = field(default_factory=list)
    step: int | None = None
    tensor_parallel_size: int | None = (
        None  # vLLM: this base model's engine over N GPUs (default: the sweep's)
    )


def run_simulators(run_dir: str | Path, include_checkpoints: bool = True) -> list[Simulator]:
    """The complete checkpoint-N folders (by step) and the final adapter of a train/sft.py run (or of a Hub
    adapter snapshot, which carries the same run_config.json)."""
    run = Path(run_dir)
    config_path = run / "run_config.json"
    if not config_path.is_file():
        raise MissingInputError(
            f"config key `run_dirs`: {run} has no run_config.json; is it a train/sft.py output_dir?"
        )
    config = json.loads(config_path.read_text())["config"]
    script, model = config["script"], config["model"]
    common = dict(
        kind="finetuned",
        base_model=model["model_name_or_path"],
        prompt_format=script["prompt_format"],
        chat_template_sha256=config.get("chat_template_sha256"),
        train_datasets=[script["dataset_name"], *script.get("extra_datasets", [])],
        score=False,
    )
    out = []
    if include_checkpoints:
        for ckpt in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
            if (ckpt / CHECKPOINT_COMPLETE).is_file() and (ckpt / "adapter_model.safetensors").is_file():
                out.append(
                    Simulator(
                        name=f"{run.name}__{ckpt.name}",
                        adapter=str(ckpt),
                        step=int(ckpt.name.split("-")[-1]),
                        **common,
                    )
                )
            else:
                logger.warning("skipping incomplete checkpoint %s", ckpt)
    if (run / "adapter_model.safetensors").is_file():
        step = None
        for record in (run / "eval_results.json", run / "trainer_state.json"):  # sft.py writes the first
            if step is None and record.is_file():
                step = json.loads(record.read_text()).get("global_step")
        # The final adapter is the last checkpoint's weights when training ended on a save step: score it once.
        out = [s for s in out if step is None or s.step != step]
        out.append(Simulator(name=f"{run.name}__final", adapter=str(run), step=step, **common))
    if not out:
        raise MissingInputError(
            f"config key `run_dirs`: {run} holds no adapter (no adapter_model.safetensors)."
        )
    return out


def baseline_simulator(spec: dict) -> Simulator:
    kind = "reference" if spec["model"] in REFERENCE_BASELINES else "baseline"
    return Simulator(
        name=f"baseline__{spec['name']}",
        kind=kind,
        base_model=spec["model"],
        shots=spec["shots"],
        score=spec["score"],
        interpretations=spec["interpretations"],
        tensor_parallel_size=spec.get("tensor_parallel_size"),
    )


def judged_format(fmt: str) -> str:
    """The per-judgment format whose eval sets a simulator trained on `fmt` scores (a dense format's `judges`)."""
    f = get_format(fmt)
    return f.judges if f.dense else f.name


def scorer_format(sim: Simulator, eval_format: str) -> str:
    """The format whose answer tokens a simulator is read at: its own when dense, else the eval set's."""
    return sim.prompt_format if sim.prompt_format and get_format(sim.prompt_format).dense else eval_format


def check_simulator(sim: Simulator, tokenizer, eval_format: str) -> None:
    """Refuse a finetuned simulator trained with another prompt format or chat template than the eval's."""
    if sim.kind != "finetuned":
        return
    if judged_format(sim.prompt_format) != eval_format:
        raise BadInputError(
            f"{sim.name}: trained on prompt format {sim.prompt_format!r}, the eval set is "
            f"{eval_format!r}; build an eval set with prompt_format: {judged_format(sim.prompt_format)}."
        )
    sha = chat_template_sha256(tokenizer)
    if sim.chat_template_sha256 and sim.chat_template_sha256 != sha:
        raise BadInputError(
            f"{sim.name}: the chat template (sha256 {sha[:12]}) differs from the one it was trained with "
            f"({sim.chat_template_sha256[:12]}); scoring would use another prompt than training."
        )


def few_shot_messages(eval_set: EvalSet, shots: int, seed: int, interpretations, score: bool) -> list[dict]:
    """`shots` solved examples from the eval set's train split (other latents than the test split in `latents`
    mode), half positive for binary formats, as user/assistant turns in the same format."""
    if not shots:
        return []
    fmt, label = eval_set.prompt_format, eval_set.label
    train = pd.read_parquet(eval_set.path / "train.parquet")
    rng = np.random.default_rng(seed)
    if eval_set.binary:
        pos, neg = train[train["active"] == 1], train[train["active"] == 0]
        n_pos = min(len(pos), (shots + 1) // 2)
        picks = pd.concat(
            [
                pos.iloc[rng.choice(len(pos), n_pos, replace=False)],
                neg.iloc[rng.choice(len(neg), min(len(neg), shots - n_pos), replace=False)],
            ]
        )
    else:
        picks = train.iloc[rng.choice(len(train), min(shots, len(train)), replace=False)]
    picks = picks.iloc[rng.permutation(len(picks))]
    messages = []
    for _, row in picks.iterrows():
        interp = (
            interpretations.get(int(row["latent"]), row["interpretation"])
            if interpretations
            else row["interpretation"]
        )
        messages += render_prompt(fmt, row["context"], interp, row["score"] if score else None)
        messages += render_completion(fmt, int(row[label]))  # label: the eval set's `active` or bin column
    return messages


def judgment_prompts(
    df: pd.DataFrame, sim: Simulator, fmt: str, prefix: list[dict], interpretations: dict[int, str] | None
) -> tuple[list[list[dict]], np.ndarray]:
    """The prompt of every row (and a mask of rows kept: an interpretation override may lack some latents).
    With the eval set's own interpretations and score setting, each must equal the stored prompt."""
    prompts, keep = [], np.ones(len(df), dtype=bool)
    has_score = df["score"].notna().all() if "score" in df else False
    if sim.score and not has_score:
        raise ConfigError(
            f"{sim.name}: score=true but the eval set has no interpretation scores; build it with score_path."
        )
    own = interpretations is None and sim.score == has_score
    for i, row in enumerate(df.itertuples(index=False)):
        interp = row.interpretation if interpretations is None else interpretations.get(int(row.latent))
        if interp is None:
            keep[i] = False
            continue
        messages = render_prompt(fmt, row.context, interp, row.score if sim.score else None)
        if own and messages != list(row.prompt):
            raise BadInputError(
                f"row {i}: re-rendering gives another prompt than the eval set stores; the prompt format "
                f"{fmt} changed since the eval set was built. Rebuild it."
            )
        prompts.append(prefix + messages)
    return prompts, keep


def predictions_table(df: pd.DataFrame, logits: np.ndarray, fmt: str) -> pd.DataFrame:
    """Per judgment: identifiers, labels, raw answer logits and renormalised probabilities."""
    out = df[list(PREDICTION_COLUMNS)].copy().reset_index(drop=True)
    probs = probabilities(logits.astype(np.float64))
    for k in range(logits.shape[1]):
        out[f"logit_{k}"] = logits[:, k]
    if get_format(fmt).label == "active":
        out["p_yes"] = probs[:, 1]
    else:
        for k in range(probs.shape[1]):
            out[f"p_digit_{k}"] = probs[:, k]
    return out


def simulators_to_score(args, api=None) -> list[Simulator]:
    """Every simulator an EvalArguments names: checkpoints and final adapters of `run_dirs`, each branch of the
    `hub_runs` repos (downloaded), then the prompting `baselines`. Resolved (and refused) before any model loads."""
    from latentsim.hub import download_adapter_branches

    sims = [s for run in args.run_dirs for s in run_simulators(run, args.include_checkpoints)]
    for repo in args.hub_runs:
        for branch, folder in download_adapter_branches(repo, Path(args.output_dir) / "hub", api=api):
            sim = run_simulators(folder, include_checkpoints=False)[-1]
            sim.name = f"{repo.replace('/', '--')}@{branch}"
            sims.append(sim)
    for sim in sims:
        if args.backend == "vllm" and get_format(sim.prompt_format).dense:
            raise ConfigError(
                f"{sim.name}: dense simulators are scored with backend: hf (the vLLM backend reads a "
                "chat prompt's next token, not a verdict at a text position)."
            )
    return sims + [baseline_simulator(b) for b in args.parsed_baselines]


def simulator_spec(sim: Simulator, args, splits: dict) -> dict:
    """What a simulator's folder holds results of (spec.json): a finished folder answers only the same spec."""
    return {
        "simulator": asdict(sim),
        "eval_set": str(Path(args.eval_set)),
        "splits": list(splits),
        "max_contexts": args.max_contexts,
        "calibration_contexts": args.calibration_contexts,
        "seed": args.seed,
        "backend": args.backend,
        "dtype": args.dtype,
    }


def gpus_per_rank(sims: list[Simulator], args) -> int:
    """Under `accelerate launch` with vLLM, the GPUs each rank owns: the most any of its engines spans (rank r
    takes GPUs r*n .. r*n + n - 1 of its machine, so ranks never share one)."""
    return max([args.tensor_parallel_size] + [s.tensor_parallel_size or 0 for s in sims])


def open_simulator_folder(folder: Path, spec: dict, overwrite: bool) -> dict | None:
    """The finished results of `folder` (None when there are none yet), refusing a folder of another spec;
    `overwrite` empties it first. Predictions of finished splits stay for the resumed run."""
    if overwrite and folder.exists():
        for f in folder.iterdir():
            f.unlink()
    old = json.loads((folder / "spec.json").read_text()) if (folder / "spec.json").is_file() else None
    if (
        old is not None
    ):  # a field added since, left at its default (None, 0), is no difference (the old behaviour)
        spec = {k: v for k, v in spec.items() if k in old or v not in (None, 0)}
        spec["simulator"] = {
            k: v for k, v in spec["simulator"].items() if k in old.get("simulator", {}) or v is not None
        }
    if old is not None and old != spec:
        diff = sorted(k for k in spec if spec[k] != old.get(k))
        raise BadInputError(
            f"{folder} holds results of another setup (differs in {diff}); pass --overwrite true "
            "or choose another output_dir."
        )
    return read_results(folder)


def score_simulator(
    sim: Simulator, args, eval_set: EvalSet, splits: dict[str, pd.DataFrame], pool, folder: Path
) -> dict:
    """Predictions of `sim` for every split (reusing finished ones, each written as it completes) and the
    scoring speed. `pool` is a latentsim.backends.ModelPool."""
    from tqdm.auto import tqdm

    from latentsim.explain import load_interpretations
    from latentsim.prompts import answer_token_ids

    if sim.kind == "reference":
        return score_reference(sim, args, eval_set, splits, folder)
    fmt = eval_set.prompt_format
    tokenizer = pool.tokenizer_for(sim)
    check_simulator(sim, tokenizer, fmt)
    answer_ids = answer_token_ids(scorer_format(sim, fmt), tokenizer)
    interpretations = (
        load_interpretations(sim.interpretations, eval_set.hookpoint, eval_set.width)
        if sim.interpretations
        else None
    )
    prefix = few_shot_messages(eval_set, sim.shots, args.seed, interpretations, sim.score)
    predictions, timing, scorer = {}, {}, None
    for split, df in splits.items():
        path = folder / f"predictions_{split}.parquet"
        if path.is_file():
            predictions[split] = pd.read_parquet(path)
            continue
        prompts, keep = judgment_prompts(df, sim, fmt, prefix, interpretations)
        if scorer is None:
            scorer = pool.scorer(sim, tokenizer, answer_ids)
        t0 = time.perf_counter()
        with tqdm(total=len(prompts), desc=f"{sim.name} ({split})", unit="judgment") as bar:
            logits = scorer.label_logits(prompts, progress=bar)
        seconds = time.perf_counter() - t0
        timing[split] = {
            "judgments": len(prompts),
            "seconds": seconds,
            "judgments_per_s": len(prompts) / seconds,
            "dropped_without_interpretation": int((~keep).sum()),
        }
        predictions[split] = save_predictions(path, df[keep], logits, fmt)
    if scorer is not None:
        pool.release(scorer)
    return {
        "predictions": predictions,
        "timing": timing,
        "chat_template_sha256": chat_template_sha256(tokenizer),
        "answer_token_ids": answer_ids,
    }


def score_reference(
    sim: Simulator, args, eval_set: EvalSet, splits: dict[str, pd.DataFrame], folder: Path
) -> dict:
    """Predictions of a reference baseline (latentsim.reference), fitted on the eval set's calibration split (held-out
    latents like the test split's, so the same share of positives; the train split's larger latent pool holds more
    actives per context) or, without one, its train split."""
    from latentsim.explain import load_interpretations
    from latentsim.reference import ReferenceModel

    eval_set.require_binary(f"the reference baseline {sim.base_model}")
    interpretations = (
        load_interpretations(sim.interpretations, eval_set.hookpoint, eval_set.width)
        if sim.interpretations
        else None
    )
    firing_rate = eval_set.statistics["firing_rate"].double().numpy()
    fit_split = args.calibration_split or "train"
    fit = eval_set.split(fit_split)
    if interpretations is not None:
        fit = fit[fit["latent"].isin(interpretations)]
    model = ReferenceModel(sim.base_model, fit, firing_rate, interpretations)
    predictions, timing = {}, {}
    for split, df in splits.items():
        keep = (
            df["latent"].isin(interpretations).to_numpy()
            if interpretations is not None
            else np.ones(len(df), bool)
        )
        t0 = time.perf_counter()
        logits = model.label_logits(df[keep])
        seconds = time.perf_counter() - t0
        timing[split] = {
            "judgments": int(keep.sum()),
            "seconds": seconds,
            "dropped_without_interpretation": int((~keep).sum()),
        }
        predictions[split] = save_predictions(
            folder / f"predictions_{split}.parquet", df[keep], logits, eval_set.prompt_format
        )
    return {
        "predictions": predictions,
        "timing": timing,
        "chat_template_sha256": None,
        "answer_token_ids": None,
        "reference": {
            "features": model.columns,
            "weights": model.weights.tolist(),
            "feature_mean": model.mean.tolist(),
            "feature_scale": model.scale.tolist(),
            "fitted_on": {"split": fit_split, "judgments": len(fit)},
        },
    }


# The references a simulator's AUC lift is measured against (results.json key -> reference model): the firing-rate
# prior, and the best reference that reads nothing, prior+string_match (the bar a simulator must clear).
LIFT_REFERENCES = {"lift_over_prior": "prior", "lift_over_prior_string_match": "prior+string_match"}


def add_lifts(
    root: Path, sims: list[Simulator], rows: list[dict], split: str, seed: int, by: str = "context_id"
) -> list[dict]:
    """Every simulator's per-context (by="latent": per-latent) AUC lift over each LIFT_REFERENCES reference the
    sweep scored (with the eval set's own interpretations) on the same judgments, with its paired bootstrap CI,
    written into its results.json; returns the summary rows (one per simulator, in `sims` order) updated."""
    from latentsim.io import write_results
    from latentsim.metrics import lift_over_reference, summary_row

    references = {
        key: next(
            (s for s in sims if s.kind == "reference" and s.base_model == model and not s.interpretations),
            None,
        )
        for key, model in LIFT_REFERENCES.items()
    }
    references = {key: ref for key, ref in references.items() if ref is not None}
    if not references:
        return rows
    tables = {
        key: pd.read_parquet(root / ref.name / f"predictions_{split}.parquet")
        for key, ref in references.items()
    }
    updated = []
    for sim in sims:
        record = read_results(root / sim.name)
        preds = pd.read_parquet(root / sim.name / f"predictions_{split}.parquet")
        for key, ref in references.items():
            record["results"][key] = {
                "reference": ref.name,
                **lift_over_reference(preds, tables[key], seed=seed, by=by),
            }
        write_results(root / sim.name, record)
        updated.append(summary_row(sim.name, sim.kind, sim.step, record["results"]))
    return updated


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    return (
        "\n".join(
            ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
        )
        + "\n"
    )


def save_predictions(path: Path, df: pd.DataFrame, logits: np.ndarray, fmt: str) -> pd.DataFrame:
    """One split's predictions table (predictions_table), written atomically to `path`; returns it."""
    from latentsim.io import atomic_save

    table = predictions_table(df, logits, fmt)
    atomic_save(path, lambda tmp: table.to_parquet(tmp, index=False))
    return table


def load_simulator_scorer(
    ref: str, fmt: str, dtype: str, device: str, batch_size: int = 32
) -> tuple[HFScorer, str]:
    """An hf scorer for one simulator: a train/sft.py run folder (its final adapter, its own tokenizer, checked
    against `fmt`) or a model reference (untuned). Returns (scorer, simulator name)."""
    from latentsim.models import load_model_and_tokenizer, load_tokenizer
    from latentsim.prompts import answer_token_ids

    sim = (
        run_simulators(ref, include_checkpoints=False)[-1]
        if (Path(ref) / "run_config.json").is_file()
        else None
    )
    model, tokenizer = load_model_and_tokenizer(sim.base_model if sim else ref, dtype=dtype, device=device)
    if sim:
        from peft import PeftModel

        tokenizer = load_tokenizer(sim.adapter)
        check_simulator(sim, tokenizer, fmt)
        model = PeftModel.from_pretrained(model, sim.adapter).eval()  # LoRA layers stay unmerged
        ids = answer_token_ids(scorer_format(sim, fmt), tokenizer)
        return hf_scorer(model, tokenizer, ids, batch_size, sim.prompt_format), sim.name
    return HFScorer(model, tokenizer, answer_token_ids(fmt, tokenizer), batch_size), ref


# The sweep's files: `<root>/<simulator>/results.json` per simulator (latentsim.io.write_results) and
# `<root>/summary.json` across them, with root = <output_dir>/<eval set>. Written and read only here.
SUMMARY_FILE = "summary.json"


def write_summary(root: Path, summary: dict) -> None:
    atomic_write_json(Path(root) / SUMMARY_FILE, summary)


def read_summary(root: str | Path) -> dict | None:
    path = Path(root) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_sweeps(sweep_dir: str | Path) -> dict[str, list[dict]]:
    """{eval set: [its simulators' results.json records (plus `name`), in summary order]} of a sweep output_dir."""
    out = {}
    for summary_path in sorted(Path(sweep_dir).glob(f"*/{SUMMARY_FILE}")):
        root = summary_path.parent
        records = [
            {"name": r["simulator"], **rec}
            for r in read_summary(root)["rows"]
            if (rec := read_results(root / r["simulator"])) is not None
        ]
        if records:
            out[root.name] = records
    if not out:
        raise MissingInputError(
            f"config key `sweep_dir`: no */{SUMMARY_FILE} under {sweep_dir}; run eval/sweep.py first."
        )
    return out
