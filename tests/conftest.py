"""Offline, seeded, tiny: every test builds its models, tokenizers, SAEs and corpora in-process."""

import os

# Before transformers/datasets are imported anywhere: never touch the network, never log to wandb.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import WORDS, build_tiny_sae, build_tiny_tokenizer, save_tiny_model  # noqa: E402

# The suite must not depend on the machine's thread count (reductions are ordered by it): run it once with
# LATENTSIM_TORCH_THREADS=1 (torch alone limited) and once with OMP_NUM_THREADS=1 (docs/tests.md).
if os.environ.get("LATENTSIM_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["LATENTSIM_TORCH_THREADS"]))


@pytest.fixture(autouse=True)
def _seed_everything(tmp_path, monkeypatch):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    # Converted embedded models and corpora go to a per-test cache, never the user's.
    monkeypatch.setenv("LATENTSIM_CACHE", str(tmp_path / "latentsim_cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 3-layer Llama (hidden 16) and its WordLevel tokenizer, saved as a model folder."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), build_tiny_tokenizer(), arch="llama")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gemma"), build_tiny_tokenizer(), arch="gemma3")


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory) -> Path:
    """A random TopK SAE (d_in 16, 64 latents, k 4) saved as a sae-lens folder."""
    path = tmp_path_factory.mktemp("tiny_sae")
    build_tiny_sae(d_in=16, d_sae=64, k=4, hook_name="layers.1").save_model(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """200 short documents of random words, as JSON lines."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(200):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            f.write(json.dumps({"text": words, "id": i}) + "\n")
    return path


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A build_dataset folder made from the tiny model, SAE and corpus (cache -> explain -> examples)."""
    from helpers import load_script, make_cache

    from latentsim.config import DatasetArguments, ExplainArguments

    root = tmp_path_factory.mktemp("sft_data")
    make_cache(root / "cache", tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=40, ctx_len=16)
    load_script("data_gen/explain.py").main(
        ExplainArguments(
            cache_dir=str(root / "cache"),
            hookpoint="layers.1",
            explanations_dir=str(root / "expl"),
            window=8,
            min_activations=2,
        )
    )
    out = root / "data"
    load_script("data_gen/build_dataset.py").main(
        DatasetArguments(
            cache_dir=str(root / "cache"),
            hookpoint="layers.1",
            interpretations=[str(root / "expl" / "token_list-quantiles")],
            simulator_tokenizer=str(tiny_model_dir),
            output_dir=str(out),
            window_min=4,
            window_max=6,
            contexts_per_row=2,
            split_mode="contexts",
        )
    )
    return out
