"""Corpus loading (local txt/jsonl/parquet, embedded) and deterministic tokenization into rows."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import build_tiny_tokenizer

from latentsim import corpus as corpus_mod
from latentsim.config import CorpusArguments
from latentsim.corpus import StreamedRows, corpus_rows, load_corpus, rst_prose_paragraphs, tokenize_rows
from latentsim.errors import ConfigError


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_rows_are_deterministic_and_well_formed(tiny_corpus, tok):
    ds = load_corpus(str(tiny_corpus))
    rows = tokenize_rows(ds, tok, ctx_len=16, n_rows=20, seed=3).tokens
    again = tokenize_rows(load_corpus(str(tiny_corpus)), tok, ctx_len=16, n_rows=20, seed=3).tokens
    other = tokenize_rows(ds, tok, ctx_len=16, n_rows=20, seed=4).tokens
    assert rows.shape == (20, 16) and rows.dtype == torch.long
    assert torch.equal(rows, again)
    assert not torch.equal(rows, other)
    assert (rows[:, 0] == tok.bos_token_id).all()
    assert (rows[:, 1:] == tok.bos_token_id).sum() == 0
    assert (rows == tok.eos_token_id).sum() > 0  # documents are joined by EOS
    # A slice of rows is the same whether asked for alone or as part of a longer run.
    assert torch.equal(tokenize_rows(ds, tok, ctx_len=16, n_rows=5, row_start=7, seed=3).tokens, rows[7:12])


def test_rows_follow_the_shuffled_documents(tiny_corpus, tok):
    ds = load_corpus(str(tiny_corpus))
    rows = tokenize_rows(ds, tok, ctx_len=9, n_rows=4, seed=0).tokens

    first_doc = ds[int(np.random.default_rng(0).permutation(len(ds))[0])]["text"]
    first_ids = tok(first_doc, add_special_tokens=False)["input_ids"]
    stream = rows[:, 1:].flatten().tolist()
    assert stream[: len(first_ids)] == first_ids[: len(stream)]


def test_rows_record_the_documents_they_hold(tiny_corpus, tok):
    """Each row's [first, last] document agrees with the EOS tokens that end documents: a row holds
    last - first document ends (one more when it ends with one), and the next row starts in its last document
    (or the next one after an EOS)."""
    rows = tokenize_rows(load_corpus(str(tiny_corpus)), tok, ctx_len=9, n_rows=60, row_start=4, seed=3)
    body, docs = rows.tokens[:, 1:], rows.documents
    ends_with_eos = (body[:, -1] == tok.eos_token_id).numpy().astype(int)
    assert np.array_equal(
        (body == tok.eos_token_id).sum(dim=1).numpy(), docs[:, 1] - docs[:, 0] + ends_with_eos
    )
    assert np.array_equal(docs[1:, 0], docs[:-1, 1] + ends_with_eos[:-1])
    assert docs[0, 0] > 0  # rows 0-3 held the first documents
    assert rows.duplicates_removed == 0 and rows[2:5].documents.tolist() == docs[2:5].tolist()


def test_exact_duplicate_documents_are_removed(tmp_path, tok):
    """A document equal to an earlier one after collapsing whitespace and folding case is skipped and
    counted; its text appears once in the rows."""
    rng = np.random.default_rng(0)
    # Every distinct document is 7 words + EOS = one row of 9 tokens, so the rows hold each of them once.
    texts = [
        " ".join(rng.choice(["cat", "dog", "sun", "moon", "tree", "river", "star"], 7)) for _ in range(30)
    ]
    texts = list(dict.fromkeys(texts))  # distinct to begin with
    dup = "the red house on the big tree"
    corpus = [
        dup,
        *texts[:10],
        "The  red HOUSE on\nthe big tree",
        *texts[10:],
        dup + " ",
        "  the red house on the big tree",
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    n_distinct = len(texts) + 1

    rows = tokenize_rows(load_corpus(str(path)), tok, ctx_len=9, n_rows=n_distinct, seed=1)
    # The count is of the duplicates met before the rows' last document, in the shuffled order.
    order = np.random.default_rng(1).permutation(len(corpus))
    keys = [" ".join(corpus[i].split()).casefold() for i in order]
    last_new = max(i for i, k in enumerate(keys) if k not in keys[:i])
    assert rows.duplicates_removed == sum(k in keys[:i] for i, k in enumerate(keys[:last_new]))
    dup_ids = tok(dup, add_special_tokens=False)["input_ids"]
    held = [r[1:-1] for r in rows.tokens.tolist()]
    assert held.count(dup_ids) == 1 and len({tuple(r) for r in held}) == n_distinct
    assert rows.documents.tolist() == [[i, i] for i in range(n_distinct)]

    # Streamed (the file's order): the copy at position 11 is skipped and counted; the two after the last
    # distinct document are not before the rows' last document. A resumed stream still knows the documents it
    # saw before the saved state (the copy comes after it).
    def streamed():
        return StreamedRows(load_corpus(str(path), streaming=True), tok, ctx_len=9, batch_docs=4)

    whole = streamed().rows(0, n_distinct)
    assert whole.duplicates_removed == 1 and whole.documents.tolist() == [[i, i] for i in range(n_distinct)]
    assert [r[1:-1] for r in whole.tokens.tolist()].count(dup_ids) == 1
    first = streamed()
    first.rows(0, 5)
    tail = streamed().rows(5, n_distinct, {5: json.loads(json.dumps(first.state()))})
    assert tail.tokens.tolist() == whole.tokens[5:].tolist()
    assert tail.documents.tolist() == whole.documents[5:].tolist()
    assert tail.duplicates_before.tolist() == whole.duplicates_before[5:].tolist()
    with pytest.raises(ConfigError, match="n_rows"):
        streamed().rows(0, n_distinct + 1)


def test_too_few_rows_is_a_clear_error(tiny_corpus, tok):
    with pytest.raises(ValueError, match="yields only .* rows"):
        tokenize_rows(load_corpus(str(tiny_corpus)), tok, ctx_len=64, n_rows=10_000)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_file_kinds(tmp_path, kind):
    texts = ["the cat sat", "a dog ran far", "yes it was red"]
    path = tmp_path / f"docs.{kind}"
    if kind == "txt":
        path.write_text("\n".join(texts) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    else:
        pq.write_table(pa.table({"text": texts}), path)
    ds = load_corpus(str(path))
    assert list(ds["text"]) == texts
    assert list(load_corpus(str(tmp_path))["text"]) == texts  # a folder works too


def test_missing_text_column_names_the_key(tiny_corpus):
    with pytest.raises(ConfigError, match="corpus_text_column"):
        load_corpus(str(tiny_corpus), text_column="content")


def test_rst_prose_filter_keeps_prose_only():
    rst = """Heading
