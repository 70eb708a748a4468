"""Pieces eval/sweep.py composes: which simulators to score, their prompts, guards, predictions, metrics.

A simulator is a base model plus (for a finetuned one) a LoRA adapter, scored on an eval set built by
data_gen/build_dataset.py (all active latents of held-out latents per context + uniformly drawn inactive
ones, `negatives_per_context`). Every judgment is built from the row's `context`, `interpretation` and
`score` (latentsim.simulators.Judgment); with the eval set's own interpretations its prompt must reproduce the
stored prompt byte for byte. Each scorer renders it through its own format and chat template.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from latentsim.errors import BadInputError, ConfigError, MissingInputError
from latentsim.eval_set import EvalSet
from latentsim.io import atomic_write_json, read_results
from latentsim.prompts import get_format, render_prompt
from latentsim.simulators import Judgment, ScorerFactory, ScorerSetup, Simulator, judgments_of, probabilities
from latentsim.simulators.spec import real_simulator_name

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
OPTIONAL_PREDICTION_COLUMNS = ("negative_kind",)  # eval sets built since each negative records its draw


def eval_judgments(
    df: pd.DataFrame, sim: Simulator, fmt: str, interpretations: dict[int, str] | None
) -> tuple[list[Judgment], np.ndarray]:
    """The judgments of eval rows (and a mask of rows kept: an interpretation override may lack some latents).
    With the eval set's own interpretations and score setting, each row's prompt must render as stored."""
    has_score = df["score"].notna().all() if "score" in df else False
    if sim.score and not has_score:
        raise ConfigError(
            f"{sim.name}: score=true but the eval set has no interpretation scores; build it with score_path."
        )
    judgments, keep = judgments_of(df, interpretations, sim.score)
    if interpretations is None and sim.score == has_score:
        for i, (j, stored) in enumerate(zip(judgments, df["prompt"], strict=True)):
            if render_prompt(fmt, j.context, j.interpretation, j.score) != list(stored):
                raise BadInputError(
                    f"row {i}: re-rendering gives another prompt than the eval set stores; the prompt format "
                    f"{fmt} changed since the eval set was built. Rebuild it."
                )
    return judgments, keep


def predictions_table(df: pd.DataFrame, logits: np.ndarray, fmt: str, sensitivity=None) -> pd.DataFrame:
    """Per judgment: identifiers, labels, raw answer logits and renormalised probabilities; the hf backends'
    rounding sensitivity too (`answer_sensitivity`: what latentsim.parity bounds a comparison with)."""
    columns = [*PREDICTION_COLUMNS, *(c for c in OPTIONAL_PREDICTION_COLUMNS if c in df)]
    out = df[columns].copy().reset_index(drop=True)
    probs = probabilities(logits.astype(np.float64))
    for k in range(logits.shape[1]):
        out[f"logit_{k}"] = logits[:, k]
    if sensitivity is not None and len(sensitivity) == len(out):
        out["answer_sensitivity"] = sensitivity
    if get_format(fmt).label == "active":
        out["p_yes"] = probs[:, 1]
    else:
        for k in range(probs.shape[1]):
            out[f"p_digit_{k}"] = probs[:, k]
    return out


def eval_splits(eval_set: EvalSet, args) -> dict[str, pd.DataFrame]:
    """The judgments an EvalArguments scores: its eval split (`max_contexts`) and, for binary sets, its
    calibration split (`calibration_contexts`, default `max_contexts`), contexts sampled with its seed."""
    return {
        s: eval_set.split(
            s,
            args.max_contexts if s == args.eval_split else (args.calibration_contexts or args.max_contexts),
            args.seed,
        )
        for s in (args.eval_split, args.calibration_split)
        if s and (s == args.eval_split or eval_set.binary)
    }


def l0_target(eval_set: EvalSet, splits: dict[str, pd.DataFrame], args) -> tuple[float, str]:
    """(L0, the split it is read from): the mean number of explained latents active at a judged token, the
    budget of the L0-matched threshold and of precision at L0. Read from the calibration split, so the test
    split chooses nothing; from the eval split only when no calibration split is scored."""
    source = args.calibration_split if args.calibration_split in splits else args.eval_split
    return eval_set.judged_l0(splits[source]), source


def simulator_spec(sim: Simulator, args, splits: dict) -> dict:
    """What a simulator's folder holds results of (spec.json): a finished folder answers only the same
    spec."""
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
    setup: ScorerSetup,
    eval_set: EvalSet,
    splits: dict[str, pd.DataFrame],
    factory: ScorerFactory,
    folder: Path,
) -> dict:
    """Predictions of a prepared simulator for every split (reusing finished ones, each written as it
    completes), the scoring speed and what the scorer records about itself."""
    from tqdm.auto import tqdm

    sim, fmt = setup.sim, eval_set.prompt_format
    predictions, timing = {}, {}
    # A reference is fitted whatever is left to score: its results record the fit.
    scorer = factory.load(setup) if sim.kind == "reference" else None
    for split, df in splits.items():
        path = folder / f"predictions_{split}.parquet"
        if path.is_file():
            predictions[split] = pd.read_parquet(path)
            continue
        judgments, keep = eval_judgments(df, sim, fmt, setup.interpretations)
        if scorer is None:
            scorer = factory.load(setup)
        t0 = time.perf_counter()
        with tqdm(total=len(judgments), desc=f"{sim.name} ({split})", unit="judgment") as bar:
            logits = scorer.label_logits(judgments, progress=bar)
        seconds = time.perf_counter() - t0
        timing[split] = {
            "judgments": len(judgments),
            "seconds": seconds,
            "judgments_per_s": len(judgments) / seconds,
            "dropped_without_interpretation": int((~keep).sum()),
        }
        sensitivity = getattr(scorer, "sensitivity", None)
        predictions[split] = save_predictions(path, df[keep], logits, fmt, sensitivity)
    described = scorer.describe() if scorer is not None else None
    if scorer is not None:
        factory.release(scorer)
    return {
        "predictions": predictions,
        "timing": timing,
        "chat_template_sha256": setup.chat_template_sha256,
        "answer_token_ids": setup.answer_ids,
        "reference": described,
        "control": setup.control,
    }


# The references a simulator's AUC lift is measured against (results.json key -> reference model): the
# firing-rate prior, prior+string_match, and the lexical readers (latentsim.simulators.lexical: every cue the
# simulator is given, read without a language model; the bar a simulator must clear).
LIFT_REFERENCES = {
    "lift_over_prior": "prior",
    "lift_over_prior_string_match": "prior+string_match",
    "lift_over_lexical": "lexical",
    "lift_over_lexical_gbm": "lexical_gbm",
}
# The other grouping of a lift's pooled-AUC interval: a per-context set's lift is also resampled over latents
# (a claim about held-out latents), a latent-major set's over contexts.
OTHER_GROUPING = {"context_id": "latent", "latent": "context_id"}


def add_lifts(
    root: Path, sims: list[Simulator], rows: list[dict], split: str, seed: int, by: str = "context_id"
) -> list[dict]:
    """Every simulator's per-context (by="latent": per-latent) AUC lift over each LIFT_REFERENCES reference
    the sweep scored (with the eval set's own interpretations, under no control) on the same judgments (its
    pooled-AUC lift also resampled over the other grouping: `pooled_auc_by_latent` or `_by_context_id`), and
    every control's `control_gap`: its real simulator's AUC minus its own (pooled and per context, the real
    one as `test`, the control as `reference`), each with its paired bootstrap CI over contexts (latents),
    written into its results.json; returns the summary rows (one per simulator, in `sims` order) updated."""
    from latentsim.io import write_results
    from latentsim.metrics import lift_over_reference, summary_row

    references = {
        key: next(
            (
                s
                for s in sims
                if s.kind == "reference" and s.base_model == model and not (s.interpretations or s.control)
            ),
            None,
        )
        for key, model in LIFT_REFERENCES.items()
    }
    references = {key: ref for key, ref in references.items() if ref is not None}
    by_name = {s.name: s for s in sims}
    reals = {s.name: by_name[real_simulator_name(s)] for s in sims if real_simulator_name(s) in by_name}
    if not references and not reals:
        return rows
    read = lambda name: pd.read_parquet(root / name / f"predictions_{split}.parquet")  # noqa: E731
    tables = {key: read(ref.name) for key, ref in references.items()}
    updated = []
    for sim in sims:
        record = read_results(root / sim.name)
        preds = read(sim.name)
        for key, ref in references.items():
            other = OTHER_GROUPING[by]
            record["results"][key] = {
                "reference": ref.name,
                **lift_over_reference(preds, tables[key], seed=seed, by=by),
                f"pooled_auc_by_{other}": lift_over_reference(preds, tables[key], seed=seed, by=other)[
                    "pooled_auc"
                ],
            }
        if (real := reals.get(sim.name)) is not None:
            record["results"]["control_gap"] = {
                "real": real.name,
                "control": sim.control,
                **lift_over_reference(read(real.name), preds, seed=seed, by=by),
            }
        write_results(root / sim.name, record, "simulator_sweep")
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


def save_predictions(path: Path, df: pd.DataFrame, logits: np.ndarray, fmt: str, sensitivity=None):
    """One split's predictions table (predictions_table), written atomically to `path`; returns it."""
    from latentsim.io import atomic_save

    table = predictions_table(df, logits, fmt, sensitivity)
    atomic_save(path, lambda tmp: table.to_parquet(tmp, index=False))
    return table


