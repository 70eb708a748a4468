"""Corpora: load a text corpus through `datasets` and tokenize it into fixed-length rows.

A row is BOS + (ctx_len - 1) tokens; documents are shuffled with the seed, tokenized, and joined by EOS
before chunking (as delphi does), so row i is the same for a given (corpus, tokenizer, ctx_len, seed).
Only as many documents as the requested rows need are tokenized, so a 10B-token Hub corpus costs nothing
beyond the slice used. With `corpus_streaming: true` the corpus is read through `datasets` streaming instead
(`StreamedRows`): nothing is downloaded or held beyond the rows being made, documents come in the corpus's own
order (a stream has no random access to shuffle), and the stream's position after any row can be saved and
resumed exactly.

Documents: an exact duplicate of an earlier document (the same text once whitespace runs are collapsed and
case folded) is skipped where it comes in the (shuffled or streamed) order, which keeps the first copy as
removing duplicates before shuffling would, while reading no more of the corpus than the rows need. The kept
documents are numbered in order, and each row records the first and last document it holds (`CorpusRows`):
the cache groups the rows that share a document so that the row split never cuts one (latentsim.splits).

The embedded corpus `embedded:debian-english` is built from two Debian packages that `./launch.sh`
installs (`apt-get install fortunes python3.11-doc`): the fortune cookie files (BSD-licensed fortune-mod
data: quotations, literature, jokes, science) and the prose paragraphs of the Python 3.11 documentation
(PSF License). About 1.5M SmolLM2 tokens of English. It is written once as JSON lines under the latentsim
cache and then read through `datasets` exactly like a user's local files.
"""

from __future__ import annotations

import base64
import glob as _glob
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
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


def document_key(text: str) -> int:
    """What makes two documents exact duplicates: their text with whitespace runs collapsed and case folded,
    hashed to 64 bits (blake2b; a collision among a corpus's documents is vanishingly unlikely)."""
    normal = " ".join(text.split()).casefold()
    return int.from_bytes(hashlib.blake2b(normal.encode("utf-8"), digest_size=8).digest(), "little")


@dataclass
class CorpusRows:
    """Rows of a corpus and the documents they hold."""

    tokens: torch.Tensor  # [n, ctx_len] int64, BOS first
    documents: np.ndarray  # [n, 2] int64: the first and last document (index among the kept ones) of each row
    duplicates_before: np.ndarray  # [n] int64: duplicate documents skipped before each row's last document

    def __getitem__(self, rows: slice) -> CorpusRows:
        return CorpusRows(self.tokens[rows], self.documents[rows], self.duplicates_before[rows])

    @property
    def duplicates_removed(self) -> int:
        """Duplicate documents skipped up to the rows' last document (from the start of the corpus)."""
        return int(self.duplicates_before[-1]) if len(self.duplicates_before) else 0


class DocumentStream:
    """The EOS-joined tokens of the distinct documents fed to it, each token tagged with its document's index
    (kept documents are numbered in order; exact duplicates of earlier ones are skipped and counted). Rows are
    taken off its front. `state` / `from_state` save and restore it as JSON (StreamedRows' resume)."""

    def __init__(self, tokenizer):
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise BadInputError("the tokenizer needs both a BOS and an EOS token to build corpus rows.")
        self.tokenizer = tokenizer
        self.tokens: list[int] = []  # read, not yet taken
        self.document_of: list[int] = []  # per token of `tokens`
        self.seen: set[int] = set()  # document_key of every kept document
        self.n_documents = 0  # documents kept so far
        self.duplicates = 0  # documents skipped so far
        self.duplicates_before: dict[
            int, int
        ] = {}  # per document still in `tokens`: duplicates skipped before it

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, texts: list[str]) -> None:
        fresh = []
        for text in texts:
            key = document_key(text)
            if key in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(key)
            self.duplicates_before[self.n_documents + len(fresh)] = self.duplicates
            fresh.append(text)
        for ids in self.tokenizer(fresh, add_special_tokens=False)["input_ids"] if fresh else []:
            self.tokens.extend(ids)
            self.tokens.append(self.tokenizer.eos_token_id)
            self.document_of.extend([self.n_documents] * (len(ids) + 1))
            self.n_documents += 1

    def take(self, n_rows: int, body: int) -> CorpusRows:
        """The next `n_rows` rows of BOS + `body` tokens (the caller has added enough documents)."""
        n = n_rows * body
        tokens, documents = self.tokens[:n], np.asarray(self.document_of[:n], dtype=np.int64)
        del self.tokens[:n], self.document_of[:n]
        per_row = documents.reshape(n_rows, body)
        duplicates = np.array([self.duplicates_before[int(d)] for d in per_row[:, -1]], dtype=np.int64)
        first_left = self.document_of[0] if self.document_of else self.n_documents
        self.duplicates_before = {d: c for d, c in self.duplicates_before.items() if d >= first_left}
        chunk = torch.tensor(tokens, dtype=torch.long).view(n_rows, body)
        bos = torch.full((n_rows, 1), self.tokenizer.bos_token_id, dtype=torch.long)
        return CorpusRows(torch.cat([bos, chunk], dim=1), per_row[:, [0, -1]].copy(), duplicates)

    def state(self) -> dict:
        runs = []  # the pending tokens' documents, run-length coded
        for doc in self.document_of:
            if runs and runs[-1][0] == doc:
                runs[-1][1] += 1
            else:
                runs.append([doc, 1])
        seen = np.array(sorted(self.seen), dtype=np.uint64).tobytes()
        return {
            "pending": list(self.tokens),
            "pending_documents": runs,
            "n_documents": self.n_documents,
            "duplicates": self.duplicates,
            "duplicates_before": {str(d): c for d, c in self.duplicates_before.items()},
            "seen": base64.b64encode(seen).decode("ascii"),
        }

    @classmethod
    def from_state(cls, tokenizer, state: dict) -> DocumentStream:
        stream = cls(tokenizer)
        stream.tokens = list(state["pending"])
        stream.document_of = [doc for doc, count in state["pending_documents"] for _ in range(count)]
        stream.n_documents, stream.duplicates = state["n_documents"], state["duplicates"]
        stream.duplicates_before = {int(d): c for d, c in state["duplicates_before"].items()}
        seen = np.frombuffer(base64.b64decode(state["seen"]), dtype=np.uint64)
        stream.seen = {int(k) for k in seen}
        return stream


