"""Interpretations of SAE latents: examples sampled from the cache, explainers, and the delphi file layout.

Examples are 32-token windows: every cache row is cut into non-overlapping windows (as delphi does) and a
latent's activating windows are ranked by their max activation. `top` sampling takes the highest windows;
`quantiles` splits them into 10 equal-count quantiles and draws a few from each, so an interpretation sees
the weak activations too. Interpretations are written one file per latent, `<set>/<hookpoint>_latent<id>.txt`,
holding a JSON string (delphi's layout), atomically, so a rerun skips latents already explained.

Existing interpretations load from: a folder of such files (ours or delphi's), a JSON dict {latent id: text}
(the seed's format), or a Neuronpedia export (a JSON list of {"index"/"feature",
"description"/"explanation"}).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latentsim.cache import SparseCache
from latentsim.cache_reader import CacheReader
from latentsim.errors import BadInputError, ConfigError, MissingInputError
from latentsim.io import atomic_write_json, atomic_write_text

FILE_RE = re.compile(r"^(?P<module>.+)_(?:latent|feature)(?P<latent>\d+)\.txt$")


# -------------------------------------------------------------------------------------------- examples
@dataclass
class Example:
    row: int
    start: int  # position of the window's first token in the row
    tokens: np.ndarray  # [window] token ids
    activations: np.ndarray  # [window] this latent's activation per token (0 where inactive)
    quantile: int | None = None  # for `quantiles` sampling: 0 (weakest) .. n_quantiles-1

    @property
    def max_activation(self) -> float:
        return float(self.activations.max())


class LatentIndex:
    """Latent-major view of a cache: the entries of latent l are `order[offsets[l]:offsets[l + 1]]`. Given
    `rows`, only those cache rows exist for it (examples, counts and non-activating windows alike)."""

    def __init__(self, cache: SparseCache, window: int = 32, rows: np.ndarray | None = None):
        self.cache = cache
        self.window = window
        self.windows_per_row = cache.tokens.shape[1] // window
        n_rows = cache.tokens.shape[0]
        self.row_ids = np.arange(n_rows) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        loc = cache.locations.numpy()
        keep = np.isin(loc[:, 0], self.row_ids) if rows is not None else slice(None)
        loc = loc[keep]
        self.rows, self.positions, self.latents = loc[:, 0], loc[:, 1], loc[:, 2]
        self.values = cache.activations.numpy()[keep]
        self.order = np.argsort(self.latents, kind="stable")
        counts = np.bincount(self.latents, minlength=cache.width)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.tokens = cache.tokens.numpy()

    def window_ids(self) -> np.ndarray:
        """Every window of the index's rows."""
        return (
            self.row_ids[:, None] * self.windows_per_row + np.arange(self.windows_per_row)[None, :]
        ).ravel()

    def count(self, latent: int) -> int:
        return int(self.offsets[latent + 1] - self.offsets[latent])

    def activating_windows(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(window ids, max activation in each window) of every window where `latent` fires."""
        idx = self.order[self.offsets[latent] : self.offsets[latent + 1]]
        in_window = self.positions[idx] < self.windows_per_row * self.window
        idx = idx[in_window]
        win = self.rows[idx] * self.windows_per_row + self.positions[idx] // self.window
        sort = np.argsort(win, kind="stable")
        win, vals = win[sort], self.values[idx][sort]
        if len(win) == 0:
            return win, vals
        starts = np.concatenate([[0], np.nonzero(np.diff(win))[0] + 1])
        return win[starts], np.maximum.reduceat(vals, starts)

    def example(self, latent: int, window_id: int, quantile: int | None = None) -> Example:
        row, k = divmod(int(window_id), self.windows_per_row)
        start = k * self.window
        idx = self.order[self.offsets[latent] : self.offsets[latent + 1]]
        mine = idx[
            (self.rows[idx] == row)
            & (self.positions[idx] >= start)
            & (self.positions[idx] < start + self.window)
        ]
        acts = np.zeros(self.window, dtype=np.float32)
        acts[self.positions[mine] - start] = self.values[mine]
        return Example(row, start, self.tokens[row, start : start + self.window].copy(), acts, quantile)


class SplitLatentIndexes:
    """LatentIndex of a cache read one latent split file at a time: `of(latent)` builds the index of the
    latent's split (dropping the previous one), so asking for latents in ascending order reads each split once
    and memory holds one split's entries, never the whole cache. `rows` as for LatentIndex."""

    def __init__(self, reader: CacheReader, window: int = 32, rows: np.ndarray | None = None):
        self.reader, self.window, self.rows = reader, window, rows
        self.split, self.index = -1, None

    def counts(self) -> np.ndarray:
        """Each latent's non-zeros in `rows`, counted chunk by chunk as the split files are read."""
        counts = np.zeros(self.reader.width, dtype=np.int64)
        for i in range(len(self.reader.splits)):
            for loc, _ in self.reader.entry_chunks(i, self.rows):
                counts += np.bincount(loc[:, 2], minlength=self.reader.width)
        return counts

    def of(self, latent: int) -> LatentIndex:
        split = self.reader.split_of(latent)
        if split != self.split:
            self.index = None  # free the previous split before reading the next
            self.index = LatentIndex(self.reader.select(self.rows, [split]), self.window, self.rows)
            self.split = split
        return self.index


def sample_examples(
    index: LatentIndex,
    latent: int,
    sampling: str,
    rng: np.random.Generator,
    n_top: int = 20,
    n_quantiles: int = 10,
    per_quantile: int = 2,
) -> list[Example]:
    """Activating examples of one latent, sampled `top` or `quantiles` (delphi's two schemes)."""
    windows, maxima = index.activating_windows(latent)
    if sampling == "top":
        best = np.argsort(-maxima, kind="stable")[:n_top]
        return [index.example(latent, windows[i]) for i in best]
    if sampling == "quantiles":
        ranked = np.argsort(maxima, kind="stable")
        out = []
        for q, chunk in enumerate(np.array_split(ranked, n_quantiles)):
            if len(chunk):
                pick = rng.choice(chunk, size=min(per_quantile, len(chunk)), replace=False)
                out.extend(index.example(latent, windows[i], quantile=q) for i in sorted(pick))
        return out
    raise ConfigError(f"config key `sampling`: {sampling!r} is not `top` or `quantiles`.")


def non_activating_examples(
    index: LatentIndex, latent: int, n: int, rng: np.random.Generator
) -> list[Example]:
    """Random windows where `latent` never fires."""
    active = set(index.activating_windows(latent)[0].tolist())
    candidates = np.setdiff1d(index.window_ids(), np.fromiter(active, dtype=np.int64, count=len(active)))
    pick = rng.choice(candidates, size=min(n, len(candidates)), replace=False)
    return [index.example(latent, int(w)) for w in sorted(pick)]


# ------------------------------------------------------------------------------------------ explainers
def token_list_explanation(
    examples: list[Example],
    tokenizer,
    n_tokens: int = 3,
    context: int = 8,
    n_contexts: int = 1,
    n_preceding: int = 0,
) -> str:
    """No LLM: the `n_tokens` tokens the latent fires on most strongly across the examples (each example's
    strongest token, weighted by its activation), optionally the `n_preceding` tokens those most often follow,
    and `n_contexts` distinct example contexts (`context` tokens before the judged one), the strongest first.
    The defaults are the original interpretation, unchanged; latentsim.token_list reads it back."""
    weight: Counter = Counter()
    preceding: Counter = Counter()
    for ex in examples:
        at = int(ex.activations.argmax())
        weight[int(ex.tokens[at])] += ex.max_activation
        if at > 0:
            preceding[int(ex.tokens[at - 1])] += ex.max_activation
    top = [tok for tok, _ in weight.most_common(n_tokens)]
    names = [json.dumps(tokenizer.decode([t]), ensure_ascii=False) for t in top]
    text = f"the token {names[0]}"
    if len(names) > 1:
        text += f" (also {', '.join(names[1:])})"
    if n_preceding and preceding:
        text += ", often after " + ", ".join(
            json.dumps(tokenizer.decode([t]), ensure_ascii=False)
            for t, _ in preceding.most_common(n_preceding)
        )
    quotes: list[str] = []
    for ex in sorted(examples, key=lambda ex: -ex.max_activation):  # stable: the first of equal maxima first
        at = int(ex.activations.argmax())
        before = tokenizer.decode(ex.tokens[max(0, at - context) : at].tolist(), skip_special_tokens=True)
        quote = f'"...{before}{tokenizer.decode(ex.tokens[at : at + 1].tolist())}"'.replace("\n", " ")
        if quote not in quotes:
            quotes.append(quote)
        if len(quotes) == n_contexts:
            break
    return text + ", as in " + " and ".join(quotes)


# ---------------------------------------------------------------------------------------- file layout
def explanation_path(set_dir: Path, hookpoint: str, latent: int) -> Path:
    return Path(set_dir) / f"{hookpoint}_latent{latent}.txt"


# Which cache rows a set's examples came from: written by explain.py, checked by build_dataset.py.
SOURCE_ROWS_FILE = "source_rows.json"


def example_rows(args, cache: CacheReader) -> np.ndarray:
    """The rows explain.py / score.py draw examples from: the training rows of the cache's row split
    (`rows: train`), or all."""
    if args.rows == "all":
        return np.arange(cache.n_rows)
    return cache.row_split()["train"]


def write_source_rows(set_dir: Path, args, rows: np.ndarray, cache: CacheReader) -> None:
    split = cache.row_split_record() if args.rows == "train" else None
    atomic_write_json(
        Path(set_dir) / SOURCE_ROWS_FILE,
        {
            "rows": args.rows,
            "row_split": {k: v for k, v in split.items() if k != "row_ids"} if split else None,
            "n_rows": cache.n_rows,
            "row_ids": [int(r) for r in rows],
        },
    )


def interpretation_source_rows(path: str | Path, n_rows: int) -> np.ndarray | None:
    """The cache rows an interpretation set was made from; None for a set that cannot say (a JSON dict, a
    Neuronpedia export or a delphi folder: made elsewhere, from other text)."""
    path = Path(path)
    record = path / SOURCE_ROWS_FILE
    if record.is_file():
        data = json.loads(record.read_text())
        if data["n_rows"] != n_rows:
            raise BadInputError(
                f"config key `interpretations`: {path} was made from a cache of {data['n_rows']} rows, "
                f"this one has {n_rows}; explain this cache (data_gen/explain.py)."
            )
        return np.asarray(data["row_ids"], dtype=np.int64)
    if (path / "run_config.json").is_file():
        raise BadInputError(
            f"config key `interpretations`: {path} was made by an older data_gen/explain.py that read "
            "every cache row (eval rows included) and did not record them; re-run data_gen/explain.py "
            "into a new set_name (rows: train)."
        )
    return None


def refuse_eval_rows(paths: list[str], eval_rows: np.ndarray, n_rows: int) -> dict[str, str]:
    """Refuse interpretation sets made from any of `eval_rows` (an interpretation could quote the judged
    context); returns {set: what its rows were} for the dataset card."""
    out = {}
    for path in paths:
        rows = interpretation_source_rows(path, n_rows)
        if rows is None:
            out[str(path)] = "not recorded (external set)"
            continue
        if overlap := sorted(set(rows.tolist()) & set(np.asarray(eval_rows).tolist())):
            raise BadInputError(
                f"config key `interpretations`: {path} was made from {len(overlap)} of this dataset's "
                f"validation/test/confirmation rows (e.g. {overlap[:5]}): its interpretations can quote eval "
                "contexts. Explain with `rows: train` (the training rows of the cache's row split)."
            )
        out[str(path)] = f"{len(rows)} cache rows, none of them validation, test or confirmation rows"
    return out


def write_explanation(set_dir: Path, hookpoint: str, latent: int, text: str) -> None:
    atomic_write_text(explanation_path(set_dir, hookpoint, latent), json.dumps(text, ensure_ascii=False))


def _normalise_module(module: str) -> str:
    return module.removeprefix("model.").removeprefix(".model.")


def load_interpretations(path: str | Path, hookpoint: str, width: int) -> dict[int, str]:
    """Interpretations {latent: text} from any supported format, checked against the SAE's hookpoint and
    width."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(
            f"config key `interpretations`: {path} not found; generate them with data_gen/explain.py."
        )
    out: dict[int, str] = {}
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise MissingInputError(f"{path} holds no <hookpoint>_latent<id>.txt explanation files.")
        for file in files:
            match = FILE_RE.match(file.name)
            if not match:
                raise BadInputError(f"{file}: not named <hookpoint>_latent<id>.txt (delphi's layout).")
            if _normalise_module(match["module"]) != _normalise_module(hookpoint):
                raise BadInputError(
                    f"{file} explains hookpoint {match['module']!r}, but the SAE reads {hookpoint!r}."
                )
            raw = file.read_text(encoding="utf-8")
            try:
                text = json.loads(raw)
            except json.JSONDecodeError:
                text = raw  # plain-text files are accepted too
            out[int(match["latent"])] = str(text)
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInputError(
                f"{path}: not valid JSON ({err}); expected {{latent: text}} or a Neuronpedia list."
            ) from None
        if isinstance(data, dict) and "explanations" in data:
            data = data["explanations"]
        if isinstance(data, dict):  # the seed's {latent id: text}
            if not all(str(k).isdigit() for k in data):
                raise BadInputError(
                    f"{path}: keys must be latent ids (integers), got e.g. {next(iter(data))!r}."
                )
            out = {int(k): str(v) for k, v in data.items()}
        elif isinstance(data, list):  # Neuronpedia-style export
            for item in data:
                latent = item.get("index", item.get("feature"))
                text = item.get("description", item.get("explanation"))
                if latent is None or text is None:
                    raise BadInputError(
                        f"{path}: entries need `index` and `description` (Neuronpedia export)."
                    )
                layer = str(item.get("layer", ""))
                match = re.match(r"(\d+)", layer)
                if match and f"layers.{match[1]}" != _normalise_module(hookpoint):
                    raise BadInputError(
                        f"{path}: entry for layer {layer!r}, but the SAE reads {hookpoint!r}."
                    )
                out[int(latent)] = str(text)
        else:
            raise BadInputError(f"{path}: expected a JSON dict {{latent: text}} or a Neuronpedia list.")
    bad = sorted(k for k in out if not 0 <= k < width)
    if bad:
        raise BadInputError(f"{path}: latents {bad[:5]} are outside the SAE's {width} latents; wrong SAE?")
    return out


def highlighted_text(example: Example, tokenizer, threshold: float = 0.3) -> str:
    """The window's text with tokens at >= threshold x the window's max activation marked <<like this>>."""
    cut = threshold * example.max_activation
    parts = []
    for tok, act in zip(example.tokens.tolist(), example.activations.tolist(), strict=True):
        piece = tokenizer.decode([tok], skip_special_tokens=True)
        parts.append(f"<<{piece}>>" if act > 0 and act >= cut else piece)
    return "".join(parts).replace("<<>>", "").replace("\n", " ")


LLM_EXPLAINER_PROMPT = (
    "Here are text examples where one feature of a language model is active. The tokens where it is active "
    "are marked <<like this>>.\n\n{examples}\n\nIn a few words, what does the feature detect? Answer with a "
    "short phrase only."
)


def explainer_messages(
    examples_per_latent: list[list[Example]], subject_tokenizer, max_examples: int = 10
) -> list[str]:
    """The user message asking for one latent's interpretation, from its highlighted examples."""
    out = []
    for examples in examples_per_latent:
        shown = "\n".join(
            f"Example {i + 1}: {highlighted_text(ex, subject_tokenizer)}"
            for i, ex in enumerate(examples[:max_examples])
        )
        out.append(LLM_EXPLAINER_PROMPT.format(examples=shown))
    return out


def first_line(text: str) -> str:
    """An interpretation is the first line of the answer, without quotes."""
    return text.strip().split("\n")[0].strip().strip('"').strip()
