"""Every recipe parses with the real parser; parsing is strict and errors name the key and the fix."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml

from latentsim.config import (
    CacheArguments,
    ConfigError,
    CorpusArguments,
    DatasetArguments,
    EvalArguments,
    ModelArguments,
    SAEArguments,
    TrainSAEArguments,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "configs").rglob("*.yaml"))
TRL_YAMLS = [p for p in YAMLS if "accelerate" not in p.parts]
ACCELERATE_YAMLS = [p for p in YAMLS if "accelerate" in p.parts]


def script_of(config: Path) -> Path:
    """The entry script named by the recipe's first line, e.g.
    `# python data_gen/train_sae.py --config ...`."""
    first = config.read_text().splitlines()[0]
    match = re.search(r"((?:data_gen|train|eval)/\w+\.py) .*--config (\S+)", first)
    assert match, f"{config}: the first line must be the command that runs it"
    assert match.group(2) == str(config.relative_to(ROOT)), f"{config}: its command names another file"
    return ROOT / match.group(1)


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_glob_is_not_empty():
    # An empty parametrize list would be a silent skip (torchtune's guard that stopped guarding).
    assert len(TRL_YAMLS) >= 20 and len(ACCELERATE_YAMLS) >= 5


@pytest.mark.parametrize("config", TRL_YAMLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses(config):
    script = load_script(script_of(config))
    raw = yaml.safe_load(config.read_text())
    # GPU recipes (bf16) cannot build TrainingArguments on a CPU machine: parse them with CPU overrides.
    cpu_overrides = (
        ["--bf16", "false", "--use_cpu", "true"] if raw.get("bf16") and not torch.cuda.is_available() else []
    )
    parsed = parse_config(script.DATACLASSES, ["--config", str(config), *cpu_overrides])
    assert [type(p) for p in parsed] == list(script.DATACLASSES)
    values = {k: v for p in parsed for k, v in vars(p).items()}
    for key, value in raw.items():
        if cpu_overrides and key in ("bf16", "use_cpu"):
            continue
        if key == "report_to" and value == "none":
            assert values[key] in ([], "none", ["none"])  # transformers normalises "none" to []
            continue
        assert values[key] == value, f"{config}: {key}"
    assert not re.search(r"/(home|root|tmp|mnt|Users)/", config.read_text()), "no machine paths in recipes"


@pytest.mark.parametrize("config", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_accelerate_config_loads(config):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(config))
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert config.read_text().startswith("# accelerate launch --config_file " + str(config.relative_to(ROOT)))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    config = write(tmp_path, "hookpoint: layers.2\nsae_pth: x\n")
    with pytest.raises(ConfigError) as err:
        parse_config((SAEArguments, CacheArguments), ["--config", config])
    msg = str(err.value)
    assert "`sae_pth`" in msg and "did you mean `sae_path`" in msg and config in msg


def test_unknown_command_line_flag_fails():
    with pytest.raises(ValueError, match="ctx_lenn"):
        parse_config((CorpusArguments,), ["--ctx_lenn", "3"])


def test_command_line_overrides_yaml_and_floats_parse(tmp_path):
    config = write(tmp_path, "lr: 2.0e-5\nd_sae: 128\nk: 8\n")
    (args,) = parse_config((TrainSAEArguments,), ["--config", config, "--k", "4"])
    assert args.lr == 2.0e-5 and isinstance(args.lr, float)
    assert args.d_sae == 128 and args.k == 4


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (SAEArguments, {"hookpoint": "blocks.3.hook_resid_post"}, "hookpoint"),
        (SAEArguments, {"sae_release": "gemma-scope"}, "sae_id"),
        (SAEArguments, {"sae_path": "a", "sae_release": "r", "sae_id": "i"}, "sae_path"),
        (ModelArguments, {"model_name_or_path": "embedded:gpt5"}, "model_name_or_path"),
        (ModelArguments, {"model_dtype": "fp8"}, "model_dtype"),
        (CorpusArguments, {"ctx_len": 1}, "ctx_len"),
        (CorpusArguments, {"corpus": "embedded:wikipedia"}, "corpus"),
        (TrainSAEArguments, {"k": 100, "d_sae": 64}, "k"),
        (CacheArguments, {"shard_rows": 0}, "shard_rows"),
        (EvalArguments, {"eval_set": ""}, "eval_set"),
        (EvalArguments, {"eval_set": "e"}, "run_dirs"),
        (EvalArguments, {"eval_set": "e", "baselines": ["shots=two"]}, "baselines"),
        (EvalArguments, {"eval_set": "e", "baselines": ["shot=2"]}, "baselines"),
        (EvalArguments, {"eval_set": "e", "baselines": ["shots=1", "shots=1"]}, "baselines"),
        (EvalArguments, {"eval_set": "e", "baselines": ["name=a b"]}, "baselines"),
        (
            EvalArguments,
            {"eval_set": "e", "baselines": ["shots=1"], "calibration_split": "test"},
            "calibration_split",
        ),
        (EvalArguments, {"eval_set": "e", "baselines": ["shots=1"], "backend": "tgi"}, "backend"),
        (DatasetArguments, {"interpretations": ["x"], "negatives_per_context": -1}, "negatives_per_context"),
        (
            DatasetArguments,
            {
                "interpretations": ["x"],
                "label": "quantile_bin",
                "prompt_format": "sim_value_v1",
                "negatives_per_positive": 0,
                "negatives_per_context": 5,
            },
            "negatives_per_context",
        ),
    ],
)
def test_bad_values_name_the_key(cls, kwargs, key):
    with pytest.raises(ConfigError, match=f"config key `{key}`"):
        cls(**kwargs)


def test_baseline_specs_parse_with_defaults_and_names():
    from latentsim.config import parse_baseline

    assert parse_baseline("shots=3") == {
        "model": "embedded:smollm2-135m",
        "shots": 3,
        "score": False,
        "interpretations": None,
        "tensor_parallel_size": None,
        "control": None,
        "name": "smollm2-135m_3shot",
    }
    assert parse_baseline("model=org/big,tensor_parallel_size=4")["tensor_parallel_size"] == 4
    with pytest.raises(ConfigError, match="tensor_parallel_size must be a positive integer"):
        parse_baseline("model=org/big,tensor_parallel_size=0")
    spec = parse_baseline(
        "model=meta-llama/Llama-3.1-70B-Instruct, score=true, interpretations=out/token_list-top"
    )
    assert spec["name"] == "Llama-3.1-70B-Instruct_0shot_score_token_list-top" and spec["score"] is True
    with pytest.raises(ConfigError, match="did you mean `shots`"):
        parse_baseline("shot=3")


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(ConfigError, match="no such file"):
        parse_config((SAEArguments,), ["--config", "configs/does_not_exist.yaml"])


def test_dependency_bounds_admit_only_versions_that_work_together():
    """vLLM < 0.32 lacks answer log-probs by token id (and up to 0.19 declares transformers<5); PEFT < 0.18.1
    breaks on transformers 5; training needs transformers 5.23 (`activation_checkpointing`), which no vLLM
    release admits, so [train] and [vllm] are separate extras (separate environments, constraints/)."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    specs = {
        (group, Requirement(r).name): Requirement(r).specifier
        for group, lines in [("core", project["dependencies"]), *extras.items()]
        for r in lines
    }
    admits = lambda group, name, version: specs[(group, name)].contains(version)  # noqa: E731
    assert not admits("core", "peft", "0.18.0") and admits("core", "peft", "0.18.1")
    assert not admits("train", "transformers", "5.22.2") and admits("train", "transformers", "5.23.0")
    assert not admits("vllm", "vllm", "0.31.0") and admits("vllm", "vllm", "0.32.0")
    assert not admits("vllm", "vllm", "0.35.0")  # unverified releases stay out
    assert "gpu" not in extras and ("dev", "vllm") not in specs and ("train", "vllm") not in specs


def test_8b_lora_recipes_use_ddp_without_deprecated_keys():
    """transformers 5 renamed gradient_checkpointing (a deprecated alias now); LoRA under DDP needs
    ddp_find_unused_parameters: false; the recipes name plain DDP, not ZeRO, for a LoRA on an 8B."""
    for path in sorted((ROOT / "configs" / "sft").glob("llama-3.1-8b_*.yaml")):
        text = path.read_text()
        config = yaml.safe_load(text)
        assert "gradient_checkpointing" not in config and config["activation_checkpointing"] is True, (
            path.name
        )
        assert (
            config["ddp_find_unused_parameters"] is False and config["per_device_train_batch_size"] >= 16
        ), path.name
        assert text.splitlines()[0].startswith(
            "# accelerate launch --config_file configs/accelerate/multi_gpu.yaml"
        )
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        assert "gradient_checkpointing:" not in path.read_text(), path
