"""The lexical reader: every cue a simulator is given, read from strings and token ids with no language model.

The strongest reference that reads what a simulator reads. Per judgment (latentsim.simulators.Judgment) it
computes `FEATURES` from the interpretation (latentsim.token_list: the token-list format read back) and the
context, and a scikit-learn learner turns them into P(yes):

- `log_firing_rate`: the prior, the latent's log share of the cache's tokens it fires on;
- `token_list`: 1 when the interpretation is a token list (the learner may weigh the cues of the two formats
  apart);
- `token_match`, `token_rank`: the judged token is one the interpretation names (compared as
  reference.normalise_token compares, without case or surrounding space), and 1 / (1 + rank) of the first
  name it matches (names come strongest first: 1 for the first, 1/2 for the second...; 0 for none);
- `previous_match`, `previous_rank`: the same for the previous subject token against the `often after` tokens;
- `context_suffix`: how many words the context's tail and a quoted context share at their ends (the longest
  common word suffix, over the quotes, of the last `TAIL_WORDS` words of the context up to and including the
  judged token). Each quote ends at a token the latent fires on, so a suffix of 1 aligns the judged token
  with it, 2 its previous word too, and so on: the quotes read as n-grams that end at the judged token;
- `context_overlap`: the share of the distinct words among the context's last `TAIL_WORDS` words that occur
  in any quoted context (the topic, wherever in the quote);
- `free_text_token_match`, `free_text_previous_match`: for a free-text interpretation (not a token list), the
  judged token and the previous token are among its words.

Words are `\\w+` runs and single punctuation marks, casefolded; a context's are read from its prefix and
judged token joined as decoded, as the explainer writes its quotes. `TAIL_WORDS` is 8: the explainer quotes 8
tokens before the one it fires on (ExplainArguments.context_tokens).

The previous token is exact: the token before the judged one in the eval set's cache row (Judgment `row` and
`position`, decoded with the cache's subject tokenizer). A judgment without them falls back to the last
subject token of its context's prefix re-tokenized (`latentsim.prompts.unmark_context`; exact unless the
tokenizer splits the decoded text otherwise). A context whose prefix is empty, or whose previous position is
BOS, has no previous token: the simulator sees none.

Two learners, registered as references: `lexical` (LogisticRegression on standardised features) and
`lexical_gbm` (HistGradientBoostingClassifier, fixed seed, 100 trees of at most 15 leaves). Both are fitted on
the eval set's `train` split, whatever the sweep's calibration split: training latents x training rows, the
information a simulator had (at most `MAX_FIT_JUDGMENTS`, a seeded sample). Logits are [0, z] with
P(yes) = sigmoid(z). `text_p_yes` judges every latent at every position of a text (the whole layer's dense
API).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from latentsim.errors import BadInputError
from latentsim.prompts import unmark_context
from latentsim.simulators.base import Judgment, ScorerSetup, judgments_of, register_reference
from latentsim.simulators.reference import FIRING_RATE_FLOOR, FeatureReference, named_tokens, normalise_token
from latentsim.token_list import parse_token_list

FEATURES = (
    "log_firing_rate",
    "token_list",
    "token_match",
    "token_rank",
    "previous_match",
    "previous_rank",
    "context_suffix",
    "context_overlap",
    "free_text_token_match",
    "free_text_previous_match",
)
TAIL_WORDS = 8  # the context words compared with the quotes: as many tokens as the explainer quotes
FIT_SPLIT = "train"  # training latents x training rows: what a simulator learned from
MAX_FIT_JUDGMENTS = 200_000  # a seeded sample beyond this: a fit takes seconds on 2 cores
FIT_SEED = 0
WORD_RE = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """`\\w+` runs and single punctuation marks, casefolded."""
    return [w.casefold() for w in WORD_RE.findall(text)]


def ranks(names) -> dict[str, int]:
    """Each normalised name's first rank among `names`."""
    out: dict[str, int] = {}
    for i, name in enumerate(names):
        if name:
            out.setdefault(normalise_token(name), i)
    return out