=======

This paragraph explains how :func:`sorted` returns a ``list`` of the items in *order* always.

.. note::

   A directive body.

::

    code = 1  # indented code

>>> print("doctest")

Short line.
"""
    assert rst_prose_paragraphs(rst) == [
        "This paragraph explains how sorted returns a list of the items in order always."
    ]


def test_embedded_corpus_is_built_from_debian_files(tmp_path, monkeypatch):
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    (fortunes / "wisdom").write_text(
        "A penny saved is a penny earned.\n%\nHe who laughs last laughs best.\n%\n"
    )
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x01")
    (fortunes / "art").write_text("  /\\_/\\ cat picture here ok\n%\n")
    pydoc = tmp_path / "pydoc" / "tutorial"
    pydoc.mkdir(parents=True)
    (pydoc / "intro.rst.txt").write_text(
        "Python is an easy to learn, powerful programming language for everyone.\n"
    )
    monkeypatch.setattr(corpus_mod, "FORTUNES_DIR", fortunes)
    monkeypatch.setattr(corpus_mod, "PYDOC_DIR", tmp_path / "pydoc")
    monkeypatch.setattr(corpus_mod.fortune_documents, "__defaults__", (fortunes,))
    monkeypatch.setattr(corpus_mod.pydoc_documents, "__defaults__", (tmp_path / "pydoc",))
    ds = load_corpus("embedded:debian-english")
    assert sorted(ds["source"]) == [
        "fortunes/wisdom",
        "fortunes/wisdom",
        "python3.11-doc/tutorial/intro.rst.txt",
    ]
    assert "A penny saved is a penny earned." in list(ds["text"])


def test_missing_debian_packages_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "FORTUNES_DIR", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes python3.11-doc"):
        corpus_mod.prepare_embedded_corpus("debian-english")


def test_missing_local_corpus_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="config key `corpus`"):
        load_corpus(str(tmp_path / "nope.jsonl"))


class CountingTokenizer:
    """The tiny tokenizer, counting the documents it tokenizes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.documents = tokenizer, 0
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    def __call__(self, texts, **kwargs):
        self.documents += len(texts)
        return self.tokenizer(texts, **kwargs)


