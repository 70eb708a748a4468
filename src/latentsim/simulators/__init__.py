"""Simulators: what they are, where they are found, and the one way they are scored.

- `spec.py`: `Simulator` (a base model + LoRA adapter, a prompted baseline, or a reference) and discovery: a
  training run's checkpoints and final adapter, Hub branches, baseline specs.
- `base.py`: `Judgment` (an eval row's fields), the `Scorer` interface (`label_logits(judgments)`), the
  registries of scorer kinds and references.
- `factory.py`: `ScorerFactory`, the one place that checks a simulator (format, chat template, held-out rows
  and latents) and constructs its scorer; `load_scorer` for a single simulator.
- The kinds: `hf.py` (`hf`: prefix-shared chat prompts; `dense`: verdicts at every token), `vllm.py` (`vllm`),
  `first_stage.py` (`first_stage`: a two-stage whole layer's first stage, a head on the simulator's states),
  `fake.py` (`fake`, for tests), `reference.py` (`prior`, `string_match`, `prior+string_match`), `lexical.py`
  (`lexical`, `lexical_gbm`: the lexical reader).

Adding a kind (docs/extending.md walks through one): write one `Scorer` subclass with `create(setup)` and
`label_logits(judgments)`, register it with `@register_scorer(name)` (a way of running simulator models,
selected by `backend`) or `@register_reference(name)` (a reference, selected by a baseline spec's
`model=<name>`), import its module here, and test it. The sweep, patching, the whole layer, generation and the
benchmarks reach it through the factory.
"""

from latentsim.simulators import (  # noqa: F401  (registers the built-in kinds)
    fake,
    first_stage,
    hf,
    lexical,
    reference,
    vllm,
)
from latentsim.simulators.base import (
    REFERENCES,
    SCORERS,
    Judgment,
    Scorer,
    ScorerSetup,
    ScoringOptions,
    judgments_of,
    probabilities,
    register_reference,
    register_scorer,
)
from latentsim.simulators.factory import (
    ScorerFactory,
    few_shot_messages,
    load_scorer,
    scorer_for_model,
    scorer_kind,
)
from latentsim.simulators.spec import (
    Simulator,
    baseline_simulator,
    final_simulator,
    model_simulator,
    run_simulators,
    simulator_tokenizer,
    simulators_to_score,
)

__all__ = [
    "REFERENCES",
    "SCORERS",
    "Judgment",
    "Scorer",
    "ScorerFactory",
    "ScorerSetup",
    "ScoringOptions",
    "Simulator",
    "baseline_simulator",
    "few_shot_messages",
    "final_simulator",
    "judgments_of",
    "load_scorer",
    "model_simulator",
    "probabilities",
    "register_reference",
    "register_scorer",
    "run_simulators",
    "scorer_for_model",
    "scorer_kind",
    "simulator_tokenizer",
    "simulators_to_score",
]
