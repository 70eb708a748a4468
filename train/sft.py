"""Supervised finetuning of a simulator (TRL SFTTrainer + PEFT LoRA) on a build_dataset folder.

    accelerate launch --config_file configs/accelerate/cpu.yaml train/sft.py --config configs/sft/smollm2-135m_quickstart.yaml
    ./launch.sh sft configs/sft/smollm2-135m_quickstart.yaml [--key value ...]

Completion-only loss on the answer token and the end of turn; the eval during training reads only the answer
tokens' logits. Saves the adapter, tokenizer and chat template in output_dir, re-reads the adapter (LoRA
tensors only, non-empty, finite) and writes eval_results.json and a model card.
"""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, get_peft_config

from latentsim.cli import run
from latentsim.config import SimScriptArguments
from latentsim.hub import adapter_card
from latentsim.io import atomic_write_json, atomic_write_text, write_run_config
from latentsim.models import describe_model_source, resolve_model_path
from latentsim.prompts import answer_token_ids, drop_context_tokens, get_format
from latentsim.training import (
    NonFiniteGuard,
    answer_probabilities,
    binary_metrics,
    check_adapter,
    check_prompt_format,
    load_sim_dataset,
    mix_train_sets,
    resolve_resume,
)

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (SimScriptArguments, SFTConfig, ModelConfig)
logger = logging.getLogger("latentsim.sft")


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
        prompt, truncated = row["prompt"], excess > 0
        while excess > 0:
            shorter = drop_context_tokens(prompt, excess, tokenizer)
            if shorter == prompt:
                raise ValueError(f"an example does not fit max_length={max_length} even without context; raise it.")
            prompt = shorter
            excess = length(prompt, row["completion"]) - max_length
        return {"prompt": prompt, "context_truncated": truncated}

    split = split.map(fit, desc="fitting contexts to max_length")
    return split, int(sum(split["context_truncated"]))


def check_supervision(train_dataset, answer_ids: list[int]) -> None:
    """Every tokenized example supervises its answer token first, then at least the end of turn."""
    bad = []
    for i, ex in enumerate(train_dataset):
        supervised = [j for j, label in enumerate(ex["labels"]) if label != -100]
        if len(supervised) < 2 or ex["labels"][supervised[0]] not in answer_ids:
            bad.append(i)
    if bad:
        raise ValueError(f"{len(bad)} training examples (e.g. #{bad[:5]}) do not supervise their answer token and "
                         "end of turn; the chat template's prompt/completion boundary is not where it should be.")


class SimulatorTrainer(SFTTrainer):
    """SFTTrainer whose evaluate() adds the simulator metrics, from the answer tokens' logits only."""

    def __init__(self, *args, answer_ids: list[int], binary: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_ids, self.binary = answer_ids, binary

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # eval_loss
        if self.binary and self.raw_eval is not None:
            probs = answer_probabilities(self.model, self.processing_class, self.raw_eval["prompt"], self.answer_ids,
                                         self.args.per_device_eval_batch_size)
            extra = binary_metrics(probs[:, 1], np.asarray(self.raw_eval["active"]))
            extra = {f"{metric_key_prefix}_{k}": v for k, v in extra.items()}
            self.log(extra)
            metrics.update(extra)
        return metrics


def reload_parity(trainer, model_path: str, model_args: ModelConfig, training_args: SFTConfig) -> float:
    """Load the saved adapter with plain PEFT on a fresh base model: its P(yes) must equal the trainer's."""
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, model_args.dtype or "float32"))
    reloaded = PeftModel.from_pretrained(base, training_args.output_dir).to(trainer.model.device)
    prompts, ids, bs = trainer.raw_eval["prompt"], trainer.answer_ids, training_args.per_device_eval_batch_size
    diff = float(np.abs(answer_probabilities(reloaded, trainer.processing_class, prompts, ids, bs)
                        - answer_probabilities(trainer.model, trainer.processing_class, prompts, ids, bs)).max())
    if diff > 1e-4:
        raise RuntimeError(f"the saved adapter gives P(yes) up to {diff:.2e} away from the trained model; not kept.")
    return diff


