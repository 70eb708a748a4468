"""Pieces of simulator finetuning that train/sft.py composes: data, the trainer, label-logit metrics, guards,
checks.

The eval during training keeps only the answer tokens' logits at the answer position (`label_logits`), never a
full-vocabulary tensor, and reports recall, precision, F1, AUC, ECE and mean P(yes) on the validation split
(latentsim.metrics' definitions: NaN where undefined, e.g. precision when nothing is predicted positive).
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTTrainer

from latentsim.config import SimScriptArguments
from latentsim.errors import BadInputError, ConfigError, MissingInputError
from latentsim.metrics import confusion_metrics, reliability, roc_auc
from latentsim.parity import forward_roundings, layer_count, p_yes_bound
from latentsim.prompts import dense_token_ids, drop_context_tokens, get_format, render_prompt
from latentsim.simulators import Judgment, probabilities, scorer_for_model
from latentsim.simulators.spec import CHECKPOINT_COMPLETE

logger = logging.getLogger(__name__)


def load_sim_dataset(name: str, config: str | None = None):
    """A build_dataset output folder ({train,validation,test}.parquet) or a Hub dataset id."""
    from datasets import load_dataset

    folder = Path(name)
    if folder.is_dir():
        files = {
            s: str(folder / f"{s}.parquet")
            for s in ("train", "validation", "test")
            if (folder / f"{s}.parquet").is_file()
        }
        if "train" not in files:
            raise MissingInputError(
                f"config key `dataset_name`: {folder} has no train.parquet; "
                "build it with data_gen/build_dataset.py."
            )
        return load_dataset("parquet", data_files=files)
    return load_dataset(name, name=config)


def mix_train_sets(train_sets: list, weights: list[float], seed: int):
    """Interleave train splits with sampling probabilities = normalised weights (stops when one runs out, so
    the mixture keeps its proportions); each row records its `dataset_index`."""
    from datasets import interleave_datasets

    if len(train_sets) == 1:
        return train_sets[0]
    first = train_sets[0]
    for i, ds in enumerate(train_sets[1:], 1):
        if set(ds.column_names) != set(first.column_names):
            raise BadInputError(
                f"extra dataset {i} has other columns than dataset_name's (missing "
                f"{sorted(set(first.column_names) - set(ds.column_names))}, extra "
                f"{sorted(set(ds.column_names) - set(first.column_names))}); build both with "
                "data_gen/build_dataset.py (or data_gen/import_records.py's dense_train)."
            )
    # Same columns, possibly other storage types (large vs plain strings, an all-empty list column): cast
    # to the first dataset's features so that they interleave.
    train_sets = [first] + [
        ds.cast(first.features) if ds.features != first.features else ds for ds in train_sets[1:]
    ]
    weights = weights or [1.0] * len(train_sets)
    tagged = [ds.add_column("dataset_index", [i] * len(ds)) for i, ds in enumerate(train_sets)]
    total = sum(weights)
    return interleave_datasets(
        tagged, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="first_exhausted"
    )


def load_training_data(script_args: SimScriptArguments, seed: int):
    """The run's dataset (`dataset_name`) with its train split mixed with the `extra_datasets`' train splits
    by `dataset_weights`; every dataset must have been rendered with the run's `prompt_format`."""
    dataset = load_sim_dataset(script_args.dataset_name, script_args.dataset_config)
    check_prompt_format(dataset, script_args.prompt_format)
    extra = [load_sim_dataset(name) for name in script_args.extra_datasets]
    for ds in extra:
        check_prompt_format(ds, script_args.prompt_format)
    train_split = script_args.dataset_train_split
    dataset[train_split] = mix_train_sets(
        [dataset[train_split]] + [ds[train_split] for ds in extra], script_args.dataset_weights, seed
    )
    return dataset


def check_prompt_format(dataset, prompt_format: str) -> None:
    """Refuse to train on rows rendered with another prompt format than the one the run records."""
    for split, ds in dataset.items():
        if "prompt_format" not in ds.column_names:
            raise BadInputError(
                f"split {split} has no `prompt_format` column; build the data with data_gen/build_dataset.py."
            )
        found = set(ds.unique("prompt_format"))
        if found != {prompt_format}:
            raise BadInputError(
                f"config key `prompt_format`: {prompt_format!r}, but split {split} was rendered "
                f"with {sorted(found)}; rebuild the data or fix the key."
            )