def test_streamed_rows_are_the_documents_in_order_and_resume_from_a_saved_state(tiny_corpus, tok):
    docs = [json.loads(line)["text"] for line in tiny_corpus.read_text().splitlines()]
    stream = [t for ids in tok(docs, add_special_tokens=False)["input_ids"] for t in [*ids, tok.eos_token_id]]
    rows = StreamedRows(load_corpus(str(tiny_corpus), streaming=True), tok, ctx_len=9, batch_docs=4)
    first = rows.rows(0, 60).tokens  # 480 tokens: ~28 documents
    assert first[:, 0].eq(tok.bos_token_id).all() and first[:, 1:].flatten().tolist() == stream[:480]
    state = rows.state()
    assert state["row"] == 60 and rows.rows(60, 62).tokens[:, 1:].flatten().tolist() == stream[480:496]
    # A new process resumes from the saved state: the same rows, without tokenizing the documents before them.
    counting = CountingTokenizer(tok)
    resumed = StreamedRows(load_corpus(str(tiny_corpus), streaming=True), counting, ctx_len=9, batch_docs=4)
    again = resumed.rows(60, 62, {60: json.loads(json.dumps(state))})
    assert again.tokens.tolist() == rows.rows(60, 62).tokens.tolist()
    assert again.documents.tolist() == rows.rows(60, 62).documents.tolist()
    assert counting.documents <= 8  # at most two batches of 4 documents after row 60
    # Going back restarts the stream (no saved state at or before row 1 but the start).
    assert rows.rows(1, 3).tokens.tolist() == first[1:3].tolist()
    with pytest.raises(ConfigError, match="n_rows"):
        rows.rows(0, 10_000)


def test_streaming_refuses_slices_and_missing_columns(tiny_corpus):
    with pytest.raises(ConfigError, match="corpus_split"):
        CorpusArguments(corpus=str(tiny_corpus), corpus_split="train[:10%]", corpus_streaming=True)
    rows = StreamedRows(load_corpus(str(tiny_corpus), streaming=True), build_tiny_tokenizer(), ctx_len=9)
    rows.text_column = "content"  # a Hub stream whose columns are only known from its first document
    with pytest.raises(ConfigError, match="corpus_text_column"):
        rows.rows(0, 2)
    args = CorpusArguments(corpus=str(tiny_corpus), ctx_len=9, n_rows=4, row_start=2, corpus_streaming=True)
    assert (
        corpus_rows(args, build_tiny_tokenizer()).tokens.tolist()
        == StreamedRows(load_corpus(str(tiny_corpus), streaming=True), build_tiny_tokenizer(), ctx_len=9)
        .rows(2, 6)
        .tokens.tolist()
    )
