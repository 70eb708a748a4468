"""Pieces of simulator finetuning that train/sft.py composes: data, label-logit metrics, guards, checks.

The eval during training keeps only the answer tokens' logits at the answer position (`label_logits`), never a
full-vocabulary tensor, and reports recall, precision, F1, AUC, ECE and mean P(yes) on the validation split.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

from latentsim.backends import HFScorer, probabilities
from latentsim.metrics import reliability, roc_auc

logger = logging.getLogger(__name__)
CHECKPOINT_COMPLETE = "trainer_state.json"  # the Trainer writes it last in a checkpoint folder


def load_sim_dataset(name: str, config: str | None = None):
    """A build_dataset output folder ({train,validation,test}.parquet) or a Hub dataset id."""
    from datasets import load_dataset

    folder = Path(name)
    if folder.is_dir():
        files = {s: str(folder / f"{s}.parquet") for s in ("train", "validation", "test") if (folder / f"{s}.parquet").is_file()}
        if "train" not in files:
            raise FileNotFoundError(f"config key `dataset_name`: {folder} has no train.parquet; "
                                    "build it with data_gen/build_dataset.py.")
        return load_dataset("parquet", data_files=files)
    return load_dataset(name, name=config)


def mix_train_sets(train_sets: list, weights: list[float], seed: int):
    """Interleave train splits with sampling probabilities = normalised weights (stops when one runs out, so the
    mixture keeps its proportions); each row records its `dataset_index`."""
    from datasets import interleave_datasets

    if len(train_sets) == 1:
        return train_sets[0]
    weights = weights or [1.0] * len(train_sets)
    tagged = [ds.add_column("dataset_index", [i] * len(ds)) for i, ds in enumerate(train_sets)]
    total = sum(weights)
    return interleave_datasets(tagged, probabilities=[w / total for w in weights], seed=seed,
                               stopping_strategy="first_exhausted")


def check_prompt_format(dataset, prompt_format: str) -> None:
    """Refuse to train on rows rendered with another prompt format than the one the run records."""
    for split, ds in dataset.items():
        if "prompt_format" not in ds.column_names:
            raise ValueError(f"split {split} has no `prompt_format` column; build the data with data_gen/build_dataset.py.")
        found = set(ds.unique("prompt_format"))
        if found != {prompt_format}:
            raise ValueError(f"config key `prompt_format`: {prompt_format!r}, but split {split} was rendered with "
                             f"{sorted(found)}; rebuild the data or fix the key.")


def answer_probabilities(model, tokenizer, prompts: list[list[dict]], answer_ids: list[int],
                         batch_size: int = 16) -> np.ndarray:
    """P(answer) renormalised over the format's answers, [N, n_answers], for chat prompts (lists of messages):
    the eval's scoring engine (prefix-shared KV, answer-token logits only; latentsim.backends)."""
    return probabilities(HFScorer(model, tokenizer, answer_ids, batch_size).label_logits(prompts))


def binary_metrics(p_yes: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    pred = p_yes > threshold
    tp, fp, fn = int((pred & (truth == 1)).sum()), int((pred & (truth == 0)).sum()), int((~pred & (truth == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "recall": recall, "precision": precision,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auc": roc_auc(p_yes, truth), "ece": reliability(p_yes, truth)["ece"],
        "mean_p_yes": float(p_yes.mean()), "accuracy": float((pred == (truth == 1)).mean()),
    }


class NonFiniteGuard(TrainerCallback):
    """Stop training when the logged loss or grad norm is NaN/inf (Trainer's log filter must be off)."""

    def __init__(self, patience: int = 0):
        self.patience, self.bad = patience, 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: v for k, v in (logs or {}).items() if k in ("loss", "grad_norm")}
        if any(isinstance(v, float) and not math.isfinite(v) for v in values.values()):
            self.bad += 1
            if self.bad > self.patience:
                raise FloatingPointError(f"non-finite training values at step {state.global_step}: {values}; "
                                         "stopping. Lower the learning rate, or resume from the last checkpoint.")
        else:
            self.bad = 0


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """`auto`: the last complete checkpoint-N in output_dir (incomplete ones skipped with a warning), `never`: None,
    else a path that must be a complete checkpoint."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / CHECKPOINT_COMPLETE).is_file():
            raise FileNotFoundError(f"config key `resume`: {path} is not a complete checkpoint (no {CHECKPOINT_COMPLETE}).")
        return str(path)
    checkpoints = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    for path in reversed(checkpoints):
        if (path / CHECKPOINT_COMPLETE).is_file():
            return str(path)
        logger.warning("skipping incomplete checkpoint %s (no %s)", path, CHECKPOINT_COMPLETE)
    return None


def check_adapter(folder: str | Path) -> dict:
    """Re-read a saved LoRA adapter: LoRA tensors only, none empty, all finite. Returns a summary."""
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} was not written.")
    tensors = load_file(str(path))
    if not tensors:
        raise ValueError(f"{path} holds no tensors (ZeRO-3 + PEFT is known to write empty adapters).")
    for name, t in tensors.items():
        if "lora_" not in name:
            raise ValueError(f"{path}: non-LoRA tensor {name} (modules_to_save?); vLLM would refuse the adapter.")
        if t.numel() == 0:
            raise ValueError(f"{path}: tensor {name} is empty (ZeRO-3 partitioned weights saved without gathering).")
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {name} has NaN/inf values; refusing to keep this adapter.")
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return {"n_tensors": len(tensors), "n_parameters": int(sum(t.numel() for t in tensors.values())),
            "r": config.get("r"), "target_modules": config.get("target_modules")}
