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


@torch.no_grad()
def answer_probabilities(model, tokenizer, prompts: list[list[dict]], answer_ids: list[int],
                         batch_size: int = 16) -> np.ndarray:
    """P(answer) renormalised over the format's answers, [N, n_answers], for chat prompts (lists of messages).

    Reads only the last position's logits (`logits_to_keep=1`) of left-padded prompts: no full-vocabulary
    tensor over the sequence is built or kept.
    """
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    ids = torch.tensor(answer_ids, device=device)
    out = []
    for i in range(0, len(prompts), batch_size):
        encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts[i:i + batch_size]]
        encoded = [list(e["input_ids"] if hasattr(e, "keys") else e) for e in encoded]
        width = max(len(e) for e in encoded)
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        logits = model(input_ids=input_ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, :]
        out.append(torch.softmax(logits[:, ids].double(), dim=1).cpu())
    tokenizer.padding_side = side
    model.train(was_training)
    return torch.cat(out).numpy()


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); nan with one class only."""
    pos, neg = truth == 1, truth == 0
    if not pos.any() or not neg.any():
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


def expected_calibration_error(p: np.ndarray, truth: np.ndarray, n_bins: int = 10) -> float:
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(p[mask].mean() - truth[mask].mean())
    return float(ece)


def binary_metrics(p_yes: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    pred = p_yes > threshold
    tp, fp, fn = int((pred & (truth == 1)).sum()), int((pred & (truth == 0)).sum()), int((~pred & (truth == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "recall": recall, "precision": precision,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auc": roc_auc(p_yes, truth), "ece": expected_calibration_error(p_yes, truth),
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
