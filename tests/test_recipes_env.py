"""Every recipe parses in the environment that will run it, read from the committed pins with no network:
training and `backend: hf` stages in the training environment (constraints/train.txt), `backend: vllm`
stages in the vLLM one (constraints/vllm.txt), whose vLLM caps transformers below the 5.23 that the SFT
recipes need (latentsim.envs; docs/gpu.md)."""

import json
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from test_configs import TRL_YAMLS, load_script, script_of

from latentsim.envs import (
    ENVIRONMENTS,
    FIELD_PACKAGES,
    THIRD_PARTY_DATACLASSES,
    constraints_path,
    live_snapshot,
    normalize,
    python_for,
    read_header,
    read_pins,
    recipe_problems,
    snapshot_path,
    stage_env,
    write_lock,
)

ROOT = Path(__file__).resolve().parents[1]


def snapshot(env: str) -> dict:
    return json.loads(snapshot_path(env).read_text())


def recipe_env(config: Path) -> str:
    return stage_env(["--config", str(config)])


def test_every_environment_is_pinned_exactly_and_snapshotted_at_its_pins():
    for env in ENVIRONMENTS:
        pins = read_pins(constraints_path(env))  # raises on any line that is not `name==version`
        snap = snapshot(env)
        assert snap["environment"] == env and snap["constraints"] == f"constraints/{env}.txt"
        assert snap["versions"] == {p: pins[p] for p in FIELD_PACKAGES}, f"{env}: snapshot is not at its pins"
        assert set(snap["dataclasses"]) == set(THIRD_PARTY_DATACLASSES)
        extras = ",".join(read_header(constraints_path(env), "extras"))
        install = f"pip install -q -e '.[{extras}]' -c {snap['constraints']}"
        assert install in (ROOT / "launch.sh").read_text(), f"launch.sh does not install {env} as locked"
        for root in read_header(constraints_path(env), "roots"):
            name, version = root.split("==")
            assert pins[normalize(name)] == version, f"{env}: the root {root} is not what the lock pins"
    train, vllm = (read_pins(constraints_path(e)) for e in ENVIRONMENTS)
    assert "vllm" not in train and "vllm" in vllm  # training never pulls vLLM
    assert (
        train["torch"] == vllm["torch"] == "2.13.0"
    )  # the CPU tests' torch; CUDA 13 libraries pinned beside it
    assert train["nvidia-cudnn-cu13"] and vllm["nvidia-cudnn-cu13"] and train["deepspeed"]


