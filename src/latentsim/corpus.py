"""Corpora: load a text corpus through `datasets` and tokenize it into fixed-length rows.

A row is BOS + (ctx_len - 1) tokens; documents are shuffled with the seed, tokenized, and joined by EOS
before chunking (as delphi does), so row i is the same for a given (corpus, tokenizer, ctx_len, seed).
Only as many documents as the requested rows need are tokenized, so a 10B-token Hub corpus costs nothing
beyond the slice used. With `corpus_streaming: true` the corpus is read through `datasets` streaming instead
(`StreamedRows`): nothing is downloaded or held beyond the rows being made, documents come in the corpus's own
order (a stream has no random access to shuffle), and the stream's position after any row can be saved and
resumed exactly.

The embedded corpus `embedded:debian-english` is built from two Debian packages that `./launch.sh`
installs (`apt-get install fortunes python3.11-doc`): the fortune cookie files (BSD-licensed fortune-mod
data: quotations, literature, jokes, science) and the prose paragraphs of the Python 3.11 documentation
(PSF License). About 1.5M SmolLM2 tokens of English. It is written once as JSON lines under the latentsim
cache and then read through `datasets` exactly like a user's local files.
"""

from __future__ import annotations

import glob as _glob
import itertools
import json
import re
from pathlib import Path

import numpy as np
import torch

from latentsim.errors import BadInputError, ConfigError, MissingInputError
from latentsim.io import atomic_write_text
from latentsim.models import EMBEDDED_PREFIX, cache_root

FORTUNES_DIR = Path("/usr/share/games/fortunes")
PYDOC_DIR = Path("/usr/share/doc/python3.11/html/_sources")
FORTUNE_SKIP = {"art", "ascii-art"}  # pictures, not prose

EMBEDDED_CORPORA = {
    "debian-english": "fortunes (BSD) + Python 3.11 docs prose (PSF); apt-get install fortunes "
    "python3.11-doc",
}
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# ---------------------------------------------------------------------------------------- embedded corpus
def _clean_rst(text: str) -> str:
    """Inline reST markup to plain text: :func:`x` -> x, ``x`` -> x, *x* -> x, `x <url>`_ -> x."""
    text = re.sub(r":[a-zA-Z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", text)
    text = re.sub(r"`([^`<]+?)\s*<[^>]*>`_+", r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_*", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*", lambda m: m.group(1) or m.group(2), text)
    return re.sub(r"\s+", " ", text).strip()


def rst_prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a reST file: no directives, code, headings, tables or lists of symbols."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if not lines or lines[0].startswith((" ", "\t", "..", ">>>", "|", "+", "=", "*", "-", "#")):
            continue
        if any(re.fullmatch(r"\s*[=\-*~^#+`.:]{3,}\s*", line) for line in lines):
            continue  # a heading or a table
        para = _clean_rst(" ".join(line.strip() for line in lines))
        words = para.split()
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if len(words) >= 8 and letters / max(len(para), 1) > 0.85 and not para.endswith("::"):
            paragraphs.append(para)
    return paragraphs


def fortune_documents(fortunes_dir: Path = FORTUNES_DIR) -> list[dict]:
    docs = []
    for path in sorted(fortunes_dir.iterdir()):
        if path.suffix or path.name in FORTUNE_SKIP or not path.is_file():
            continue  # .dat indexes and .u8 links are not text files
        for item in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            item = item.strip().strip("%").strip()
            if len(item.split()) >= 4:
                docs.append({"text": item, "source": f"fortunes/{path.name}"})
    return docs


def pydoc_documents(pydoc_dir: Path = PYDOC_DIR) -> list[dict]:
    docs = []
    for path in sorted(pydoc_dir.rglob("*.rst.txt")):
        paragraphs = rst_prose_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            docs.append(
                {"text": "\n\n".join(paragraphs), "source": f"python3.11-doc/{path.relative_to(pydoc_dir)}"}
            )
    return docs


