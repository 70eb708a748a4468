"""bench/ arguments: sizes of the benchmarks `./launch.sh bench` runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentsim.config.common import _fail, _require_positive, hookpoint_layer


@dataclass
class BenchArguments:
    """bench/run_all.py: every benchmark against its naive way, in one run."""

    model: str = field(default="embedded:smollm2-135m", metadata={"help": "The subject model benchmarked."})
    hookpoint: str = field(
        default="layers.15", metadata={"help": "Residual stream after layer N (`layers.N`)."}
    )
    sae_path: str = field(
        default="outputs/quickstart/sae",
        metadata={"help": "An SAE of this hookpoint (a random TopK SAE of its shape if missing)."},
    )
    rows: int = field(default=32, metadata={"help": "Caching: corpus rows."})
    ctx_len: int = field(default=128, metadata={"help": "Caching and SFT: tokens per row."})
    batch_size: int = field(default=16, metadata={"help": "Caching: rows per forward pass."})
    wide_d_sae: int = field(default=32768, metadata={"help": "Caching: width of the second (random) SAE."})
    shallow_layer: int = field(default=7, metadata={"help": "Caching: a shallower hook layer."})
    eval_set: str = field(
        default="outputs/quickstart/datasets/eval_quantiles",
        metadata={"help": "Scoring: the eval set whose judgments are scored."},
    )
    score_contexts: int = field(default=4, metadata={"help": "Scoring: contexts."})
    score_latents: int = field(default=32, metadata={"help": "Scoring: latents per context at most."})
    patch_rows: int = field(default=4, metadata={"help": "Patched KL: contexts."})
    patch_len: int = field(default=64, metadata={"help": "Patched KL: tokens per context."})
    patch_variants: int = field(default=8, metadata={"help": "Patched KL: latent variants per context."})
    whole_layer_latents: int = field(
        default=64,
        metadata={
            "help": "Whole-layer judging: latents (of one header length, as batches are in a whole run)."
        },
    )
    whole_layer_tokens: int = field(default=64, metadata={"help": "Whole-layer judging: tokens of the text."})
    whole_layer_sim_v1_positions: int = field(
        default=4, metadata={"help": "Whole-layer judging: tokens the per-judgment variants judge."}
    )
    output: str = field(default="outputs/bench/results.json", metadata={"help": "Where the results go."})

    def __post_init__(self):
        hookpoint_layer(self.hookpoint)
        _require_positive(
            self,
            "rows",
            "ctx_len",
            "batch_size",
            "wide_d_sae",
            "score_contexts",
            "score_latents",
            "patch_rows",
            "patch_len",
            "patch_variants",
            "whole_layer_latents",
            "whole_layer_tokens",
            "whole_layer_sim_v1_positions",
        )


@dataclass
class GpuCheckArguments:
    """bench/gpu_check.py: the GPU paths (vLLM, bf16, ZeRO-3, a base-model switch) run for real on one GPU."""

    dry_run: bool = field(
        default=False, metadata={"help": "Print the steps and what is checked; run nothing."}
    )
    output_dir: str = field(
        default="outputs/gpu_check", metadata={"help": "Where every step writes, and results.json."}
    )
    step_timeout_s: int = field(
        default=900,
        metadata={
            "help": "Seconds a step may run (a hung engine or collective ends its step, not the check)."
        },
    )

    def __post_init__(self):
        if self.step_timeout_s < 1:
            _fail("step_timeout_s", f"must be >= 1, got {self.step_timeout_s}.")


@dataclass
class GpuOfflineArguments:
    """bench/gpu_offline.py: the offline GPU check (bench/gpu_check.sh --offline BUNDLE), its bundle and its
    CPU rehearsal."""

    bundle: str = field(
        default="",
        metadata={"help": "The bundle folder (./launch.sh gpu_check --bundle DIR) the check reads."},
    )
    output_dir: str = field(
        default="outputs/gpu_check_offline",
        metadata={"help": "Where results.json, logs/<step>.log and steps/<step>.json go."},
    )
    budget_s: float = field(
        default=360.0, metadata={"help": "Seconds for all steps; a step that would not fit is not run."}
    )
    bf16_peak_tflops: float = field(
        default=0.0,
        metadata={"help": "The card's dense bf16 peak for MFU (0: from the device name, e.g. H200 989.4)."},
    )
    build_bundle: str = field(
        default="", metadata={"help": "Build the bundle into this folder here (CPU, package index) and stop."}
    )
    rehearse: bool = field(
        default=False,
        metadata={
            "help": "On CPU: build the bundle, a fresh venv like the GPU image, run the check offline."
        },
    )
    step: str = field(
        default="", metadata={"help": "Run this one step in this process (the runner's child)."}
    )

    def __post_init__(self):
        _require_positive(self, "budget_s")
        if self.bf16_peak_tflops < 0:
            _fail("bf16_peak_tflops", f"must be >= 0 (0: from the device name), got {self.bf16_peak_tflops}.")
        if not (self.bundle or self.build_bundle or self.rehearse):
            _fail("bundle", "name the bundle folder (or --build_bundle DIR, or --rehearse true).")


@dataclass
class ScaleArguments:
    """bench/scale.py: the cache readers on synthetic caches of the seed's shape, at growing sizes."""

    sizes: list[int] = field(
        default_factory=lambda: [1_000_000, 3_000_000, 10_000_000],
        metadata={"help": "Cache sizes in tokens, one synthetic cache each."},
    )
    width: int = field(default=131072, metadata={"help": "SAE latents (the seed's Gemma Scope width)."})
    l0: int = field(
        default=50, metadata={"help": "Latents drawn per token (duplicates merged: L0 a little lower)."}
    )
    n_splits: int = field(default=5, metadata={"help": "delphi split files."})
    ctx_len: int = field(default=256, metadata={"help": "Tokens per cache row."})
    explain_latents: int = field(
        default=1000, metadata={"help": "Latents whose examples are sampled and explained."}
    )
    max_rows_per_split: int = field(default=2048, metadata={"help": "Dataset and eval set: rows per split."})
    keep_caches: bool = field(
        default=False, metadata={"help": "Keep each synthetic cache (~0.4 GB per 1M tokens)."}
    )
    output_dir: str = field(
        default="outputs/bench/scale", metadata={"help": "results.json and one folder per size."}
    )
    seed: int = field(
        default=0, metadata={"help": "Recorded in the provenance (the caches use their own seed)."}
    )

    def __post_init__(self):
        _require_positive(self, "width", "l0", "n_splits", "ctx_len", "explain_latents", "max_rows_per_split")
        if not self.sizes or min(self.sizes) < self.ctx_len:
            _fail("sizes", f"each size must be at least ctx_len ({self.ctx_len}) tokens.")


