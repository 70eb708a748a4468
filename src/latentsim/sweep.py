"""Pieces eval/sweep.py composes: which simulators to score, their prompts, guards, predictions, metrics.

A simulator is a base model plus (for a finetuned one) a LoRA adapter, scored on an eval set built by
data_gen/build_dataset.py (all active latents of held-out latents per context + uniformly drawn inactive ones,
`negatives_per_context`). Every prompt is re-rendered from the row's `context`, `interpretation` and `score` by
latentsim.prompts (for the eval set's own interpretations it must reproduce the stored prompt byte for byte),
then tokenized with the simulator's own chat template.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from latentsim.backends import HFScorer, chat_template_sha256, probabilities
from latentsim.errors import MissingInputError
from latentsim.io import atomic_write_json
from latentsim.prompts import get_format, render_completion, render_prompt
from latentsim.training import CHECKPOINT_COMPLETE

logger = logging.getLogger(__name__)
PREDICTION_COLUMNS = ("context_id", "row", "position", "latent", "active", "activation", "activation_bin",
                      "quantile_bin", "n_active", "candidate")


@dataclass
class Simulator:
    name: str                       # its results folder under <output_dir>/<eval set>/
    kind: str                       # `finetuned` or `baseline`
    base_model: str                 # model reference (Hub id, folder, embedded:...)
    adapter: str | None = None      # LoRA adapter folder (finetuned)
    shots: int = 0                  # few-shot examples prepended (baselines)
    score: bool = False             # show the interpretation score in the prompt
    interpretations: str | None = None  # another interpretation set than the eval set's
    prompt_format: str | None = None    # recorded by training (finetuned)
    chat_template_sha256: str | None = None
    train_datasets: list[str] = field(default_factory=list)
    step: int | None = None


def run_simulators(run_dir: str | Path, include_checkpoints: bool = True) -> list[Simulator]:
    """The complete checkpoint-N folders (by step) and the final adapter of a train/sft.py run (or of a Hub
    adapter snapshot, which carries the same run_config.json)."""
    run = Path(run_dir)
    config_path = run / "run_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"config key `run_dirs`: {run} has no run_config.json; is it a train/sft.py output_dir?")
    config = json.loads(config_path.read_text())["config"]
    script, model = config["script"], config["model"]
    common = dict(kind="finetuned", base_model=model["model_name_or_path"], prompt_format=script["prompt_format"],
                  chat_template_sha256=config.get("chat_template_sha256"),
                  train_datasets=[script["dataset_name"], *script.get("extra_datasets", [])],
                  score=False)
    out = []
    if include_checkpoints:
        for ckpt in sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
            if (ckpt / CHECKPOINT_COMPLETE).is_file() and (ckpt / "adapter_model.safetensors").is_file():
                out.append(Simulator(name=f"{run.name}__{ckpt.name}", adapter=str(ckpt),
                                     step=int(ckpt.name.split("-")[-1]), **common))
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
        raise FileNotFoundError(f"config key `run_dirs`: {run} holds no adapter (no adapter_model.safetensors).")
    return out


def baseline_simulator(spec: dict) -> Simulator:
    return Simulator(name=f"baseline__{spec['name']}", kind="baseline", base_model=spec["model"],
                     shots=spec["shots"], score=spec["score"], interpretations=spec["interpretations"])


def check_simulator(sim: Simulator, tokenizer, eval_format: str) -> None:
    """Refuse a finetuned simulator trained with another prompt format or chat template than the eval's."""
    if sim.kind != "finetuned":
        return
    if sim.prompt_format != eval_format:
        raise ValueError(f"{sim.name}: trained on prompt format {sim.prompt_format!r}, the eval set is "
                         f"{eval_format!r}; build an eval set with prompt_format: {sim.prompt_format}.")
    sha = chat_template_sha256(tokenizer)
    if sim.chat_template_sha256 and sim.chat_template_sha256 != sha:
        raise ValueError(f"{sim.name}: the chat template (sha256 {sha[:12]}) differs from the one it was trained with "
                         f"({sim.chat_template_sha256[:12]}); scoring would use another prompt than training.")


@functools.lru_cache(maxsize=8)
def train_latents(path: Path) -> frozenset[int]:
    """The latents of a build_dataset train split (read once per sweep, however many checkpoints use it)."""
    return frozenset(pd.read_parquet(path, columns=["latent"])["latent"].tolist())


def seen_latents(sim: Simulator, latents: set[int]) -> set[int]:
    """Latents of the eval set that a finetuned simulator's training data (train splits) holds."""
    seen = set()
    for name in sim.train_datasets:
        train = Path(name) / "train.parquet"
        if train.is_file():
            seen |= train_latents(train.resolve()) & latents
        else:
            logger.warning("%s: cannot check held-out latents against %s (not a local build_dataset folder)",
                           sim.name, name)
    return seen


