"""Supervised finetuning of a simulator (TRL SFTTrainer + PEFT LoRA) on a build_dataset folder.

    accelerate launch --config_file configs/accelerate/cpu.yaml train/sft.py \
        --config configs/sft/smollm2-135m_quickstart.yaml
    ./launch.sh sft configs/sft/smollm2-135m_quickstart.yaml [--key value ...]

Completion-only loss on the answer token and the end of turn (dense formats: No/Yes cross-entropy at every
aligned text token, latentsim.training.dense_features); the eval during training reads only the answer
tokens' logits. Saves the adapter, tokenizer and chat template in output_dir, re-reads the adapter (LoRA
tensors only, non-empty, finite) and writes eval_results.json and a model card.
"""

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, set_seed
from trl import ModelConfig, SFTConfig, get_peft_config

from latentsim.cli import run
from latentsim.config import SimScriptArguments
from latentsim.hub import adapter_card
from latentsim.io import atomic_write_json, atomic_write_text, write_run_config
from latentsim.models import describe_model_source, load_tokenizer, resolve_dtype, resolve_model_path
from latentsim.prompts import answer_token_ids, chat_template_sha256, get_format
from latentsim.training import (
    NonFiniteGuard,
    SimulatorTrainer,
    check_adapter,
    check_dense_supervision,
    check_supervision,
    finished_step,
    fit_examples,
    load_training_data,
    reload_parity,
    resolve_resume,
)

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (SimScriptArguments, SFTConfig, ModelConfig)
logger = logging.getLogger("latentsim.sft")


def main(script_args: SimScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> None:
    set_seed(training_args.seed)
    logging.basicConfig(
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not torch.cuda.is_available() and (training_args.bf16 or training_args.activation_checkpointing):
        logger.warning(
            "bf16=%s, activation_checkpointing=%s on a CPU: bf16 matmuls are ~80x slower without native "
            "support and checkpointing adds a forward; set both false for CPU runs.",
            training_args.bf16,
            training_args.activation_checkpointing,
        )
    training_args.logging_nan_inf_filter = False  # NonFiniteGuard must see NaN losses, not a running average
    output_dir = Path(training_args.output_dir)
    done = finished_step(output_dir) if script_args.resume == "auto" else None
    if (
        done is not None and 0 < training_args.max_steps <= done
    ):  # resuming would take an extra step past the end
        logger.info("%s finished at step %d earlier; skipped (resume: never retrains it)", output_dir, done)
        return

    # Data, tokenizer and the run's provenance.
    dataset = load_training_data(script_args, training_args.seed)
    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_args.model_name_or_path, revision=model_args.model_revision)
    answer_ids = answer_token_ids(script_args.prompt_format, tokenizer)
    template_sha = chat_template_sha256(tokenizer)
    if training_args.process_index == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_config(
            output_dir,
            "sft",
            {
                "script": script_args,
                "training": training_args.to_dict(),
                "model": model_args,
                "chat_template_sha256": template_sha,
            },
            training_args.seed,
        )
    fmt = get_format(script_args.prompt_format)
    changed_key, changed = fit_examples(dataset, tokenizer, fmt.name, answer_ids, training_args.max_length)
    eval_dataset = dataset["validation"] if "validation" in dataset else None
    if eval_dataset is not None and script_args.max_eval_samples:
        eval_dataset = eval_dataset.select(range(min(script_args.max_eval_samples, len(eval_dataset))))

    # Model and trainer.
    # `auto`: bfloat16 on a GPU, float32 on a CPU (as every stage); unset: float32.
    dtype = resolve_dtype(
        model_args.dtype or "float32", torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_path, revision=model_args.model_revision, dtype=dtype, trust_remote_code=False
    )
    binary = fmt.reads_active  # P(yes) metrics (a dense value format's 1 - P(" No"))
    if model_args.use_peft and not model_args.lora_target_modules:
        model_args.lora_target_modules = "all-linear"
    trainer = SimulatorTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=[NonFiniteGuard(script_args.nan_patience)],
        answer_ids=answer_ids,
        binary=binary,
        prompt_format=fmt.name,
    )
    (check_dense_supervision if fmt.dense else check_supervision)(trainer.train_dataset, answer_ids)

    trainer.train(resume_from_checkpoint=resolve_resume(script_args.resume, training_args.output_dir))
    trainer.save_model(training_args.output_dir)
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    # Every rank takes part in the reload check (under ZeRO-3 the trained model's forward needs all of them).
    check = model_args.use_peft and binary and eval_dataset is not None
    parity = reload_parity(trainer, model_path) if check else None
    if not trainer.is_world_process_zero():
        return

    # Tokenizer, adapter checks, eval results and the model card.
    tokenizer.save_pretrained(training_args.output_dir)
    adapter = check_adapter(output_dir) if model_args.use_peft else {}
    adapter.update(parity or {})  # reload_{mean,max}_abs_diff_p_yes and their bounds
    base_model = describe_model_source(model_args.model_name_or_path)
    atomic_write_json(
        output_dir / "eval_results.json",
        {
            "metrics": metrics,
            "prompt_format": script_args.prompt_format,
            "adapter": adapter,
            "global_step": trainer.state.global_step,
            changed_key: changed,
            "chat_template_sha256": template_sha,
            "base_model": base_model,
        },
    )
    atomic_write_text(
        output_dir / "README.md",
        adapter_card(
            base_model.get("hub_equivalent", model_args.model_name_or_path),
            script_args.prompt_format,
            script_args.dataset_name,
            metrics,
            output_dir.name,
        ),
    )
    logger.info(
        "saved %s: %s",
        training_args.output_dir,
        json.dumps({k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}),
    )


if __name__ == "__main__":
    run(main, DATACLASSES)
