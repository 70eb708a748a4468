"""Baselines that read nothing a simulator should need: how far a latent's frequency and a string match go.

A per-context AUC can be high without reading the context: at a token the active latents are mostly frequent
ones and uniformly drawn negatives mostly rare ones. These reference baselines put a number on that, scored by
eval/sweep.py like any simulator (same predictions files, metrics, report and patched-KL rows):

- `prior`: the latent's firing rate in the cache (reads neither the interpretation nor the context);
- `string_match`: is the judged token one the interpretation names (a token-list interpretation's tokens,
  not its `often after` tokens nor its contexts; for free text, its words)? Reads the interpretation and the
  judged token only;
- `prior+string_match`: both;
- `lexical`, `lexical_gbm` (latentsim.simulators.lexical): the lexical reader, every cue a token-list
  interpretation gives (the named tokens' ranks, the `often after` tokens against the previous token, the
  quoted contexts against the context's tail) and the prior, read by a logistic regression or gradient-boosted
  trees fitted on the train split: the strongest reference that reads the simulator's cues without a language
  model.

Each of the first three is a logistic regression on its features (log firing rate, match), fitted on the
eval set's calibration split (eval/sweep.py: `validation`, held-out latents of other rows than the test
split's), so its P(yes) is calibrated like a simulator's and its thresholded metrics mean something. Logits
are written as [0, z]: P(yes) = sigmoid(z). `FeatureReference` is the registered scorer (docs/extending.md
adds another reference); `text_p_yes` judges every latent at every position of a text (the whole layer's
dense API).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from latentsim.prompts import marked_context, unmark_context
from latentsim.simulators.base import Judgment, Scorer, ScorerSetup, probabilities, register_reference
from latentsim.token_list import parse_token_list

REFERENCE_FEATURES = {
    "prior": ("log_firing_rate",),
    "string_match": ("string_match",),
    "prior+string_match": ("log_firing_rate", "string_match"),
}
FIRING_RATE_FLOOR = 1e-7  # log of a latent that never fired in the cache


def normalise_token(text: str) -> str:
    """Case and surrounding space do not matter (`" No"` names `no`); an all-space token stays itself."""
    return text.strip().casefold() or text.casefold()


def named_tokens(interpretation: str) -> set[str]:
    """The tokens an interpretation names as those the latent fires on: a token-list interpretation's
    tokens (`the token " not" (also " no", "No")`; not its `often after` tokens nor its quoted contexts:
    latentsim.token_list), else the words of the text; normalised."""
    parsed = parse_token_list(interpretation)
    names = parsed.tokens if parsed else re.findall(r"\w+", interpretation)
    return {normalise_token(n) for n in names if n}


def judged_token(context: str) -> str:
    """The judged (marked, last) token of a context rendered by latentsim.prompts.marked_context."""
    return unmark_context(context)[1]


def text_judgments(latents: list[int], interpretations: list[str], ids, tokenizer) -> list[Judgment]:
    """Every latent judged at every position 1..n of a text of subject token ids `ids` (BOS at index 0, length
    n + 1), position-major: the context at position p is the text of tokens 1..p, token p judged (decoded
    with `tokenizer`, the subject model's, as the eval sets decode their windows)."""
    ids = np.asarray(ids).reshape(-1).tolist()
    pairs = list(zip(latents, interpretations, strict=True))
    judgments = []
    for p in range(1, len(ids)):
        context = marked_context(tokenizer.decode(ids[1:p]), tokenizer.decode(ids[p : p + 1]))
        judgments += [Judgment(context, text, latent=int(latent)) for latent, text in pairs]
    return judgments


def features(
    df: pd.DataFrame, firing_rate: np.ndarray, interpretations: dict[int, str] | None = None
) -> pd.DataFrame:
    """Per judgment: log firing rate of the latent and whether the interpretation names the judged token
    (`interpretations` overrides the rows' own interpretation texts)."""
    texts = (
        df["interpretation"]
        if interpretations is None
        else df["latent"].map(lambda lat: interpretations.get(int(lat), ""))
    )
    names = {
        t: named_tokens(t) for t in set(texts)
    }  # a latent's interpretation recurs in every context it is judged in
    match = [normalise_token(judged_token(c)) in names[t] for c, t in zip(df["context"], texts, strict=True)]
    rate = np.maximum(firing_rate[df["latent"].to_numpy()], FIRING_RATE_FLOOR)
    return pd.DataFrame(
        {"log_firing_rate": np.log(rate), "string_match": np.asarray(match, dtype=float)}, index=df.index
    )


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-4, iterations: int = 100) -> np.ndarray:
    """Weights [bias, w...] of a logistic regression (Newton's method with a small L2 penalty on w, so a
    feature that separates the classes perfectly still gives finite weights)."""
    design = np.column_stack([np.ones(len(x)), x])
    w = np.zeros(design.shape[1])
    penalty = l2 * len(x) * np.diag([0.0] + [1.0] * x.shape[1])
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-design @ w))
        grad = design.T @ (p - y) + penalty @ w
        hess = design.T @ (design * (p * (1 - p))[:, None]) + penalty + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


