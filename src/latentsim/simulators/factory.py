"""The one place that turns a simulator spec into a scorer, with every check a simulator must pass.

    factory = ScorerFactory(ScoringOptions.from_args(args))
    # checks, no model
    setup = factory.prepare(sim, eval_set.prompt_format, eval_set=eval_set, seed=args.seed)
    scorer = factory.load(setup)                # the registered kind's `create`
    logits = scorer.label_logits(judgments)     # latentsim.simulators.base.Judgment
    factory.release(scorer)

`prepare` refuses, before any model loads: an unknown reference, a kind the backend cannot run (a dense
simulator under vLLM), a finetuned simulator trained on another prompt format or chat template than the one it
is scored in, and (given the eval rows) eval rows or latents it trained on (latentsim.held_out). The factory
keeps one base model (or vLLM engine) at a time across simulators: finetuned adapters attach unmerged and
detach again on `release`. Under a multi-process launch (latentsim.distributed.Ranks) each rank loads its own:
hf on its own GPU, vLLM on its own `gpus_per_rank` GPUs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from latentsim.errors import BadInputError, ConfigError
from latentsim.prompts import (
    answer_token_ids,
    chat_template_sha256,
    get_format,
    render_completion,
    render_prompt,
)
from latentsim.simulators.base import REFERENCES, SCORERS, Scorer, ScorerSetup, ScoringOptions
from latentsim.simulators.spec import Simulator, model_simulator, simulator_tokenizer

# Kinds trained on a mixture: held to its prompt format and to its held-out rows and latents.
TRAINED = ("finetuned", "first_stage")


def scorer_kind(sim: Simulator, backend: str) -> str:
    """The registered kind that runs `sim` under `backend`: a reference by its name, a first stage as
    `first_stage` (whatever the backend: a head on the model's hidden states), else the backend (`hf` becomes
    `dense` for a simulator trained on a dense format)."""
    if sim.kind in ("reference", "first_stage"):
        return sim.base_model if sim.kind == "reference" else sim.kind
    if backend == "hf" and sim.dense:
        return "dense"
    return backend


class ScorerFactory:
    def __init__(self, options: ScoringOptions | None = None, ranks=None, gpus_per_rank: int | None = None):
        self.options = options or ScoringOptions()
        self.ranks, self.gpus_per_rank = ranks, gpus_per_rank
        self._shared: tuple[Any, Any, Callable | None] | None = None  # (key, resource, close)

    # -- checks and resolution (no model loads) --
    def check(self, sim: Simulator, eval_format: str) -> None:
        """The checks that need nothing but the spec: its kind exists and runs here, its format judges like
        the eval's."""
        kind = scorer_kind(sim, self.options.backend)
        if sim.kind == "reference":
            if kind not in REFERENCES:
                raise ConfigError(f"{sim.name}: no reference named {kind!r}; known: {sorted(REFERENCES)}.")
            return
        if kind not in SCORERS:
            raise ConfigError(f"config key `backend`: unknown backend {kind!r}; known: {sorted(SCORERS)}.")
        if sim.dense and self.options.backend == "vllm" and sim.kind != "first_stage":
            raise ConfigError(
                f"{sim.name}: dense simulators are scored with backend: hf (the vLLM backend reads a chat "
                "prompt's next token, not a verdict at a text position)."
            )
        if sim.kind in TRAINED and get_format(sim.prompt_format).judgment_format != eval_format:
            judged = get_format(sim.prompt_format).judgment_format
            raise BadInputError(
                f"{sim.name}: trained on prompt format {sim.prompt_format!r}, "
                f"the eval set is {eval_format!r}; "
                f"build an eval set with prompt_format: {judged}."
            )

    def prepare(
        self,
        sim: Simulator,
        eval_format: str,
        *,
        eval_set=None,
        seed: int = 0,
        frames: dict | None = None,
        allow_seen_latents: bool = False,
    ) -> ScorerSetup:
        """Resolve and check `sim` for judgments in `eval_format`: its tokenizer (chat template checked
        against training's), answer tokens, few-shot turns and interpretation set (both from `eval_set`).
        `frames` ({split: eval rows}) are checked against what a finetuned simulator trained on. Under a
        control (`sim.control`) its judgments (and a reference's fit) read the control's texts, seeded by
        `seed`; few-shot examples keep their real ones (they show the task, not the judged latent)."""
        self.check(sim, eval_format)
        real = eval_set.interpretations(sim.interpretations) if sim.interpretations else None
        interpretations, control = real, None
        if sim.control:
            from latentsim.simulators.controls import control_interpretations

            interpretations, control = control_interpretations(sim.control, eval_set, seed, real)
        if sim.kind in TRAINED and frames is not None:
            from latentsim.held_out import refuse_seen

            refuse_seen(sim, eval_set, frames, allow_seen_latents)
        common = dict(
            sim=sim,
            eval_format=eval_format,
            interpretations=interpretations,
            options=self.options,
            factory=self,
            eval_set=eval_set,
            control=control,
        )
        if sim.kind == "reference":
            return ScorerSetup(
                answer_format=eval_format, tokenizer=None, answer_ids=None, prefix=[], **common
            )
        tokenizer = simulator_tokenizer(sim)
        sha = chat_template_sha256(tokenizer)
        if sim.chat_template_sha256 and sim.chat_template_sha256 != sha:
            raise BadInputError(
                f"{sim.name}: the chat template (sha256 {sha[:12]}) differs from the one it was trained with "
                f"({sim.chat_template_sha256[:12]}); scoring would use another prompt than training."
            )
        answer_format = sim.prompt_format if sim.dense else eval_format
        prefix = few_shot_messages(eval_set, sim.shots, seed, real, sim.score) if sim.shots else []
        return ScorerSetup(
            answer_format=answer_format,
            tokenizer=tokenizer,
            answer_ids=answer_token_ids(answer_format, tokenizer),
            prefix=prefix,
            chat_template_sha256=sha,
            **common,
        )

    def load(self, setup: ScorerSetup) -> Scorer:
        """The scorer of a prepared simulator: the registered kind's `create`."""
        kind = scorer_kind(setup.sim, self.options.backend)
        cls = REFERENCES[kind] if setup.sim.kind == "reference" else SCORERS[kind]
        return cls.create(setup)

    def release(self, scorer: Scorer) -> None:
        scorer.release()

    # -- models shared across simulators --
    def shared(self, key, build: Callable[[], Any], close: Callable[[Any], None] | None = None):
        """The one shared resource (a base model, a vLLM engine) for `key`, built when the key changes; the
        previous one is closed (or dropped) first, so two never coexist."""
        if self._shared is not None and self._shared[0] == key:
            return self._shared[1]
        if self._shared is not None:
            _, old, old_close = self._shared
            self._shared = None
            if old_close is not None:
                old_close(old)
            del old
        resource = build()
        self._shared = (key, resource, close)
        return resource

    def base_model(self, ref: str):
        """The base model `ref` in the options' dtype, on this rank's device."""
        from latentsim.models import load_model_and_tokenizer

        device = self.ranks.device(self.options.device) if self.ranks else self.options.device
        return self.shared(
            ("hf", ref), lambda: load_model_and_tokenizer(ref, dtype=self.options.dtype, device=device)[0]
        )

    def simulator_model(self, sim: Simulator):
        """The simulator's model: its base model with its LoRA adapter attached (unmerged, or merged into the
        weights when `merge_adapter`: that base copy is then not reused)."""
        model = self.base_model(sim.base_model)
        if not sim.adapter:
            return model
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, sim.adapter).eval()  # LoRA layers stay unmerged
        if self.options.merge_adapter:
            self._shared = None  # its weights now hold the adapter
            model = model.merge_and_unload()
        return model

    def detach_adapter(self, model) -> None:
        """Remove an attached adapter's LoRA layers, keeping the shared base weights untouched."""
        if hasattr(model, "unload") and self._shared is not None and self._shared[0][0] == "hf":
            key, _, close = self._shared
            self._shared = (key, model.unload(), close)


