"""The simulator spec, the scorer interface, its inputs and the registry of scorer kinds.

A scorer answers judgments: `Scorer.label_logits(judgments) -> [N, n_answers]`, the raw logits of the answer
tokens (renormalise with `probabilities`: P(yes) for a Yes/No format, a digit distribution for sim_value_v1).
A `Judgment` is an eval row's fields, never a rendered prompt: each scorer renders it through its own prompt
format (a chat prompt, a dense text, features), so no scorer parses another's rendering back.

Kinds are registered by name: `@register_scorer("hf")` for the ways a simulator model is run (hf, dense, vllm,
fake), `@register_reference("prior", ...)` for reference simulators that read no text with a language model
(selected by a baseline spec's `model=<name>`). latentsim.simulators.factory is the one place that picks a
kind and constructs it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Simulator:
    name: str  # its results folder under <output_dir>/<eval set>/
    kind: str  # `finetuned`, `baseline` (prompted), `reference` (reads nothing) or `first_stage`
    base_model: str  # model reference (Hub id, folder, embedded:...), or a reference's registered name
    adapter: str | None = None  # LoRA adapter folder (finetuned)
    shots: int = 0  # few-shot examples prepended (baselines)
    score: bool = False  # show the interpretation score in the prompt
    interpretations: str | None = None  # another interpretation set than the eval set's
    prompt_format: str | None = None  # recorded by training (finetuned)
    chat_template_sha256: str | None = None
    train_datasets: list[str] = field(default_factory=list)
    step: int | None = None
    tensor_parallel_size: int | None = (
        None  # vLLM: this base model's engine over N GPUs (default: the sweep's)
    )
    control: str | None = None  # `shuffled`/`empty`: other latents' texts or none (simulators.controls)
    first_stage: str | None = None  # kind `first_stage`: its train/first_stage.py folder

    @property
    def dense(self) -> bool:
        """Trained on a dense format (a verdict at every token)."""
        from latentsim.prompts import get_format

        return bool(self.prompt_format) and get_format(self.prompt_format).dense


@dataclass(frozen=True)
class Judgment:
    """One (context, latent) question: the context marked as `latentsim.prompts.marked_context` makes it (the
    judged token last), the interpretation to read, and the interpretation score when it is shown. `row` and
    `position` locate the judged token in the eval set's cache (the lexical reader reads the previous token
    there); None when the context is not a cache row's."""

    context: str
    interpretation: str
    score: float | None = None
    latent: int | None = None  # the latent's global id (references read its firing rate)
    row: int | None = None  # the cache row of the judged token
    position: int | None = None  # the judged token's position in that row (never 0)


def judgments_of(
    df: pd.DataFrame, interpretations: dict[int, str] | None = None, show_score: bool = False
) -> tuple[list[Judgment], np.ndarray]:
    """The judgments of eval rows and a mask of the rows kept: `interpretations` (another set than the rows'
    own) may lack some latents, whose rows are dropped. Rows with `row`/`position` columns (every eval set's)
    carry them into the judgments."""
    judgments, keep = [], np.ones(len(df), dtype=bool)
    located = {"row", "position"} <= set(df.columns)
    for i, row in enumerate(df.itertuples(index=False)):
        text = row.interpretation if interpretations is None else interpretations.get(int(row.latent))
        if text is None:
            keep[i] = False
            continue
        judgments.append(
            Judgment(
                row.context,
                text,
                row.score if show_score else None,
                int(row.latent),
                int(row.row) if located else None,
                int(row.position) if located else None,
            )
        )
    return judgments, keep


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the answers only (renormalised over the label tokens): the last axis; a row of NaN (an
    unaligned token) stays NaN."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class ScoringOptions:
    """How simulators are run: the keys of EvalArguments (and the other stages' arguments) that scorers
    read."""

    backend: str = "hf"  # hf | vllm | fake; references ignore it
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    merge_adapter: bool = (
        False  # hf: merge the LoRA into the base weights (faster; the base is then not reused)
    )
    fit_split: str | None = None  # references: the eval set split they are fitted on (default `train`)
    max_lora_rank: int = 64  # vllm engine keys
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 4096
    tensor_parallel_size: int = 1

    @classmethod
    def from_args(cls, args: Any, **overrides) -> ScoringOptions:
        """The options a stage's arguments carry (missing keys keep their defaults)."""
        names = cls.__dataclass_fields__
        values = {k: getattr(args, k) for k in names if hasattr(args, k)}
        if getattr(args, "calibration_split", None):
            values["fit_split"] = args.calibration_split
        return cls(**{**values, **overrides})


@dataclass
class ScorerSetup:
    """Everything the factory resolved and checked for one simulator before a scorer is built."""

    sim: Simulator
    eval_format: str  # the per-judgment format of the judgments (sim_v1, sim_value_v1)
    answer_format: str  # the format whose answer tokens are read (a dense simulator's own)
    tokenizer: Any  # the simulator's tokenizer (None for references)
    answer_ids: list[int] | None
    prefix: list[dict]  # few-shot turns before every judgment's prompt
    interpretations: dict[int, str] | None  # the simulator's own interpretation set, when not the eval set's
    options: ScoringOptions
    factory: Any  # the latentsim.simulators.factory.ScorerFactory that prepared it (shared models live there)
    eval_set: Any = None  # latentsim.eval_set.EvalSet, for references (fitted on one of its splits)
    chat_template_sha256: str | None = None
    control: dict | None = None  # what a control changed (latentsim.simulators.controls), for results.json


class Scorer(ABC):
    """A way of answering judgments. Subclasses implement `create` and `label_logits`; `kind` is set by
    registration."""

    kind: str = ""
    answer_ids: list[int]

    def __init__(self):
        self.stats = {"judgments": 0, "prompt_tokens": 0, "computed_tokens": 0}

    @classmethod
    @abstractmethod
    def create(cls, setup: ScorerSetup) -> Scorer:
        """Build the scorer of a resolved simulator (load its model, fit it, start an engine...)."""

    @abstractmethod
    def label_logits(self, judgments: list[Judgment], progress=None) -> np.ndarray:
        """[N, n_answers] answer logits, deterministic; `progress` (tqdm) advances by judgments scored."""

    def release(self) -> None:
        """Give back what `create` took that another simulator may reuse (an attached adapter...)."""
        return None

    def describe(self) -> dict | None:
        """What a results.json records about this scorer beyond the simulator spec (a fitted reference's
        weights), or None."""
        return None


SCORERS: dict[str, type[Scorer]] = {}
REFERENCES: dict[str, type[Scorer]] = {}


def register_scorer(name: str):
    """Register a way of running simulator models under `name` (EvalArguments.backend, or `dense`)."""

    def register(cls: type[Scorer]) -> type[Scorer]:
        SCORERS[name] = cls
        cls.kind = name
        return cls

    return register


def register_reference(*names: str):
    """Register a reference simulator (reads no text with a language model) under each of `names`: a baseline
    spec `model=<name>` selects it."""

    def register(cls: type[Scorer]) -> type[Scorer]:
        for name in names:
            REFERENCES[name] = cls
        cls.kind = "reference"
        return cls

    return register