def answer_probabilities(
    model,
    tokenizer,
    judgments: list[Judgment],
    answer_ids: list[int],
    batch_size: int = 16,
    fmt: str = "sim_v1",
) -> np.ndarray:
    """P(answer) renormalised over the format's answers, [N, n_answers], of a model trained on `fmt`: the
    eval's scoring engine (latentsim.simulators.hf: prefix-shared KV, the answer rows in fp32). A dense
    simulator reads the same judgments at their judged token."""
    return scored_answers(model, tokenizer, judgments, answer_ids, batch_size, fmt)[0]


def scored_answers(model, tokenizer, judgments, answer_ids, batch_size: int = 16, fmt: str = "sim_v1"):
    """(answer_probabilities, each judgment's rounding sensitivity: latentsim.parity.p_yes_bound's input)."""
    scorer = scorer_for_model(model, tokenizer, fmt, answer_ids, batch_size)
    return probabilities(scorer.label_logits(judgments)), scorer.sensitivity


def dataset_judgments(split) -> list[Judgment]:
    """The judgments of dataset rows, from their fields (the score where the rows show one)."""
    columns = (split["context"], split["interpretation"], split["score"], split["latent"])
    return [Judgment(c, i, s, int(lat)) for c, i, s, lat in zip(*columns, strict=True)]


def dense_features(split, tokenizer, fmt: str, answer_ids: list[int], max_length: int | None):
    """Tokenize a dense split (latentsim.prompts.dense_token_ids): `input_ids` = header + text + one closing
    token, and `labels` in the causal-LM convention (the verdict read at position p sits at p + 1) holding the
    answer token of each aligned label (`token_labels`; value formats: `token_bins`), -100 elsewhere;
    `label_positions` keeps the positions for check_dense_supervision. Labels whose token has no aligned
    simulator position are dropped and counted."""
    closing = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    column = "token_bins" if get_format(fmt).value_bins else "token_labels"  # the answer index per token
    if column not in split.column_names:
        raise BadInputError(
            f"format {fmt} trains on `{column}`, which these dense rows lack; build them with "
            f"data_gen/build_dataset.py --prompt_format {fmt}."
        )

    def tokenize(row):
        ids, positions = dense_token_ids(
            tokenizer, fmt, row["interpretation"], row["text"], row["token_ends"]
        )
        labels, kept, unaligned = [-100] * (len(ids) + 1), [], 0
        for p, y in zip(positions, row[column], strict=True):
            if y < 0:  # unlabelled by build_dataset already
                continue
            if p < 0:
                unaligned += 1
                continue
            labels[p + 1] = answer_ids[y]
            kept.append(p)
        return {
            "input_ids": ids + [closing],
            "labels": labels,
            "label_positions": kept,
            "unaligned": unaligned,
        }

    split = split.map(tokenize, desc="tokenizing dense examples")
    longest = max(len(ids) for ids in split["input_ids"])
    if max_length is not None and longest > max_length:
        raise ConfigError(
            f"config key `max_length`: a dense example has {longest} tokens (> {max_length}); raise "
            "max_length or build shorter windows (window_max)."
        )
    return split, int(sum(split["unaligned"]))


def check_dense_supervision(train_dataset, answer_ids: list[int]) -> None:
    """Every tokenized dense example supervises exactly its aligned label positions (shifted by one) with
    answer tokens, and nothing was cut off: a shifted or truncated label would train the wrong token's
    verdict."""
    bad = []
    for i, ex in enumerate(train_dataset):
        supervised = [j for j, label in enumerate(ex["labels"]) if label != -100]
        if (
            supervised != [p + 1 for p in ex["label_positions"]]
            or not supervised
            or any(ex["labels"][j] not in answer_ids for j in supervised)
            or supervised[-1] >= len(ex["input_ids"])
        ):
            bad.append(i)
    if bad:
        raise BadInputError(
            f"{len(bad)} dense training examples (e.g. #{bad[:5]}) do not supervise their label "
            "positions with answer tokens; the tokenized data no longer lines up with the labels."
        )


