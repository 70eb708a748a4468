"""Publish a simulator run (or one checkpoint) as a PEFT adapter repo on the Hugging Face Hub.

    python train/publish.py --run_dir outputs/quickstart/sft/<run> --repo_id <org>/<name> \
        [--checkpoint checkpoint-30] [--dry_run true]

Stages exactly what is uploaded in `<run_dir>/publish/<revision>/`: adapter weights (safetensors, re-checked:
LoRA tensors only, non-empty, finite), adapter_config.json, tokenizer + chat template, and a model card whose
YAML names the base model, `library_name: peft`, the dataset's Hub id (if it has one), the prompt format and a
model-index of this adapter's own numbers: eval/sweep.py's held-out results with CIs (`--sweep_dir`) when the
sweep scored it, else its validation metrics. A checkpoint goes to branch `step-<N>` with its own step and
trainer state. `--dry_run true` writes the folder and `planned_operations.json` and stops. The token comes
from HF_TOKEN / `huggingface-cli login` only.
"""

import json
import shutil
from pathlib import Path

from latentsim.cli import run
from latentsim.config import PublishArguments
from latentsim.errors import MissingInputError
from latentsim.hub import adapter_card, checkpoint_results, held_out_metrics, upload_folder
from latentsim.io import atomic_write_json, atomic_write_text
from latentsim.training import check_adapter

# The config dataclasses this script parses (tests/test_configs.py parses every recipe with them).
DATACLASSES = (PublishArguments,)
UPLOADED = (
    "adapter_model.safetensors",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "eval_results.json",
    "run_config.json",
)


def main(args: PublishArguments, api=None) -> None:
    run = Path(args.run_dir)
    source = run / args.checkpoint if args.checkpoint else run
    revision = f"step-{int(args.checkpoint.split('-')[1]):09d}" if args.checkpoint else None
    key = "checkpoint" if args.checkpoint else "run_dir"
    if not source.is_dir():
        raise MissingInputError(f"config key `{key}`: {source} does not exist.")
    if not (source / "adapter_model.safetensors").is_file():
        raise MissingInputError(
            f"config key `{key}`: {source} holds no adapter (no adapter_model.safetensors); "
            "train one with train/sft.py (use_peft: true) or point to its output_dir."
        )
    check_adapter(source)  # refuse empty, non-finite or non-LoRA adapters before anything leaves the machine
    stage = run / "publish" / (revision or "main")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for name in UPLOADED:
        for folder in (source, run):  # a checkpoint lacks some run-level files (tokenizer, run config)
            if (folder / name).is_file() and not (args.checkpoint and name == "eval_results.json"):
                shutil.copy2(folder / name, stage / name)
                break
    run_results = (
        json.loads((run / "eval_results.json").read_text()) if (run / "eval_results.json").is_file() else {}
    )
    # A checkpoint carries its own step and validation metrics (its trainer_state.json), never the final
    # run's.
    results = checkpoint_results(source, run_results) if args.checkpoint else run_results
    if args.checkpoint:
        atomic_write_json(stage / "eval_results.json", results)
        shutil.copy2(source / "trainer_state.json", stage / "trainer_state.json")
    held_out = (
        held_out_metrics(args.sweep_dir, f"{run.name}__{args.checkpoint or 'final'}")
        if args.sweep_dir
        else []
    )
    run_config = (
        json.loads((stage / "run_config.json").read_text()) if (stage / "run_config.json").is_file() else {}
    )
    script = run_config.get("config", {}).get("script", {})
    base = results.get("base_model", {}).get("hub_equivalent") or run_config.get("config", {}).get(
        "model", {}
    ).get("model_name_or_path", "unknown")
    atomic_write_text(
        stage / "README.md",
        adapter_card(
            base,
            script.get("prompt_format", "unknown"),
            script.get("dataset_name", "unknown"),
            results.get("metrics"),
            args.repo_id.split("/")[-1],
            held_out,
            results.get("global_step") if args.checkpoint else None,
        ),
    )
    plan = [
        {
            "op": "create_repo",
            "repo_id": args.repo_id,
            "repo_type": "model",
            "private": args.private,
            "exist_ok": True,
        }
    ]
    if revision:
        plan.append({"op": "create_branch", "repo_id": args.repo_id, "branch": revision, "exist_ok": True})
    plan.append(
        {
            "op": "upload_folder",
            "repo_id": args.repo_id,
            "revision": revision,
            "files": sorted(p.name for p in stage.iterdir()),
        }
    )
    atomic_write_json(stage.parent / f"{revision or 'main'}_planned_operations.json", plan)
    if args.dry_run:
        print(
            f"[publish] dry run: {stage} holds exactly what would be uploaded; operations in "
            f"{stage.parent / ((revision or 'main') + '_planned_operations.json')}"
        )
        return
    url = upload_folder(
        stage,
        args.repo_id,
        "model",
        private=args.private,
        revision=revision,
        api=api,
        commit_message=f"latentsim simulator adapter ({revision or 'final'})",
    )
    print(f"[publish] {args.repo_id}@{revision or 'main'}: {url}")


if __name__ == "__main__":
    run(main, DATACLASSES)
