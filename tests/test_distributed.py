"""Stages under `accelerate launch` with 2 CPU processes (gloo) give the files a 1-process run gives."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import load_script, make_cache

from latentsim.cache import shard_path
from latentsim.config import DatasetArguments, EvalArguments, ExplainArguments
from latentsim.distributed import Ranks
from latentsim.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
HOOK = "layers.1"


def launch(script: str, tmp: Path, *configs, processes: int = 2) -> str:
    """`accelerate launch --num_processes N script --config <the dataclasses as YAML>`; returns its output."""
    values = {}
    for config in configs:
        for key, value in dataclasses.asdict(config).items():
            if value is not None:
                values[key] = list(value) if isinstance(value, tuple) else value
    path = tmp / f"{Path(script).stem}_{len(list(tmp.glob('*.yaml')))}.yaml"
    path.write_text(f"# python {script} --config {path}\n" + yaml.safe_dump(values))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/multi_cpu.yaml"), "--num_processes", str(processes), str(ROOT / script),
           "--config", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def same_files(a: Path, b: Path, pattern: str) -> list[str]:
    names = sorted(p.relative_to(a).as_posix() for p in a.glob(pattern) if p.is_file())
    assert names and names == sorted(p.relative_to(b).as_posix() for p in b.glob(pattern) if p.is_file())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A 1-process cache (with the arguments that made it), its interpretations and an eval set."""
    root = tmp_path_factory.mktemp("single")
    cache_args = make_cache(root / "cache", tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=40, ctx_len=16)
    explain = ExplainArguments(cache_dir=str(root / "cache"), hookpoint=HOOK, explanations_dir=str(root / "expl"),
                               window=8, min_activations=2, seed=3, validation_fraction=0.2, test_fraction=0.2)
    load_script("data_gen/explain.py").main(explain)
    load_script("data_gen/build_dataset.py").main(DatasetArguments(
        cache_dir=str(root / "cache"), hookpoint=HOOK, simulator_tokenizer=str(tiny_model_dir),
        interpretations=[str(root / "expl" / explain.set_name)], window_min=4, window_max=6, contexts_per_row=2,
        validation_fraction=0.2, test_fraction=0.2, seed=3, positives="all", negatives_per_context=4,
        output_dir=str(root / "eval_set")))
    return root, cache_args, explain


def test_shares_are_dealt_by_position():
    ranks = [Ranks(rank=r, world=4, share_index=r, n_shares=4) for r in range(4)]
    assert [rk.share(list(range(10))) for rk in ranks] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    # Two tensor-parallel engines of 2 ranks: ranks 0-1 compute share 0 (rank 0 writes), ranks 2-3 share 1.
    tp = [rk.with_tensor_parallel(2) for rk in ranks]
    assert [(t.share_index, t.n_shares, t.writes) for t in tp] == [(0, 2, True), (0, 2, False), (1, 2, True),
                                                                   (1, 2, False)]
    assert tp[1].share(list(range(5))) == [0, 2, 4]
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        ranks[0].with_tensor_parallel(3)
    assert Ranks.from_env() == Ranks()  # a plain `python` run is rank 0 of 1


def test_caching_across_two_processes_resumes_and_equals_one(single, tmp_path, monkeypatch):
    root, (model, corpus, sae, cache), _ = single
    cache = dataclasses.replace(cache, output_dir=str(tmp_path / "cache"))
    # A run killed before finalising, then one unfinished shard of each rank's share lost.
    monkeypatch.setattr("latentsim.cache.finalise_shards", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
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
    out = launch("data_gen/explain.py", tmp_path, dataclasses.replace(explain, explanations_dir=str(tmp_path / "expl")))
    assert "rank 0 of 2:" in out and "rank 1 of 2:" in out
    names = same_files(root / "expl" / explain.set_name, tmp_path / "expl" / explain.set_name, "*.txt")
    assert len(names) > 10
    for name in ("explain_report.json", "source_rows.json"):
        same_files(root / "expl" / explain.set_name, tmp_path / "expl" / explain.set_name, name)


def test_sweep_across_two_processes_equals_one(single, tiny_model_dir, tmp_path):
    root, _, _ = single
    args = EvalArguments(eval_set=str(root / "eval_set"), output_dir=str(tmp_path / "one"), batch_size=4,
                         baselines=[f"model={tiny_model_dir},name=zero", f"model={tiny_model_dir},shots=2,name=two",
                                    "model=prior", "model=string_match"])
    load_script("eval/sweep.py").main(args)
    out = launch("eval/sweep.py", tmp_path, dataclasses.replace(args, output_dir=str(tmp_path / "two")))
    # Simulator i is scored by rank i % 2.
    assert "baseline__zero (rank 0 of 2)" in out and "baseline__two (rank 1 of 2)" in out
    assert "baseline__prior (rank 0 of 2)" in out and "baseline__string_match (rank 1 of 2)" in out
    one, two = tmp_path / "one" / "eval_set", tmp_path / "two" / "eval_set"
    names = same_files(one, two, "*/predictions_*.parquet")
    assert len(names) == 8  # 4 simulators x (test, validation)
    summary = [yaml.safe_load((d / "summary.json").read_text())["rows"] for d in (one, two)]
    assert summary[0] == summary[1] and len(summary[0]) == 4