def answer_metrics(p_yes: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The training eval's metrics of P(yes) against the 0/1 labels: recall, precision, F1 and accuracy at
    p >= threshold, AUC, ECE and mean P(yes) (latentsim.metrics; NaN where undefined)."""
    confusion = confusion_metrics(p_yes, truth, threshold)
    return {
        "recall": confusion["recall"],
        "precision": confusion["precision"],
        "f1": confusion["f1"],
        "auc": roc_auc(p_yes, truth),
        "ece": reliability(p_yes, truth)["ece"],
        "mean_p_yes": float(np.mean(p_yes)),
        "accuracy": confusion["accuracy"],
    }


def fit_contexts(split, tokenizer, max_length: int | None):
    """TRL cuts the right end of long examples, where the one-token label sits (and then drops them silently).
    Instead, drop tokens from the start of the context until prompt + answer fit; count the examples changed.
    Examples that cannot fit even with no context left are an error."""
    if max_length is None:
        return split, 0

    def length(prompt, completion):
        ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def fit(row):
        excess = length(row["prompt"], row["completion"]) - max_length
        context, prompt, truncated = row["context"], row["prompt"], excess > 0
        while excess > 0:
            shorter = drop_context_tokens(context, excess, tokenizer)
            if shorter == context:
                raise ConfigError(
                    f"an example does not fit max_length={max_length} even without context; raise it."
                )
            context = shorter
            prompt = render_prompt(row["prompt_format"], context, row["interpretation"], row["score"])
            excess = length(prompt, row["completion"]) - max_length
        return {"prompt": prompt, "context": context, "context_truncated": truncated}

    split = split.map(fit, desc="fitting contexts to max_length")
    return split, int(sum(split["context_truncated"]))


def fit_examples(dataset, tokenizer, fmt: str, answer_ids: list[int], max_length: int | None):
    """Fit every split of `dataset` (in place) to `max_length`: contexts shortened from the left, or for a
    dense format (tokenized here, a label at every aligned text token) the labels without an aligned position
    dropped. Returns (what changed, {split: count}), logged when anything did."""
    dense = get_format(fmt).dense
    changed = {}
    for split in list(dataset):
        if dense:
            dataset[split], changed[split] = dense_features(
                dataset[split], tokenizer, fmt, answer_ids, max_length
            )
        else:
            dataset[split], changed[split] = fit_contexts(dataset[split], tokenizer, max_length)
    key = "labels_unaligned" if dense else "contexts_truncated"
    if any(changed.values()):
        logger.warning(
            "%s (max_length=%s, labels untouched or dropped, never shifted): %s", key, max_length, changed
        )
    return key, changed


def check_supervision(train_dataset, answer_ids: list[int]) -> None:
    """Every tokenized example supervises its answer token first, then at least the end of turn."""
    bad = []
    for i, ex in enumerate(train_dataset):
        supervised = [j for j, label in enumerate(ex["labels"]) if label != -100]
        if len(supervised) < 2 or ex["labels"][supervised[0]] not in answer_ids:
            bad.append(i)
    if bad:
        raise BadInputError(
            f"{len(bad)} training examples (e.g. #{bad[:5]}) do not supervise their answer token "
            "and end of turn; the chat template's prompt/completion boundary is not where it "
            "should be."
        )


def reentrant_checkpointing(args, peft: bool) -> None:
    """PEFT + DeepSpeed ZeRO-3 + activation checkpointing needs reentrant checkpointing (TRL issue 2514). TRL
    writes use_reentrant=True into the deprecated `gradient_checkpointing_kwargs`, but from transformers 5.23
    the Trainer reads `activation_checkpointing_kwargs`, resolved from it before TRL writes: the combination
    would silently run non-reentrant. Set it where the Trainer reads it (one dict under both names, so what
    TRL writes lands there too); an explicit use_reentrant false is refused."""
    if not args.activation_checkpointing:
        return
    kwargs = dict(args.activation_checkpointing_kwargs or {})
    if peft and zero_stage(args) == 3:
        if kwargs.get("use_reentrant") is False:
            raise ConfigError(
                "config key `activation_checkpointing_kwargs`: use_reentrant false with a LoRA adapter under "
                "DeepSpeed ZeRO-3 does not train correctly (TRL issue 2514); drop the key or set it true."
            )
        kwargs["use_reentrant"] = True
    args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = kwargs


def zero_stage(args) -> int:
    """The DeepSpeed ZeRO stage of a run (accelerate launch's DeepSpeed config), 0 without DeepSpeed."""
    plugin = getattr(args, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else 0


def checkpointing_keywords(model) -> dict | None:
    """What the model's activation checkpointing passes to torch.utils.checkpoint (None when it is off)."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            return dict(getattr(module._gradient_checkpointing_func, "keywords", {}))
    return None


class CheckpointingLog(TrainerCallback):
    """Logs what the model's activation checkpointing passes to torch.utils.checkpoint, as training starts
    (the Trainer turns checkpointing on inside train())."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.activation_checkpointing and model is not None:
            logger.info("activation checkpointing: %s", checkpointing_keywords(model))


class SimulatorTrainer(SFTTrainer):
    """SFTTrainer whose evaluate() adds the simulator metrics (binary formats), from the answer tokens' logits
    only. `raw_eval` keeps the untokenized eval prompts and labels the metrics are computed on."""

    def __init__(
        self,
        *args,
        answer_ids: list[int],
        binary: bool,
        eval_dataset=None,
        prompt_format: str = "sim_v1",
        **kwargs,
    ):
        if kwargs.get("args") is not None:
            reentrant_checkpointing(kwargs["args"], kwargs.get("peft_config") is not None)
        super().__init__(*args, eval_dataset=eval_dataset, **kwargs)
        self.add_callback(CheckpointingLog())
        self.answer_ids, self.binary, self.prompt_format = answer_ids, binary, prompt_format
        self.raw_eval = (
            {"judgments": dataset_judgments(eval_dataset), "active": list(eval_dataset["active"])}
            if eval_dataset is not None
            else None
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # eval_loss
        if self.binary and self.raw_eval is not None:
            probs = answer_probabilities(
                self.model,
                self.processing_class,
                self.raw_eval["judgments"],
                self.answer_ids,
                self.args.per_device_eval_batch_size,
                self.prompt_format,
            )
            extra = answer_metrics(probs[:, 1], np.asarray(self.raw_eval["active"]))
            extra = {f"{metric_key_prefix}_{k}": v for k, v in extra.items()}
            self.log(extra)
            metrics.update(extra)
        return metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Dense formats: cross-entropy over the answers only (No/Yes) at every label position, which a
        verdict per text token needs (most are No; full-vocabulary CE would spend its first steps moving mass
        onto the answer tokens). Per-judgment formats: TRL's loss."""
        if not get_format(self.prompt_format).dense:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        target = labels[:, 1:]
        mask = target != -100
        answer = torch.tensor(self.answer_ids, device=labels.device)
        logits = outputs.logits[:, :-1][mask][:, answer].float()
        truth = (target[mask][:, None] == answer[None]).float().argmax(1)
        loss = torch.nn.functional.cross_entropy(logits, truth, reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = (
                loss * self.accelerator.num_processes
            )  # num_items_in_batch counts every rank's labels (as TRL)
        return (loss, outputs) if return_outputs else loss


@contextmanager
def without_zero3_init():
    """Build a plain, unpartitioned model on one rank while a ZeRO-3 engine lives: as long as its DeepSpeed
    config is registered, transformers builds every from_pretrained inside deepspeed.zero.Init, a collective
    the other ranks never join."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


def reload_parity(trainer: SimulatorTrainer, model_path: str) -> dict | None:
    """Load the adapter saved in the trainer's output_dir with plain PEFT on a fresh base model, in the dtypes
    it trained in: its P(yes) on the eval prompts must equal the trainer's within latentsim.parity's bound for
    that dtype, on the mean and on the max over the prompts. Call it on every rank: the trained model's P(yes)
    is computed by all of them together (under ZeRO-3 each forward gathers the layers' shards from every rank,
    so a forward on rank 0 alone hangs); rank 0 alone then reloads and compares. Returns the record for
    eval_results.json (None on the other ranks)."""
    judgments, ids, bs = (
        trainer.raw_eval["judgments"],
        trainer.answer_ids,
        trainer.args.per_device_eval_batch_size,
    )
    fmt, tokenizer = trainer.prompt_format, trainer.processing_class
    trained, sensitivity = scored_answers(trainer.model, tokenizer, judgments, ids, bs, fmt)
    if not trainer.is_world_process_zero():
        return None
    base_dtype, lora_dtype = trained_dtypes(trainer.model)
    reloaded = reload_adapter(trainer, model_path, base_dtype, lora_dtype)
    diff = answer_probabilities(reloaded, tokenizer, judgments, ids, bs, fmt)[:, 1] - trained[:, 1]
    bound = p_yes_bound(base_dtype, sensitivity, forward_roundings(layer_count(reloaded)))
    found = bound.check(diff)
    if not found["ok"]:
        raise RuntimeError(
            f"the saved adapter gives P(yes) {found['mean_abs_diff']:.2e} on average and up to "
            f"{found['max_abs_diff']:.2e} away from the trained model (bounds {bound.mean:.1e} and "
            f"{bound.max:.1e} in {base_dtype}); not kept."
        )
    return {f"reload_{k}_p_yes": v for k, v in found.items() if k != "ok"}


def trained_dtypes(model) -> tuple[torch.dtype, torch.dtype]:
    """(base weights' dtype, LoRA weights' dtype) of the trained model, as the eval's forward reads them:
    DeepSpeed's bf16 casts both to bf16; the Trainer's bf16 autocasts a model left in its loaded dtype, with
    PEFT's LoRA weights in fp32 over a bf16 base. Read from the parameters, partitioned by ZeRO-3 or not."""
    lora = next(p.dtype for name, p in model.named_parameters() if "lora_" in name)
    base = next(
        p.dtype for name, p in model.named_parameters() if "lora_" not in name and p.is_floating_point()
    )
    return base, lora


def reload_adapter(trainer: SimulatorTrainer, model_path: str, base_dtype, lora_dtype) -> torch.nn.Module:
    """The saved adapter on a fresh base model in `base_dtype`, its LoRA weights in `lora_dtype` (PEFT would
    upcast them to fp32 by default: another model than the one trained under DeepSpeed's bf16)."""
    from peft import PeftModel

    with without_zero3_init():
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=base_dtype)
        reloaded = PeftModel.from_pretrained(base, trainer.args.output_dir, autocast_adapter_dtype=False)
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(lora_dtype)
    return reloaded.to(trainer.args.device)


class NonFiniteGuard(TrainerCallback):
    """Stop training when the logged loss or grad norm is NaN/inf (Trainer's log filter must be off)."""

    def __init__(self, patience: int = 0):
        self.patience, self.bad = patience, 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: v for k, v in (logs or {}).items() if k in ("loss", "grad_norm")}
        if any(isinstance(v, float) and not math.isfinite(v) for v in values.values()):
            self.bad += 1
            if self.bad > self.patience:
                raise FloatingPointError(
                    f"non-finite training values at step {state.global_step}: {values}; "
                    "stopping. Lower the learning rate, or resume from the last checkpoint."
                )
        else:
            self.bad = 0


def finished_step(output_dir: str | Path) -> int | None:
    """The step a finished run in `output_dir` ended at (train/sft.py writes eval_results.json last, after the
    adapter), or None when it has not finished."""
    results = Path(output_dir) / "eval_results.json"
    if not (results.is_file() and (Path(output_dir) / "adapter_model.safetensors").is_file()):
        return None
    return json.loads(results.read_text()).get("global_step")


def resolve_resume(resume: str, output_dir: str) -> str | None:
    """`auto`: the last complete checkpoint-N in output_dir (incomplete ones skipped with a warning), `never`:
    None, else a path that must be a complete checkpoint."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / CHECKPOINT_COMPLETE).is_file():
            raise MissingInputError(
                f"config key `resume`: {path} is not a complete checkpoint (no {CHECKPOINT_COMPLETE})."
            )
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
        raise MissingInputError(f"{path} was not written.")
    tensors = load_file(str(path))
    if not tensors:
        raise BadInputError(f"{path} holds no tensors (ZeRO-3 + PEFT is known to write empty adapters).")
    for name, t in tensors.items():
        if "lora_" not in name:
            raise BadInputError(
                f"{path}: non-LoRA tensor {name} (modules_to_save?); vLLM would refuse the adapter."
            )
        if t.numel() == 0:
            raise BadInputError(
                f"{path}: tensor {name} is empty (ZeRO-3 partitioned weights saved without gathering)."
            )
        if not torch.isfinite(t).all():
            raise BadInputError(f"{path}: tensor {name} has NaN/inf values; refusing to keep this adapter.")
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    return {
        "n_tensors": len(tensors),
        "n_parameters": int(sum(t.numel() for t in tensors.values())),
        "r": config.get("r"),
        "target_modules": config.get("target_modules"),
    }