def prepare_embedded_corpus(name: str = "debian-english") -> Path:
    """Write the embedded corpus as JSON lines (once) and return the file."""
    if name not in EMBEDDED_CORPORA:
        raise ConfigError(f"unknown embedded corpus {name!r}; choose one of {sorted(EMBEDDED_CORPORA)}.")
    out = cache_root() / "corpora" / f"{name}.jsonl"
    if out.is_file():
        return out
    missing = [str(d) for d in (FORTUNES_DIR, PYDOC_DIR) if not d.is_dir()]
    if missing:
        raise MissingInputError(
            f"embedded corpus {name!r} is built from Debian packages that are not installed "
            f"({', '.join(missing)} missing): run `apt-get install -y fortunes python3.11-doc` "
            "(./launch.sh setup does this)."
        )
    docs = fortune_documents() + pydoc_documents()
    atomic_write_text(out, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return out


# ---------------------------------------------------------------------------------------------- loading
def load_corpus(
    corpus: str,
    split: str = "train",
    text_column: str = "text",
    config_name: str | None = None,
    revision: str | None = None,
    streaming: bool = False,
):
    """Any corpus reference -> a `datasets.Dataset` (streaming: an `IterableDataset`) with a text column."""
    from datasets import load_dataset

    if corpus.startswith(EMBEDDED_PREFIX):
        corpus = str(prepare_embedded_corpus(corpus[len(EMBEDDED_PREFIX) :]))
    path = Path(corpus)
    looks_local = corpus.startswith((".", "/", "~")) or path.suffix in LOCAL_BUILDERS
    if looks_local and not path.exists() and not any(ch in corpus for ch in "*?["):
        raise MissingInputError(
            f"config key `corpus`: {corpus} does not exist; give an existing file/folder/glob, "
            "a Hub dataset id, or `embedded:debian-english`."
        )
    if path.exists() or any(ch in corpus for ch in "*?["):
        files = (
            sorted(str(p) for p in path.rglob("*") if p.is_file())
            if path.is_dir()
            else sorted(_glob.glob(corpus))
        )
        files = [f for f in files if Path(f).suffix in LOCAL_BUILDERS]
        if not files:
            raise MissingInputError(
                f"config key `corpus`: {corpus!r} holds no .txt/.jsonl/.json/.parquet files."
            )
        builders = {LOCAL_BUILDERS[Path(f).suffix] for f in files}
        if len(builders) > 1:
            raise BadInputError(
                f"config key `corpus`: {corpus!r} mixes file types {sorted(builders)}; point it at one kind."
            )
        # Local files always form a single "train" split; slicing (train[:10%]) still applies.
        local_split = re.sub(r"^[A-Za-z_]+", "train", split)
        ds = load_dataset(builders.pop(), data_files=files, split=local_split, streaming=streaming)
    else:
        ds = load_dataset(corpus, name=config_name, split=split, revision=revision, streaming=streaming)
    # A streamed Hub corpus may not know its columns before the first document (StreamedRows checks it then).
    if ds.column_names is not None and text_column not in ds.column_names:
        raise ConfigError(
            f"config key `corpus_text_column`: corpus {corpus!r} has no column {text_column!r}; "
            f"its columns are {ds.column_names}."
        )
    return ds


def tokenize_rows(
    ds,
    tokenizer,
    ctx_len: int,
    n_rows: int,
    row_start: int = 0,
    seed: int = 22,
    text_column: str = "text",
    batch_docs: int = 256,
) -> torch.Tensor:
    """Rows [row_start, row_start + n_rows) of the shuffled, EOS-joined, BOS-prefixed corpus, as int64."""
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise BadInputError("the tokenizer needs both a BOS and an EOS token to build corpus rows.")
    body = ctx_len - 1
    needed = (row_start + n_rows) * body
    order = np.random.default_rng(seed).permutation(len(ds))
    stream: list[int] = []
    for i in range(0, len(order), batch_docs):
        texts = list(ds.select(order[i : i + batch_docs])[text_column])
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
        if len(stream) >= needed:
            break
    available = len(stream) // body
    if available < row_start + n_rows:
        raise ConfigError(
            f"config key `n_rows`: the corpus yields only {available} rows of {ctx_len} tokens; asked "
            f"for rows [{row_start}, {row_start + n_rows}). Lower `n_rows`/`row_start` or use a larger "
            "corpus."
        )
    chunk = torch.tensor(stream[row_start * body : (row_start + n_rows) * body], dtype=torch.long).view(
        n_rows, body
    )
    bos = torch.full((n_rows, 1), tokenizer.bos_token_id, dtype=torch.long)
    return torch.cat([bos, chunk], dim=1)


class StreamedRows:
    """Rows of a streamed corpus (`load_corpus(..., streaming=True)`), tokenized as they are read:
    BOS + ctx_len - 1 tokens of the EOS-joined documents, in the stream's order. Row r is corpus row r
    (row_start is the caller's). `state()` after a row (the stream's `state_dict` + the tokens read past that
    row) lets `restore` resume there without reading the documents before it again."""

    def __init__(self, ds, tokenizer, ctx_len: int, text_column: str = "text", batch_docs: int = 32):
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise BadInputError("the tokenizer needs both a BOS and an EOS token to build corpus rows.")
        self.ds, self.tokenizer, self.body = ds, tokenizer, ctx_len - 1
        self.text_column, self.batch_docs = text_column, batch_docs
        self.start = ds.state_dict()
        self.restore({"dataset": self.start, "pending": [], "row": 0})

    def state(self) -> dict:
        return {"dataset": self.ds.state_dict(), "pending": list(self.pending), "row": self.row}

    def restore(self, state: dict) -> None:
        self.ds.load_state_dict(state["dataset"])
        self.docs, self.pending, self.row = iter(self.ds), list(state["pending"]), state["row"]

    def rows(self, a: int, b: int, states: dict[int, dict] | None = None) -> torch.Tensor:
        """Corpus rows [a, b), as int64, from the nearest saved `states` ({row: state()}) at or before a."""
        usable = [r for r in (states or {}) if (self.row if self.row <= a else 0) < r <= a]
        if usable:
            self.restore(states[max(usable)])
        elif self.row > a:
            self.restore({"dataset": self.start, "pending": [], "row": 0})
        self._read(a - self.row)
        chunk = torch.tensor(self._read(b - a), dtype=torch.long).view(b - a, self.body)
        return torch.cat(
            [torch.full((b - a, 1), self.tokenizer.bos_token_id, dtype=torch.long), chunk], dim=1
        )

    def _read(self, n_rows: int) -> list[int]:
        needed = n_rows * self.body
        while len(self.pending) < needed:
            texts = [self._text(doc) for doc in itertools.islice(self.docs, self.batch_docs)]
            if not texts:
                raise ConfigError(
                    f"config key `n_rows`: the streamed corpus ended after "
                    f"{self.row + len(self.pending) // self.body} rows of {self.body + 1} tokens. Lower "
                    "`n_rows`/`row_start` or use a larger corpus."
                )
            for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]:
                self.pending.extend(ids)
                self.pending.append(self.tokenizer.eos_token_id)
        out, self.pending = self.pending[:needed], self.pending[needed:]
        self.row += n_rows
        return out

    def _text(self, doc: dict) -> str:
        if self.text_column not in doc:
            raise ConfigError(
                f"config key `corpus_text_column`: the streamed corpus has no column {self.text_column!r}; "
                f"its documents have {sorted(doc)}."
            )
        return doc[self.text_column]


def load_corpus_from_args(args):
    """The dataset a stage's `CorpusArguments` name (load it before any model, so a bad corpus fails fast)."""
    return load_corpus(
        args.corpus,
        args.corpus_split,
        args.corpus_text_column,
        args.corpus_config_name,
        args.corpus_revision,
        streaming=args.corpus_streaming,
    )


def streamed_rows(args, tokenizer, ds=None) -> StreamedRows:
    """The row stream of a stage's `CorpusArguments` (`corpus_streaming: true`)."""
    ds = load_corpus_from_args(args) if ds is None else ds
    return StreamedRows(ds, tokenizer, args.ctx_len, args.corpus_text_column)


def corpus_rows(args, tokenizer, ds=None) -> torch.Tensor:
    """The rows a stage's `CorpusArguments` ask for (streamed, when `corpus_streaming`, and then not
    shuffled)."""
    if args.corpus_streaming:
        return streamed_rows(args, tokenizer, ds).rows(args.row_start, args.row_start + args.n_rows)
    ds = load_corpus_from_args(args) if ds is None else ds
    return tokenize_rows(
        ds, tokenizer, args.ctx_len, args.n_rows, args.row_start, args.seed, args.corpus_text_column
    )
