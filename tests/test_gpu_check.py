"""bench/gpu_check.py, which runs only where a GPU is lent: its dry run, and its checks on planted outputs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import load_script

from latentsim.config import GpuCheckArguments
from latentsim.gpu_check import CHECKED_LAYERS, checks, plan
from latentsim.parity import forward_roundings, p_yes_bound


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
    hf, vllm = argv["sweep_hf"], argv["sweep_vllm"]
    assert hf[1:-4] == vllm[1:-6]  # same eval set, adapter and baselines
    # vLLM runs with its own environment's python (transformers < 5.20 there), the rest with this one
    assert vllm[0].endswith(".venv-vllm/bin/python") and hf[0] == argv["train_zero3"][0]


N_JUDGED = 400


def plant(root, name, p_yes, sensitivity=None):
    """A predictions table of N_JUDGED judgments (P(yes) 0.2, 0.5, 0.9 over and over, plus `p_yes`'s shifts)
    with answer logits near 20; hf's carry their rounding sensitivity."""
    folder = root / "eval_set" / name
    folder.mkdir(parents=True)
    p = np.resize([0.2, 0.5, 0.9], N_JUDGED) + np.asarray(p_yes)
    table = {"context_id": np.arange(N_JUDGED), "latent": [3] * N_JUDGED, "p_yes": p, "logit_0": 20.0}
    table["logit_1"] = 20.0 + np.log(p / (1 - p))
    if sensitivity is not None:
        table["answer_sensitivity"] = sensitivity
    pd.DataFrame(table).to_parquet(folder / "predictions_test.parquet")


def test_checks_compare_backends_judgment_by_judgment_and_read_the_adapters(tmp_path):
    bounds = {"reload_bound_mean_p_yes": 2e-3, "reload_bound_max_p_yes": 5e-3}
    for run, record in (
        (
            "single_gpu",
            {"n_parameters": 10, "reload_mean_abs_diff_p_yes": 1e-3, "reload_max_abs_diff_p_yes": 4e-3},
        ),
        ("zero3", {"n_parameters": 0, "reload_mean_abs_diff_p_yes": 1e-4, "reload_max_abs_diff_p_yes": 1e-3}),
        ("old", {"n_parameters": 10, "reload_max_abs_diff_p_yes": 1e-5}),  # no bounds recorded: not ok
    ):
        (tmp_path / "sft" / run).mkdir(parents=True)
        (tmp_path / "sft" / run / "eval_results.json").write_text(
            json.dumps({"adapter": {**record, **bounds}})
        )
    # The bf16 bound of these judgments (sensitivity 0.5, logits near 20): vLLM's logit rounding alone may
    # move P(yes) by up to u * 40 / 4 = 0.039; a correct pair sits inside it, a shifted one does not.
    bound = p_yes_bound(
        torch.bfloat16, [0.5] * N_JUDGED, forward_roundings(CHECKED_LAYERS), [40.0] * N_JUDGED
    )
    assert 0.039 < bound.mean < bound.max < 0.07
    one = np.zeros(N_JUDGED)
    one[1] = 1.0  # the second judgment (P(yes) 0.5) alone
    plant(tmp_path / "eval_hf", "run__final", 0.0, sensitivity=0.5)
    plant(tmp_path / "eval_vllm", "run__final", one * bound.max / 2)
    plant(tmp_path / "eval_hf", "baseline__gemma3_zero-shot", 0.0, sensitivity=0.5)
    plant(tmp_path / "eval_vllm", "baseline__gemma3_zero-shot", one * 1.5 * bound.max)
    plant(tmp_path / "eval_hf", "baseline__all_off", 0.0, sensitivity=0.5)  # each judgment within the max,
    plant(tmp_path / "eval_vllm", "baseline__all_off", 0.95 * bound.max)  # all of them off: the mean fails
    plant(tmp_path / "eval_hf", "baseline__smollm2_zero-shot", 0.0, sensitivity=0.5)
    found = checks(tmp_path)
    assert found["adapter_single_gpu"]["ok"] and not found["adapter_zero3"]["ok"]  # an empty adapter fails
    assert found["p_yes_run__final"]["ok"] and found["p_yes_run__final"]["judgments"] == N_JUDGED
    assert not found["p_yes_baseline__gemma3_zero-shot"]["ok"]
    assert found["p_yes_baseline__gemma3_zero-shot"]["max_abs_diff"] == pytest.approx(1.5 * bound.max)
    assert not found["p_yes_baseline__all_off"]["ok"]
    assert found["p_yes_baseline__all_off"]["max_abs_diff"] < found["p_yes_baseline__all_off"]["bound_max"]
    assert not found["p_yes_baseline__smollm2_zero-shot"]["ok"]  # the vLLM sweep never scored it
