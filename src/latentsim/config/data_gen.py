"""data_gen/ arguments: embedded default, SAE training, caching, interpretations, scores, simulator
examples."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentsim.config.common import (
    OutputArguments,
    VLLMEngineArguments,
    _fail,
    _require_positive,
    check_device,
    device_field,
    hookpoint_layer,
)


def check_split_fractions(args) -> None:
    """validation_fraction and test_fraction > 0, confirmation_fraction >= 0, together below 1."""
    shares = (args.validation_fraction, args.test_fraction, args.confirmation_fraction)
    if args.confirmation_fraction < 0:
        _fail("confirmation_fraction", f"must be >= 0, got {args.confirmation_fraction}.")
    if not (0 < args.validation_fraction and 0 < args.test_fraction and sum(shares) < 1):
        _fail(
            "test_fraction",
            "validation_fraction and test_fraction must be > 0 and, with confirmation_fraction, sum below 1.",
        )


def split_fraction_field(help: str, default: float = 0.1):
    return field(default=default, metadata={"help": help})


@dataclass
class RowChoiceArguments:
    """Which cache rows examples may come from (explain.py, score.py): the training rows of the cache's row
    split (recorded by data_gen/cache_activations.py, read by build_dataset alike), or all rows."""

    rows: str = field(
        default="train",
        metadata={
            "help": "`train`: only the training rows of the cache's row split (cache_activations.py "
            "records it), so no eval context is quoted; `all`: every row (build_dataset then refuses eval "
            "splits built on it)."
        },
    )

    def check_row_choice(self) -> None:
        if self.rows not in ("train", "all"):
            _fail("rows", f"{self.rows!r} is not `train` (the row split's training rows) or `all`.")


@dataclass
class PrepareArguments:
    """data_gen/prepare_embedded.py: build the embedded default (models converted once, corpus files)."""

    models: list[str] = field(
        default_factory=lambda: ["smollm2-135m", "gemma3-270m"],
        metadata={"help": "Embedded models to convert to cached safetensors folders."},
    )
    corpora: list[str] = field(
        default_factory=lambda: ["debian-english"], metadata={"help": "Embedded corpora to build."}
    )

    def __post_init__(self):
        from latentsim.corpus import EMBEDDED_CORPORA
        from latentsim.models import EMBEDDED_MODELS

        for name in self.models:
            if name not in EMBEDDED_MODELS:
                _fail("models", f"unknown embedded model {name!r}; choose from {sorted(EMBEDDED_MODELS)}.")
        for name in self.corpora:
            if name not in EMBEDDED_CORPORA:
                _fail("corpora", f"unknown embedded corpus {name!r}; choose from {sorted(EMBEDDED_CORPORA)}.")


@dataclass
class CacheArguments(OutputArguments):
    """data_gen/cache_activations.py: record sparse SAE latents over corpus rows."""

    output_dir: str = field(
        default="outputs/cache", metadata={"help": "Cache folder (delphi layout under latents/)."}
    )
    batch_size: int = field(default=16, metadata={"help": "Rows per forward pass."})
    shard_rows: int = field(
        default=128, metadata={"help": "Rows per resumable shard (a killed run loses at most one)."}
    )
    n_splits: int = field(default=5, metadata={"help": "Latent-range split files in the delphi layout."})
    quantile_sample_size: int = field(
        default=2048,
        metadata={"help": "Max non-zero activations kept per latent (sorted) for quantile statistics."},
    )
    # The row split every later stage reads (latentsim.splits): whole documents, seeded by the corpus seed.
    validation_fraction: float = split_fraction_field("Share of the rows (whole documents) for validation.")
    test_fraction: float = split_fraction_field("Share of the rows (whole documents) for test.")
    confirmation_fraction: float = split_fraction_field(
        "Share of the rows (whole documents) for the locked confirmation split (0: none).", 0.0
    )
    split_group_rows: int = field(
        default=8,
        metadata={
            "help": "Rows sharing documents are split in groups cut after about this many rows, at a row "
            "holding a document's end (left out of every split when its two sides land in different ones)."
        },
    )

    def __post_init__(self):
        _require_positive(
            self, "batch_size", "shard_rows", "n_splits", "quantile_sample_size", "split_group_rows"
        )
        check_split_fractions(self)


@dataclass
class TrainSAEArguments(OutputArguments):
    """data_gen/train_sae.py: train a TopK SAE with sae-lens on residuals from the corpus (position 0
    excluded)."""

    output_dir: str = field(default="outputs/sae", metadata={"help": "Where the sae-lens folder is written."})
    hookpoint: str = field(
        default="layers.15", metadata={"help": "Residual stream after layer N (`layers.N`)."}
    )
    d_sae: int = field(default=4096, metadata={"help": "Number of latents."})
    k: int = field(default=32, metadata={"help": "TopK: active latents per token."})
    training_tokens: int = field(
        default=1_000_000, metadata={"help": "Samples seen in training (repeats the collected tokens)."}
    )
    train_batch_size_tokens: int = field(default=4096, metadata={"help": "Tokens per optimizer step."})
    lr: float = field(default=4.0e-4, metadata={"help": "Adam learning rate."})
    lr_end_fraction: float = field(default=0.1, metadata={"help": "Cosine decay ends at lr * this."})
    eval_rows: int = field(
        default=32, metadata={"help": "Rows after the training rows held out to measure FVE/L0."}
    )
    outlier_norm_factor: float = field(
        default=10.0,
        metadata={
            "help": "Tokens whose residual norm exceeds this x the median are left out of SAE "
            "training and FVE (massive activations: ~0.1% of tokens, >90% of variance)."
        },
    )
    batch_size: int = field(
        default=16, metadata={"help": "Rows per forward pass when collecting activations."}
    )

    def __post_init__(self):
        hookpoint_layer(self.hookpoint)
        _require_positive(
            self, "d_sae", "k", "training_tokens", "train_batch_size_tokens", "eval_rows", "batch_size"
        )
        if self.k > self.d_sae:
            _fail("k", f"k={self.k} exceeds d_sae={self.d_sae}.")
        if not self.outlier_norm_factor > 1:
            _fail("outlier_norm_factor", f"must be > 1, got {self.outlier_norm_factor}.")
        if not self.lr > 0:
            _fail("lr", f"must be > 0, got {self.lr}.")
        if not 0 < self.lr_end_fraction <= 1:
            _fail("lr_end_fraction", f"must be in (0, 1], got {self.lr_end_fraction}.")


@dataclass
class ExplainArguments(RowChoiceArguments, VLLMEngineArguments):
    """data_gen/explain.py: interpret latents from examples sampled out of the cache."""

    cache_dir: str = field(
        default="outputs/cache", metadata={"help": "A finished activation cache (cache_activations.py)."}
    )
    hookpoint: str = field(
        default="layers.15", metadata={"help": "Which hookpoint of the cache (`layers.N`)."}
    )
    explanations_dir: str = field(
        default="outputs/explanations", metadata={"help": "Sets are written to <dir>/<set_name>/."}
    )
    explainer: str = field(default="token_list", metadata={"help": "`token_list` (no LLM) or `llm`."})
    sampling: str = field(
        default="quantiles", metadata={"help": "`top` (highest windows) or `quantiles` (10 equal-count)."}
    )
    set_name: str | None = field(default=None, metadata={"help": "Default: <explainer>-<sampling>."})
    window: int = field(default=32, metadata={"help": "Tokens per example window."})
    n_top: int = field(default=20, metadata={"help": "`top`: windows per latent."})
    n_quantiles: int = field(default=10, metadata={"help": "`quantiles`: number of quantiles."})
    per_quantile: int = field(default=2, metadata={"help": "`quantiles`: windows drawn per quantile."})
    min_activations: int = field(
        default=5, metadata={"help": "Latents firing fewer times are reported, not explained."}
    )
    max_latents: int = field(
        default=0, metadata={"help": "Explain a seeded random sample of this many latents (0: all)."}
    )
    n_tokens: int = field(default=3, metadata={"help": "`token_list`: the latent's strongest tokens named."})
    n_contexts: int = field(
        default=1, metadata={"help": "`token_list`: example contexts quoted, the strongest first."}
    )
    context_tokens: int = field(
        default=8, metadata={"help": "`token_list`: tokens quoted before each example's token."}
    )
    n_preceding: int = field(
        default=0, metadata={"help": "`token_list`: the tokens it most often follows, named."}
    )
    explainer_model: str = field(
        default="embedded:smollm2-135m", metadata={"help": "`llm`: chat model (Hub id, folder, embedded)."}
    )
    backend: str = field(
        default="hf",
        metadata={"help": "`llm`: `hf` (transformers, CPU or GPU) or `vllm` (GPU; .venv-vllm, docs/gpu.md)."},
    )
    batch_size: int = field(default=8, metadata={"help": "`llm`: prompts per generate call."})
    max_new_tokens: int = field(default=32, metadata={"help": "`llm`: tokens generated per interpretation."})
    device: str = device_field("`llm`: ")
    seed: int = field(default=22, metadata={"help": "Seed for sampling latents and examples."})

    def __post_init__(self):
        hookpoint_layer(self.hookpoint)
        check_device("device", self.device)
        if self.backend not in ("hf", "vllm"):
            _fail("backend", f"{self.backend!r} is not `hf` or `vllm`.")
        if self.explainer not in ("token_list", "llm"):
            _fail("explainer", f"{self.explainer!r} is not `token_list` or `llm`.")
        self.check_row_choice()
        self.check_vllm_engine()
        if self.sampling not in ("top", "quantiles"):
            _fail("sampling", f"{self.sampling!r} is not `top` or `quantiles`.")
        _require_positive(
            self,
            "window",
            "n_top",
            "n_quantiles",
            "per_quantile",
            "min_activations",
            "batch_size",
            "max_new_tokens",
            "n_tokens",
            "n_contexts",
            "context_tokens",
        )
        for key in ("max_latents", "n_preceding"):
            if getattr(self, key) < 0:
                _fail(key, f"must be >= 0, got {getattr(self, key)}.")
        if self.set_name is None:
            self.set_name = f"{self.explainer}-{self.sampling}"


@dataclass
class ScoreArguments(RowChoiceArguments, VLLMEngineArguments):
    """data_gen/score.py: detection / fuzzing scores of an interpretation set, judged by an LLM."""

    cache_dir: str = field(
        default="outputs/cache", metadata={"help": "The activation cache the examples come from."}
    )
    hookpoint: str = field(
        default="layers.15", metadata={"help": "Which hookpoint of the cache (`layers.N`)."}
    )
    interpretations: str = field(
        default="outputs/explanations/token_list-quantiles",
        metadata={"help": "The interpretation set to score (folder or JSON)."},
    )
    scores_dir: str = field(
        default="outputs/scores", metadata={"help": "Writes <scores_dir>/<scorer>/ + <scorer>.json."}
    )
    scorer: str = field(default="detection", metadata={"help": "`detection` or `fuzz`."})
    judge_model: str = field(
        default="embedded:smollm2-135m",
        metadata={"help": "Chat model that judges (Hub id, folder, embedded)."},
    )
    backend: str = field(
        default="hf",
        metadata={"help": "`hf` (transformers, CPU or GPU) or `vllm` (GPU; .venv-vllm, docs/gpu.md)."},
    )
    n_activating: int = field(
        default=5, metadata={"help": "Activating windows per latent (drawn across quantiles)."}
    )
    n_non_activating: int = field(default=5, metadata={"help": "Windows where the latent never fires."})
    window: int = field(default=32, metadata={"help": "Tokens per window."})
    max_latents: int = field(
        default=0, metadata={"help": "Score a seeded sample of this many latents (0: all)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per forward pass."})
    device: str = device_field()
    seed: int = field(default=22, metadata={"help": "Seed for latents and windows."})

    def __post_init__(self):
        hookpoint_layer(self.hookpoint)
        check_device("device", self.device)
        if self.backend not in ("hf", "vllm"):
            _fail("backend", f"{self.backend!r} is not `hf` or `vllm`.")
        self.check_row_choice()
        self.check_vllm_engine()
        if self.scorer not in ("detection", "fuzz"):
            _fail("scorer", f"{self.scorer!r} is not `detection` or `fuzz`.")
        _require_positive(
            self,
            "n_activating",
            "n_non_activating",
            "window",
            "batch_size",
        )
        if self.max_latents < 0:
            _fail("max_latents", f"must be >= 0, got {self.max_latents}.")


@dataclass
class DatasetArguments:
    """data_gen/build_dataset.py: (interpretation, context, label) examples under a data mixture."""

    cache_dir: str = field(default="outputs/cache", metadata={"help": "A finished activation cache."})
    hookpoint: str = field(
        default="layers.15", metadata={"help": "Which hookpoint of the cache (`layers.N`)."}
    )
    interpretations: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Interpretation sets (folder, JSON dict or Neuronpedia export); "
            "several are mixed per example by `interpretation_weights`."
        },
    )
    interpretation_weights: list[float] = field(
        default_factory=list, metadata={"help": "One weight per set (default equal)."}
    )
    score_path: str | None = field(
        default=None,
        metadata={
            "help": "Per-latent scores shown in the prompt (JSON {latent: "
            "score} or a scores folder); latents without one are left out and counted."
        },
    )
    candidates: str = field(
        default="per_context",
        metadata={
            "help": "`per_context`: for each context, its active "
            "latents and sampled inactive ones; `per_latent` "
            "(latent-major eval sets, for per-latent AUC): for "
            "each latent of the split, `contexts_per_latent` "
            "contexts where it fires and as many where it does not."
        },
    )
    contexts_per_latent: int = field(
        default=5,
        metadata={
            "help": "`per_latent`: active (and as many inactive) contexts "
            "per latent, fewer where it fires less often."
        },
    )
    positives: str = field(default="all", metadata={"help": "`all` active latents or the `top_k` strongest."})
    top_k: int = field(default=5, metadata={"help": "With `positives: top_k`."})
    negatives_per_positive: float = field(
        default=1.0, metadata={"help": "Inactive candidates per positive (0 for value labels)."}
    )
    negatives_per_context: int = field(
        default=0,
        metadata={
            "help": "If > 0: exactly this many inactive candidates per "
            "context instead (eval sets: the dictionary-wide extrapolation needs them)."
        },
    )
    hard_negatives: str = field(
        default="none",
        metadata={
            "help": "`none`, `same_token` (latents that fire on this token "
            "elsewhere) or `decoder` (decoder neighbours of the positives)."
        },
    )
    hard_negative_fraction: float = field(
        default=0.5, metadata={"help": "Share of the negatives that are hard."}
    )
    negative_sampling: str = field(
        default="uniform",
        metadata={
            "help": "The non-hard negatives: `uniform` over the split's latents, `frequency_matched` (their "
            "log firing rates distributed like the positives', so a firing-rate prior cannot rank them; see "
            "latentsim.dataset.FrequencyBins), or `mixed`: half of each (per-context eval sets: the uniform "
            "half serves the dictionary-wide extrapolations, every candidate the AUCs)."
        },
    )
    frequency_bins: int = field(
        default=10,
        metadata={"help": "`frequency_matched`: quantile bins of the split's latents by log firing rate."},
    )
    label: str = field(
        default="active", metadata={"help": "`active` (binary), `activation_bin` or `quantile_bin` (0-9)."}
    )
    prompt_format: str = field(
        default="sim_v1", metadata={"help": "A format of latentsim.prompts (sim_v1, sim_value_v1)."}
    )
    window_min: int = field(
        default=32, metadata={"help": "Shortest context window (tokens, judged token last)."}
    )
    window_max: int = field(default=32, metadata={"help": "Longest context window."})
    contexts_per_row: int = field(default=1, metadata={"help": "Contexts sampled per cache row."})
    max_rows_per_split: int = field(
        default=0,
        metadata={
            "help": "0: every row of each split; N: a seeded random N of "
            "each split's rows (a seed-sized cache has ~40k rows)."
        },
    )
    split_mode: str = field(
        default="latents",
        metadata={
            "help": "`latents`: splits disjoint in latents and rows; `contexts`: disjoint in rows only."
        },
    )
    # The latent split (`latents` mode; the rows are always the cache's row split): twins kept on one side.
    validation_fraction: float = split_fraction_field("Share of the explained latents for validation.")
    test_fraction: float = split_fraction_field("Share of the explained latents for test.")
    confirmation_fraction: float = split_fraction_field(
        "Share of the explained latents for the locked confirmation split (confirmation.parquet, on the "
        "cache's confirmation rows; > 0 exactly when the cache keeps confirmation rows).",
        0.0,
    )
    simulator_tokenizer: str = field(
        default="embedded:smollm2-135m",
        metadata={"help": "Tokenizer whose answers must be single tokens (checked)."},
    )
    output_dir: str = field(
        default="outputs/datasets/default", metadata={"help": "Parquet splits + README.md card."}
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "help": "Also upload the folder to this Hub dataset repo "
            "(token from HF_TOKEN / huggingface-cli login)."
        },
    )
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub dataset repo as private."})
    seed: int = field(default=22, metadata={"help": "Seed for splits, windows and negatives."})

    def __post_init__(self):
        from latentsim.prompts import PROMPT_FORMATS

        hookpoint_layer(self.hookpoint)
        if not self.interpretations:
            _fail("interpretations", "give at least one interpretation set (folder or JSON file).")
        if self.interpretation_weights and len(self.interpretation_weights) != len(self.interpretations):
            _fail(
                "interpretation_weights",
                f"{len(self.interpretation_weights)} weights for "
                f"{len(self.interpretations)} interpretation sets.",
            )
        if any(w < 0 for w in self.interpretation_weights) or (
            self.interpretation_weights and sum(self.interpretation_weights) <= 0
        ):
            _fail("interpretation_weights", "weights must be >= 0 with a positive sum.")
        choices = {
            "positives": ("all", "top_k"),
            "hard_negatives": ("none", "same_token", "decoder"),
            "negative_sampling": ("uniform", "frequency_matched", "mixed"),
            "label": ("active", "activation_bin", "quantile_bin"),
            "split_mode": ("latents", "contexts"),
            "candidates": ("per_context", "per_latent"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                _fail(key, f"{getattr(self, key)!r} is not one of {', '.join(allowed)}.")
        if self.prompt_format not in PROMPT_FORMATS:
            _fail("prompt_format", f"{self.prompt_format!r} is not one of {sorted(PROMPT_FORMATS)}.")
        wants_bins = PROMPT_FORMATS[self.prompt_format].label == "bin"
        if wants_bins != (self.label != "active"):
            _fail(
                "label",
                f"format {self.prompt_format} answers "
                f"{'a 0-9 bin' if wants_bins else 'Yes/No'}; label {self.label!r} does not fit it.",
            )
        if self.label != "active" and (self.negatives_per_positive != 0 or self.negatives_per_context != 0):
            _fail(
                "negatives_per_positive" if self.negatives_per_positive else "negatives_per_context",
                "value labels (bins) exist only for active latents; set it to 0.",
            )
        if self.negatives_per_context < 0 or self.max_rows_per_split < 0:
            _fail(
                "negatives_per_context" if self.negatives_per_context < 0 else "max_rows_per_split",
                "must be >= 0.",
            )
        if self.top_k < 1 or self.contexts_per_row < 1:
            _fail("top_k" if self.top_k < 1 else "contexts_per_row", "must be >= 1.")
        if self.negatives_per_positive < 0:
            _fail("negatives_per_positive", "must be >= 0.")
        if not 0 <= self.hard_negative_fraction <= 1:
            _fail("hard_negative_fraction", "must be in [0, 1].")
        _require_positive(self, "frequency_bins", "contexts_per_latent")
        if self.candidates == "per_latent" and (
            self.label != "active" or self.hard_negatives == "decoder" or self.negative_sampling != "uniform"
        ):
            _fail(
                "candidates",
                "`per_latent` builds binary eval sets whose inactive contexts are drawn uniformly, or "
                "on the latent's own tokens (label: active, hard_negatives: none or same_token, "
                "negative_sampling: uniform).",
            )
        if not 2 <= self.window_min <= self.window_max:
            _fail(
                "window_min", f"need 2 <= window_min <= window_max, got {self.window_min}, {self.window_max}."
            )
        check_split_fractions(self)


@dataclass
class ImportRecordsArguments:
    """data_gen/import_records.py: records of the sae-auto-interp schema as latentsim tables."""

    records: str = field(
        default="",
        metadata={"help": "A JSON-lines file of records (schema: ../shared/external/README.md)."},
    )
    output_dir: str = field(default="", metadata={"help": "Where the imported tables are written."})
    simulator_tokenizer: str = field(
        default="embedded:smollm2-135m",
        metadata={"help": "The simulator's tokenizer: marked spans are aligned to its tokens by characters."},
    )
    held_out_fraction: float = field(
        default=0.5, metadata={"help": "Share of the scored latents held out from training (seeded)."}
    )
    seed: int = field(default=22, metadata={"help": "Seed of the latent split."})

    def __post_init__(self):
        from pathlib import Path

        if not self.records:
            _fail("records", "give the record file: --records FILE.jsonl.")
        if not Path(self.records).is_file():
            _fail("records", f"{self.records} does not exist (the shared data: ../shared/external/).")
        if not self.output_dir:
            _fail("output_dir", "give the folder to write: --output_dir DIR.")
        if not 0 < self.held_out_fraction < 1:
            _fail("held_out_fraction", f"must be in (0, 1), got {self.held_out_fraction}.")