class ReferenceModel:
    """One reference baseline: its features standardised on the train split, then a logistic fit."""

    def __init__(
        self,
        kind: str,
        train: pd.DataFrame,
        firing_rate: np.ndarray,
        interpretations: dict[int, str] | None = None,
    ):
        self.columns, self.firing_rate, self.interpretations = (
            list(REFERENCE_FEATURES[kind]),
            firing_rate,
            interpretations,
        )
        x = features(train, firing_rate, interpretations)[self.columns].to_numpy()
        self.mean, self.scale = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
        self.weights = fit_logistic((x - self.mean) / self.scale, train["active"].to_numpy(dtype=float))

    def label_logits(self, df: pd.DataFrame) -> np.ndarray:
        """[N, 2] logits (No, Yes) of the rows: [0, z] with P(yes) = sigmoid(z)."""
        x = (
            features(df, self.firing_rate, self.interpretations)[self.columns].to_numpy() - self.mean
        ) / self.scale
        z = self.weights[0] + x @ self.weights[1:]
        return np.column_stack([np.zeros(len(z)), z]).astype(np.float32)


def judgment_frame(judgments: list[Judgment]) -> pd.DataFrame:
    """The columns `features` reads, from judgments."""
    return pd.DataFrame(
        {
            "latent": [j.latent for j in judgments],
            "context": [j.context for j in judgments],
            "interpretation": [j.interpretation for j in judgments],
        }
    )


@register_reference(*REFERENCE_FEATURES)
class FeatureReference(Scorer):
    """A reference baseline (`model=prior`, `string_match` or `prior+string_match`): ReferenceModel fitted on
    the eval set's calibration split (held-out latents like the test split's, so the same share of positives;
    the train split's larger latent pool holds more actives per context) or, without one, its train split."""

    def __init__(self, model: ReferenceModel, fitted_on: dict):
        super().__init__()
        self.model, self.fitted_on, self.answer_ids = model, fitted_on, []

    @classmethod
    def create(cls, setup: ScorerSetup) -> FeatureReference:
        from latentsim.simulators.base import judgments_of

        eval_set, name = setup.eval_set, setup.sim.base_model
        eval_set.require_binary(f"the reference baseline {name}")
        fit_split = setup.options.fit_split or "train"
        fit = eval_set.split(fit_split)
        judgments, keep = judgments_of(fit, setup.interpretations)
        firing_rate = eval_set.statistics["firing_rate"].double().numpy()
        fit = fit[keep].assign(
            interpretation=[j.interpretation for j in judgments]
        )  # the simulator's own texts
        model = ReferenceModel(name, fit, firing_rate)
        return cls(model, {"split": fit_split, "judgments": len(judgments)})

    def judgment_logits(
        self, judgments: list[Judgment], previous: list[str | None] | None = None
    ) -> np.ndarray:
        """[N, 2] logits (No, Yes) of judgments. `previous` (each judgment's previous subject token, known
        when a text's ids are judged) is for references that read it; these do not."""
        return self.model.label_logits(judgment_frame(judgments))

    def label_logits(self, judgments: list[Judgment], progress=None) -> np.ndarray:
        logits = self.judgment_logits(judgments)
        self.stats["judgments"] += len(judgments)
        if progress is not None:
            progress.update(len(judgments))
        return logits

    def text_p_yes(
        self, latents: list[int], interpretations: list[str], ids: np.ndarray, tokenizer
    ) -> np.ndarray:
        """P(yes) [n_positions, n_latents] of every latent at every position 1..n of a text of subject ids
        `ids` (BOS at index 0): the logits of `text_judgments`, each with its previous token read from `ids`
        (none at position 1: BOS), exactly as `label_logits` answers the same judgments."""
        ids = np.asarray(ids).reshape(-1).tolist()
        judgments = text_judgments(latents, interpretations, ids, tokenizer)
        previous = [None] + [tokenizer.decode(ids[p - 1 : p]) for p in range(2, len(ids))]
        logits = self.judgment_logits(judgments, [prev for prev in previous for _ in latents])
        self.stats["judgments"] += len(judgments)
        return probabilities(logits)[:, 1].reshape(len(ids) - 1, len(latents))

    def describe(self) -> dict:
        m = self.model
        return {
            "features": m.columns,
            "weights": m.weights.tolist(),
            "feature_mean": m.mean.tolist(),
            "feature_scale": m.scale.tolist(),
            "fitted_on": self.fitted_on,
        }
