"""Interpretations written elsewhere: records of the sae-auto-interp schema (../shared/external/README.md)
imported as sets latentsim's simulators can be scored and trained on.

A record is one latent with its free-text `explanation` and either
- `train_examples_quantised` (texts the explanation was written from, activating tokens marked `<<...>>`),
  `test_recall` (detection: whole texts, does the latent fire anywhere) and `test_fuzz` (texts with marked
  tokens, are the marks where it fires), each test text with the explainer's recorded `prediction`; or
- `records` (texts as the subject model's token strings, the true activation at every token and the
  explainer's `simulated_activations`).

The subject model's tokens are not the simulator's, so everything is aligned by characters: a simulator token
is marked (active) when its characters overlap a marked span, and carries the largest activation of the
subject tokens it overlaps. A mark that no simulator token overlaps is counted, never guessed; a mark whose
simulator tokens reach beyond it (the mark `ifty` inside the simulator token `Fifty`) is counted as widened.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from latentsim.errors import BadInputError

OPEN, CLOSE = "<<", ">>"
SPLITS = ("train", "test")


def parse_marked(text_marked: str) -> tuple[str, list[tuple[int, int]]]:
    """(the text without marks, the character spans [start, end) of its marked parts in that text).

    Left to right, each `<<` opens a mark that the first `>>` after it closes; a `>>` outside a mark, or a
    `<<` never closed, is the text's own (the corpus has both: "... style. more >>")."""
    text, spans, i, length = [], [], 0, 0
    while True:
        start = text_marked.find(OPEN, i)
        end = text_marked.find(CLOSE, start + len(OPEN)) if start >= 0 else -1
        if start < 0 or end < 0:
            text.append(text_marked[i:])
            break
        before, inside = text_marked[i:start], text_marked[start + len(OPEN) : end]
        text += [before, inside]
        spans.append((length + len(before), length + len(before) + len(inside)))
        length += len(before) + len(inside)
        i = end + len(CLOSE)
    return "".join(text), spans


def simulator_tokens(tokenizer, text: str) -> list[tuple[int, int]]:
    """The character spans of the simulator's tokens of `text` (tokenized on its own, as the dense format
    reads a text), one per distinct end: byte pieces of one character share its span and are read at the
    last of them (latentsim.prompts.dense_text_ids)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans: list[tuple[int, int]] = []
    for start, end in offsets:
        if end <= start:
            continue
        if spans and spans[-1][1] == end:
            spans[-1] = (min(spans[-1][0], start), end)
        else:
            spans.append((start, end))
    return spans


@dataclass
class Alignment:
    """How marked spans landed on the simulator's tokens."""

    marks: int = 0
    uncovered: int = 0  # no simulator token overlaps the mark: it is lost, and counted
    widened: int = 0  # the simulator tokens overlapping it reach beyond it
    examples: list[str] = field(default_factory=list)  # a few uncovered marks, for the report

    def add(self, other: Alignment) -> None:
        self.marks += other.marks
        self.uncovered += other.uncovered
        self.widened += other.widened
        self.examples.extend(other.examples[: max(0, 5 - len(self.examples))])

    def as_dict(self) -> dict:
        return {
            "marks": self.marks,
            "uncovered": self.uncovered,
            "widened": self.widened,
            "uncovered_examples": self.examples,
        }


def mark_tokens(
    tokens: list[tuple[int, int]], marks: list[tuple[int, int]], text: str = ""
) -> tuple[np.ndarray, Alignment]:
    """(per simulator token: whether it overlaps a mark, how the marks aligned)."""
    marked = np.zeros(len(tokens), dtype=bool)
    report = Alignment(marks=len(marks))
    starts = np.array([s for s, _ in tokens], dtype=np.int64)
    ends = np.array([e for _, e in tokens], dtype=np.int64)
    for a, b in marks:
        hit = (starts < b) & (ends > a) if b > a else np.zeros(len(tokens), dtype=bool)
        if not hit.any():
            report.uncovered += 1
            if len(report.examples) < 5:
                report.examples.append(repr(text[max(0, a - 10) : b + 10]))
            continue
        marked |= hit
        if starts[hit].min() < a or ends[hit].max() > b:
            report.widened += 1
    return marked, report


def subject_spans(subject_tokens: list[str]) -> list[tuple[int, int]]:
    """Character spans of the subject model's token strings in their concatenation."""
    spans, at = [], 0
    for piece in subject_tokens:
        spans.append((at, at + len(piece)))
        at += len(piece)
    return spans


def carry_values(
    tokens: list[tuple[int, int]], subject: list[tuple[int, int]], values: list[float]
) -> np.ndarray:
    """Per simulator token, the largest value of the subject tokens it overlaps (0 where none does)."""
    out = np.zeros(len(tokens), dtype=np.float32)
    for j, (s, e) in enumerate(tokens):
        over = [v for (a, b), v in zip(subject, values, strict=True) if a < e and b > s]
        if over:
            out[j] = max(over)
    return out