def few_shot_messages(eval_set, shots: int, seed: int, interpretations, score: bool) -> list[dict]:
    """`shots` solved examples from the eval set's train split (other latents than the test split in `latents`
    mode), half positive for binary formats, as user/assistant turns in the same format."""
    import pandas as pd

    if not shots:
        return []
    fmt, label = eval_set.prompt_format, eval_set.label
    train = pd.read_parquet(eval_set.path / "train.parquet")
    rng = np.random.default_rng(seed)
    if eval_set.binary:
        pos, neg = train[train["active"] == 1], train[train["active"] == 0]
        n_pos = min(len(pos), (shots + 1) // 2)
        picks = pd.concat(
            [
                pos.iloc[rng.choice(len(pos), n_pos, replace=False)],
                neg.iloc[rng.choice(len(neg), min(len(neg), shots - n_pos), replace=False)],
            ]
        )
    else:
        picks = train.iloc[rng.choice(len(train), min(shots, len(train)), replace=False)]
    picks = picks.iloc[rng.permutation(len(picks))]
    messages = []
    for _, row in picks.iterrows():
        interp = row["interpretation"]
        if interpretations:
            interp = interpretations.get(int(row["latent"]), interp)
        messages += render_prompt(fmt, row["context"], interp, row["score"] if score else None)
        messages += render_completion(fmt, int(row[label]))  # label: the eval set's `active` or bin column
    return messages


def load_scorer(ref: str | Simulator, eval_format: str, options: ScoringOptions) -> tuple[Scorer, str]:
    """One simulator's scorer outside a sweep: a train/sft.py run folder (its final adapter, its own
    tokenizer, checked against `eval_format`), an untuned model reference, or a Simulator. Returns (scorer,
    name)."""
    sim = ref if isinstance(ref, Simulator) else model_simulator(ref)
    factory = ScorerFactory(options)
    return factory.load(factory.prepare(sim, eval_format)), sim.name


def scorer_for_model(model, tokenizer, fmt: str, answer_ids: list[int], batch_size: int = 32) -> Scorer:
    """The hf scorer of a model already in memory (training's eval, the benchmarks), trained on or prompted in
    `fmt`: `dense` for a dense format, else `hf` (chat prompts in `fmt`)."""
    if get_format(fmt).dense:
        return SCORERS["dense"](model, tokenizer, answer_ids, batch_size, fmt)
    return SCORERS["hf"](model, tokenizer, answer_ids, batch_size, fmt)
