"""The offline GPU check's pieces that run in-process on CPU: the step runner (timeouts, results.json after
each step, logs kept, skipped and not-installed steps), the bundle's size check, and the steps' CPU paths at a
tiny shape on a bundle-like folder (tokenizer + the tests' tiny dataset)."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from latentsim import gpu_bundle, gpu_offline
from latentsim.errors import BadInputError
from latentsim.gpu_offline import Step, run_steps

PY = sys.executable


def step_argv(out: Path, code: dict[str, str]):
    """argv_of for run_steps: each step a `python -c` that may write steps/<name>.json."""

    def argv_of(step):
        return [PY, "-c", code[step.name].replace("OUT", str(out))]

    return argv_of


def write_result(name: str, body: str) -> str:
    return (
        f"import json, pathlib; p = pathlib.Path('OUT/steps/{name}.json'); p.parent.mkdir(exist_ok=True); "
        f"p.write_text(json.dumps({body}))"
    )


def test_runner_records_each_step_with_timeout_logs_and_skips(tmp_path):
    out = tmp_path / "out"
    steps = [
        Step("env", "env", 30),
        Step("good", "passes", 30),
        Step("slow", "hangs", 2),
        Step("bad", "exits 0 but not ok", 30),
        Step("crash", "exits 3", 30),
        Step("gpu", "needs CUDA", 30, only="cuda"),
        Step("absent", "needs a missing module", 30, needs=("no_such_module_xyz",)),
    ]
    code = {
        "env": "print('hello env'); "
        + write_result("env", "{'ok': True, 'cuda': False, 'device': {'name': 'cpu'}}"),
        "good": write_result("good", "{'ok': True, 'tokens_per_s': 12.5}"),
        "slow": "import time; print('waiting', flush=True); time.sleep(60)",
        "bad": write_result("bad", "{'ok': False}"),
        "crash": "import sys; sys.stderr.write('boom\\n'); sys.exit(3)",
    }
    record = run_steps(steps, out, step_argv(out, code), budget_s=120)
    by = {s["step"]: s for s in record["steps"]}
    assert [s["status"] for s in record["steps"]] == [
        "passed",
        "passed",
        "timeout",
        "failed",
        "failed",
        "skipped",
        "not run",
    ]
    assert by["good"]["result"]["tokens_per_s"] == 12.5
    assert by["slow"]["rc"] is None and by["slow"]["seconds"] < 20
    assert by["crash"]["rc"] == 3 and by["crash"]["result"] is None
    assert by["gpu"]["reason"] == "needs CUDA"
    assert by["absent"]["reason"] == "not installed (no_such_module_xyz)"
    assert record["device"] == {"name": "cpu"} and record["finished"] and record["passed"] is False
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == json.loads(json.dumps(record["steps"])) and saved["finished"]
    assert "hello env" in (out / "logs" / "env.log").read_text()
    assert "waiting" in (out / "logs" / "slow.log").read_text()
    assert "boom" in (out / "logs" / "crash.log").read_text()


def test_results_json_is_rewritten_after_each_step(tmp_path):
    """While the second step runs, results.json already holds the first, and the second as running."""
    out = tmp_path / "out"
    snapshot = tmp_path / "seen.json"
    code = {
        "first": write_result("first", "{'ok': True}"),
        "second": f"import shutil; shutil.copy('OUT/results.json', {str(snapshot)!r}); "
        + write_result("second", "{'ok': True}"),
    }
    record = run_steps([Step("first", "", 30), Step("second", "", 30)], out, step_argv(out, code), 60)
    seen = json.loads(snapshot.read_text())
    assert [(s["step"], s["status"]) for s in seen["steps"]] == [("first", "passed"), ("second", "running")]
    assert seen["finished"] is False
    assert record["passed"] is True and len(record["steps"]) == 2


def test_budget_spent_steps_are_not_run(tmp_path):
    out = tmp_path / "out"
    code = {"a": "import time; time.sleep(3)", "b": write_result("b", "{'ok': True}")}
    steps = [Step("a", "", 60), Step("b", "", 60)]
    record = run_steps(steps, out, step_argv(out, code), budget_s=2, min_step_s=1)
    assert record["steps"][0]["status"] == "timeout" and record["steps"][0]["timeout_s"] == 2
    assert record["steps"][1]["status"] == "not run" and "budget" in record["steps"][1]["reason"]


def test_plan_skips_by_device():
    steps = {s.name: s for s in gpu_offline.plan()}
    assert gpu_offline.why_not_run(steps["sft_speed_8b"], cuda=False) == ("skipped", "needs CUDA")
    assert gpu_offline.why_not_run(steps["sft_speed_tiny"], cuda=False) is None
    assert gpu_offline.why_not_run(steps["sft_speed_tiny"], cuda=True)[0] == "skipped"
    assert gpu_offline.why_not_run(steps["dense_exact"], cuda=False) is None


def test_bundle_size_check(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "big.bin").write_bytes(b"x" * 3000)
    (tmp_path / "small.txt").write_bytes(b"y" * 100)
    assert gpu_bundle.check_size(tmp_path, limit=4000) == 3100
    with pytest.raises(BadInputError, match=r"a/big\.bin"):
        gpu_bundle.check_size(tmp_path, limit=3000)


def test_lora_flops_per_token():
    flops = gpu_offline.lora_flops_per_token(n_matmul=1000, layers=2, seq=10, hidden=4)
    assert flops == {"model": 2 * (2000 + 160), "with_recompute": 3 * (2000 + 160)}


def test_bf16_peak_by_device_name():
    assert gpu_offline.bf16_peak("NVIDIA H200")[0] == 989.4
    assert gpu_offline.bf16_peak("NVIDIA H200", 500.0)[0] == 500.0
    assert gpu_offline.bf16_peak("Some GPU")[0] is None


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, dataset_dir):
    """A bundle-like folder: the tokenizer the steps build models for, and the tests' tiny dataset as both
    the dense mixture and the eval set (the steps read interpretations and sim_v1 judgments from them)."""
    from latentsim.scale import word_level_tokenizer

    root = tmp_path_factory.mktemp("bundle")
    word_level_tokenizer(gpu_bundle.ANSWERS + gpu_bundle.WORDS).save_pretrained(str(root / "tokenizer"))
    for name in ("dense", "eval"):
        shutil.copytree(dataset_dir, root / "datasets" / name)
    (root / "bundle.json").write_text(json.dumps({"requirements": ["latentsim==0"]}))
    return root


def test_dense_exact_on_cpu(bundle, tmp_path):
    result = gpu_offline.step_dense_exact(bundle, tmp_path)
    assert result["ok"] and result["device"] == "cpu"
    assert result["dense_text_logits_max_abs_diff"] < 1e-4 and result["prefix_shared_max_abs_diff"] < 1e-4
    assert result["dense_judged"] > 100 and result["prefix_shared_judgments"] > 10


def test_bf16_parity_on_cpu(bundle, tmp_path):
    result = gpu_offline.step_bf16_parity(bundle, tmp_path)
    assert 0 < result["max_abs_diff"] <= result["bound"] and result["ok"]
    assert result["mean_abs_diff"] <= result["max_abs_diff"]


def test_sft_speed_tiny(bundle, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the GPU recipe it reads its batch and LoRA from
    result = gpu_offline.step_sft_speed(bundle, tmp_path, "tiny")
    assert result["ok"] and result["shape"] == "tiny" and result["batch"] == [4, 64]
    assert result["tokens_per_s"] > 0 and result["mfu"] is None and result["achieved_model_tflops"] > 0
    assert result["trainable_parameters"] < result["parameters"] and len(result["step_seconds"]) == 3
    assert result["activation_checkpointing"] is True and result["lora"]["r"] == 16


def test_scoring_speed_tiny_is_exact_in_fp32(bundle, tmp_path):
    result = gpu_offline.step_scoring_speed(bundle, tmp_path, "tiny")
    assert result["ok"] and result["exact"] and result["max_abs_diff_margin"] < 1e-4
    assert set(result["judgments_per_s"]) == {
        "dense_kv_shared",
        "dense_value_kv_shared",
        "dense_per_position",
        "sim_v1_prefix_shared",
    }
    assert result["value_exact"]  # the value format's 11 answer rows in the same pass, exact in fp32
    # whole-layer judging computes fewer tokens per judgment than one forward per judgment
    per = result["computed_tokens_per_judgment"]
    assert per["dense_kv_shared"] < per["dense_per_position"]


def test_env_step_reports_offline_and_versions(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = gpu_offline.step_env(bundle, tmp_path)
    assert result["hf_hub_offline"] and result["cuda"] is False and result["versions"]["trl"]
    assert result["recipes_parse"] and result["ok"] and result["bundle"] == ["latentsim==0"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert gpu_offline.step_env(bundle, tmp_path)["ok"] is False


def test_networked_gpu_check_times_out_a_step_and_keeps_every_log(tmp_path, monkeypatch, capsys):
    """bench/gpu_check.py: a hung step is killed at step_timeout_s, the next still runs, results.json says
    which passed and which timed out, each step's output is in logs/<step>.log, and the check fails."""
    from helpers import load_script

    from latentsim.config import GpuCheckArguments

    script = load_script("bench/gpu_check.py")
    steps = [
        ("hangs", [PY, "-c", "import time; print('started', flush=True); time.sleep(60)"]),
        ("quick", [PY, "-c", "print('quick step ran')"]),
    ]
    monkeypatch.setattr(script, "plan", lambda out: steps)
    monkeypatch.setattr(script, "checks", lambda out: {"planted": {"ok": True}})
    out = tmp_path / "g"
    with pytest.raises(SystemExit):
        script.main(GpuCheckArguments(output_dir=str(out), step_timeout_s=2))
    record = json.loads((out / "results.json").read_text())
    assert [(s["step"], s["status"]) for s in record["steps"]] == [("hangs", "timeout"), ("quick", "passed")]
    assert record["finished"] and not record["passed"] and record["steps"][0]["seconds"] < 30
    assert "started" in (out / "logs" / "hangs.log").read_text()
    assert "quick step ran" in (out / "logs" / "quick.log").read_text()