def subject_to_simulator(tokens: list[tuple[int, int]], subject: list[tuple[int, int]]) -> list[int]:
    """Per subject token, the simulator token holding its last character (-1 for an empty token): where a
    simulator's per-token prediction is read for it, so a correlation is computed over the subject's tokens,
    as the recorded one was."""
    out = []
    for a, b in subject:
        if b <= a:
            out.append(-1)
            continue
        j = next((j for j, (s, e) in enumerate(tokens) if s <= b - 1 < e), -1)
        out.append(j)
    return out


def latent_split(n: int, held_out_fraction: float, seed: int) -> list[str]:
    """A seeded split of `n` latents into `train` and `test` (held out): round(n * fraction) held out."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * held_out_fraction))
    split = np.array(["train"] * n, dtype=object)
    split[order[:n_test]] = "test"
    return split.tolist()


def recorded_scores(tables: dict) -> dict:
    """The recorded answers' balanced accuracy per latent (mean and median over latents), on every latent and
    on the held-out ones, and the recorded simulation's correlation: the numbers the data's README states."""
    split = tables["latents"].set_index("latent")["split"]
    out = {}
    for name in ("detection", "fuzz"):
        df = tables[name]
        if df.empty:
            continue
        per = df.groupby("latent").apply(lambda g: balanced_accuracy(g["label"], g["recorded"]))
        out[name] = {
            part: {"latents": int(len(v)), "mean": float(v.mean()), "median": float(v.median())}
            for part, v in (("all", per), ("test", per[split.loc[per.index] == "test"]))
        }
        out[name]["said_yes"] = float(df["recorded"].mean())
    latents = tables["latents"]
    scored = latents["recorded_correlation"].dropna()
    if len(scored):
        out["per_token_correlation"] = {"latents": int(len(scored)), "mean": float(scored.mean())}
    return out


def balanced_accuracy(truth, predicted) -> float:
    """Mean of the rates on true and on false texts (delphi's score); NaN where one class is absent."""
    truth, predicted = np.asarray(truth, dtype=bool), np.asarray(predicted, dtype=bool)
    if truth.all() or not truth.any():
        return float("nan")
    return float((predicted[truth].mean() + (~predicted[~truth]).mean()) / 2)


# GPT-2's document separator is quoted literally in the recorded texts; a simulator whose tokenizer knows the
# string would read its own end-of-text token mid-text. It becomes a paragraph break (counted).
SEPARATOR, SEPARATOR_TEXT = "<|endoftext|>", "\n\n"


@dataclass
class Imported:
    """The tables of an imported record file (each a list of row dicts) and what the import counted."""

    latents: list[dict] = field(default_factory=list)
    detection: list[dict] = field(default_factory=list)
    fuzz: list[dict] = field(default_factory=list)
    train_texts: list[dict] = field(default_factory=list)
    per_token: list[dict] = field(default_factory=list)
    alignment: dict[str, Alignment] = field(default_factory=dict)
    separators: int = 0
    value_fallbacks: int = 0  # training texts whose marks and activating_tokens do not pair up one to one

    def align(self, table: str) -> Alignment:
        return self.alignment.setdefault(table, Alignment())


def clean(text: str, imported: Imported) -> str:
    imported.separators += text.count(SEPARATOR)
    return text.replace(SEPARATOR, SEPARATOR_TEXT)


def marked_row(tokenizer, text_marked: str, imported: Imported, table: str) -> tuple[dict, list]:
    """(a marked text's unmarked string, its simulator tokens' character ends and their marks; the simulator
    tokens' spans)."""
    text, marks = parse_marked(clean(text_marked, imported))
    tokens = simulator_tokens(tokenizer, text)
    marked, report = mark_tokens(tokens, marks, text)
    imported.align(table).add(report)
    row = {
        "text": text,
        "token_ends": [e for _, e in tokens],
        "token_marked": marked.tolist(),
        "marks": [list(m) for m in marks],
    }
    return row, tokens


def import_record(record: dict, latent: int, split: str, tokenizer, imported: Imported) -> None:
    """Add one record (one latent) to the tables."""
    kind = "per_token" if "records" in record else "scored"
    imported.latents.append(
        {
            "latent": latent,
            "layer": int(record["layer"]),
            "index": int(record["index"]),
            "explanation": record["explanation"].strip(),
            "explainer": record.get("explainer", ""),
            "source": record.get("source", ""),
            "kind": kind,
            "split": split,
            "recorded_correlation": float(record.get("ev_correlation_score", float("nan"))),
        }
    )
    if kind == "per_token":
        for t, rec in enumerate(record["records"]):
            pieces = [clean(p, imported) for p in rec["tokens"]]
            text, subject = "".join(pieces), subject_spans(pieces)
            tokens = simulator_tokens(tokenizer, text)
            imported.per_token.append(
                {
                    "latent": latent,
                    "text_id": t,
                    "text": text,
                    "token_ends": [e for _, e in tokens],
                    "token_activations": carry_values(tokens, subject, rec["activations"]).tolist(),
                    "subject_token_ends": [b for _, b in subject],
                    "subject_to_simulator": subject_to_simulator(tokens, subject),
                    "activations": [float(v) for v in rec["activations"]],
                    "simulated_activations": [float(v) for v in rec["simulated_activations"]],
                }
            )
        return
    for t, example in enumerate(record["train_examples_quantised"]):
        row, tokens = marked_row(tokenizer, example["text_marked"], imported, "train_texts")
        values = [float(v) for _, v in example["activating_tokens"]]
        if len(values) != len(row["marks"]):
            imported.value_fallbacks += 1
            values = [max(values, default=1.0)] * len(row["marks"])
        row["token_values"] = carry_values(tokens, [tuple(m) for m in row["marks"]], values).tolist()
        imported.train_texts.append({"latent": latent, "text_id": t, **row})
    for example in record["test_recall"]:
        text = clean(example["text"], imported)
        imported.detection.append(
            {
                "latent": latent,
                "text_id": str(example["id"]),
                "text": text,
                "token_ends": [e for _, e in simulator_tokens(tokenizer, text)],
                "label": bool(example["ground_truth"]),
                "distance": int(example["distance"]),
                "recorded": bool(example["prediction"]),
            }
        )
    for example in record["test_fuzz"]:
        row, _ = marked_row(tokenizer, example["text"], imported, "fuzz")
        imported.fuzz.append(
            {
                "latent": latent,
                "text_id": str(example["id"]),
                **row,
                "label": bool(example["ground_truth"]),
                "distance": int(example["distance"]),
                "recorded": bool(example["prediction"]),
            }
        )


REQUIRED_KEYS = {
    "scored": ("layer", "index", "explanation", "train_examples_quantised", "test_recall", "test_fuzz"),
    "per_token": ("layer", "index", "explanation", "records"),
}


def check_record(record: dict, where: str) -> None:
    """A record of neither schema is the user's error, named by its line."""
    if not isinstance(record, dict):
        raise BadInputError(f"{where}: not a JSON object.")
    kind = "per_token" if "records" in record else "scored"
    missing = [k for k in REQUIRED_KEYS[kind] if k not in record]
    if missing:
        raise BadInputError(
            f"{where}: a {kind} record lacks {missing} (schema: ../shared/external/README.md; a record has "
            "either train_examples_quantised, test_recall and test_fuzz, or records)."
        )


def import_records(path, tokenizer, held_out_fraction: float, seed: int) -> Imported:
    """Every record of a JSON-lines file, checked, split (scored records: `held_out_fraction` of them held
    out, seeded; per-token records have no training texts and are all `test`) and aligned to `tokenizer`."""

    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BadInputError(f"{path}:{n}: not JSON ({err.msg}).") from None
            check_record(record, f"{path}:{n}")
            records.append(record)
    if not records:
        raise BadInputError(f"{path}: no records.")
    scored = [i for i, r in enumerate(records) if "records" not in r]
    splits = dict(zip(scored, latent_split(len(scored), held_out_fraction, seed), strict=True))
    imported = Imported()
    for i, record in enumerate(records):
        import_record(record, i, splits.get(i, "test"), tokenizer, imported)
    return imported


DENSE_FORMAT = "sim_dense_v1"


def dense_training_rows(train_texts, latents, source: str) -> list[dict]:
    """The training latents' marked texts as dense examples (prompt format sim_dense_v1, the columns of a
    data_gen/build_dataset.py dense split): the explanation as the interpretation, a label at every simulator
    token (1 where it overlaps a mark) and the quantised activation (1..10) as its value. `row` and `position`
    are -1: these texts are no cache's rows."""
    from latentsim.prompts import get_format, marked_context, render_completion, render_prompt

    judged = get_format(DENSE_FORMAT).judgment_format
    explanation = dict(zip(latents["latent"], latents["explanation"], strict=True))
    split = dict(zip(latents["latent"], latents["split"], strict=True))
    rows = []
    for t in train_texts.itertuples(index=False):
        if split[t.latent] != "train":
            continue
        ends, labels = [int(e) for e in t.token_ends], [int(m) for m in t.token_marked]
        start = ends[-2] if len(ends) > 1 else 0
        context = marked_context(t.text[:start], t.text[start:])  # the last token, as sim_v1 shows it
        rows.append(
            {
                "prompt": render_prompt(judged, context, explanation[t.latent]),
                "completion": render_completion(judged, labels[-1]),
                "latent": int(t.latent),
                "row": -1,
                "position": -1,
                "window_start": 0,
                "context": context,
                "context_ids": [],
                "n_active": int(sum(labels)),
                "n_active_explained": int(sum(labels)),
                "active": labels[-1],
                "activation": float(t.token_values[-1]),
                "activation_bin": 0,
                "quantile_bin": 0,
                "candidate": "external_marked",
                "negative_kind": "",
                "interpretation": explanation[t.latent],
                "interpretation_source": source,
                "score": None,
                "prompt_format": DENSE_FORMAT,
                "text": t.text,
                "token_ends": ends,
                "token_labels": labels,
                "token_activations": [float(v) for v in t.token_values],
            }
        )
    return rows