def common_suffix(a: list[str], b: tuple[str, ...]) -> int:
    """How many words `a` and `b` share at their ends."""
    n = 0
    for x, y in zip(reversed(a), reversed(b), strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class InterpretationCues:
    """What the lexical reader reads of one interpretation."""

    token_rank: dict[str, int]  # named tokens (token lists)
    previous_rank: dict[str, int]  # `often after` tokens
    quotes: tuple[tuple[str, ...], ...]  # each quoted context's words
    quote_words: frozenset[str]
    free_words: frozenset[str] | None  # a free-text interpretation's words (None for a token list)

    @classmethod
    def of(cls, interpretation: str) -> InterpretationCues:
        parsed = parse_token_list(interpretation)
        if parsed is None:
            return cls({}, {}, (), frozenset(), frozenset(named_tokens(interpretation)))
        quotes = tuple(tuple(words(q)) for q in parsed.contexts)
        return cls(
            ranks(parsed.tokens),
            ranks(parsed.preceding),
            quotes,
            frozenset(w for q in quotes for w in q),
            None,
        )

    def read(self, judged: str, previous: str | None, tail: list[str]) -> list[float]:
        """FEATURES after the prior, for a normalised judged token, previous token (None: none) and the
        context's last words."""
        out = dict.fromkeys(FEATURES[1:], 0.0)
        if self.free_words is not None:
            out["free_text_token_match"] = float(judged in self.free_words)
            out["free_text_previous_match"] = float(previous is not None and previous in self.free_words)
            return list(out.values())
        out["token_list"] = 1.0
        if judged in self.token_rank:
            out["token_match"], out["token_rank"] = 1.0, 1 / (1 + self.token_rank[judged])
        if previous is not None and previous in self.previous_rank:
            out["previous_match"], out["previous_rank"] = 1.0, 1 / (1 + self.previous_rank[previous])
        if tail:
            out["context_suffix"] = max((common_suffix(tail, q) for q in self.quotes), default=0)
            distinct = set(tail)
            out["context_overlap"] = len(distinct & self.quote_words) / len(distinct)
        return list(out.values())


class LexicalFeatures:
    """`FEATURES` of judgments, from the latents' firing rates, the cache's tokens [rows, ctx_len] (the exact
    previous token of located judgments) and the subject tokenizer that decodes them."""

    def __init__(self, firing_rate: np.ndarray, tokenizer, tokens: np.ndarray | None = None):
        self.log_rate = np.log(np.maximum(np.asarray(firing_rate, dtype=np.float64), FIRING_RATE_FLOOR))
        self.tokenizer, self.tokens = tokenizer, tokens
        # Contexts recur across the latents judged in them, interpretations across their contexts.
        self._decoded: dict[int, str] = {}
        self._contexts: dict[str, tuple[str, str, list[str]]] = {}
        self._interpretations: dict[str, InterpretationCues] = {}

    def decode(self, token_id: int) -> str:
        if token_id not in self._decoded:
            self._decoded[token_id] = self.tokenizer.decode([token_id])
        return self._decoded[token_id]

    def context(self, context: str) -> tuple[str, str, list[str]]:
        """(unmarked prefix, normalised judged token, the last TAIL_WORDS words up to the judged token)."""
        if context not in self._contexts:
            prefix, judged = unmark_context(context)
            self._contexts[context] = (prefix, normalise_token(judged), words(prefix + judged)[-TAIL_WORDS:])
        return self._contexts[context]

    def previous(self, judgment: Judgment, prefix: str) -> str | None:
        """The normalised subject token before the judged one; None when the context shows none."""
        if not prefix:
            return None
        if judgment.row is not None and judgment.position is not None and self.tokens is not None:
            if judgment.position <= 1:  # position 0 is BOS
                return None
            return normalise_token(self.decode(int(self.tokens[judgment.row, judgment.position - 1])))
        ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        return normalise_token(self.decode(ids[-1])) if ids else None

    def matrix(self, judgments: list[Judgment], previous: list[str | None] | None = None) -> np.ndarray:
        """[N, len(FEATURES)] features; `previous` (raw token texts, None for none) overrides each judgment's
        previous token when the caller knows it (a text's ids)."""
        x = np.zeros((len(judgments), len(FEATURES)))
        latents = [j.latent for j in judgments]
        if None in latents:
            raise ValueError(
                "the lexical reader reads each judgment's latent (Judgment.latent) for its prior"
            )
        x[:, 0] = self.log_rate[np.asarray(latents, dtype=np.int64)]
        for i, j in enumerate(judgments):
            prefix, judged, tail = self.context(j.context)
            if previous is None or not prefix:
                prev = self.previous(j, prefix)
            else:
                prev = None if previous[i] is None else normalise_token(previous[i])
            if j.interpretation not in self._interpretations:
                self._interpretations[j.interpretation] = InterpretationCues.of(j.interpretation)
            x[i, 1:] = self._interpretations[j.interpretation].read(judged, prev, tail)
        return x


def learner(name: str):
    """The unfitted scikit-learn model of a lexical reference."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "lexical":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    return HistGradientBoostingClassifier(
        max_iter=100,
        learning_rate=0.1,
        max_leaf_nodes=15,
        min_samples_leaf=20,
        l2_regularization=1.0,
        early_stopping=False,
        random_state=FIT_SEED,
    )


def plain_params(model) -> dict:
    """A model's scalar parameters (what a results.json can hold)."""
    return {
        k: v for k, v in model.get_params().items() if v is None or isinstance(v, (bool, int, float, str))
    }


@register_reference("lexical", "lexical_gbm")
class LexicalReader(FeatureReference):
    """The lexical reader (`model=lexical`: logistic regression; `model=lexical_gbm`: gradient-boosted trees):
    `FEATURES` of each judgment read by a scikit-learn model fitted on the eval set's `train` split (training
    latents x training rows, at most MAX_FIT_JUDGMENTS), never the sweep's calibration split. Answers
    judgments (`label_logits`) and texts (`text_p_yes`) as FeatureReference does, from its own features."""

    def __init__(self, name: str, features: LexicalFeatures, model, fitted_on: dict):
        super().__init__(model, fitted_on)
        self.name, self.features = name, features

    @classmethod
    def fit(
        cls,
        name: str,
        features: LexicalFeatures,
        judgments: list[Judgment],
        labels: np.ndarray,
        fitted_on: dict | None = None,
    ) -> LexicalReader:
        """`name`'s learner fitted on the features of `judgments` and their 0/1 `labels`."""
        labels = np.asarray(labels, dtype=np.int64)
        if len(np.unique(labels)) < 2:
            raise BadInputError(
                f"the lexical reader {name} is fitted on the eval set's {FIT_SPLIT} split, whose "
                f"{len(labels)} judgments are all {'positive' if labels.any() else 'negative'}; rebuild the "
                "eval set with more rows or negatives_per_context > 0."
            )
        model = learner(name).fit(features.matrix(judgments), labels)
        fitted_on = {**(fitted_on or {}), "judgments": len(labels), "positives": int(labels.sum())}
        return cls(name, features, model, fitted_on)

    @classmethod
    def create(cls, setup: ScorerSetup) -> LexicalReader:
        eval_set, name = setup.eval_set, setup.sim.base_model
        eval_set.require_binary(f"the reference baseline {name}")
        frame = eval_set.split(FIT_SPLIT)
        total = len(frame)
        if total > MAX_FIT_JUDGMENTS:
            frame = frame.sample(n=MAX_FIT_JUDGMENTS, random_state=FIT_SEED).sort_index()
        judgments, keep = judgments_of(frame, setup.interpretations)  # the simulator's own texts
        features = LexicalFeatures(
            eval_set.statistics["firing_rate"].double().numpy(),
            eval_set.cache.subject_tokenizer(),
            eval_set.tokens.numpy(),
        )
        labels = frame["active"].to_numpy()[keep]
        return cls.fit(name, features, judgments, labels, {"split": FIT_SPLIT, "split_judgments": total})

    def judgment_logits(
        self, judgments: list[Judgment], previous: list[str | None] | None = None
    ) -> np.ndarray:
        """[N, 2] logits (No, Yes) of judgments: [0, z] with P(yes) = sigmoid(z); `previous` as
        LexicalFeatures.matrix reads it."""
        z = self.model.decision_function(self.features.matrix(judgments, previous))
        return np.column_stack([np.zeros(len(z)), z]).astype(np.float32)

    def describe(self) -> dict:
        out = {"features": list(FEATURES), "fitted_on": self.fitted_on}
        if self.name == "lexical":
            scaler, logistic = self.model[0], self.model[-1]
            out["learner"] = {
                "class": "LogisticRegression on standardised features",
                "params": plain_params(logistic),
                "intercept": float(logistic.intercept_[0]),
                "coefficients": dict(zip(FEATURES, logistic.coef_[0].tolist(), strict=True)),
                "feature_mean": scaler.mean_.tolist(),
                "feature_scale": scaler.scale_.tolist(),
            }
        else:
            out["learner"] = {
                "class": "HistGradientBoostingClassifier",
                "params": plain_params(self.model),
                "trees": int(self.model.n_iter_),
            }
        return out