# The sweep's files: `<root>/<simulator>/results.json` per simulator (latentsim.io.write_results) and
# `<root>/summary.json` across them, with root = <output_dir>/<eval set>. Written and read only here.
SUMMARY_FILE = "summary.json"


def write_summary(
    root: Path,
    eval_set: EvalSet,
    split: str,
    rows: list[dict],
    width: int,
    l0: float,
    l0_source: str,
    confirmation_look: dict | None = None,
) -> None:
    """The sweep's summary.json (its rows, the judged dictionary, the split its L0 target was read from and,
    on the confirmation split, which look at it this is: latentsim.confirmation) and summary.md (their
    table)."""
    from latentsim.io import atomic_write_text

    atomic_write_json(
        Path(root) / SUMMARY_FILE,
        {
            "eval_set": str(eval_set.path),
            "prompt_format": eval_set.prompt_format,
            "candidates": "per_latent" if eval_set.latent_major else "per_context",
            "width": eval_set.width,
            "judged_width": width,
            "l0": l0,
            "l0_source": l0_source,
            "split": split,
            "confirmation_look": confirmation_look,
            "rows": rows,
        },
    )
    atomic_write_text(
        Path(root) / "summary.md",
        f"# {eval_set.name} ({eval_set.prompt_format}, split {split})\n\n"
        f"{'Per-latent' if eval_set.latent_major else 'Per-context'} medians unless marked pooled. "
        f"{l0_sentence(l0, l0_source, split)}{look_sentence(confirmation_look)}\n\n" + markdown_table(rows),
    )


def l0_sentence(l0: float, source: str, eval_split: str) -> str:
    """Where the L0 target came from, as the summary and the report say it."""
    caveat = " (no calibration split: the split reported on chose it)" if source == eval_split else ""
    return f"L0 target {l0:.2f} explained latents per judged token, from the {source} split{caveat}."


def look_sentence(look: dict | None) -> str:
    """Which read of the locked confirmation split a sweep is (nothing for another split)."""
    if not look:
        return ""
    first = look["first"]
    return f" Confirmation split: look {look['look']} of {look['looks']}" + (
        " (the confirmation)."
        if look.get("confirmation", look["look"] == 1)
        else f"; the first was {first['stage']} of {', '.join(first['simulators'])}: not a confirmation."
    )


def read_summary(root: str | Path) -> dict | None:
    path = Path(root) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_sweeps(sweep_dir: str | Path) -> dict[str, list[dict]]:
    """{eval set: [its simulators' results.json records (plus `name`), in summary order]} of a sweep
    output_dir."""
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
