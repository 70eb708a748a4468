"""Config dataclasses for the data_gen stages, parsed from YAML + command line by TRL's `TrlParser`.

Every YAML in `configs/` maps onto a tuple of these dataclasses. Parsing is strict: an unknown key is an
error that names the key, the file and the closest valid key. `__post_init__` validates values without
touching the disk or the network; `check_paths` checks files right before a stage loads any model.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from trl import ScriptArguments, TrlParser

EMBEDDED_PREFIX = "embedded:"
HOOKPOINT_RE = re.compile(r"^(?:model\.)?layers\.(\d+)$")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and how to fix it."""


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"config key `{key}`: {message}")


def _require_positive(args, *keys: str) -> None:
    for key in keys:
        if getattr(args, key) < 1:
            _fail(key, f"must be >= 1, got {getattr(args, key)}.")


@dataclass
class ModelArguments:
    """The subject model whose activations are recorded."""

    model_name_or_path: str = field(
        default="embedded:smollm2-135m",
        metadata={"help": "Hub id, local folder, or an embedded model (`embedded:smollm2-135m`, `embedded:gemma3-270m`)."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    model_dtype: str = field(
        default="auto",
        metadata={"help": "`auto` (float32 on CPU, bfloat16 on GPU), `float32`, `bfloat16` or `float16`."},
    )
    device: str = field(default="auto", metadata={"help": "`auto` (cuda if available), `cpu`, `cuda`, `cuda:N`."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the Hub (off by default)."})

    def __post_init__(self):
        if not self.model_name_or_path:
            _fail("model_name_or_path", "is empty; give a Hub id, a local folder or `embedded:smollm2-135m`.")
        if self.model_name_or_path.startswith(EMBEDDED_PREFIX):
            from latentsim.models import EMBEDDED_MODELS

            name = self.model_name_or_path[len(EMBEDDED_PREFIX):]
            if name not in EMBEDDED_MODELS:
                _fail("model_name_or_path", f"unknown embedded model {name!r}; choose one of "
                      f"{[EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS]}.")
        if self.model_dtype not in ("auto", "float32", "bfloat16", "float16"):
            _fail("model_dtype", f"{self.model_dtype!r} is not one of auto, float32, bfloat16, float16.")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            _fail("device", f"{self.device!r} is not one of auto, cpu, cuda, cuda:N.")


@dataclass
class CorpusArguments:
    """The text corpus, tokenized into fixed-length rows (BOS + ctx_len-1 tokens, documents joined by EOS)."""

    corpus: str = field(
        default="embedded:debian-english",
        metadata={"help": "Hub dataset id, a local file/folder/glob of .txt/.jsonl/.json/.parquet, "
                          "or `embedded:debian-english`."},
    )
    corpus_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config (subset) name."})
    corpus_split: str = field(default="train", metadata={"help": "Split, slicing allowed (`train[:1%]`)."})
    corpus_text_column: str = field(default="text", metadata={"help": "Column holding the document text."})
    corpus_revision: str | None = field(default=None, metadata={"help": "Hub dataset revision."})
    ctx_len: int = field(default=64, metadata={"help": "Tokens per row, including the BOS at position 0."})
    row_start: int = field(default=0, metadata={"help": "First row of the tokenized corpus to use."})
    n_rows: int = field(default=1024, metadata={"help": "Number of rows to use, from `row_start`."})
    seed: int = field(default=22, metadata={"help": "Seed for the document shuffle and every random choice of the stage."})

    def __post_init__(self):
        if not self.corpus:
            _fail("corpus", "is empty; give a Hub dataset id, local files, or `embedded:debian-english`.")
        if self.corpus.startswith(EMBEDDED_PREFIX):
            from latentsim.corpus import EMBEDDED_CORPORA

            name = self.corpus[len(EMBEDDED_PREFIX):]
            if name not in EMBEDDED_CORPORA:
                _fail("corpus", f"unknown embedded corpus {name!r}; choose one of "
                      f"{[EMBEDDED_PREFIX + k for k in EMBEDDED_CORPORA]}.")
        if self.ctx_len < 2:
            _fail("ctx_len", f"must be >= 2 (BOS + at least one token), got {self.ctx_len}.")
        if self.row_start < 0:
            _fail("row_start", f"must be >= 0, got {self.row_start}.")
        if self.n_rows < 1:
            _fail("n_rows", f"must be >= 1, got {self.n_rows}.")


@dataclass
class SAEArguments:
    """Where the SAE comes from and which residual stream it reads."""

    hookpoint: str = field(
        default="layers.15",
        metadata={"help": "Residual stream after decoder layer N, written `layers.N` (delphi's naming)."},
    )
    sae_path: str | None = field(default=None, metadata={"help": "Local sae-lens folder (cfg.json + sae_weights.safetensors)."})
    sae_release: str | None = field(default=None, metadata={"help": "sae-lens pretrained release (GPU users), with `sae_id`."})
    sae_id: str | None = field(default=None, metadata={"help": "SAE id inside `sae_release`."})

    def __post_init__(self):
        if not HOOKPOINT_RE.match(self.hookpoint):
            _fail("hookpoint", f"{self.hookpoint!r} is not of the form `layers.N` (residual stream after layer N).")
        if (self.sae_release is None) != (self.sae_id is None):
            _fail("sae_release" if self.sae_release is None else "sae_id",
                  "`sae_release` and `sae_id` go together; set both or neither.")
        if self.sae_path and self.sae_release:
            _fail("sae_path", "set either `sae_path` (local folder) or `sae_release` + `sae_id`, not both.")

    @property
    def layer(self) -> int:
        return hookpoint_layer(self.hookpoint)


def hookpoint_layer(hookpoint: str) -> int:
    match = HOOKPOINT_RE.match(hookpoint)
    if not match:
        _fail("hookpoint", f"{hookpoint!r} is not of the form `layers.N`.")
    return int(match.group(1))


@dataclass
class CacheArguments:
    """data_gen/cache_activations.py: record sparse SAE latents over corpus rows."""

    output_dir: str = field(default="outputs/cache", metadata={"help": "Cache folder (delphi layout under latents/)."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward pass."})
    shard_rows: int = field(default=128, metadata={"help": "Rows per resumable shard (a killed run loses at most one)."})
    n_splits: int = field(default=5, metadata={"help": "Latent-range split files in the delphi layout."})
    quantile_sample_size: int = field(
        default=2048, metadata={"help": "Max non-zero activations kept per latent (sorted) for quantile statistics."})
    overwrite: bool = field(default=False, metadata={"help": "Delete an existing cache in output_dir and start again."})

    def __post_init__(self):
        _require_positive(self, "batch_size", "shard_rows", "n_splits", "quantile_sample_size")


@dataclass
class TrainSAEArguments:
    """data_gen/train_sae.py: train a TopK SAE with sae-lens on residuals from the corpus (position 0 excluded)."""

    output_dir: str = field(default="outputs/sae", metadata={"help": "Where the sae-lens folder is written."})
    hookpoint: str = field(default="layers.15", metadata={"help": "Residual stream after layer N (`layers.N`)."})
    d_sae: int = field(default=4096, metadata={"help": "Number of latents."})
    k: int = field(default=32, metadata={"help": "TopK: active latents per token."})
    training_tokens: int = field(default=1_000_000, metadata={"help": "Samples seen in training (repeats the collected tokens)."})
    train_batch_size_tokens: int = field(default=4096, metadata={"help": "Tokens per optimizer step."})
    lr: float = field(default=4.0e-4, metadata={"help": "Adam learning rate."})
    lr_end_fraction: float = field(default=0.1, metadata={"help": "Cosine decay ends at lr * this."})
    eval_rows: int = field(default=32, metadata={"help": "Rows after the training rows held out to measure FVE/L0."})
    outlier_norm_factor: float = field(
        default=10.0, metadata={"help": "Tokens whose residual norm exceeds this x the median are left out of SAE "
                                        "training and FVE (massive activations: ~0.1% of tokens, >90% of variance)."})
    batch_size: int = field(default=16, metadata={"help": "Rows per forward pass when collecting activations."})
    overwrite: bool = field(default=False, metadata={"help": "Retrain even if output_dir holds a trained SAE."})

    def __post_init__(self):
        hookpoint_layer(self.hookpoint)
        _require_positive(self, "d_sae", "k", "training_tokens", "train_batch_size_tokens", "eval_rows", "batch_size")
        if self.k > self.d_sae:
            _fail("k", f"k={self.k} exceeds d_sae={self.d_sae}.")
        if not self.outlier_norm_factor > 1:
            _fail("outlier_norm_factor", f"must be > 1, got {self.outlier_norm_factor}.")
        if not self.lr > 0:
            _fail("lr", f"must be > 0, got {self.lr}.")
        if not 0 < self.lr_end_fraction <= 1:
            _fail("lr_end_fraction", f"must be in (0, 1], got {self.lr_end_fraction}.")


@dataclass
class ExplainArguments:
    """data_gen/explain.py: interpret latents from examples sampled out of the cache."""

    cache_dir: str = field(default="outputs/cache", metadata={"help": "A finished activation cache (cache_activations.py)."})
    hookpoint: str = field(default="layers.15", metadata={"help": "Which hookpoint of the cache (`layers.N`)."})
    explanations_dir: str = field(default="outputs/explanations", metadata={"help": "Sets are written to <dir>/<set_name>/."})
    explainer: str = field(default="token_list", metadata={"help": "`token_list` (no LLM) or `llm`."})
    sampling: str = field(default="quantiles", metadata={"help": "`top` (highest windows) or `quantiles` (10 equal-count)."})
    set_name: str | None = field(default=None, metadata={"help": "Default: <explainer>-<sampling>."})
    window: int = field(default=32, metadata={"help": "Tokens per example window."})
    n_top: int = field(default=20, metadata={"help": "`top`: windows per latent."})
    n_quantiles: int = field(default=10, metadata={"help": "`quantiles`: number of quantiles."})
    per_quantile: int = field(default=2, metadata={"help": "`quantiles`: windows drawn per quantile."})
    min_activations: int = field(default=5, metadata={"help": "Latents firing fewer times are reported, not explained."})
    max_latents: int = field(default=0, metadata={"help": "Explain a seeded random sample of this many latents (0: all)."})
    explainer_model: str = field(default="embedded:smollm2-135m", metadata={"help": "`llm`: chat model (Hub id, folder, embedded)."})
    backend: str = field(default="hf", metadata={"help": "`llm`: `hf` (transformers, CPU or GPU) or `vllm` (GPU, [gpu] extra)."})
    batch_size: int = field(default=8, metadata={"help": "`llm`: prompts per generate call."})
    max_new_tokens: int = field(default=32, metadata={"help": "`llm`: tokens generated per interpretation."})
    device: str = field(default="auto", metadata={"help": "`llm`: auto, cpu, cuda, cuda:N."})
    seed: int = field(default=22, metadata={"help": "Seed for sampling latents and examples."})

    def __post_init__(self):
        hookpoint_layer(self.hookpoint)
        if self.backend not in ("hf", "vllm"):
            _fail("backend", f"{self.backend!r} is not `hf` or `vllm`.")
        if self.explainer not in ("token_list", "llm"):
            _fail("explainer", f"{self.explainer!r} is not `token_list` or `llm`.")
        if self.sampling not in ("top", "quantiles"):
            _fail("sampling", f"{self.sampling!r} is not `top` or `quantiles`.")
        _require_positive(self, "window", "n_top", "n_quantiles", "per_quantile", "min_activations", "batch_size",
                          "max_new_tokens")
        if self.max_latents < 0:
            _fail("max_latents", f"must be >= 0, got {self.max_latents}.")
        if self.set_name is None:
            self.set_name = f"{self.explainer}-{self.sampling}"


@dataclass
class ScoreArguments:
    """data_gen/score.py: detection / fuzzing scores of an interpretation set, judged by an LLM."""

    cache_dir: str = field(default="outputs/cache", metadata={"help": "The activation cache the examples come from."})
    hookpoint: str = field(default="layers.15", metadata={"help": "Which hookpoint of the cache (`layers.N`)."})
    interpretations: str = field(default="outputs/explanations/token_list-quantiles",
                                 metadata={"help": "The interpretation set to score (folder or JSON)."})
    scores_dir: str = field(default="outputs/scores", metadata={"help": "Writes <scores_dir>/<scorer>/ + <scorer>.json."})
    scorer: str = field(default="detection", metadata={"help": "`detection` or `fuzz`."})
    judge_model: str = field(default="embedded:smollm2-135m", metadata={"help": "Chat model that judges (Hub id, folder, embedded)."})
    backend: str = field(default="hf", metadata={"help": "`hf` (transformers, CPU or GPU) or `vllm` (GPU, [gpu] extra)."})
    n_activating: int = field(default=5, metadata={"help": "Activating windows per latent (drawn across quantiles)."})
    n_non_activating: int = field(default=5, metadata={"help": "Windows where the latent never fires."})
    window: int = field(default=32, metadata={"help": "Tokens per window."})
    max_latents: int = field(default=0, metadata={"help": "Score a seeded sample of this many latents (0: all)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per forward pass."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    seed: int = field(default=22, metadata={"help": "Seed for latents and windows."})

    def __post_init__(self):
        hookpoint_layer(self.hookpoint)
        if self.backend not in ("hf", "vllm"):
            _fail("backend", f"{self.backend!r} is not `hf` or `vllm`.")
        if self.scorer not in ("detection", "fuzz"):
            _fail("scorer", f"{self.scorer!r} is not `detection` or `fuzz`.")
        _require_positive(self, "n_activating", "n_non_activating", "window", "batch_size")
        if self.max_latents < 0:
            _fail("max_latents", f"must be >= 0, got {self.max_latents}.")


@dataclass
class DatasetArguments:
    """data_gen/build_dataset.py: (interpretation, context, label) examples under a data mixture."""

    cache_dir: str = field(default="outputs/cache", metadata={"help": "A finished activation cache."})
    hookpoint: str = field(default="layers.15", metadata={"help": "Which hookpoint of the cache (`layers.N`)."})
    interpretations: list[str] = field(
        default_factory=list, metadata={"help": "Interpretation sets (folder, JSON dict or Neuronpedia export); "
                                                "several are mixed per example by `interpretation_weights`."})
    interpretation_weights: list[float] = field(default_factory=list, metadata={"help": "One weight per set (default equal)."})
    score_path: str | None = field(default=None, metadata={"help": "Per-latent scores shown in the prompt (JSON {latent: "
                                                                   "score} or a scores folder); latents without one are left out and counted."})
    positives: str = field(default="all", metadata={"help": "`all` active latents or the `top_k` strongest."})
    top_k: int = field(default=5, metadata={"help": "With `positives: top_k`."})
    negatives_per_positive: float = field(default=1.0, metadata={"help": "Inactive candidates per positive (0 for value labels)."})
    negatives_per_context: int = field(default=0, metadata={"help": "If > 0: exactly this many inactive candidates per "
                                                                    "context instead (eval sets: the dictionary-wide extrapolation needs them)."})
    hard_negatives: str = field(default="none", metadata={"help": "`none`, `same_token` (latents that fire on this token "
                                                                  "elsewhere) or `decoder` (decoder neighbours of the positives)."})
    hard_negative_fraction: float = field(default=0.5, metadata={"help": "Share of the negatives that are hard."})
    label: str = field(default="active", metadata={"help": "`active` (binary), `activation_bin` or `quantile_bin` (0-9)."})
    prompt_format: str = field(default="sim_v1", metadata={"help": "A format of latentsim.prompts (sim_v1, sim_value_v1)."})
    window_min: int = field(default=32, metadata={"help": "Shortest context window (tokens, judged token last)."})
    window_max: int = field(default=32, metadata={"help": "Longest context window."})
    contexts_per_row: int = field(default=1, metadata={"help": "Contexts sampled per cache row."})
    split_mode: str = field(default="latents", metadata={"help": "`latents`: splits disjoint in latents and rows; "
                                                                 "`contexts`: disjoint in rows only."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of latents/rows for validation."})
    test_fraction: float = field(default=0.1, metadata={"help": "Share of latents/rows for test."})
    simulator_tokenizer: str = field(default="embedded:smollm2-135m",
                                     metadata={"help": "Tokenizer whose answers must be single tokens (checked)."})
    output_dir: str = field(default="outputs/datasets/default", metadata={"help": "Parquet splits + README.md card."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Also upload the folder to this Hub dataset repo "
                                                                    "(token from HF_TOKEN / huggingface-cli login)."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub dataset repo as private."})
    seed: int = field(default=22, metadata={"help": "Seed for splits, windows and negatives."})

    def __post_init__(self):
        from latentsim.prompts import PROMPT_FORMATS

        hookpoint_layer(self.hookpoint)
        if not self.interpretations:
            _fail("interpretations", "give at least one interpretation set (folder or JSON file).")
        if self.interpretation_weights and len(self.interpretation_weights) != len(self.interpretations):
            _fail("interpretation_weights", f"{len(self.interpretation_weights)} weights for "
                  f"{len(self.interpretations)} interpretation sets.")
        if any(w < 0 for w in self.interpretation_weights) or (self.interpretation_weights and
                                                                sum(self.interpretation_weights) <= 0):
            _fail("interpretation_weights", "weights must be >= 0 with a positive sum.")
        choices = {"positives": ("all", "top_k"), "hard_negatives": ("none", "same_token", "decoder"),
                   "label": ("active", "activation_bin", "quantile_bin"), "split_mode": ("latents", "contexts")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                _fail(key, f"{getattr(self, key)!r} is not one of {', '.join(allowed)}.")
        if self.prompt_format not in PROMPT_FORMATS:
            _fail("prompt_format", f"{self.prompt_format!r} is not one of {sorted(PROMPT_FORMATS)}.")
        wants_bins = PROMPT_FORMATS[self.prompt_format].label == "bin"
        if wants_bins != (self.label != "active"):
            _fail("label", f"format {self.prompt_format} answers "
                  f"{'a 0-9 bin' if wants_bins else 'Yes/No'}; label {self.label!r} does not fit it.")
        if self.label != "active" and (self.negatives_per_positive != 0 or self.negatives_per_context != 0):
            _fail("negatives_per_positive" if self.negatives_per_positive else "negatives_per_context",
                  "value labels (bins) exist only for active latents; set it to 0.")
        if self.negatives_per_context < 0:
            _fail("negatives_per_context", "must be >= 0.")
        if self.top_k < 1 or self.contexts_per_row < 1:
            _fail("top_k" if self.top_k < 1 else "contexts_per_row", "must be >= 1.")
        if self.negatives_per_positive < 0:
            _fail("negatives_per_positive", "must be >= 0.")
        if not 0 <= self.hard_negative_fraction <= 1:
            _fail("hard_negative_fraction", "must be in [0, 1].")
        if not 2 <= self.window_min <= self.window_max:
            _fail("window_min", f"need 2 <= window_min <= window_max, got {self.window_min}, {self.window_max}.")
        if not (0 < self.validation_fraction and 0 < self.test_fraction
                and self.validation_fraction + self.test_fraction < 1):
            _fail("test_fraction", "validation_fraction and test_fraction must be > 0 and sum below 1.")


@dataclass
class SimScriptArguments(ScriptArguments):
    """train/sft.py: the dataset (a build_dataset folder or a Hub dataset) and the simulator-specific switches."""

    prompt_format: str = field(default="sim_v1", metadata={"help": "Must match the dataset's `prompt_format` column."})
    extra_datasets: list[str] = field(default_factory=list, metadata={"help": "More build_dataset folders whose train "
                                                                              "splits are mixed in (validation: the first dataset's)."})
    dataset_weights: list[float] = field(default_factory=list, metadata={"help": "Sampling weight of dataset_name and "
                                                                                 "each extra dataset (default: equal)."})
    max_eval_samples: int = field(default=512, metadata={"help": "Validation rows scored during training (0: all)."})
    resume: str = field(default="auto", metadata={"help": "`auto` (last complete checkpoint in output_dir, if any), "
                                                          "`never`, or a checkpoint-N path (an error if incomplete)."})
    nan_patience: int = field(default=0, metadata={"help": "Logged steps with a non-finite loss/grad norm tolerated "
                                                           "before training stops."})

    def __post_init__(self):
        from latentsim.prompts import PROMPT_FORMATS

        if not self.dataset_name:
            _fail("dataset_name", "give a build_dataset output folder or a Hub dataset id.")
        if self.prompt_format not in PROMPT_FORMATS:
            _fail("prompt_format", f"{self.prompt_format!r} is not one of {sorted(PROMPT_FORMATS)}.")
        if self.dataset_weights and len(self.dataset_weights) != 1 + len(self.extra_datasets):
            _fail("dataset_weights", f"{len(self.dataset_weights)} weights for {1 + len(self.extra_datasets)} datasets "
                  "(dataset_name + extra_datasets).")
        if any(w <= 0 for w in self.dataset_weights):
            _fail("dataset_weights", "weights must be > 0.")
        if self.max_eval_samples < 0 or self.nan_patience < 0:
            _fail("max_eval_samples" if self.max_eval_samples < 0 else "nan_patience", "must be >= 0.")


@dataclass
class PublishArguments:
    """train/publish.py: publish a run folder or one of its checkpoints as a PEFT adapter repo."""

    run_dir: str = field(default="outputs/sft/run", metadata={"help": "The train/sft.py output_dir."})
    checkpoint: str | None = field(default=None, metadata={"help": "`checkpoint-N` inside run_dir: published to "
                                                                   "branch step-<N, 9 digits>; default: the final adapter on main."})
    repo_id: str = field(default="", metadata={"help": "Hub repo `<org>/<name>`."})
    private: bool = field(default=True, metadata={"help": "Create the repo as private."})
    dry_run: bool = field(default=False, metadata={"help": "Write the exact folder and planned operations; no network."})

    def __post_init__(self):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id or ""):
            _fail("repo_id", f"{self.repo_id!r} is not `<org>/<name>`.")
        if self.checkpoint is not None and not re.fullmatch(r"checkpoint-\d+", self.checkpoint):
            _fail("checkpoint", f"{self.checkpoint!r} is not `checkpoint-N`.")


@dataclass
class PrepareArguments:
    """data_gen/prepare_embedded.py: build the embedded default (models converted once, corpus files)."""

    models: list[str] = field(
        default_factory=lambda: ["smollm2-135m", "gemma3-270m"],
        metadata={"help": "Embedded models to convert to cached safetensors folders."})
    corpora: list[str] = field(default_factory=lambda: ["debian-english"], metadata={"help": "Embedded corpora to build."})

    def __post_init__(self):
        from latentsim.corpus import EMBEDDED_CORPORA
        from latentsim.models import EMBEDDED_MODELS

        for name in self.models:
            if name not in EMBEDDED_MODELS:
                _fail("models", f"unknown embedded model {name!r}; choose from {sorted(EMBEDDED_MODELS)}.")
        for name in self.corpora:
            if name not in EMBEDDED_CORPORA:
                _fail("corpora", f"unknown embedded corpus {name!r}; choose from {sorted(EMBEDDED_CORPORA)}.")


BASELINE_KEYS = ("name", "model", "shots", "score", "interpretations")


def parse_baseline(spec: str) -> dict:
    """`key=value,key=value` (lm-eval `--model_args` style) -> a prompting-baseline spec with defaults:
    model (default embedded:smollm2-135m), shots (few-shot examples, 0), score (show the eval set's
    interpretation score, false), interpretations (another interpretation set; default the eval set's), name."""
    out = {"model": "embedded:smollm2-135m", "shots": 0, "score": False, "interpretations": None}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in BASELINE_KEYS:
            close = difflib.get_close_matches(key, BASELINE_KEYS, n=1)
            _fail("baselines", f"{spec!r}: `{part}` is not key=value with a key in {', '.join(BASELINE_KEYS)}"
                  + (f" (did you mean `{close[0]}`?)" if close else "") + ".")
        if key == "shots":
            if not value.isdigit():
                _fail("baselines", f"{spec!r}: shots must be a non-negative integer.")
            out[key] = int(value)
        elif key == "score":
            if value not in ("true", "false"):
                _fail("baselines", f"{spec!r}: score must be true or false.")
            out[key] = value == "true"
        else:
            out[key] = value
    if not out.get("name"):
        model = out["model"].rsplit("/", 1)[-1].removeprefix(EMBEDDED_PREFIX)
        out["name"] = (f"{model}_{out['shots']}shot" + ("_score" if out["score"] else "")
                       + (f"_{Path(out['interpretations']).name}" if out["interpretations"] else ""))
    if not re.fullmatch(r"[A-Za-z0-9._-]+", out["name"]):
        _fail("baselines", f"{spec!r}: name {out['name']!r} may only hold letters, digits, `.`, `_`, `-`.")
    return out


@dataclass
class EvalArguments:
    """eval/sweep.py: simulators (checkpoints of finetuning runs, Hub branches, prompting baselines) x one eval set."""

    eval_set: str = field(default="", metadata={"help": "A build_dataset folder (test + validation splits) of held-out latents."})
    eval_split: str = field(default="test", metadata={"help": "The split the metrics are reported on."})
    calibration_split: str | None = field(default="validation", metadata={"help": "Split for temperature scaling and the "
                                                                                  "L0-matched threshold (null: none)."})
    max_contexts: int = field(default=0, metadata={"help": "Score a seeded sample of this many contexts per split (0: all)."})
    run_dirs: list[str] = field(default_factory=list, metadata={"help": "train/sft.py output dirs: every complete "
                                                                        "checkpoint-N and the final adapter are evaluated."})
    hub_runs: list[str] = field(default_factory=list, metadata={"help": "Hub adapter repos: `main` and every `step-N` branch."})
    include_checkpoints: bool = field(default=True, metadata={"help": "Evaluate checkpoint-N folders, not only the final adapter."})
    baselines: list[str] = field(default_factory=list, metadata={"help": "Prompting baselines, each `key=value,...` with "
                                                                         "keys model, shots, score, interpretations, name."})
    score_files: list[str] = field(default_factory=list, metadata={"help": "Interpretation scores ({latent: score} JSON, "
                                                                           "data_gen/score.py) to plot accuracy against."})
    allow_seen_latents: bool = field(default=False, metadata={"help": "Score a finetuned simulator on latents it was trained on."})
    backend: str = field(default="hf", metadata={"help": "`hf` (CPU or GPU), `vllm` (GPU, [gpu] extra) or `fake` (tests)."})
    batch_size: int = field(default=32, metadata={"help": "Suffixes per forward pass (hf)."})
    dtype: str = field(default="auto", metadata={"help": "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    max_lora_rank: int = field(default=64, metadata={"help": "vLLM: the largest adapter rank allowed."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Writes <output_dir>/<eval set>/<simulator>/."})
    overwrite: bool = field(default=False, metadata={"help": "Recompute finished results."})
    seed: int = field(default=22, metadata={"help": "Seed for context sampling, few-shot examples and random baselines."})

    def __post_init__(self):
        if not self.eval_set:
            _fail("eval_set", "give a build_dataset output folder (data_gen/build_dataset.py, see configs/data/eval_*.yaml).")
        if self.backend not in ("hf", "vllm", "fake"):
            _fail("backend", f"{self.backend!r} is not `hf`, `vllm` or `fake`.")
        if not (self.run_dirs or self.hub_runs or self.baselines):
            _fail("run_dirs", "nothing to evaluate: give run_dirs, hub_runs or baselines.")
        self.parsed_baselines = [parse_baseline(b) for b in self.baselines]
        names = [b["name"] for b in self.parsed_baselines]
        if len(set(names)) != len(names):
            _fail("baselines", f"two baselines share a name ({names}); give them distinct `name=`.")
        _require_positive(self, "batch_size", "max_lora_rank")
        if self.max_contexts < 0:
            _fail("max_contexts", "must be >= 0.")
        if self.eval_split == self.calibration_split:
            _fail("calibration_split", "must differ from eval_split (a temperature fitted on the test split is not a result).")


@dataclass
class PatchArguments:
    """eval/patch_kl.py: patch decoded latents (SAE, fractions, simulators) into the subject model; KL and CE."""

    eval_set: str = field(default="", metadata={"help": "The binary eval set eval/sweep.py scored (build_dataset folder)."})
    split: str = field(default="test", metadata={"help": "Its split."})
    sweep_dir: str | None = field(default=None, metadata={"help": "eval/sweep.py's output_dir: simulators are read from "
                                                                   "<sweep_dir>/<eval set>/*/predictions_<split>.parquet."})
    simulators: list[str] = field(default_factory=list, metadata={"help": "Simulator folder names (default: all in the sweep)."})
    thresholds: list[str] = field(default_factory=lambda: ["0.5", "l0_matched"],
                                  metadata={"help": "P(yes) thresholds: numbers, or `l0_matched` (fitted by the sweep on validation)."})
    values: list[str] = field(default_factory=lambda: ["oracle", "median"],
                              metadata={"help": "Values of predicted latents: `oracle` (true value where truly active, "
                                                "median otherwise), `median` (the latent's median non-zero activation) "
                                                "and/or `predicted` (value_simulator's 0-9 answer mapped through the "
                                                "latent's deciles)."})
    value_simulator: str | None = field(default=None, metadata={"help": "For `predicted` values: a train/sft.py run "
                                                                        "trained on sim_value_v1, or a model reference."})
    fractions: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 0.75, 1.0],
                                   metadata={"help": "Figure 1: fractions of the truly active latents kept."})
    fraction_modes: list[str] = field(default_factory=lambda: ["top", "random"], metadata={"help": "`top` and/or `random`."})
    all_positions: bool = field(default=True, metadata={"help": "Also patch every position (SAE, ablations, fractions)."})
    max_contexts: int = field(default=0, metadata={"help": "Contexts (0: those the sweep scored, else all of the split)."})
    mean_contexts: int = field(default=32, metadata={"help": "Cache rows averaged for the mean-ablation vector."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    dtype: str = field(default="auto", metadata={"help": "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16."})
    output_dir: str = field(default="", metadata={"help": "Default <sweep_dir>/<eval set>/patch_kl."})
    overwrite: bool = field(default=False, metadata={"help": "Recompute finished results."})
    seed: int = field(default=22, metadata={"help": "Seed for random fractions and context sampling."})

    def __post_init__(self):
        if not self.eval_set:
            _fail("eval_set", "give the binary eval set (data_gen/build_dataset.py, configs/data/eval_quantiles.yaml).")
        for t in self.thresholds:
            if t != "l0_matched":
                try:
                    ok = 0 < float(t) < 1
                except ValueError:
                    ok = False
                if not ok:
                    _fail("thresholds", f"{t!r} is neither a number in (0, 1) nor `l0_matched`.")
        if bad := set(self.values) - {"oracle", "median", "predicted"}:
            _fail("values", f"{sorted(bad)}: choose from oracle, median, predicted.")
        if "predicted" in self.values and not self.value_simulator:
            _fail("value_simulator", "`predicted` values need a value simulator (a sim_value_v1 run or a model).")
        if bad := set(self.fraction_modes) - {"top", "random"}:
            _fail("fraction_modes", f"{sorted(bad)}: choose from top, random.")
        if any(not 0 <= f <= 1 for f in self.fractions):
            _fail("fractions", "every fraction must be in [0, 1].")
        if self.max_contexts < 0 or self.mean_contexts < 1:
            _fail("max_contexts" if self.max_contexts < 0 else "mean_contexts", "must be >= 0 (mean_contexts >= 1).")


@dataclass
class GenerateArguments:
    """eval/generate.py: closed-loop generation with the hook layer rewritten from SAE latents or a simulator."""

    eval_set: str = field(default="", metadata={"help": "A binary eval set: its cache names the subject model, SAE and "
                                                         "hookpoint; its test latents are the ones a simulator rewrites."})
    prompts: list[str] = field(default_factory=lambda: ["The sun was", "A fool and his money"],
                               metadata={"help": "Prompts the subject model continues."})
    max_new_tokens: int = field(default=10, metadata={"help": "Tokens generated per prompt and source."})
    sources: list[str] = field(default_factory=lambda: ["clean", "sae", "fraction:top:0.5", "simulator"],
                               metadata={"help": "`clean`, `sae`, `fraction:<top|random>:<f>`, `simulator`."})
    simulator_run: str | None = field(default=None, metadata={"help": "A train/sft.py output_dir (its final adapter); "
                                                                      "default: the untuned simulator_model."})
    simulator_model: str = field(default="embedded:smollm2-135m", metadata={"help": "Base simulator model without a run."})
    threshold: float = field(default=0.5, metadata={"help": "P(yes) at which the simulator calls a latent active."})
    values: str = field(default="oracle", metadata={"help": "`oracle` (true value where truly active, median otherwise) "
                                                           "or `median` (no oracle)."})
    n_inactive: int = field(default=16, metadata={"help": "Inactive latents of the pool scored per step beside the active ones."})
    window: int = field(default=32, metadata={"help": "Tokens of context the simulator sees (the eval set's window)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (seeded, temperature 1) instead of greedy decoding."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N."})
    dtype: str = field(default="auto", metadata={"help": "auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16."})
    batch_size: int = field(default=32, metadata={"help": "Simulator suffixes per forward pass."})
    output_dir: str = field(default="outputs/generate", metadata={"help": "results.json and generation.html go here."})
    seed: int = field(default=22, metadata={"help": "Seed for inactive latents, random fractions and sampling."})

    def __post_init__(self):
        if not self.eval_set:
            _fail("eval_set", "give the binary eval set (configs/data/eval_quantiles.yaml).")
        for source in self.sources:
            parts = source.split(":")
            ok = source in ("clean", "sae", "simulator") or (
                len(parts) == 3 and parts[0] == "fraction" and parts[1] in ("top", "random")
                and parts[2].replace(".", "", 1).isdigit() and 0 <= float(parts[2]) <= 1)
            if not ok:
                _fail("sources", f"{source!r}: use clean, sae, simulator or fraction:<top|random>:<f in [0, 1]>.")
        if self.values not in ("oracle", "median"):
            _fail("values", f"{self.values!r} is not oracle or median.")
        if not self.prompts:
            _fail("prompts", "give at least one prompt.")
        _require_positive(self, "max_new_tokens", "window", "batch_size")


@dataclass
class ReportArguments:
    """eval/report.py: the HTML report of a sweep folder."""

    sweep_dir: str = field(default="outputs/eval", metadata={"help": "eval/sweep.py's output_dir."})
    output_dir: str = field(default="", metadata={"help": "Where report.html and figures/ go (default <sweep_dir>/report)."})
    title: str = field(default="latentsim simulator evaluation", metadata={"help": "The report's title."})


def parse_config(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple:
    """YAML (`--config x.yaml`) + command-line overrides -> dataclasses, strictly.

    TRL's parser already rejects unknown keys; this wraps its message so that it names the config file,
    the unknown key and the closest valid key.
    """
    args = list(sys.argv[1:] if args is None else args)
    parser = TrlParser(dataclass_types)
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    if config_path is not None and not Path(config_path).is_file():
        raise ConfigError(f"--config {config_path}: no such file.")
    try:
        return tuple(parser.parse_args_and_config(args))
    except ValueError as err:
        if "Unknown arguments from config file" not in str(err):
            raise
        valid = sorted({f.name for t in dataclass_types for f in fields(t)})
        unknown = re.findall(r"'--([^']+)'", str(err))
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
        raise ConfigError(
            f"{config_path}: unknown config key(s) {', '.join(hints)}. Remove them or fix the spelling; "
            f"valid keys: {', '.join(valid)}."
        ) from None
