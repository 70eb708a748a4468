"""Publishing adapters: the staged folder, the card's YAML, branches for checkpoints, no secrets, no HTTP."""

import json

import pytest
import torch
import yaml
from helpers import FakeHubApi, load_script, sft_args
from safetensors.torch import load_file, save_file

from latentsim.config import ConfigError, PublishArguments


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, dataset_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("pub") / "run"
    load_script("train/sft.py").main(
        *sft_args(
            dataset_dir,
            tiny_model_dir,
            out,
            training={"max_steps": 4, "save_steps": 2, "eval_strategy": "steps", "eval_steps": 2},
        )
    )
    return out


def front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def test_dry_run_stages_exactly_the_adapter_and_a_card(run_dir, monkeypatch, capsys):
    secret = "hf_" + "x" * 34
    monkeypatch.setenv("HF_TOKEN", secret)
    load_script("train/publish.py").main(
        PublishArguments(run_dir=str(run_dir), repo_id="me/sim", dry_run=True)
    )
    stage = run_dir / "publish" / "main"
    names = {p.name for p in stage.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
        "eval_results.json",
    } <= names
    assert not names & {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}  # no pickles
    meta = front_matter((stage / "README.md").read_text())
    assert meta["library_name"] == "peft" and meta["base_model_relation"] == "adapter"
    assert (
        meta["base_model"]
        == json.loads((stage / "run_config.json").read_text())["config"]["model"]["model_name_or_path"]
    )
    # The training set is a local folder that was never pushed: a card's `datasets:` takes Hub ids only.
    assert meta["prompt_format"] == "sim_v1" and "datasets" not in meta
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    results = json.loads((stage / "eval_results.json").read_text())["metrics"]
    assert metrics["auc"] == pytest.approx(results["eval_auc"], abs=1e-4)
    plan = json.loads((run_dir / "publish" / "main_planned_operations.json").read_text())
    assert [op["op"] for op in plan] == ["create_repo", "upload_folder"]
    assert sorted(plan[-1]["files"]) == sorted(names)
    text = capsys.readouterr().out + "".join(
        p.read_text(errors="ignore") for p in stage.iterdir() if p.suffix != ".safetensors"
    )
    assert secret not in text


def test_checkpoint_goes_to_a_step_branch_through_one_thin_function(run_dir):
    api = FakeHubApi()
    load_script("train/publish.py").main(
        PublishArguments(run_dir=str(run_dir), repo_id="me/sim", checkpoint="checkpoint-2"), api=api
    )
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][1]["branch"] == "step-000000002"
    assert api.calls[2][1]["revision"] == "step-000000002"
    staged = api.calls[2][1]["folder_path"]
    assert (
        load_file(f"{staged}/adapter_model.safetensors").keys()
        == load_file(str(run_dir / "checkpoint-2" / "adapter_model.safetensors")).keys()
    )
    # The branch claims its own step and numbers (its trainer state's eval at step 2), not the final run's.
    own = json.loads((run_dir / "publish" / "step-000000002" / "eval_results.json").read_text())
    final = json.loads((run_dir / "eval_results.json").read_text())
    assert own["global_step"] == 2 != final["global_step"] and own["metrics"]["step"] == 2
    card = (run_dir / "publish" / "step-000000002" / "README.md").read_text()
    metrics = {m["type"]: m["value"] for m in front_matter(card)["model-index"][0]["results"][0]["metrics"]}
    assert metrics["auc"] == pytest.approx(own["metrics"]["eval_auc"], abs=1e-4) and "step 2" in card
    assert own["metrics"]["eval_auc"] != pytest.approx(final["metrics"]["eval_auc"], abs=1e-6)


def test_a_card_shows_the_sweeps_held_out_numbers_with_their_cis(run_dir, dataset_dir, tmp_path):
    from latentsim.config import EvalArguments

    load_script("eval/sweep.py").main(
        EvalArguments(
            eval_set=str(dataset_dir),
            run_dirs=[str(run_dir)],
            backend="fake",
            output_dir=str(tmp_path / "eval"),
            allow_seen_latents=True,
        )
    )  # the fixture splits by context
    load_script("train/publish.py").main(
        PublishArguments(
            run_dir=str(run_dir),
            repo_id="me/sim",
            dry_run=True,
            checkpoint="checkpoint-2",
            sweep_dir=str(tmp_path / "eval"),
        )
    )
    card = (run_dir / "publish" / "step-000000002" / "README.md").read_text()
    result = json.loads(
        (tmp_path / "eval" / dataset_dir.name / "run__checkpoint-2" / "results.json").read_text()
    )
    auc = result["results"]["binary"]["per_context"]["auc"]
    index = front_matter(card)["model-index"][0]["results"][0]
    assert index["dataset"]["split"] == "test" and index["dataset"]["type"] == dataset_dir.name
    assert {m["type"]: m["value"] for m in index["metrics"]}["auc"] == pytest.approx(auc["median"], abs=1e-4)
    assert (
        f"| auc ({dataset_dir.name}) | {auc['median']:.4f} [{auc['ci95'][0]:.3f}, {auc['ci95'][1]:.3f}] |"
        in card
    )


def test_a_published_dataset_is_named_by_its_hub_id(tmp_path):
    from latentsim.hub import hub_dataset_id

    pushed = tmp_path / "pushed"
    pushed.mkdir()
    (pushed / "run_config.json").write_text(
        json.dumps({"config": {"dataset": {"push_to_hub": "org/sim-data"}}})
    )
    assert hub_dataset_id(str(pushed)) == "org/sim-data"
    assert hub_dataset_id("org/sim-data") == "org/sim-data"
    assert hub_dataset_id(str(tmp_path)) is None and hub_dataset_id("outputs/datasets/mix") is None


def test_a_broken_adapter_is_never_published(run_dir, tmp_path):
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((run_dir / "adapter_config.json").read_text())
    tensors = load_file(str(run_dir / "adapter_model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    api = FakeHubApi()
    with pytest.raises(ValueError, match="NaN"):
        load_script("train/publish.py").main(PublishArguments(run_dir=str(broken), repo_id="me/sim"), api=api)
    assert api.calls == []


def test_publish_arguments_are_validated():
    with pytest.raises(ConfigError, match="repo_id"):
        PublishArguments(repo_id="no-slash")
    with pytest.raises(ConfigError, match="checkpoint"):
        PublishArguments(repo_id="me/sim", checkpoint="step-3")
