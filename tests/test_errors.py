"""A bad config or input ends as `error: <message>` on stderr and exit 2, never a traceback, and leaves
nothing that looks finished; a real bug keeps its traceback (and LATENTSIM_DEBUG=1 brings the input error's
back)."""

import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from helpers import FakeHubApi, make_cache

ROOT = Path(__file__).resolve().parents[1]
HOOK = "layers.1"  # the tiny SAE's hookpoint
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the error is about a machine without a GPU")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A tiny finished cache, a corrupt copy of it and interpretation sets that do not fit it."""
    root = tmp_path_factory.mktemp("error_inputs")
    make_cache(root / "cache", tiny_model_dir, tiny_sae_dir, tiny_corpus)
    shutil.copytree(root / "cache", root / "corrupt_cache")
    split = root / "corrupt_cache" / "latents" / HOOK / "21_41.safetensors"
    split.write_bytes(split.read_bytes()[: split.stat().st_size // 2])  # a copy cut short
    shutil.copytree(root / "cache", root / "unsplit_cache")
    (root / "unsplit_cache" / "latents" / HOOK / "row_split.json").unlink()  # as an older cache has none
    (root / "expl_layers.2").mkdir()
    (root / "expl_layers.2" / "layers.2_latent3.txt").write_text(json.dumps("the token cat"))
    (root / "too_wide.json").write_text(json.dumps({"9999": "the token dog"}))
    (root / "interpretations.json").write_text(json.dumps({"3": "the token cat"}))
    return {
        "model": str(tiny_model_dir),
        "sae": str(tiny_sae_dir),
        "corpus": str(tiny_corpus),
        "cache": str(root / "cache"),
        "corrupt_cache": str(root / "corrupt_cache"),
        "unsplit_cache": str(root / "unsplit_cache"),
        "expl_other_hookpoint": str(root / "expl_layers.2"),
        "too_wide": str(root / "too_wide.json"),
        "interpretations": str(root / "interpretations.json"),
    }


@dataclass
class Paths:
    """What a case's command line may name: the shared inputs, a fresh output folder, files to write."""

    tmp: Path
    shared: dict

    def __getattr__(self, name):
        return self.shared[name]

    @property
    def out(self) -> str:
        return str(self.tmp / "out")

    def missing(self, name: str) -> str:
        return str(self.tmp / name)

    def empty_dir(self, name: str) -> str:
        (self.tmp / name).mkdir()
        return str(self.tmp / name)

    def write(self, name: str, text: str) -> str:
        (self.tmp / name).write_text(text)
        return str(self.tmp / name)

    def recipe(self, recipe: str, **changes) -> str:
        """A copy of configs/<recipe> with keys set (None: removed), written beside the case's output."""
        config = yaml.safe_load((ROOT / "configs" / recipe).read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key)
            else:
                config[key] = value
        return self.write(Path(recipe).name, yaml.safe_dump(config))

    def sft_run(self, adapter: dict | None = None) -> str:
        """A train/sft.py output_dir holding `adapter` (tensors), or one whose run stopped before saving
        it."""
        from safetensors.torch import save_file

        Path(self.out).mkdir()
        (Path(self.out) / "run_config.json").write_text("{}")
        if adapter is not None:
            (Path(self.out) / "adapter_config.json").write_text(json.dumps({"r": 4}))
            save_file(adapter, str(Path(self.out) / "adapter_model.safetensors"))
        return self.out


def as_argv(args: dict) -> list[str]:
    return [item for key, value in args.items() for item in (f"--{key}", value)]


def tiny_model_args(p: Paths) -> dict:
    """The tiny model and corpus, on CPU, few short rows."""
    return {
        "model_name_or_path": p.model,
        "corpus": p.corpus,
        "ctx_len": "12",
        "n_rows": "8",
        "device": "cpu",
    }


def sae_args(p: Paths, **changes) -> list[str]:
    """data_gen/train_sae.py on the tiny model and corpus (a tiny SAE), with some keys changed."""
    return as_argv(
        {
            **tiny_model_args(p),
            "hookpoint": HOOK,
            "eval_rows": "2",
            "d_sae": "32",
            "k": "4",
            "output_dir": p.out,
            **changes,
        }
    )


def cache_args(p: Paths, **changes) -> list[str]:
    """data_gen/cache_activations.py on the tiny model, SAE and corpus, with some keys changed."""
    return as_argv(
        {**tiny_model_args(p), "sae_path": p.sae, "hookpoint": HOOK, "output_dir": p.out, **changes}
    )


def cache_reader_args(p: Paths, **changes) -> list[str]:
    """A stage that reads the tiny cache (explain, score, build_dataset), with some keys changed."""
    return as_argv({"cache_dir": p.cache, "hookpoint": HOOK, **changes})


def case(name: str, script: str, culprit: str, argv, in_subprocess: bool = False, marks=()):
    """One bad input: the script, what the message must name, its command line given the case's Paths. Cases
    `in_subprocess` run as a real `python script ...`, proving "no traceback" end to end; the rest run
    in-process."""
    return pytest.param(script, argv, culprit, in_subprocess, id=name, marks=marks)


SFT_GPU_RECIPE = "sft/llama-3.1-8b_quantiles_top5.yaml"
SFT_CPU_RECIPE = "sft/smollm2-135m_quickstart.yaml"
CASES = [
    case(
        "prepare-unknown-embedded-model",
        "data_gen/prepare_embedded.py",
        "smollm2-13m",
        lambda p: ["--models", "smollm2-13m"],
    ),
    case(
        "train_sae-unknown-yaml-key",
        "data_gen/train_sae.py",
        "d_saee",
        lambda p: ["--config", p.recipe("data/sae_smollm2-135m_l15.yaml", d_saee=64, output_dir=p.out)],
    ),
    case(
        "train_sae-bad-hookpoint",
        "data_gen/train_sae.py",
        "hookpoint",
        lambda p: ["--hookpoint", "layer15", "--output_dir", p.out],
    ),
    case(
        "train_sae-missing-config-file",
        "data_gen/train_sae.py",
        "sae.yaml",
        lambda p: ["--config", p.missing("sae.yaml")],
    ),
    case(
        "train_sae-invalid-yaml",
        "data_gen/train_sae.py",
        "broken.yaml",
        lambda p: ["--config", p.write("broken.yaml", "d_sae: [64\nk: 4\n")],
        in_subprocess=True,
    ),
    case(
        "train_sae-hookpoint-beyond-the-model",
        "data_gen/train_sae.py",
        "only 3 layers",
        lambda p: sae_args(p, hookpoint="layers.7"),
    ),
    case(
        "train_sae-corpus-too-small",
        "data_gen/train_sae.py",
        "n_rows",
        lambda p: sae_args(p, ctx_len="64", n_rows="100000"),
    ),
    case(
        "cache-bad-device", "data_gen/cache_activations.py", "device", lambda p: cache_args(p, device="gpu")
    ),
    case(
        "cache-ctx_len-not-a-number",
        "data_gen/cache_activations.py",
        "ctx_len",
        lambda p: cache_args(p, ctx_len="twelve"),
    ),
    case(
        "cache-split-fractions-too-large",
        "data_gen/cache_activations.py",
        "confirmation_fraction",
        lambda p: cache_args(p, validation_fraction="0.4", test_fraction="0.4", confirmation_fraction="0.3"),
    ),
    case(
        "cache-missing-sae",
        "data_gen/cache_activations.py",
        "sae_path",
        lambda p: cache_args(p, sae_path=p.missing("no_sae")),
    ),
    case(
        "cache-missing-corpus",
        "data_gen/cache_activations.py",
        "docs.jsonl",
        lambda p: cache_args(p, corpus=p.missing("docs.jsonl")),
    ),
    case(
        "cache-missing-text-column",
        "data_gen/cache_activations.py",
        "corpus_text_column",
        lambda p: cache_args(p, corpus_text_column="content"),
    ),
    case(
        "cache-missing-model",
        "data_gen/cache_activations.py",
        "no_model",
        lambda p: cache_args(p, model_name_or_path=p.missing("no_model")),
    ),
    case(
        "cache-sae-of-another-hookpoint",
        "data_gen/cache_activations.py",
        "trained on",
        lambda p: cache_args(p, hookpoint="layers.2"),
    ),
    case(
        "cache-cuda-without-gpu",
        "data_gen/cache_activations.py",
        "device",
        lambda p: cache_args(p, device="cuda"),
        marks=CPU_ONLY,
    ),
    case(
        "explain-missing-cache",
        "data_gen/explain.py",
        "no_cache",
        lambda p: cache_reader_args(p, cache_dir=p.missing("no_cache"), explanations_dir=p.out),
        in_subprocess=True,
    ),
    case(
        "explain-corrupt-cache",
        "data_gen/explain.py",
        "21_41.safetensors",
        lambda p: cache_reader_args(p, cache_dir=p.corrupt_cache, explanations_dir=p.out),
    ),
    case(
        "explain-cache-without-row-split",
        "data_gen/explain.py",
        "row_split.json",
        lambda p: cache_reader_args(p, cache_dir=p.unsplit_cache, explanations_dir=p.out),
    ),
    case(
        "explain-bad-sampling",
        "data_gen/explain.py",
        "sampling",
        lambda p: cache_reader_args(p, sampling="median", explanations_dir=p.out),
    ),
    case(
        "explain-vllm-without-gpu",
        "data_gen/explain.py",
        "vllm",
        lambda p: cache_reader_args(p, explainer="llm", backend="vllm", explanations_dir=p.out),
        marks=CPU_ONLY,
    ),
    case(
        "explain-misspelled-yaml-key",
        "data_gen/explain.py",
        "min_activation",
        lambda p: [
            "--config",
            p.recipe(
                "data/explain_token_list_quantiles.yaml",
                min_activations=None,
                min_activation=2,
                explanations_dir=p.out,
            ),
        ],
    ),
    case(
        "score-interpretations-of-another-hookpoint",
        "data_gen/score.py",
        "layers.2_latent3.txt",
        lambda p: cache_reader_args(p, interpretations=p.expl_other_hookpoint, scores_dir=p.out),
    ),
    case(
        "score-missing-interpretations",
        "data_gen/score.py",
        "interpretations",
        lambda p: cache_reader_args(p, interpretations=p.missing("no_expl"), scores_dir=p.out),
    ),
    case(
        "score-latents-outside-the-sae",
        "data_gen/score.py",
        "too_wide.json",
        lambda p: cache_reader_args(p, interpretations=p.too_wide, scores_dir=p.out),
    ),
    case(
        "score-bad-scorer",
        "data_gen/score.py",
        "scorer",
        lambda p: cache_reader_args(p, scorer="fuzzy", scores_dir=p.out),
    ),
    case(
        "build_dataset-unknown-command-line-key",
        "data_gen/build_dataset.py",
        "windw_min",
        lambda p: cache_reader_args(p, interpretations=p.too_wide, windw_min="4", output_dir=p.out),
    ),
    case(
        "build_dataset-missing-cache",
        "data_gen/build_dataset.py",
        "no_cache",
        lambda p: cache_reader_args(
            p, cache_dir=p.missing("no_cache"), interpretations=p.too_wide, output_dir=p.out
        ),
    ),
    case(
        "build_dataset-interpretations-of-another-hookpoint",
        "data_gen/build_dataset.py",
        "layers.2_latent3.txt",
        lambda p: cache_reader_args(p, interpretations=p.expl_other_hookpoint, output_dir=p.out),
    ),
    case(
        "build_dataset-missing-simulator-tokenizer",
        "data_gen/build_dataset.py",
        "no_tokenizer",
        lambda p: cache_reader_args(
            p,
            interpretations=p.interpretations,
            simulator_tokenizer=p.missing("no_tokenizer"),
            output_dir=p.out,
        ),
    ),
    case(
        "sft-misspelled-key-in-a-gpu-recipe",
        "train/sft.py",
        "learnin_rate",
        lambda p: [
            "--config",
            p.recipe(SFT_GPU_RECIPE, learning_rate=None, learnin_rate=1.0e-4, output_dir=p.out),
        ],
        in_subprocess=True,
    ),
    case(
        "sft-gpu-recipe-on-cpu",
        "train/sft.py",
        "bf16",
        lambda p: ["--config", p.recipe(SFT_GPU_RECIPE, output_dir=p.out)],
        marks=CPU_ONLY,
    ),
    case(
        "sft-bad-dtype",
        "train/sft.py",
        "dtype",
        lambda p: ["--config", p.recipe(SFT_CPU_RECIPE, dtype="fp16", output_dir=p.out)],
    ),
    case(
        "sft-unknown-command-line-key",
        "train/sft.py",
        "lora_rank",
        lambda p: ["--config", p.recipe(SFT_CPU_RECIPE, output_dir=p.out), "--lora_rank", "8"],
    ),
    case(
        "sft-dataset-not-built",
        "train/sft.py",
        "dataset_name",
        lambda p: [
            "--config",
            p.recipe(SFT_CPU_RECIPE, dataset_name=p.empty_dir("dataset"), output_dir=p.out),
        ],
    ),
    case(
        "publish-without-an-adapter",
        "train/publish.py",
        "adapter_model.safetensors",
        lambda p: ["--run_dir", p.sft_run(), "--repo_id", "me/sim"],
    ),
    case(
        "publish-non-finite-adapter",
        "train/publish.py",
        "NaN",
        lambda p: [
            "--run_dir",
            p.sft_run({"x.lora_A.weight": torch.full((4, 16), float("nan"))}),
            "--repo_id",
            "me/sim",
        ],
    ),
    case(
        "publish-missing-run-dir",
        "train/publish.py",
        "run_dir",
        lambda p: ["--run_dir", p.missing("no_run"), "--repo_id", "me/sim"],
    ),
    case(
        "publish-bad-repo-id",
        "train/publish.py",
        "repo_id",
        lambda p: ["--run_dir", p.out, "--repo_id", "no-slash"],
    ),
    case(
        "sweep-bad-dtype",
        "eval/sweep.py",
        "dtype",
        lambda p: [
            "--config",
            p.recipe("eval/sweep_smollm2-135m_quickstart.yaml", dtype="fp16", output_dir=p.out),
        ],
    ),
    case(
        "sweep-missing-eval-set",
        "eval/sweep.py",
        "no_eval_set",
        lambda p: [
            "--config",
            p.recipe(
                "eval/sweep_smollm2-135m_quickstart.yaml", eval_set=p.missing("no_eval_set"), output_dir=p.out
            ),
        ],
    ),
    case(
        "patch_kl-bad-device",
        "eval/patch_kl.py",
        "device",
        lambda p: [
            "--config",
            p.recipe("eval/patch_kl_quickstart.yaml", output_dir=p.out),
            "--device",
            "gpu",
        ],
    ),
    case(
        "patch_kl-unknown-command-line-key",
        "eval/patch_kl.py",
        "tresholds",
        lambda p: [
            "--config",
            p.recipe("eval/patch_kl_quickstart.yaml", output_dir=p.out),
            "--tresholds",
            "0.5",
        ],
    ),
    case(
        "patch_kl-missing-eval-set",
        "eval/patch_kl.py",
        "no_eval_set",
        lambda p: [
            "--config",
            p.recipe(
                "eval/patch_kl_quickstart.yaml",
                eval_set=p.missing("no_eval_set"),
                sweep_dir=p.missing("no_sweep"),
                output_dir=p.out,
            ),
        ],
    ),
    case(
        "whole_layer-unknown-reference",
        "eval/whole_layer.py",
        "references",
        lambda p: [
            "--config",
            p.recipe("eval/whole_layer_quickstart.yaml", references=["lexicon"], output_dir=p.out),
        ],
    ),
    case(
        "generate-bad-source",
        "eval/generate.py",
        "sources",
        lambda p: [
            "--config",
            p.recipe("eval/generate_quickstart.yaml", output_dir=p.out),
            "--sources",
            "sae:all",
        ],
    ),
    case(
        "generate-missing-eval-set",
        "eval/generate.py",
        "no_eval_set",
        lambda p: [
            "--config",
            p.recipe("eval/generate_quickstart.yaml", eval_set=p.missing("no_eval_set"), output_dir=p.out),
        ],
    ),
    case(
        "report-missing-sweep-dir",
        "eval/report.py",
        "no_sweep",
        lambda p: ["--sweep_dir", p.missing("no_sweep"), "--output_dir", p.out],
    ),
]


def run_in_process(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """The script as `__main__` with `argv`: (exit code, stdout, stderr). Any other exception propagates."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / script), *argv])
    grad = torch.is_grad_enabled()  # cache_activations' __main__ turns autograd off process-wide
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        torch.set_grad_enabled(grad)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def run_subprocess(command: list[str], **env) -> tuple[int, str, str]:
    proc = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_readable_error(code: int, out: str, err: str, culprit: str) -> str:
    """Exit 2, stderr ends in a line-starting `error: ...` naming the culprit, no traceback; returns the
    message."""
    assert code == 2, f"exit code {code}\n{out}\n{err}"
    assert "Traceback" not in out + err, err
    start = err.find("error: ")
    assert start == 0 or (start > 0 and err[start - 1] == "\n"), err
    message = err[start:]
    assert culprit in message, message
    return message


def assert_nothing_finished(out: Path) -> None:
    """A failed stage may have recorded its provenance (run_config.json), nothing else."""
    written = (
        [p for p in out.rglob("*") if p.is_file() and p.name != "run_config.json"] if out.exists() else []
    )
    assert written == [], written


@pytest.fixture
def paths(tmp_path, inputs, monkeypatch):
    monkeypatch.delenv("LATENTSIM_DEBUG", raising=False)
    return Paths(tmp_path, inputs)


@pytest.mark.parametrize(("script", "argv", "culprit", "in_subprocess"), CASES)
def test_bad_input_is_one_readable_line(script, argv, culprit, in_subprocess, paths, monkeypatch, capsys):
    args = argv(paths)
    if in_subprocess:
        code, out, err = run_subprocess([sys.executable, script, *args])
    else:
        code, out, err = run_in_process(script, args, monkeypatch, capsys)
    message = assert_readable_error(code, out, err, culprit)
    if (
        "learnin_rate" in culprit
    ):  # the misspelled key, never transformers' bf16/GPU check it used to hide behind
        assert "did you mean `learning_rate`" in message and "bf16" not in message
    # publish stages its upload inside the run folder it reads
    assert_nothing_finished(Path(paths.out) / ("publish" if script == "train/publish.py" else ""))


def test_the_table_covers_every_stage():
    stages = {
        "prepare_embedded",
        "train_sae",
        "cache_activations",
        "explain",
        "score",
        "build_dataset",
        "sft",
        "publish",
        "sweep",
        "patch_kl",
        "generate",
        "report",
    }
    assert {Path(p.values[0]).stem for p in CASES} >= stages
    assert len(CASES) >= 15 and sum(p.values[3] for p in CASES) >= 3


def test_debug_mode_brings_the_traceback_back(paths):
    args = cache_reader_args(paths, cache_dir=paths.missing("no_cache"), explanations_dir=paths.out)
    code, out, err = run_subprocess([sys.executable, "data_gen/explain.py", *args], LATENTSIM_DEBUG="1")
    assert code == 1 and "Traceback" in err and "MissingInputError" in err and "no_cache" in err


def test_a_real_bug_keeps_its_traceback(tmp_path):
    script = tmp_path / "buggy.py"
    script.write_text(
        "from latentsim.cli import run\nfrom latentsim.config import ReportArguments\n\n"
        "def main(args):\n    return {}[args.title]\n\n"
        "if __name__ == '__main__':\n    run(main, (ReportArguments,))\n"
    )
    code, out, err = run_subprocess([sys.executable, str(script)])
    assert code == 1 and "Traceback" in err and "KeyError" in err and "\nerror: " not in "\n" + err


def test_a_real_bug_propagates_in_process(paths, monkeypatch):
    def broken_reader(*_args, **_kwargs):
        raise AssertionError("a bug, not the user's")

    monkeypatch.setattr("latentsim.cache_reader.CacheReader.__init__", broken_reader)
    monkeypatch.setattr(sys, "argv", ["explain.py", *cache_reader_args(paths, explanations_dir=paths.out)])
    with pytest.raises(AssertionError, match="a bug"):
        runpy.run_path(str(ROOT / "data_gen/explain.py"), run_name="__main__")


def test_check_parses_without_running(paths, capsys):
    from latentsim.cli import check

    parsed = check("train/publish.py", ["--run_dir", paths.missing("no_run"), "--repo_id", "me/sim"])
    assert parsed[0].run_dir == paths.missing("no_run")  # parsed only: publish would refuse the missing run
    assert capsys.readouterr().out == ""


def test_a_failed_accelerate_child_ends_with_its_own_error(paths):
    """accelerate raises its own traceback over a failed training process; our launcher ends with its
    status."""
    code, out, err = run_subprocess(
        [
            sys.executable,
            "-m",
            "latentsim.cli",
            "accelerate-launch",
            "--config_file",
            "configs/accelerate/cpu.yaml",
            "data_gen/train_sae.py",
            "--config",
            paths.missing("sae.yaml"),
        ]
    )
    assert_readable_error(code, out, err, "sae.yaml")


@pytest.mark.parametrize("error", ["LocalTokenNotFoundError", "OfflineModeIsEnabled"])
def test_hub_access_problems_are_the_users_to_fix(error, tmp_path):
    import huggingface_hub.errors

    from latentsim.errors import UnavailableError
    from latentsim.hub import upload_folder

    class RefusingHubApi(FakeHubApi):
        def create_repo(self, **kwargs):
            raise getattr(huggingface_hub.errors, error)("refused")

    with pytest.raises(UnavailableError, match="me/sim: refused; log in with `huggingface-cli login`"):
        upload_folder(tmp_path, "me/sim", "model", api=RefusingHubApi())


def launch_setup_is_current() -> bool:
    """launch.sh reinstalls the project when pyproject.toml, launch.sh or constraints/train.txt changed since
    the last setup."""
    files = ("pyproject.toml", "launch.sh", "constraints/train.txt")
    want = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in files)).hexdigest()
    stamp = ROOT / os.environ.get("VENV", ".venv") / ".latentsim-setup"
    return stamp.is_file() and stamp.read_text().strip() == want


@pytest.mark.skipif(
    not launch_setup_is_current(), reason="./launch.sh setup would reinstall first; run it once"
)
def test_launch_sft_reports_a_config_error_before_accelerate(paths):
    config = paths.recipe(
        "sft/smollm2-135m_quickstart.yaml", max_steps=None, max_step=16, output_dir=paths.out
    )
    code, out, err = run_subprocess(["./launch.sh", "sft", config])
    assert_readable_error(code, out, err, "max_step")
    assert "accelerate" not in err  # stopped before `accelerate launch`, whose traceback would follow
    assert_nothing_finished(Path(paths.out))