@dataclass
class TwoStageBenchArguments:
    """bench/two_stage.py: seconds per text of the whole layer judged both ways against dictionary size, and
    the cost model of a 131k dictionary with an 8B simulator on one H200."""

    model: str = field(default="embedded:smollm2-135m", metadata={"help": "The simulator's model."})
    eval_set: str = field(
        default="outputs/quickstart/datasets/eval_quantiles",
        metadata={"help": "Its interpretations (synthetic ones when missing); timing only."},
    )
    sizes: list[int] = field(default_factory=lambda: [2048, 8192, 32768], metadata={"help": "Dictionaries."})
    k: int = field(default=32, metadata={"help": "Latents proposed per token."})
    tokens: int = field(default=64, metadata={"help": "Tokens of the text."})
    sample_latents: int = field(default=64, metadata={"help": "Proposed latents judged for real per size."})
    batch_size: int = field(default=64, metadata={"help": "Latents per forward pass."})
    target_parameters: float = field(
        default=6.98e9,
        metadata={"help": "Cost model: the simulator's non-embedding parameters (Llama-3.1-8B)."},
    )
    target_latents: int = field(default=131072, metadata={"help": "Cost model: the dictionary (the seed's)."})
    target_tflops: float = field(
        default=989.0, metadata={"help": "Cost model: the GPU's dense bf16 TFLOP/s (H200 SXM) at full use."}
    )
    output: str = field(default="outputs/bench/two_stage.json", metadata={"help": "Where the results go."})

    def __post_init__(self):
        _require_positive(self, "k", "tokens", "sample_latents", "batch_size", "target_latents")
        if not self.sizes or min(self.sizes) < 1:
            _fail("sizes", f"{self.sizes}: give dictionary sizes >= 1.")
        if self.target_parameters <= 0 or self.target_tflops <= 0:
            _fail("target_parameters", "the cost model's parameters and TFLOP/s must be > 0.")
