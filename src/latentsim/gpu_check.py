"""The GPU check's steps and checks (bench/gpu_check.py): what runs on a lent GPU, and what must hold
afterwards."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import torch

from latentsim.envs import python_for, stage_env
from latentsim.parity import forward_roundings, p_yes_bound

# The deepest model the check's sweeps score (SmolLM2-135M: 30 layers; Gemma-3-270M: 18): where two engines'
# bf16 kernels may round the residual stream differently (latentsim.parity.forward_roundings).
CHECKED_LAYERS = 30
PY = sys.executable


def plan(out: str) -> list[tuple[str, list[str]]]:
    """(step, argv) in order: what runs, and what --dry_run prints."""
    d, sft = f"{out}/datasets", f"{out}/sft"
    accelerate = [PY, "-m", "accelerate.commands.launch"]
    train = [
        "train/sft.py",
        "--config",
        "configs/sft/smollm2-135m_quickstart.yaml",
        "--dataset_name",
        f"{d}/quantiles_top5",
        "--max_steps",
        "8",
        "--save_steps",
        "4",
        "--eval_steps",
        "4",
        "--bf16",
        "true",
        "--use_cpu",
        "false",
        "--dtype",
        "bfloat16",
        "--max_eval_samples",
        "64",
    ]
    sweep = [
        PY,
        "eval/sweep.py",
        "--config",
        "configs/eval/sweep_smollm2-135m_quickstart.yaml",
        "--eval_set",
        f"{d}/eval_quantiles",
        "--run_dirs",
        f"{sft}/single_gpu",
        "--include_checkpoints",
        "false",
        "--baselines",
        "name=smollm2_zero-shot",
        "name=gemma3_zero-shot,model=embedded:gemma3-270m",
        "--max_contexts",
        "20",
        "--device",
        "cuda",
        "--dtype",
        "bfloat16",
    ]
    return [
        (
            "prepare",
            [
                PY,
                "data_gen/prepare_embedded.py",
                "--config",
                "configs/data/prepare_embedded.yaml",
                "--models",
                "smollm2-135m",
                "gemma3-270m",
            ],
        ),
        (
            "train_sae",
            [
                PY,
                "data_gen/train_sae.py",
                "--config",
                "configs/data/sae_smollm2-135m_l15.yaml",
                "--n_rows",
                "128",
                "--training_tokens",
                "60000",
                "--output_dir",
                f"{out}/sae",
            ],
        ),
        (
            "cache",
            [
                PY,
                "data_gen/cache_activations.py",
                "--config",
                "configs/data/cache_smollm2-135m_l15.yaml",
                "--n_rows",
                "256",
                "--sae_path",
                f"{out}/sae",
                "--output_dir",
                f"{out}/cache",
            ],
        ),
        (
            "explain",
            [
                PY,
                "data_gen/explain.py",
                "--config",
                "configs/data/explain_token_list_quantiles.yaml",
                "--cache_dir",
                f"{out}/cache",
                "--explanations_dir",
                f"{out}/explanations",
            ],
        ),
        (
            "build_mixture",
            [
                PY,
                "data_gen/build_dataset.py",
                "--config",
                "configs/data/mix_quantiles_top5.yaml",
                "--cache_dir",
                f"{out}/cache",
                "--interpretations",
                f"{out}/explanations/token_list-quantiles",
                "--output_dir",
                f"{d}/quantiles_top5",
            ],
        ),
        (
            "build_eval_set",
            [
                PY,
                "data_gen/build_dataset.py",
                "--config",
                "configs/data/eval_quantiles.yaml",
                "--cache_dir",
                f"{out}/cache",
                "--interpretations",
                f"{out}/explanations/token_list-quantiles",
                "--output_dir",
                f"{d}/eval_quantiles",
            ],
        ),
        (
            "train_single_gpu",
            [
                *accelerate,
                "--config_file",
                "configs/accelerate/single_gpu.yaml",
                *train,
                "--output_dir",
                f"{sft}/single_gpu",
            ],
        ),
        (
            "train_zero3",
            [
                *accelerate,
                "--config_file",
                "configs/accelerate/deepspeed_zero3.yaml",
                "--num_processes",
                "1",
                *train,
                "--output_dir",
                f"{sft}/zero3",
            ],
        ),
        ("sweep_hf", [*sweep, "--backend", "hf", "--output_dir", f"{out}/eval_hf"]),
        # vLLM runs in its own environment (.venv-vllm: latentsim.envs). Each engine takes under half the
        # card: the sweep builds one per base model, and a released engine's memory may not be free at once.
        (
            "sweep_vllm",
            in_its_environment(
                [
                    *sweep,
                    "--backend",
                    "vllm",
                    "--gpu_memory_utilization",
                    "0.4",
                    "--output_dir",
                    f"{out}/eval_vllm",
                ]
            ),
        ),
    ]


def in_its_environment(argv: list[str]) -> list[str]:
    """A stage whose backend is vLLM runs with .venv-vllm's python (latentsim.envs.python_for)."""
    if argv[0] == PY and stage_env(argv[1:]) == "vllm":
        return [str(python_for(argv[1:])), *argv[1:]]
    return argv


