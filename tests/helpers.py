"""Builders for tiny in-process assets (SAELens-style helpers with tiny defaults)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from latentsim.scale import word_level_tokenizer

WORDS = (
    "the cat dog sat on a mat and ran far away yes no it was red blue green big small house tree "
    "river sun moon star day night one two three four five run jump sing read write code data "
    "Yes No 0 1 2 3 4 5 6 7 8 9"
).split()
SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>"]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over WORDS (+ specials) with a ChatML-style chat template."""
    return word_level_tokenizer(WORDS)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: splits text very differently from the WordLevel one."""
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = build_tiny_tokenizer().chat_template
    return fast


def save_tiny_model(folder: Path, tokenizer, arch: str = "llama", n_layers: int = 3) -> Path:
    """A random causal LM with hidden size 16, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = LlamaConfig(**common)
    else:
        config = Gemma3TextConfig(**common, head_dim=4, sliding_window=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_sae(d_in: int = 16, d_sae: int = 64, k: int = 4, hook_name: str = "layers.1", seed: int = 0):
    """A random sae-lens TopK SAE (inference class), decoder rows unit-norm."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=hook_name)))
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=gen)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T.clone())
        # the tiny model's residuals are small (norm ~0.1): a bias would pick the same latents
        sae.b_enc.zero_()
    return sae


def load_script(relative: str):
    """Import an entry script (data_gen/x.py) as a module, as tests may not import script folders as
    packages."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_cache(
    out: Path,
    model_dir: Path,
    sae_dir: Path,
    corpus: Path,
    n_rows: int = 20,
    ctx_len: int = 12,
    hookpoint: str = "layers.1",
    **cache_kwargs,
):
    """Run data_gen/cache_activations.py on tiny assets; returns the parsed argument dataclasses."""
    from latentsim.config import CacheArguments, CorpusArguments, ModelArguments, SAEArguments

    args = (
        ModelArguments(model_name_or_path=str(model_dir)),
        CorpusArguments(corpus=str(corpus), ctx_len=ctx_len, n_rows=n_rows, row_start=3, seed=5),
        SAEArguments(hookpoint=hookpoint, sae_path=str(sae_dir)),
        CacheArguments(
            output_dir=str(out),
            **{"batch_size": 4, "shard_rows": 6, "n_splits": 3, "split_group_rows": 2, **cache_kwargs},
        ),
    )
    load_script("data_gen/cache_activations.py").main(*args)
    return args


def make_explained_cache(
    root: Path, model_dir: Path, sae_dir: Path, corpus: Path, samplings=("quantiles",)
) -> Path:
    """A 40-row tiny cache in root/cache (rows split 0.2 validation, 0.2 test) and its token-list
    interpretations in root/expl/token_list-<sampling>, made from the training rows of that split."""
    from latentsim.config import ExplainArguments

    make_cache(
        root / "cache",
        model_dir,
        sae_dir,
        corpus,
        n_rows=40,
        ctx_len=16,
        validation_fraction=0.2,
        test_fraction=0.2,
    )
    for sampling in samplings:
        load_script("data_gen/explain.py").main(
            ExplainArguments(
                cache_dir=str(root / "cache"),
                hookpoint="layers.1",
                explanations_dir=str(root / "expl"),
                window=8,
                min_activations=2,
                sampling=sampling,
                seed=3,
            )
        )
    return root


def sft_args(dataset_dir, model_dir, out, **overrides):
    """train/sft.py arguments for a fast tiny CPU run (LoRA r=4, 12 steps, checkpoints every 6)."""
    from trl import ModelConfig, SFTConfig

    from latentsim.config import SimScriptArguments

    training = dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=12,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=5.0e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=6,
        eval_strategy="no",
        report_to="none",
        max_length=128,
        seed=0,
        disable_tqdm=True,
    )
    training.update(overrides.pop("training", {}))
    return (
        SimScriptArguments(dataset_name=str(dataset_dir), max_eval_samples=32, **overrides.pop("script", {})),
        SFTConfig(**training),
        ModelConfig(
            model_name_or_path=str(model_dir), use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0
        ),
    )


def run_accelerate(config: str, dataset_dir, model_dir, out, extra=()):
    """`accelerate launch` train/sft.py (the quickstart recipe, shrunk) as a subprocess; checkpoint-4's
    state."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / config),
        str(root / "train" / "sft.py"),
        "--config",
        str(root / "configs/sft/smollm2-135m_quickstart.yaml"),
        "--dataset_name",
        str(dataset_dir),
        "--model_name_or_path",
        str(model_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "4",
        "--save_steps",
        "2",
        "--eval_steps",
        "2",
        "--max_length",
        "128",
        "--lora_r",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--max_eval_samples",
        "16",
        "--logging_steps",
        "1",
        *extra,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    (Path(out).parent / f"{Path(out).name}.stderr.txt").write_text(
        result.stderr
    )  # the whole log, for a failure
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())


def launch(script: str, tmp: Path, *configs, processes: int = 2, timeout: int = 600) -> str:
    """`accelerate launch --num_processes N script --config <the dataclasses as YAML>` (CPU processes, gloo);
    returns the processes' output."""
    import dataclasses
    import os
    import signal
    import subprocess
    import sys

    import yaml

    values = {}
    for config in configs:
        for key, value in dataclasses.asdict(config).items():
            if value is not None:
                values[key] = list(value) if isinstance(value, tuple) else value
    root = Path(__file__).resolve().parents[1]
    path = tmp / f"{Path(script).stem}_{len(list(tmp.glob('*.yaml')))}.yaml"
    path.write_text(f"# python {script} --config {path}\n" + yaml.safe_dump(values))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / "configs/accelerate/multi_cpu.yaml"),
        "--num_processes",
        str(processes),
        str(root / script),
        "--config",
        str(path),
    ]
    # Its own process group, so a hung launch is killed with every process it started.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{script} ran past {timeout} s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-3000:]
    return stdout + stderr


def same_files(a: Path, b: Path, pattern: str) -> list[str]:
    """The files matching `pattern` under a and b: the same names, byte for byte the same contents."""
    names = sorted(p.relative_to(a).as_posix() for p in a.glob(pattern) if p.is_file())
    assert names and names == sorted(p.relative_to(b).as_posix() for p in b.glob(pattern) if p.is_file())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    return names


def build_eval_set(
    root: Path, model_dir: Path, set_name: str = "token_list-quantiles", out: str = "eval_set", **overrides
) -> Path:
    """data_gen/build_dataset.py over make_explained_cache's cache and one of its interpretation sets
    (root/expl/<set_name>): the tests' tiny eval set, every positive and 6 uniform negatives per context, in
    root/<out>; `overrides` are DatasetArguments keys."""
    from latentsim.config import DatasetArguments

    args = dict(
        cache_dir=str(root / "cache"),
        hookpoint="layers.1",
        simulator_tokenizer=str(model_dir),
        interpretations=[str(root / "expl" / set_name)],
        window_min=4,
        window_max=6,
        contexts_per_row=2,
        validation_fraction=0.2,
        test_fraction=0.2,
        seed=3,
        positives="all",
        negatives_per_context=6,
        output_dir=str(root / out),
    )
    load_script("data_gen/build_dataset.py").main(DatasetArguments(**{**args, **overrides}))
    return root / out


class FakeHubApi:
    """Records the huggingface_hub calls our thin upload function makes (no network)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("CommitInfo", (), {"commit_url": "https://hf.co/me/sim/commit/1"})()