def tokenize_rows(
    ds,
    tokenizer,
    ctx_len: int,
    n_rows: int,
    row_start: int = 0,
    seed: int = 22,
    text_column: str = "text",
    batch_docs: int = 256,
) -> CorpusRows:
    """Rows [row_start, row_start + n_rows) of the shuffled, deduplicated, EOS-joined, BOS-prefixed corpus,
    and the documents each holds."""
    stream = DocumentStream(tokenizer)
    body = ctx_len - 1
    needed = (row_start + n_rows) * body
    order = np.random.default_rng(seed).permutation(len(ds))
    for i in range(0, len(order), batch_docs):
        stream.add(list(ds.select(order[i : i + batch_docs])[text_column]))
        if len(stream) >= needed:
            break
    available = len(stream) // body
    if available < row_start + n_rows:
        raise ConfigError(
            f"config key `n_rows`: the corpus yields only {available} rows of {ctx_len} tokens; asked "
            f"for rows [{row_start}, {row_start + n_rows}). Lower `n_rows`/`row_start` or use a larger "
            "corpus."
        )
    stream.take(row_start, body)
    return stream.take(n_rows, body)


class StreamedRows:
    """Rows of a streamed corpus (`load_corpus(..., streaming=True)`), tokenized as they are read:
    BOS + ctx_len - 1 tokens of the EOS-joined distinct documents, in the stream's order. Row r is corpus
    row r (row_start is the caller's). `state()` after a row (the stream's `state_dict`, the tokens read past
    that row and what DocumentStream knows of the documents so far) lets `restore` resume there without
    reading the documents before it again."""

    def __init__(self, ds, tokenizer, ctx_len: int, text_column: str = "text", batch_docs: int = 32):
        self.ds, self.tokenizer, self.body = ds, tokenizer, ctx_len - 1
        self.text_column, self.batch_docs = text_column, batch_docs
        self.start = ds.state_dict()
        self.restore({"dataset": self.start, "row": 0})

    def state(self) -> dict:
        return {"dataset": self.ds.state_dict(), "row": self.row, **self.stream.state()}

    def restore(self, state: dict) -> None:
        self.ds.load_state_dict(state["dataset"])
        self.docs, self.row = iter(self.ds), state["row"]
        self.stream = (
            DocumentStream.from_state(self.tokenizer, state)
            if "pending" in state
            else DocumentStream(self.tokenizer)
        )

    def rows(self, a: int, b: int, states: dict[int, dict] | None = None) -> CorpusRows:
        """Corpus rows [a, b) from the nearest saved `states` ({row: state()}) at or before a."""
        usable = [r for r in (states or {}) if (self.row if self.row <= a else 0) < r <= a]
        if usable:
            self.restore(states[max(usable)])
        elif self.row > a:
            self.restore({"dataset": self.start, "row": 0})
        self._read(a - self.row)
        return self._read(b - a)

    def _read(self, n_rows: int) -> CorpusRows:
        while len(self.stream) < n_rows * self.body:
            texts = [self._text(doc) for doc in itertools.islice(self.docs, self.batch_docs)]
            if not texts:
                raise ConfigError(
                    f"config key `n_rows`: the streamed corpus ended after "
                    f"{self.row + len(self.stream) // self.body} rows of {self.body + 1} tokens. Lower "
                    "`n_rows`/`row_start` or use a larger corpus."
                )
            self.stream.add(texts)
        self.row += n_rows
        return self.stream.take(n_rows, self.body)

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


def corpus_rows(args, tokenizer, ds=None) -> CorpusRows:
    """The rows a stage's `CorpusArguments` ask for, with their documents (streamed, when `corpus_streaming`,
    and then not shuffled)."""
    if args.corpus_streaming:
        return streamed_rows(args, tokenizer, ds).rows(args.row_start, args.row_start + args.n_rows)
    ds = load_corpus_from_args(args) if ds is None else ds
    return tokenize_rows(
        ds, tokenizer, args.ctx_len, args.n_rows, args.row_start, args.seed, args.corpus_text_column
    )
