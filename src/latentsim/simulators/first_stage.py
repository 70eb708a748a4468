"""`first_stage`: the first stage of a two-stage whole layer (latentsim.first_stage) scored as a simulator.

A train/first_stage.py output folder listed in a sweep's `run_dirs` is this kind. Each judgment's context is
read alone by the dense simulator's model (one pass, the vector at the simulator token that ends where the
judged token does), its interpretation's dense header alone (one pass per distinct interpretation), and the
trained bilinear head scores the pair with the latent's log firing rate (the eval set's training-row
statistics, as in training): logits [0, score], so P(yes) = sigmoid(score). It is held to what its simulator
trained on (the same held-out checks), and refused for another simulator's model.
"""

from __future__ import annotations

import numpy as np
import torch

from latentsim.errors import BadInputError
from latentsim.prompts import unmark_context
from latentsim.simulators.base import Judgment, Scorer, ScorerSetup, register_scorer

KIND = "first_stage"


@register_scorer(KIND)
class FirstStageScorer(Scorer):
    def __init__(self, head, encoder, statistics: dict, answer_ids: list[int] | None = None):
        super().__init__()
        self.head, self.encoder, self.statistics = head, encoder, statistics
        self.answer_ids = answer_ids or []

    @classmethod
    def create(cls, setup: ScorerSetup) -> FirstStageScorer:
        from latentsim import first_stage

        sim = setup.sim
        if setup.prefix:
            raise BadInputError(f"{sim.name}: a first stage reads one judgment at a time (no few-shot).")
        if setup.eval_set is None:
            raise BadInputError(f"{sim.name}: a first stage reads the eval set's firing rates; give it one.")
        head, record = first_stage.load_head(sim.first_stage)
        first_stage.require_trained_for(record, sim, setup.options.dtype, sim.first_stage)
        encoder = first_stage.Encoder(
            setup.factory.simulator_model(sim),
            setup.tokenizer,
            sim.prompt_format,
            record["identity"]["layer"],
            setup.options.batch_size,
        )
        scorer = cls(head, encoder, setup.eval_set.statistics, setup.answer_ids)
        scorer.setup = setup
        return scorer

    @torch.no_grad()
    def label_logits(self, judgments: list[Judgment], progress=None) -> np.ndarray:
        from latentsim.first_stage import log_firing_rate

        texts: dict[str, int] = {}  # each distinct text (the judged token last) once
        interpretations: dict[str, int] = {}
        at_text = []
        for j in judgments:
            if j.score is not None:
                raise BadInputError("a first stage reads no interpretation scores; score it without them.")
            if j.latent is None:
                raise BadInputError("a first stage reads each latent's firing rate: judgments need a latent.")
            prefix, judged = unmark_context(j.context)
            at_text.append(texts.setdefault(prefix + judged, len(texts)))
            interpretations.setdefault(j.interpretation.strip(), len(interpretations))
        listed = list(texts)
        vectors = []
        for a in range(0, len(listed), self.encoder.batch_size):
            chunk = listed[a : a + self.encoder.batch_size]
            for text, (vec, aligned) in zip(
                chunk, self.encoder.token_vectors([(t, [len(t)]) for t in chunk]), strict=True
            ):
                if not aligned[0]:
                    raise BadInputError(
                        f"no simulator token ends where the judged token does in {text[-40:]!r}; the first "
                        "stage cannot read this judgment."
                    )
                vectors.append(vec[0])
        headers = self.encoder.interpretation_vectors(list(interpretations))
        side = self.head.latent_side(torch.from_numpy(headers))
        at_interpretation = [interpretations[j.interpretation.strip()] for j in judgments]
        log_rate = log_firing_rate(self.statistics, [j.latent for j in judgments])
        scores = self.head.pair_scores(
            torch.from_numpy(np.stack(vectors)[at_text]), side[at_interpretation], torch.from_numpy(log_rate)
        )
        self.stats["judgments"] += len(judgments)
        if progress is not None:
            progress.update(len(judgments))
        return np.stack([np.zeros(len(judgments)), scores.numpy()], axis=1).astype(np.float32)