def test_pins_satisfy_the_projects_own_bounds():
    """Each lock meets pyproject's dependencies and the extras its environment installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for env in ENVIRONMENTS:
        pins = read_pins(constraints_path(env))
        extras = read_header(constraints_path(env), "extras")
        wanted = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
        for line in wanted:
            req = Requirement(line)
            assert req.specifier.contains(pins[normalize(req.name)]), (
                f"{env}: {pins[normalize(req.name)]} {req}"
            )
    assert not Requirement("transformers>=5.23").specifier.contains(
        read_pins(constraints_path("vllm"))["transformers"]
    )


def test_recipe_envs_cover_both_environments(monkeypatch):
    envs = {config.relative_to(ROOT).as_posix(): recipe_env(config) for config in TRL_YAMLS}
    assert envs["configs/eval/sweep_llama-3.1-8b.yaml"] == "vllm"
    assert envs["configs/data/explain_llm_gemma-2-9b_quantiles.yaml"] == "vllm"
    assert envs["configs/eval/sweep_smollm2-135m_quickstart.yaml"] == "train"
    sft = [c for c in envs if script_of(ROOT / c).name == "sft.py"]
    assert len(sft) >= 10 and all(envs[c] == "train" for c in sft)
    assert (
        stage_env(["--config", str(ROOT / "configs/eval/sweep_llama-3.1-8b.yaml"), "--backend", "hf"])
        == "train"
    )
    assert (
        stage_env([f"--config={ROOT}/configs/eval/sweep_smollm2-135m_quickstart.yaml", "--backend=vllm"])
        == "vllm"
    )
    monkeypatch.setenv("VENV", "/elsewhere/venv")
    assert python_for(["eval/sweep.py", "--config", str(ROOT / "configs/eval/sweep_llama-3.1-8b.yaml")]) == (
        ROOT / ".venv-vllm/bin/python"
    )
    assert python_for(["train/sft.py", "--config", "x.yaml"]) == Path("/elsewhere/venv/bin/python")


@pytest.mark.parametrize("config", TRL_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses_in_the_environment_that_runs_it(config):
    dataclasses = load_script(script_of(config)).DATACLASSES
    assert recipe_problems(config, dataclasses, snapshot(recipe_env(config))) == []


def test_a_key_the_environment_lacks_is_reported():
    """The check fails where it must: the SFT recipes in the vLLM environment (transformers < 5.23 has no
    `activation_checkpointing`), and a snapshot that lost a field or a dataclass."""
    config = ROOT / "configs/sft/llama-3.1-8b_quantiles_top5.yaml"
    dataclasses = load_script(script_of(config)).DATACLASSES
    vllm = snapshot("vllm")
    problems = recipe_problems(config, dataclasses, vllm)
    assert len(problems) == 1 and "`activation_checkpointing`" in problems[0]
    assert (
        f"transformers {vllm['versions']['transformers']}" in problems[0]
        and "vllm environment" in problems[0]
    )
    train = snapshot("train")
    assert recipe_problems(config, dataclasses, train) == []
    fewer = {**train, "dataclasses": dict(train["dataclasses"])}
    fewer["dataclasses"]["trl.SFTConfig"] = [
        f for f in fewer["dataclasses"]["trl.SFTConfig"] if f != "max_steps"
    ]
    assert recipe_problems(config, dataclasses, fewer) == [
        f"{config}: the train environment (transformers {train['versions']['transformers']}, trl "
        f"{train['versions']['trl']}) does not accept `max_steps`"
    ]
    del fewer["dataclasses"]["trl.ModelConfig"]
    missing = recipe_problems(config, dataclasses, fewer)
    assert "no snapshot of trl.ModelConfig" in missing[0] and "snapshot train" in missing[0]


def test_snapshot_equals_the_live_fields_where_the_pinned_versions_run():
    """Where this interpreter has an environment's pinned transformers and trl (./launch.sh setup installs
    constraints/train.txt), the committed snapshot is what those libraries really accept."""
    installed = {p: metadata.version(p) for p in FIELD_PACKAGES}
    matched = [env for env in ENVIRONMENTS if snapshot(env)["versions"] == installed]
    if not matched:
        pytest.skip(f"no environment pins this interpreter's {installed}")
    for env in matched:
        assert live_snapshot(env)["dataclasses"] == snapshot(env)["dataclasses"], (
            f"rerun `python -m latentsim.envs snapshot {env}`"
        )


def test_a_lock_is_written_from_pips_report(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text(
        "# about x\n# roots: a==1\n# extras: dev\n# Resolved by pip 1 for CPython 3 on X, 2000.\nold==1\n"
    )
    report = {
        "pip_version": "26.3",
        "environment": {
            "python_full_version": "3.11.7",
            "platform_system": "Linux",
            "platform_machine": "x86_64",
        },
        "install": [
            {"metadata": {"name": "Typing_Extensions", "version": "4.16.0"}},
            {"metadata": {"name": "latentsim", "version": "0.1.0"}},
            {"metadata": {"name": "a", "version": "1"}},
        ],
    }
    write_lock(path, report)
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# about x", "# roots: a==1", "# extras: dev"]
    assert lines[3].startswith("# Resolved by pip 26.3 for CPython 3.11.7 on Linux x86_64, ")
    assert lines[4:] == ["a==1", "typing-extensions==4.16.0"]
    assert read_pins(path) == {"a": "1", "typing-extensions": "4.16.0"}
    path.write_text("torch>=2\n")
    with pytest.raises(ValueError, match="not an exact `name==version` pin"):
        read_pins(path)
