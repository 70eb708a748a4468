"""train/ arguments: the simulator-specific switches of train/sft.py (beside TRL's SFTConfig and ModelConfig),
train/first_stage.py and train/publish.py."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from trl import ScriptArguments

from latentsim.config.common import (
    RunArguments,
    _fail,
    _require_positive,
    check_dtype_device,
    device_field,
    dtype_field,
)


@dataclass
class SimScriptArguments(ScriptArguments):
    """train/sft.py: the dataset (a build_dataset folder or a Hub dataset) and the simulator-specific
    switches."""

    prompt_format: str = field(
        default="sim_v1", metadata={"help": "Must match the dataset's `prompt_format` column."}
    )
    extra_datasets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More build_dataset folders whose train "
            "splits are mixed in (validation: the first dataset's)."
        },
    )
    dataset_weights: list[float] = field(
        default_factory=list,
        metadata={"help": "Sampling weight of dataset_name and each extra dataset (default: equal)."},
    )
    max_eval_samples: int = field(
        default=512, metadata={"help": "Validation rows scored during training (0: all)."}
    )
    resume: str = field(
        default="auto",
        metadata={
            "help": "`auto` (last complete checkpoint in output_dir, if any), "
            "`never`, or a checkpoint-N path (an error if incomplete)."
        },
    )
    nan_patience: int = field(
        default=0,
        metadata={"help": "Logged steps with a non-finite loss/grad norm tolerated before training stops."},
    )

    def __post_init__(self):
        from latentsim.prompts import PROMPT_FORMATS

        if not self.dataset_name:
            _fail("dataset_name", "give a build_dataset output folder or a Hub dataset id.")
        if self.prompt_format not in PROMPT_FORMATS:
            _fail("prompt_format", f"{self.prompt_format!r} is not one of {sorted(PROMPT_FORMATS)}.")
        if self.dataset_weights and len(self.dataset_weights) != 1 + len(self.extra_datasets):
            _fail(
                "dataset_weights",
                f"{len(self.dataset_weights)} weights for {1 + len(self.extra_datasets)} datasets "
                "(dataset_name + extra_datasets).",
            )
        if any(w <= 0 for w in self.dataset_weights):
            _fail("dataset_weights", "weights must be > 0.")
        if self.max_eval_samples < 0 or self.nan_patience < 0:
            _fail("max_eval_samples" if self.max_eval_samples < 0 else "nan_patience", "must be >= 0.")


@dataclass
class PublishArguments:
    """train/publish.py: publish a run folder or one of its checkpoints as a PEFT adapter repo."""

    run_dir: str = field(default="outputs/sft/run", metadata={"help": "The train/sft.py output_dir."})
    checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "`checkpoint-N` inside run_dir: published to "
            "branch step-<N, 9 digits>; default: the final adapter on main."
        },
    )
    repo_id: str = field(default="", metadata={"help": "Hub repo `<org>/<name>`."})
    sweep_dir: str | None = field(
        default=None,
        metadata={
            "help": "An eval/sweep.py output_dir: the card shows the "
            "held-out results it holds for this adapter."
        },
    )
    private: bool = field(default=True, metadata={"help": "Create the repo as private."})
    dry_run: bool = field(
        default=False, metadata={"help": "Write the exact folder and planned operations; no network."}
    )

    def __post_init__(self):
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", self.repo_id or ""):
            _fail("repo_id", f"{self.repo_id!r} is not `<org>/<name>`.")
        if self.checkpoint is not None and not re.fullmatch(r"checkpoint-\d+", self.checkpoint):
            _fail("checkpoint", f"{self.checkpoint!r} is not `checkpoint-N`.")


@dataclass
class FirstStageArguments(RunArguments):
    """train/first_stage.py: the two-stage whole layer's first stage (latentsim.first_stage) for one dense
    simulator, trained on the rows and latents the simulator trained on, its k chosen on validation texts."""

    eval_set: str = field(
        default="",
        metadata={"help": "A binary eval set on the simulator's cache: statistics, interpretations, splits."},
    )
    simulator: str = field(default="", metadata={"help": "A train/sft.py run folder of a dense simulator."})
    layer: int = field(
        default=-1, metadata={"help": "The hidden states read (-1: the last, after the final norm)."}
    )
    rank: int = field(default=64, metadata={"help": "The bilinear head's rank."})
    epochs: int = field(default=4, metadata={"help": "Passes over the training tokens."})
    learning_rate: float = field(default=1.0e-3, metadata={"help": "Adam's learning rate."})
    batch_tokens: int = field(default=256, metadata={"help": "Training tokens per step (x every latent)."})
    max_train_rows: int = field(
        default=0, metadata={"help": "Training rows encoded (seeded sample; 0: every one)."}
    )
    validation_texts: int = field(
        default=16, metadata={"help": "The eval set's validation rows on which k is chosen."}
    )
    tokens: int = field(default=64, metadata={"help": "Positions 1..tokens of each validation text."})
    recall_target: float = field(
        default=0.9,
        metadata={"help": "k: the smallest top-k holding this share of the truly active pairs (validation)."},
    )
    batch_size: int = field(default=16, metadata={"help": "Texts or headers per forward pass."})
    merge_adapter: bool = field(default=True, metadata={"help": "Merge the LoRA into the base (faster)."})
    dtype: str = dtype_field()
    device: str = device_field()
    output_dir: str = field(default="outputs/first_stage", metadata={"help": "The head and its record here."})

    def __post_init__(self):
        if not self.eval_set:
            _fail("eval_set", "give a build_dataset eval set on the simulator's cache.")
        if not self.simulator:
            _fail("simulator", "give the train/sft.py run folder of a dense simulator.")
        if not 0 < self.recall_target <= 1:
            _fail("recall_target", f"{self.recall_target} is not in (0, 1].")
        if self.max_train_rows < 0:
            _fail("max_train_rows", "must be >= 0 (0: every training row).")
        if self.learning_rate <= 0:
            _fail("learning_rate", "must be > 0.")
        _require_positive(self, "rank", "epochs", "batch_tokens", "validation_texts", "tokens", "batch_size")
        check_dtype_device(self)