def checks(out: Path) -> dict:
    """What must hold after the steps: adapters non-empty with their bf16 reload parity, P(yes) equal across
    backends (every simulator of the sweep, judgment by judgment), the vLLM sweep having switched base
    model."""
    found = {}
    for run_name in ("single_gpu", "zero3"):
        path = out / "sft" / run_name / "eval_results.json"
        adapter = json.loads(path.read_text())["adapter"] if path.is_file() else {}
        found[f"adapter_{run_name}"] = {
            **adapter,
            "ok": bool(adapter.get("n_parameters")) and reload_ok(adapter),
        }
    for hf_preds in sorted((out / "eval_hf").glob("*/*/predictions_test.parquet")):
        vllm_preds = out / "eval_vllm" / hf_preds.relative_to(out / "eval_hf")
        name = hf_preds.parent.name
        if not vllm_preds.is_file():
            found[f"p_yes_{name}"] = {"ok": False, "why": "no vLLM predictions"}
            continue
        a, b = pd.read_parquet(hf_preds), pd.read_parquet(vllm_preds)
        joined = a.merge(b, on=["context_id", "latent"], suffixes=("_hf", "_vllm"))
        found[f"p_yes_{name}"] = {"judgments": len(joined), **backends_agree(joined)}
        found[f"p_yes_{name}"]["ok"] &= len(joined) == len(a) == len(b)
    return found


def reload_ok(adapter: dict) -> bool:
    """The adapter's reload parity (train/sft.py's record): mean and max |ΔP(yes)| within their bounds."""
    keys = [f"reload_{k}_p_yes" for k in ("mean_abs_diff", "max_abs_diff", "bound_mean", "bound_max")]
    if any(adapter.get(k) is None for k in keys):
        return False
    mean, worst, bound_mean, bound_max = (adapter[k] for k in keys)
    return mean <= bound_mean and worst <= bound_max


def backends_agree(joined: pd.DataFrame) -> dict:
    """hf (bf16, answer rows in fp32) against vLLM (bf16, whose lm_head rounds the logits to bf16) on the same
    judgments: |ΔP(yes)| within latentsim.parity's bf16 bound, on the mean and on the max."""
    if "answer_sensitivity" not in joined:
        return {"ok": False, "why": "the hf predictions carry no answer_sensitivity"}
    logits = joined[["logit_0_hf", "logit_1_hf"]].abs().sum(axis=1).to_numpy()
    bound = p_yes_bound(
        torch.bfloat16, joined["answer_sensitivity"].to_numpy(), forward_roundings(CHECKED_LAYERS), logits
    )
    return bound.check(joined["p_yes_hf"].to_numpy() - joined["p_yes_vllm"].to_numpy())