def main(script_args: SimScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    set_seed(training_args.seed)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available() and (training_args.bf16 or training_args.gradient_checkpointing):
        logger.warning("bf16=%s, gradient_checkpointing=%s on a CPU: bf16 matmuls are ~80x slower without native "
                       "support and checkpointing adds a forward; set both false for CPU runs.",
                       training_args.bf16, training_args.gradient_checkpointing)
    training_args.logging_nan_inf_filter = False  # NonFiniteGuard must see NaN losses, not a running average

    dataset = load_sim_dataset(script_args.dataset_name, script_args.dataset_config)
    check_prompt_format(dataset, script_args.prompt_format)
    extra = [load_sim_dataset(name) for name in script_args.extra_datasets]
    for ds in extra:
        check_prompt_format(ds, script_args.prompt_format)
    train_split = script_args.dataset_train_split
    dataset[train_split] = mix_train_sets([dataset[train_split]] + [ds[train_split] for ds in extra],
                                          script_args.dataset_weights, training_args.seed)
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
    answer_ids = answer_token_ids(script_args.prompt_format, tokenizer)
    template_sha = hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()
    if training_args.process_index == 0:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        write_run_config(training_args.output_dir, "sft", {"script": script_args, "training": training_args.to_dict(),
                         "model": model_args, "chat_template_sha256": template_sha}, training_args.seed)

    truncated = {}
    for split in list(dataset):
        dataset[split], truncated[split] = fit_contexts(dataset[split], tokenizer, training_args.max_length)
    if any(truncated.values()):
        logger.warning("contexts shortened from the left to fit max_length=%s (labels untouched): %s",
                       training_args.max_length, truncated)
    model = AutoModelForCausalLM.from_pretrained(model_path, revision=model_args.model_revision,
                                                 dtype=getattr(torch, model_args.dtype or "float32"),
                                                 trust_remote_code=False)
    eval_split = "validation" if "validation" in dataset else None
    eval_dataset = dataset[eval_split] if eval_split else None
    if eval_dataset is not None and script_args.max_eval_samples:
        eval_dataset = eval_dataset.select(range(min(script_args.max_eval_samples, len(eval_dataset))))
    binary = get_format(script_args.prompt_format).label == "active"
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args.lora_target_modules = "all-linear"
    trainer = SimulatorTrainer(
        model=model, args=training_args, train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset, processing_class=tokenizer, peft_config=get_peft_config(model_args),
        callbacks=[NonFiniteGuard(script_args.nan_patience)], answer_ids=answer_ids, binary=binary,
    )
    trainer.raw_eval = eval_dataset.select_columns(["prompt", "active"]).to_dict() if eval_dataset is not None else None
    check_supervision(trainer.train_dataset, answer_ids)

    trainer.train(resume_from_checkpoint=resolve_resume(script_args.resume, training_args.output_dir))
    trainer.save_model(training_args.output_dir)
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)
        adapter = check_adapter(training_args.output_dir) if model_args.use_peft else {}
        if model_args.use_peft and binary and eval_dataset is not None:
            adapter["reload_max_abs_diff_p_yes"] = reload_parity(trainer, model_path, model_args, training_args)
        atomic_write_json(Path(training_args.output_dir) / "eval_results.json",
                          {"metrics": metrics, "prompt_format": script_args.prompt_format, "adapter": adapter,
                           "global_step": trainer.state.global_step,
                           "contexts_truncated": truncated,
                           "chat_template_sha256": template_sha, "base_model": describe_model_source(
                               model_args.model_name_or_path)})
        base = describe_model_source(model_args.model_name_or_path).get("hub_equivalent", model_args.model_name_or_path)
        atomic_write_text(Path(training_args.output_dir) / "README.md",
                          adapter_card(base, script_args.prompt_format, script_args.dataset_name, metrics,
                                       Path(training_args.output_dir).name))
        logger.info("saved %s: %s", training_args.output_dir, json.dumps({k: round(v, 4) for k, v in metrics.items()
                                                                         if isinstance(v, float)}))


if __name__ == "__main__":
    run(main, DATACLASSES)