def load_split(eval_set: str | Path, split: str, max_contexts: int, seed: int) -> pd.DataFrame:
    path = Path(eval_set) / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"config key `eval_set`: {path} does not exist; build it with data_gen/build_dataset.py.")
    df = pd.read_parquet(path)
    missing = {"context", "interpretation", "n_active", "prompt_format"} - set(df.columns)
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}: it was built by an older build_dataset; rebuild it.")
    df["context_id"] = df["row"].astype(np.int64) * 1_000_000 + df["position"].astype(np.int64)
    if max_contexts:
        ids = np.sort(df["context_id"].unique())
        if len(ids) > max_contexts:
            keep = np.random.default_rng(seed).choice(ids, size=max_contexts, replace=False)
            df = df[df["context_id"].isin(keep)]
    return df.reset_index(drop=True)


def few_shot_messages(eval_set: str | Path, shots: int, fmt: str, label: str, seed: int, interpretations,
                      score: bool) -> list[dict]:
    """`shots` solved examples from the eval set's train split (other latents than the test split in `latents`
    mode), half positive for binary formats, as user/assistant turns in the same format."""
    if not shots:
        return []
    train = pd.read_parquet(Path(eval_set) / "train.parquet")
    rng = np.random.default_rng(seed)
    binary = get_format(fmt).label == "active"
    if binary:
        pos, neg = train[train["active"] == 1], train[train["active"] == 0]
        n_pos = min(len(pos), (shots + 1) // 2)
        picks = pd.concat([pos.iloc[rng.choice(len(pos), n_pos, replace=False)],
                           neg.iloc[rng.choice(len(neg), min(len(neg), shots - n_pos), replace=False)]])
    else:
        picks = train.iloc[rng.choice(len(train), min(shots, len(train)), replace=False)]
    picks = picks.iloc[rng.permutation(len(picks))]
    messages = []
    for _, row in picks.iterrows():
        interp = interpretations.get(int(row["latent"]), row["interpretation"]) if interpretations else row["interpretation"]
        messages += render_prompt(fmt, row["context"], interp, row["score"] if score else None)
        messages += render_completion(fmt, int(row[label]))  # label: the eval set's `active` or bin column
    return messages


def judgment_prompts(df: pd.DataFrame, sim: Simulator, fmt: str, prefix: list[dict],
                     interpretations: dict[int, str] | None) -> tuple[list[list[dict]], np.ndarray]:
    """The prompt of every row (and a mask of rows kept: an interpretation override may lack some latents).
    With the eval set's own interpretations and score setting, each must equal the stored prompt."""
    prompts, keep = [], np.ones(len(df), dtype=bool)
    has_score = df["score"].notna().all() if "score" in df else False
    if sim.score and not has_score:
        raise ValueError(f"{sim.name}: score=true but the eval set has no interpretation scores; build it with score_path.")
    own = interpretations is None and sim.score == has_score
    for i, row in enumerate(df.itertuples(index=False)):
        interp = row.interpretation if interpretations is None else interpretations.get(int(row.latent))
        if interp is None:
            keep[i] = False
            continue
        messages = render_prompt(fmt, row.context, interp, row.score if sim.score else None)
        if own and messages != list(row.prompt):
            raise ValueError(f"row {i}: re-rendering gives another prompt than the eval set stores; the prompt format "
                             f"{fmt} changed since the eval set was built. Rebuild it.")
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


def load_scores(paths: list[str]) -> dict[str, dict[int, float]]:
    out = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"config key `score_files`: {path} must be a JSON dict {{latent: score}}.")
        out[Path(path).stem] = {int(k): float(v) for k, v in data.items()}
    return out


def load_simulator_scorer(ref: str, fmt: str, dtype: str, device: str, batch_size: int = 32) -> tuple[HFScorer, str]:
    """An hf scorer for one simulator: a train/sft.py run folder (its final adapter, its own tokenizer, checked
    against `fmt`) or a model reference (untuned). Returns (scorer, simulator name)."""
    from transformers import AutoTokenizer

    from latentsim.models import load_model_and_tokenizer
    from latentsim.prompts import answer_token_ids

    sim = run_simulators(ref, include_checkpoints=False)[-1] if (Path(ref) / "run_config.json").is_file() else None
    model, tokenizer = load_model_and_tokenizer(sim.base_model if sim else ref, dtype=dtype, device=device)
    if sim:
        from peft import PeftModel

        tokenizer = AutoTokenizer.from_pretrained(sim.adapter)
        check_simulator(sim, tokenizer, fmt)
        model = PeftModel.from_pretrained(model, sim.adapter).eval()  # LoRA layers stay unmerged
    return HFScorer(model, tokenizer, answer_token_ids(fmt, tokenizer), batch_size), sim.name if sim else ref


# The sweep's files: `<root>/<simulator>/results.json` per simulator and `<root>/summary.json` across them, with
# root = <output_dir>/<eval set>. Written and read only here.
RESULTS_FILE, SUMMARY_FILE = "results.json", "summary.json"


def write_results(folder: Path, record: dict) -> None:
    atomic_write_json(Path(folder) / RESULTS_FILE, record)


def read_results(folder: str | Path) -> dict | None:
    """One simulator's results.json record, or None when it has not finished."""
    path = Path(folder) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


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
        records = [{"name": r["simulator"], **rec} for r in read_summary(root)["rows"]
                   if (rec := read_results(root / r["simulator"])) is not None]
        if records:
            out[root.name] = records
    if not out:
        raise MissingInputError(f"config key `sweep_dir`: no */{SUMMARY_FILE} under {sweep_dir}; run eval/sweep.py first.")
    return out
