"""bench/gpu_check.py, which runs only where a GPU is lent: its dry run, and its checks on planted outputs."""

import json

import pandas as pd
import pytest
from helpers import load_script

from latentsim.config import GpuCheckArguments
from latentsim.gpu_check import P_YES_TOLERANCE, checks, plan


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path, capsys):
    load_script("bench/gpu_check.py").main(GpuCheckArguments(dry_run=True, output_dir=str(tmp_path / "g")))
    out = capsys.readouterr().out
    steps = [name for name, _ in plan(str(tmp_path / "g"))]
    assert steps[-4:] == ["train_single_gpu", "train_zero3", "sweep_hf", "sweep_vllm"]
    assert all(f"[gpu_check] {s}:" in out for s in steps) and "nothing ran" in out
    assert not (tmp_path / "g").exists()
    argv = dict(plan("o"))
    assert (
        "configs/accelerate/deepspeed_zero3.yaml" in argv["train_zero3"]
        and argv["train_zero3"][argv["train_zero3"].index("--num_processes") + 1] == "1"
    )
    assert "embedded:gemma3-270m" in " ".join(argv["sweep_vllm"])  # the vLLM sweep switches base model
    assert argv["sweep_hf"][:-4] == argv["sweep_vllm"][:-4]  # same eval set, adapter and baselines


def plant(root, name, p_yes):
    folder = root / "eval_set" / name
    folder.mkdir(parents=True)
    pd.DataFrame({"context_id": [0, 0, 1], "latent": [3, 4, 3], "p_yes": p_yes}).to_parquet(
        folder / "predictions_test.parquet"
    )


def test_checks_compare_backends_judgment_by_judgment_and_read_the_adapters(tmp_path):
    for run, record in (
        ("single_gpu", {"n_parameters": 10, "reload_max_abs_diff_p_yes": 0.004}),
        ("zero3", {"n_parameters": 0, "reload_max_abs_diff_p_yes": 0.001}),
    ):
        (tmp_path / "sft" / run).mkdir(parents=True)
        (tmp_path / "sft" / run / "eval_results.json").write_text(json.dumps({"adapter": record}))
    plant(tmp_path / "eval_hf", "run__final", [0.2, 0.5, 0.9])
    plant(tmp_path / "eval_vllm", "run__final", [0.2, 0.5 + P_YES_TOLERANCE / 2, 0.9])
    plant(tmp_path / "eval_hf", "baseline__gemma3_zero-shot", [0.2, 0.5, 0.9])
    plant(tmp_path / "eval_vllm", "baseline__gemma3_zero-shot", [0.2, 0.5, 0.9 - 2 * P_YES_TOLERANCE])
    plant(tmp_path / "eval_hf", "baseline__smollm2_zero-shot", [0.1, 0.1, 0.1])
    found = checks(tmp_path)
    assert found["adapter_single_gpu"]["ok"] and not found["adapter_zero3"]["ok"]  # an empty adapter fails
    assert found["p_yes_run__final"]["ok"] and found["p_yes_run__final"]["judgments"] == 3
    assert not found["p_yes_baseline__gemma3_zero-shot"]["ok"]
    assert found["p_yes_baseline__gemma3_zero-shot"]["max_abs_diff"] == pytest.approx(2 * P_YES_TOLERANCE)
    assert not found["p_yes_baseline__smollm2_zero-shot"]["ok"]  # the vLLM sweep never scored it
