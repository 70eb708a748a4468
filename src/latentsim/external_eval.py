"""Simulators scored on an imported set (latentsim.external, data_gen/import_records.py): detection, fuzzing
and per-token correlation on held-out latents whose interpretations were written elsewhere.

What each kind of simulator answers, per text:
- a dense simulator (sim_dense_v1) reads the text once after the explanation's header and gives a verdict at
  every token: a detection text's P(yes) is the largest of its tokens' (the latent fires *anywhere*); a fuzz
  text's is the mean over its marked tokens (are the marks where it fires: every mark should be); a per-token
  text's prediction for each subject token is the verdict of the simulator token holding its last character;
- a prompted model answers the detection or fuzzing question (latentsim.interpretation_scores' prompts, the
  marks shown as `<<...>>`), optionally after solved examples of training latents;
- references: `string_match` (the share of the explanation's content words found in the text, or in the
  marked spans), `recorded` (the explainer's recorded yes/no answers, or its simulation per token) and
  `oracle` (the labels themselves: an import's round trip must score 1).

Metrics, over held-out latents (CIs resample latents): per-latent AUC, balanced accuracy at a threshold fitted
on the other latents (leave one latent out), and per-token Pearson r per latent; each paired against the
recorded answers over the same latents.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from latentsim.config.eval import EXTERNAL_KINDS, EXTERNAL_REFERENCES
from latentsim.errors import BadInputError, MissingInputError
from latentsim.external import balanced_accuracy, simulator_tokens
from latentsim.interpretation_scores import DETECTION_PROMPT, FUZZ_PROMPT
from latentsim.metrics import mean_ci, roc_auc

KINDS, REFERENCES = EXTERNAL_KINDS, EXTERNAL_REFERENCES
N_BOOT = 2000
STOPWORDS = frozenset(
    "the a an and or of to in on for with as by at from is are was were be been this that these those it its "
    "word words token tokens such like related specifically particularly often also phrase phrases term "
    "terms text texts mention mentions references reference context contexts including include various "
    "neuron feature looking which when where what their there other about".split()
)


@dataclass
class ExternalSet:
    """An imported folder: its latents and the tables it holds."""

    path: Path
    latents: pd.DataFrame
    stats: dict

    @classmethod
    def open(cls, path: str | Path) -> ExternalSet:
        path = Path(path)
        if not (path / "import_stats.json").is_file():
            raise MissingInputError(
                f"config key `eval_set`: {path} holds no finished import (import_stats.json); make it with "
                "data_gen/import_records.py --records FILE.jsonl --output_dir DIR."
            )
        return cls(
            path,
            pd.read_parquet(path / "latents.parquet"),
            json.loads((path / "import_stats.json").read_text()),
        )

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def explanations(self) -> dict[int, str]:
        return dict(zip(self.latents["latent"].astype(int), self.latents["explanation"], strict=True))

    def kinds(self) -> list[str]:
        return [k for k in KINDS if (self.path / f"{k}.parquet").is_file()]

    def held_out(self, kind: str, max_latents: int, max_texts: int, seed: int) -> pd.DataFrame:
        """The `kind` texts of held-out (`test`) latents: a seeded sample of `max_latents` latents (0: all)
        and, per latent, up to `max_texts` texts (0: all), half true and half false where a label exists."""
        df = pd.read_parquet(self.path / f"{kind}.parquet")
        test = set(self.latents.loc[self.latents["split"] == "test", "latent"].astype(int))
        df = df[df["latent"].isin(test)]
        rng = np.random.default_rng(seed)
        latents = np.sort(df["latent"].unique())
        if max_latents and len(latents) > max_latents:
            latents = np.sort(rng.choice(latents, size=max_latents, replace=False))
        parts = []
        for latent in latents:
            g = df[df["latent"] == latent]
            if max_texts and len(g) > max_texts:
                if "label" in g:
                    halves = [g[g["label"]], g[~g["label"]]]
                    n_true = min(len(halves[0]), max(max_texts // 2, max_texts - len(halves[1])))
                    g = pd.concat(
                        [h.iloc[np.sort(rng.choice(len(h), size=n, replace=False))]
                         for h, n in zip(halves, (n_true, max_texts - n_true), strict=True)]
                    )  # fmt: skip
                else:
                    g = g.iloc[np.sort(rng.choice(len(g), size=max_texts, replace=False))]
            parts.append(g)
        if not parts:
            raise BadInputError(f"{self.path}: no held-out latent has {kind} texts.")
        return pd.concat(parts).reset_index(drop=True)


def check_tokenizer(tokenizer, df: pd.DataFrame, where: str) -> None:
    """The simulator must split the texts exactly as the import aligned them, or its verdicts would be read
    at other tokens."""
    for text, ends in zip(df["text"].head(20), df["token_ends"].head(20), strict=True):
        if [e for _, e in simulator_tokens(tokenizer, text)] != list(ends):
            raise BadInputError(
                f"{where}: the simulator's tokenizer splits the imported texts differently from the one they "
                "were aligned to; re-import them with data_gen/import_records.py --simulator_tokenizer "
                "<its model>."
            )


def marked_text(text: str, marks) -> str:
    """A fuzz text with its marks shown as `<<...>>` again."""
    out, at = [], 0
    for a, b in marks:
        out += [text[at:a], "<<", text[a:b], ">>"]
        at = b
    return "".join([*out, text[at:]])


# -- scores: one P(yes) per text (detection, fuzz) or one prediction per subject token (per_token) --


def dense_scores(scorer, df: pd.DataFrame, kind: str, explanations: dict[int, str], progress=None) -> list:
    """A dense simulator's answer per row: each latent's header once, its texts read one by one."""
    from latentsim.simulators.base import probabilities

    out: list = [None] * len(df)
    for latent, g in df.groupby("latent", sort=False):
        texts = [(t, list(e)) for t, e in zip(g["text"], g["token_ends"], strict=True)]
        logits = scorer.text_logits([explanations[int(latent)]], texts)
        for i, row_logits, (_, row) in zip(g.index, logits, g.iterrows(), strict=True):
            p = np.full(len(row_logits[0]), np.nan)
            aligned = np.isfinite(row_logits[0]).all(axis=1)  # NaN where no simulator token ends there
            p[aligned] = probabilities(row_logits[0][aligned])[:, 1]
            if kind == "detection":
                out[i] = float(np.nanmax(p)) if aligned.any() else float("nan")
            elif kind == "fuzz":
                marked = np.asarray(row["token_marked"], dtype=bool) & aligned
                out[i] = float(p[marked].mean()) if marked.any() else float("nan")
            else:
                reads = np.asarray(row["subject_to_simulator"])
                out[i] = np.nan_to_num(np.where(reads >= 0, p[np.maximum(reads, 0)], 0.0))
        if progress is not None:
            progress.update(len(g))
    return out


def prompts(df: pd.DataFrame, kind: str, explanations: dict[int, str], examples: str = "") -> list[str]:
    """The detection or fuzzing question of each row (the judge's prompts), after `examples`."""
    template = DETECTION_PROMPT if kind == "detection" else FUZZ_PROMPT
    texts = (
        df["text"]
        if kind == "detection"
        else [marked_text(t, m) for t, m in zip(df["text"], df["marks"], strict=True)]
    )
    return [
        examples + template.format(interpretation=explanations[int(latent)], text=text)
        for latent, text in zip(df["latent"], texts, strict=True)
    ]


def few_shot_examples(external: ExternalSet, kind: str, shots: int, seed: int) -> str:
    """`shots` solved questions from training latents (half yes), as text before each prompt."""
    if not shots:
        return ""
    df = pd.read_parquet(external.path / f"{kind}.parquet")
    train = set(external.latents.loc[external.latents["split"] == "train", "latent"].astype(int))
    df = df[df["latent"].isin(train)]
    rng = np.random.default_rng(seed)
    n_yes = (shots + 1) // 2
    picks = pd.concat(
        [
            df[df["label"]].sample(n_yes, random_state=rng),
            df[~df["label"]].sample(shots - n_yes, random_state=rng),
        ]
    ).sample(frac=1, random_state=rng)
    solved = [
        f"{q}\nAnswer: {'Yes' if label else 'No'}"
        for q, label in zip(prompts(picks, kind, external.explanations), picks["label"], strict=True)
    ]
    return "Solved examples:\n\n" + "\n\n".join(solved) + "\n\nNow the question.\n\n"


def content_words(explanation: str) -> set[str]:
    words = re.findall(r"[a-z0-9]+", explanation.lower())
    return {w for w in words if len(w) >= 3 and w not in STOPWORDS}


def string_match_scores(df: pd.DataFrame, kind: str, explanations: dict[int, str]) -> list:
    """The share of the explanation's content words present in the text (detection), in its marked spans
    (fuzz) or in each subject token (per_token)."""
    out = []
    for _, row in df.iterrows():
        words = content_words(explanations[int(row["latent"])])
        if kind == "per_token":
            ends = list(row["subject_token_ends"])
            tokens = [row["text"][s:e].strip().lower() for s, e in zip([0, *ends[:-1]], ends, strict=True)]
            out.append(np.array([float(bool(t) and any(t in w or w in t for w in words)) for t in tokens]))
            continue
        if kind == "fuzz":
            text = " ".join(row["text"][a:b] for a, b in row["marks"])
        else:
            text = row["text"]
        found = set(re.findall(r"[a-z0-9]+", text.lower()))
        out.append(len(words & found) / len(words) if words else 0.0)
    return out


def reference_scores(name: str, df: pd.DataFrame, kind: str, explanations: dict[int, str]) -> list:
    if name == "string_match":
        return string_match_scores(df, kind, explanations)
    if name == "recorded":
        if kind == "per_token":
            return [np.asarray(v, dtype=float) for v in df["simulated_activations"]]
        return df["recorded"].astype(float).tolist()
    if name == "oracle":
        if kind == "per_token":
            return [np.asarray(v, dtype=float) for v in df["activations"]]
        return df["label"].astype(float).tolist()
    raise BadInputError(f"config key `references`: {name!r} is not one of {list(REFERENCES)}.")


# -- metrics over held-out latents --


def best_threshold(p: np.ndarray, truth: np.ndarray) -> float:
    """The threshold (predict yes at p >= t) with the highest balanced accuracy on these texts."""
    candidates = np.unique(p)
    scores = [balanced_accuracy(truth, p >= t) for t in candidates]
    return float(candidates[int(np.nanargmax(scores))]) if len(candidates) else 0.5


def text_metrics(df: pd.DataFrame, p: np.ndarray, seed: int) -> dict:
    """Per-latent AUC and balanced accuracy at a threshold fitted on the other latents' texts."""
    p, truth, latents = np.asarray(p, dtype=float), df["label"].to_numpy(bool), df["latent"].to_numpy()
    per = {}  # keyed by str(latent): the same keys after results.json's round trip
    for latent in np.unique(latents):
        mine, others = latents == latent, (latents != latent) & np.isfinite(p)
        t = best_threshold(p[others], truth[others])
        ok = mine & np.isfinite(p)
        per[str(int(latent))] = {
            "auc": roc_auc(p[ok], truth[ok]),
            "balanced_accuracy": balanced_accuracy(truth[ok], p[ok] >= t),
            "threshold": t,
        }
    table = pd.DataFrame.from_dict(per, orient="index")
    return {
        "per_latent": per,
        "auc": mean_ci(table["auc"], seed, N_BOOT),
        "balanced_accuracy": mean_ci(table["balanced_accuracy"], seed, N_BOOT),
        "unscored_texts": int((~np.isfinite(p)).sum()),
    }


def token_metrics(df: pd.DataFrame, predictions: list, seed: int) -> dict:
    """Per latent, Pearson r between predictions and true activations over every token of its texts."""
    per = {}
    for latent, g in df.groupby("latent"):
        truth = np.concatenate([np.asarray(v, dtype=float) for v in g["activations"]])
        pred = np.concatenate([np.asarray(predictions[i], dtype=float) for i in g.index])
        r = np.corrcoef(truth, pred)[0, 1] if truth.std() > 0 and pred.std() > 0 else float("nan")
        per[str(int(latent))] = {"r": float(r)}
    return {"per_latent": per, "r": mean_ci([v["r"] for v in per.values()], seed, N_BOOT)}


def paired(mine: dict, reference: dict, key: str, seed: int) -> dict:
    """Mean over shared latents of (mine - reference) on `key`, with a CI resampling latents."""
    shared = [
        k for k in mine if k in reference and np.isfinite(mine[k][key]) and np.isfinite(reference[k][key])
    ]
    diff = [mine[k][key] - reference[k][key] for k in shared]
    return mean_ci(diff, seed, N_BOOT)


def metrics(answers: dict[str, list], data: dict, seed: int) -> dict:
    return {
        k: token_metrics(data[k], v, seed) if k == "per_token" else text_metrics(data[k], v, seed)
        for k, v in answers.items()
    }


def summary_rows(results: dict[str, dict], seed: int) -> list[dict]:
    """One row per simulator: each kind's headline with its CI, and the paired difference to the recorded
    answers over the same latents."""
    recorded = results.get("reference__recorded", {})

    def cell(m: dict) -> str:
        return f"{m['mean']:.3f} [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]" if m.get("latents") else "-"

    rows = []
    for name, res in results.items():
        row = {"simulator": name}
        for k, m in res.items():
            keys = ("r",) if k == "per_token" else ("auc", "balanced_accuracy")
            for key in keys:
                row[f"{k} {key}"] = cell(m[key])
            key = keys[-1]
            if k in recorded and name != "reference__recorded":
                row[f"{k} {key} - recorded"] = cell(
                    paired(m["per_latent"], recorded[k]["per_latent"], key, seed)
                )
        rows.append(row)
    return rows
