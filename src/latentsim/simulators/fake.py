"""A fake simulator for tests (`backend: fake`): deterministic logits from a hash of each judgment's
prompt."""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from latentsim.prompts import render_prompt
from latentsim.simulators.base import Judgment, Scorer, ScorerSetup, register_scorer


@register_scorer("fake")
class FakeScorer(Scorer):
    """Logits from `fn(messages) -> list[float]` of each judgment's chat prompt (few-shot turns included); by
    default a hash of its text. Loads no model."""

    def __init__(
        self,
        answer_ids: list[int],
        fn: Callable[[list[dict]], list[float]] | None = None,
        fmt: str = "sim_v1",
        prefix: list[dict] | None = None,
    ):
        super().__init__()
        self.answer_ids, self.fmt, self.prefix = list(answer_ids), fmt, list(prefix or [])
        self.fn = fn or (
            lambda m: [
                ((zlib.crc32(f"{m}|{k}".encode()) % 2000) - 1000) / 250 for k in range(len(answer_ids))
            ]
        )
        self.calls = 0

    @classmethod
    def create(cls, setup: ScorerSetup) -> FakeScorer:
        return cls(setup.answer_ids, fmt=setup.eval_format, prefix=setup.prefix)

    def label_logits(self, judgments: list[Judgment], progress=None) -> np.ndarray:
        self.calls += len(judgments)
        if progress is not None:
            progress.update(len(judgments))
        prompts = [
            self.prefix + render_prompt(self.fmt, j.context, j.interpretation, j.score) for j in judgments
        ]
        return np.array([self.fn(m) for m in prompts], dtype=np.float32).reshape(
            len(prompts), len(self.answer_ids)
        )
