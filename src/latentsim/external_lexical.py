"""The lexical reader of imported sets: the cues a free-text explanation gives, read without a language model.

An explanation names words ("the words "everybody" and "somebody""), quotes strings and describes the rest.
The reader turns that into features of a text (or of each token), then fits a logistic regression (sklearn)
on the training latents' texts of the same records, so it uses exactly the information a simulator trained
on them had. Features:
- a whole text (detection; for fuzzing, the marked spans): the share of the explanation's content words it
  contains, whether it contains any of them, how often (log), whether it contains a quoted string; for
  fuzzing also the share of marks that hold a content word or a quoted string, and the number of marks (log);
- a token (per-token sets): whether it equals a quoted string or a content word, whether it is part of one or
  one part of it, the same for the token before it, and whether it is only punctuation or space.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

WORD = re.compile(r"[a-z0-9]+")
QUOTED = re.compile(r"[\"\u201c\u201d']([^\"\u201c\u201d']{1,40})[\"\u201c\u201d']")


def quoted(explanation: str) -> list[str]:
    return [q.strip().lower() for q in QUOTED.findall(explanation) if q.strip()]


def text_features(words: set[str], quotes: list[str], text: str, marks=None) -> list[float]:
    region = text if marks is None else " ".join(text[a:b] for a, b in marks)
    found = WORD.findall(region.lower())
    share = len(words & set(found)) / len(words) if words else 0.0
    count = sum(w in words for w in found)
    quote = float(any(q in region.lower() for q in quotes))
    features = [share, float(share > 0), float(np.log1p(count)), quote]
    if marks is not None:
        hits = [
            any(w in words for w in WORD.findall(text[a:b].lower()))
            or any(q in text[a:b].lower() for q in quotes)
            for a, b in marks
        ]
        features += [float(np.mean(hits)) if hits else 0.0, float(np.log1p(len(marks)))]
    return features


def token_match(token: str, words: set[str], quotes: list[str]) -> list[float]:
    t = token.strip().lower()
    if not t:
        return [0.0, 0.0, 0.0]
    exact = float(t in words or t in quotes)
    part = float(len(t) >= 3 and any(t in w or w in t for w in (*words, *quotes)))
    return [exact, part, float(not WORD.search(t))]


def token_features(words: set[str], quotes: list[str], pieces: list[str]) -> np.ndarray:
    own = [token_match(p, words, quotes) for p in pieces]
    before = [[0.0, 0.0, 0.0], *own[:-1]]
    return np.array([a + b[:2] for a, b in zip(own, before, strict=True)], dtype=float)


def pieces_of(text: str, ends) -> list[str]:
    ends = [int(e) for e in ends]
    return [text[s:e] for s, e in zip([0, *ends[:-1]], ends, strict=True)]


def cues(explanation: str) -> tuple[set[str], list[str]]:
    from latentsim.external_eval import content_words

    return content_words(explanation), quoted(explanation)


class ExternalLexicalReader:
    """Fitted per kind on the training latents' texts of an imported set."""

    def __init__(self, external, seed: int):
        self.external, self.seed, self.models, self.fitted = external, seed, {}, {}

    def training_frame(self, kind: str) -> pd.DataFrame:
        """The training latents' texts the reader of `kind` learns from (per token: their marked texts);
        empty when the import has none (a file of per-token records only)."""
        ext = self.external
        train = set(ext.latents.loc[ext.latents["split"] == "train", "latent"].astype(int))
        path = ext.path / f"{'train_texts' if kind == 'per_token' else kind}.parquet"
        if not path.is_file():
            return pd.DataFrame()
        df = pd.read_parquet(path)
        return df[df["latent"].isin(train)]

    def can_read(self, kind: str) -> bool:
        return not self.training_frame(kind).empty

    def features(
        self, df: pd.DataFrame, kind: str, training: bool
    ) -> tuple[list[np.ndarray], np.ndarray | None]:
        explanations = self.external.explanations
        rows, labels = [], []
        for _, row in df.iterrows():
            words, quotes = cues(explanations[int(row["latent"])])
            if kind == "per_token":
                ends = row["token_ends"] if training else row["subject_token_ends"]
                rows.append(token_features(words, quotes, pieces_of(row["text"], ends)))
                if training:
                    labels.append(np.asarray(row["token_marked"], dtype=int))
            else:
                marks = row["marks"] if kind == "fuzz" else None
                rows.append(np.array([text_features(words, quotes, row["text"], marks)]))
                if training:
                    labels.append(np.array([int(row["label"])]))
        return rows, (np.concatenate(labels) if training else None)

    def fit(self, kind: str):
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        rows, y = self.features(self.training_frame(kind), kind, training=True)
        x = np.concatenate(rows)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=self.seed))
        model.fit(x, y)
        self.fitted[kind] = {"examples": int(len(y)), "positives": int(y.sum())}
        return model

    def scores(self, df: pd.DataFrame, kind: str) -> list:
        if kind not in self.models:
            self.models[kind] = self.fit(kind)
        rows, _ = self.features(df, kind, training=False)
        model = self.models[kind]
        if kind == "per_token":
            return [model.predict_proba(r)[:, 1] for r in rows]
        return [float(model.predict_proba(r)[0, 1]) for r in rows]
