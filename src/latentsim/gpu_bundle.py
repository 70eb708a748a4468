"""The offline GPU check's bundle (`./launch.sh gpu_check --bundle DIR`), built here on CPU and carried to a
GPU machine that reaches no package index and no Hub: everything the offline check imports that the GPU image
lacks, as wheels, plus the data it reads.

- `wheels/`: the packages the image lacks (TRL and what it imports: datasets, dill, multiprocess), a newer
  transformers (the recipes' `activation_checkpointing` is a TrainingArguments field from 5.23 on), each at
  the version this environment runs, pure-Python or for each Python version named; and latentsim itself as a
  wheel. `requirements.txt` names them `NAME==VERSION`, so that `pip install --no-index --find-links wheels`
  picks the one wheel of each that fits the Python it runs under.
- `tokenizer/`: a WordLevel tokenizer with a chat template (latentsim.scale.word_level_tokenizer), every word
  one token: the simulators' tokenizer of the bundled data and of the random models.
- `datasets/dense/` (a sim_dense_v1 training mixture) and `datasets/eval/` (a sim_v1 held-out eval set), made
  by the project's own data_gen scripts from a tiny random subject model and a random TopK SAE (the subject
  model and SAE stay here: the GPU side reads only the parquet files).
- `bundle.json`: what is in it, each file's size and sha256, the total; the build fails above `LIMIT_BYTES`.

Runs in the repository's root (bench/gpu_offline.py changes there): it builds latentsim's wheel from `.` and
runs data_gen/ with configs/.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from latentsim.errors import BadInputError
from latentsim.io import atomic_write_json, atomic_write_text, sha256_file

LIMIT_BYTES = 60 * 2**20  # the device carries 64 MiB per command: the bundle, plus the repo's own files
# What the offline steps import that the image lacks (or has too old): TRL (config parsing, train/sft.py), its
# datasets with datasets' own pure-Python needs, and the transformers the recipes parse with.
PACKAGES = ("transformers", "trl", "datasets", "dill", "multiprocess")
DEVICE_PYTHON = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# Subject words of the bundled corpus and of the random models' texts (every one a token of the tokenizer).
WORDS = sorted(
    {
        w.strip(".,").lower()
        for w in (
            "The standard library offers a wide range of facilities. It contains built-in modules that "
            "provide access to system functionality such as file input and output, as well as modules "
            "written in Python that provide standardized solutions for many problems that occur in everyday "
            "programming. A fool and his money are soon parted, but a wise man keeps a little of both for "
            "the days when the rain will not stop falling. the cat sat on a mat and ran far away it was red "
            "blue green big small house tree river sun moon star day night one two three four five run jump"
        ).split()
    }
)
ANSWERS = ["Yes", "No", *map(str, range(10))]


def directory_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def check_size(folder: Path, limit: int = LIMIT_BYTES) -> int:
    """The bundle's size in bytes; an error naming the largest files when it is over `limit`."""
    size = directory_bytes(folder)
    if size > limit:
        largest = sorted(
            (p for p in Path(folder).rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size
        )[:5]
        names = ", ".join(f"{p.relative_to(folder)} ({p.stat().st_size / 2**20:.1f} MiB)" for p in largest)
        raise BadInputError(
            f"the bundle {folder} is {size / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB a GPU machine "
            f"can be carried; largest: {names}."
        )
    return size


def run_logged(argv: list[str], log: Path) -> None:
    """Run a build command, its whole output kept in `log`; an error with the log's tail when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(log, f"$ {' '.join(argv)}\n{result.stdout}\n{result.stderr}")
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({log}):\n{result.stderr[-2000:]}")


def download_wheels(folder: Path, log_dir: Path, pythons: tuple[str, ...]) -> list[str]:
    """`NAME==VERSION` of each package this environment runs, as wheels for each of `pythons` (one file when
    the wheel is pure-Python), no dependencies pulled."""
    pins = [f"{name}=={metadata.version(name)}" for name in PACKAGES]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    for version in pythons:
        run_logged(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                version,
                "--implementation",
                "cp",
                *platforms,
                "-d",
                str(folder),
                *pins,
            ],
            log_dir / f"pip_download_{version}.log",
        )
    return pins


def build_project_wheel(folder: Path, log_dir: Path) -> str:
    """latentsim as a wheel (no build backend needed on the GPU machine)."""
    run_logged(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(folder),
            ".",
        ],
        log_dir / "pip_wheel_latentsim.log",
    )
    return f"latentsim=={metadata.version('latentsim')}"


def write_corpus(path: Path, n_docs: int = 300, seed: int = 1) -> Path:
    rng = random.Random(seed)
    lines = [
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))), "id": i})
        for i in range(n_docs)
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def build_tokenizer(folder: Path) -> Path:
    from latentsim.scale import word_level_tokenizer

    word_level_tokenizer(ANSWERS + WORDS).save_pretrained(str(folder))
    return folder


def save_subject(folder: Path, tokenizer_dir: Path, hookpoint: str, d_sae: int, k: int) -> tuple[Path, Path]:
    """A random 2-layer Llama (hidden 32) and a random TopK SAE at `hookpoint`, saved (the subject side of
    the bundled data)."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_dir, sae_dir = folder / "model", folder / "sae"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=hookpoint)))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(d_sae, 32, generator=gen)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T.clone())
        sae.b_enc.zero_()
    sae.save_model(str(sae_dir))
    return model_dir, sae_dir


def build_data(bundle: Path, work: Path, log_dir: Path) -> dict[str, str]:
    """The bundled training mixture and eval set, made by data_gen/ (cache -> explain -> build_dataset) with
    the quickstart's recipes on a tiny random subject model and SAE."""
    hookpoint, py = "layers.1", sys.executable
    tokenizer_dir = build_tokenizer(bundle / "tokenizer")
    model_dir, sae_dir = save_subject(work, tokenizer_dir, hookpoint, d_sae=512, k=8)
    corpus = write_corpus(work / "docs.jsonl")
    cache, explanations = work / "cache", work / "explanations"
    run_logged(
        [
            *(py, "data_gen/cache_activations.py", "--config", "configs/data/cache_smollm2-135m_l15.yaml"),
            *("--model_name_or_path", str(model_dir), "--corpus", str(corpus), "--hookpoint", hookpoint),
            *("--sae_path", str(sae_dir), "--ctx_len", "32", "--row_start", "0", "--n_rows", "240"),
            *("--batch_size", "16", "--shard_rows", "64", "--n_splits", "2", "--output_dir", str(cache)),
        ],
        log_dir / "cache_activations.log",
    )
    run_logged(
        [
            *(py, "data_gen/explain.py", "--config", "configs/data/explain_token_list_quantiles.yaml"),
            *("--cache_dir", str(cache), "--hookpoint", hookpoint, "--explanations_dir", str(explanations)),
            *("--window", "8", "--min_activations", "2"),
        ],
        log_dir / "explain.log",
    )
    datasets = {
        "dense": "configs/data/mix_dense_quantiles_top5.yaml",
        "eval": "configs/data/eval_quantiles.yaml",
    }
    for name, recipe in datasets.items():
        run_logged(
            [
                *(py, "data_gen/build_dataset.py", "--config", recipe, "--cache_dir", str(cache)),
                *("--hookpoint", hookpoint, "--interpretations", str(explanations / "token_list-quantiles")),
                *("--simulator_tokenizer", str(tokenizer_dir), "--window_min", "16", "--window_max", "16"),
                *("--output_dir", str(bundle / "datasets" / name)),
            ],
            log_dir / f"build_dataset_{name}.log",
        )
    return {name: f"datasets/{name}" for name in datasets}


def build_bundle(
    folder: str | Path, pythons: tuple[str, ...] = (DEVICE_PYTHON,), limit: int = LIMIT_BYTES
) -> dict:
    """Build the bundle into `folder` (replaced when it exists), check its size, write bundle.json."""
    bundle = Path(folder)
    if bundle.exists():
        shutil.rmtree(bundle)
    wheels, work = bundle / "wheels", bundle.with_name(bundle.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    log_dir = work / "logs"
    wheels.mkdir(parents=True)
    pins = download_wheels(wheels, log_dir, tuple(dict.fromkeys(pythons)))
    pins.append(build_project_wheel(wheels, log_dir))
    atomic_write_text(bundle / "requirements.txt", "\n".join(pins) + "\n")
    data = build_data(bundle, work, log_dir)
    files = {
        str(p.relative_to(bundle)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(bundle.rglob("*"))
        if p.is_file()
    }
    manifest = {
        "requirements": pins,
        "pythons": list(dict.fromkeys(pythons)),
        "tokenizer": "tokenizer",
        "datasets": data,
        "files": files,
        "limit_bytes": limit,
    }
    atomic_write_json(bundle / "bundle.json", manifest)
    manifest["bytes"] = check_size(bundle, limit)
    atomic_write_json(bundle / "bundle.json", manifest)
    shutil.rmtree(work)
    return manifest


# The GPU image's Python packages that the offline check uses (the device's package list), at its versions
# where they matter; torch first and alone: torch==2.13.0 is this machine's CPU wheel, never a CUDA build.
IMAGE_TORCH = "torch==2.13.0"
IMAGE_PACKAGES = (
    "transformers==5.17.*",
    "accelerate==1.15.*",
    "peft",
    "safetensors",
    "tokenizers",
    "numpy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "pyyaml",
    "jinja2",
    "tqdm",
    "xxhash",
    "fsspec",
    "psutil",
    "requests",
)


def image_venv(folder: Path, log_dir: Path) -> Path:
    """A fresh venv holding what the GPU image holds (with this machine's CPU torch); its python."""
    shutil.rmtree(folder, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)
    run_logged([base, "-m", "venv", str(folder)], log_dir / "venv.log")
    py = str(folder / "bin" / "python")
    run_logged([py, "-m", "pip", "install", "-q", IMAGE_TORCH], log_dir / "pip_torch.log")
    run_logged([py, "-m", "pip", "install", "-q", *IMAGE_PACKAGES], log_dir / "pip_image.log")
    run_logged(
        [py, "-c", "import torch; assert torch.version.cuda is None, torch.__version__"], log_dir / "cpu.log"
    )
    return Path(py)


def rehearse(work: str | Path, budget_s: float = 360.0) -> tuple[int, dict]:
    """The offline check on CPU, as on the GPU machine: the bundle built (wheels for the device's Python and
    this one), a fresh image-like venv, then bench/gpu_check.sh --offline with no package index and the Hub
    offline. Returns (its exit status, seconds of each phase); its results.json is under work/out."""
    work = Path(work)
    seconds, t = {}, time.perf_counter()
    here = ".".join(platform.python_version_tuple()[:2])
    manifest = build_bundle(work / "bundle", pythons=(DEVICE_PYTHON, here))
    seconds["bundle"], t = round(time.perf_counter() - t, 1), time.perf_counter()
    py = image_venv(work / "venv", work / "logs")
    seconds["venv"], t = round(time.perf_counter() - t, 1), time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHON=str(py), PIP_NO_INDEX="1", HF_HUB_OFFLINE="1", LATENTSIM_SITE=str(work / "site"))
    argv = ["bench/gpu_check.sh", "--offline", str(work / "bundle"), "--output_dir", str(work / "out")]
    rc = subprocess.run([*argv, "--budget_s", str(budget_s)], env=env).returncode
    seconds["check"] = round(time.perf_counter() - t, 1)
    seconds["bundle_mib"] = round(manifest["bytes"] / 2**20, 2)
    return rc, seconds
