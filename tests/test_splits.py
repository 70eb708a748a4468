"""The cache's row split (whole documents, separator rows, duplicates removed) and statistics from its
training rows only."""

import json
import random

import numpy as np
import pytest
import torch
from helpers import WORDS, load_script, make_cache
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from latentsim.cache_reader import CacheReader
from latentsim.config import CacheArguments
from latentsim.corpus import corpus_rows
from latentsim.errors import ConfigError
from latentsim.io import sha256_file
from latentsim.latent_stats import load_statistics
from latentsim.splits import latent_twins, row_groups, split_groups, split_rows

HOOK = "layers.1"


def documents_of(splits: dict[str, list[int]], documents: np.ndarray) -> dict[str, set[int]]:
    """{split: every document its rows hold}."""
    return {
        s: {d for r in rows for d in range(documents[r, 0], documents[r, 1] + 1)}
        for s, rows in splits.items()
    }


def test_row_groups_cut_chains_at_rows_holding_a_document_end():
    # Rows 0-5 chain through documents 0..3 (no row ends at a document's end); row 6 starts document 5.
    documents = np.array([[0, 0], [0, 1], [1, 1], [1, 2], [2, 3], [3, 3], [5, 5], [5, 6], [6, 6]])
    assert row_groups(documents, 100).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    # After 2 rows, row 2 holds no document end (row 1's last is row 3's first): row 3 separates instead.
    assert row_groups(documents, 2).tolist() == [0, 0, 0, -1, 1, 1, 2, 2, 2]
    # Row 5 shares nothing with row 6: no separator needed there; the last row never separates.
    assert row_groups(documents, 1).tolist() == [0, -1, 1, -1, 2, 2, 3, -1, 4]


def test_separator_rows_join_a_shared_split_or_are_left_out():
    documents = np.array([[i // 2, (i + 1) // 2] for i in range(200)])  # two rows per document, chained
    record = split_rows(documents, 200, {"validation": 0.1, "test": 0.1, "confirmation": 0.1}, 7, 4)
    rows = record["row_ids"]
    held = sorted(r for split in rows.values() for r in split)
    assert len(held) + record["separator_rows_left_out"] == 200 and len(set(held)) == len(held)
    assert record["separator_rows_left_out"] > 0
    docs = documents_of(rows, documents)
    for a in rows:
        for b in rows:
            assert a == b or not docs[a] & docs[b], (a, b)
    for split, info in record["splits"].items():
        assert info["rows"] == len(rows[split]) and info["documents"] == len(docs[split])
        assert split == "train" or 0 < info["rows"] <= 20 + 2 * info["groups"]  # its share, + separators
    with pytest.raises(ConfigError, match="leave the .* split.* empty; cache more rows"):
        split_rows(documents[:8], 8, {"validation": 0.1, "test": 0.1}, 7, 4)


def test_split_groups_keeps_groups_whole_and_is_seeded():
    groups = np.repeat(np.arange(40), 3)
    parts = split_groups(groups, {"validation": 0.1, "test": 0.2}, np.random.default_rng(0))
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(120))
    assert [len(parts[s]) for s in ("test", "validation", "confirmation")] == [24, 12, 0]
    for s, members in parts.items():
        assert all(set(np.flatnonzero(groups == g)) <= set(members) for g in np.unique(groups[members])), s
    again = split_groups(groups, {"validation": 0.1, "test": 0.2}, np.random.default_rng(0))
    assert all(np.array_equal(parts[s], again[s]) for s in parts)


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory):
    """Documents of 3 to 40 words (1 to 4 rows of 11 tokens each), two of them repeated."""
    rng = random.Random(2)
    texts = [" ".join(rng.choice(WORDS[:40]) for _ in range(rng.randint(3, 40))) for _ in range(120)]
    texts += ["  ".join(texts[5].split()), "  " + texts[9] + "\n"]  # duplicates once whitespace is collapsed
    path = tmp_path_factory.mktemp("long_docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_no_document_spans_two_splits(tmp_path, tiny_model_dir, tiny_sae_dir, long_documents):
    args = make_cache(
        tmp_path,
        tiny_model_dir,
        tiny_sae_dir,
        long_documents,
        n_rows=120,
        validation_fraction=0.15,
        test_fraction=0.15,
        confirmation_fraction=0.1,
        split_group_rows=3,
    )
    reader = CacheReader(tmp_path / "latents", HOOK)
    tok = reader.subject_tokenizer()
    body = reader.tokens[:, 1:]
    documents = reader.documents
    # The recorded documents are the ones the tokens hold: a row holds last - first document ends (EOS), one
    # more when it ends with one.
    ends_with_eos = (body[:, -1] == tok.eos_token_id).astype(int)
    assert np.array_equal(
        (body == tok.eos_token_id).sum(axis=1), documents[:, 1] - documents[:, 0] + ends_with_eos
    )
    splits = reader.row_split()
    docs = documents_of({s: r.tolist() for s, r in splits.items()}, documents)
    assert all(len(splits[s]) for s in ("train", "validation", "test", "confirmation"))
    for a in splits:
        for b in splits:
            assert a == b or not docs[a] & docs[b], (a, b)
    record = reader.row_split_record()
    assert record["grouping"] == "documents" and record["seed"] == args[1].seed
    assert sum(v["rows"] for v in record["splits"].values()) + record["separator_rows_left_out"] == 120
    assert {s: v["documents"] for s, v in record["splits"].items()} == {s: len(d) for s, d in docs.items()}
    # Several rows per document, so the split is not the row-by-row one.
    assert sum(v["groups"] for v in record["splits"].values()) < sum(
        v["rows"] for v in record["splits"].values()
    )

    # The duplicates are removed (their text is held once at most) and counted as the corpus rows count them.
    recorded = reader.config["latentsim"]["documents"]
    assert recorded["duplicates_removed"] == corpus_rows(args[1], tok).duplicates_removed
    assert recorded["documents"] == documents[-1, 1] - documents[0, 0] + 1
    stream = body.ravel().tolist()
    texts = [json.loads(line)["text"] for line in long_documents.read_text().splitlines()]
    for original in (texts[5], texts[9]):
        ids = tok(original, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        found = sum(stream[i : i + len(ids)] == ids for i in range(len(stream) - len(ids) + 1))
        assert found <= 1


def rewrite_rows(folder, rows: np.ndarray, scale: float) -> None:
    """Multiply the cached activations of `rows` by `scale` in every split file (sha256 in config.json
    updated, as if the cache had recorded them so)."""
    config = json.loads((folder / "config.json").read_text())
    for name in config["latentsim"]["files"]:
        data = load_file(str(folder / name))
        hit = np.isin(data["locations"][:, 0], rows)
        data["activations"][hit] = (data["activations"][hit] * scale).astype(np.float16)
        save_file(data, str(folder / name))
        config["latentsim"]["files"][name] = sha256_file(folder / name)
    (folder / "config.json").write_text(json.dumps(config))


def test_statistics_come_from_the_training_rows_only(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    model, corpus, sae, cache = make_cache(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=40)
    reader = CacheReader(tmp_path / "latents", HOOK)
    splits = reader.row_split()
    script = load_script("data_gen/cache_activations.py")

    def statistics_after(rows: np.ndarray, scale: float) -> dict:
        rewrite_rows(tmp_path / "latents" / HOOK, rows, scale)
        (tmp_path / "stats" / f"{HOOK}.json").unlink()  # the finished cache then only redoes its statistics
        script.main(model, corpus, sae, cache)
        return load_statistics(tmp_path / "stats", HOOK)

    before = load_statistics(tmp_path / "stats", HOOK)
    summary = json.loads((tmp_path / "stats" / f"{HOOK}.json").read_text())
    assert summary["rows"] == "train" and summary["n_rows"] == len(splits["train"])
    with safe_open(str(tmp_path / "stats" / f"{HOOK}.safetensors"), "np") as f:
        assert f.metadata() == {"rows": "train"}
    assert summary["n_tokens_excluding_bos"] == len(splits["train"]) * (reader.ctx_len - 1)
    eval_rows = np.concatenate([splits["validation"], splits["test"]])
    after_eval = statistics_after(eval_rows, 3.0)
    assert set(after_eval) == set(before)
    for key in before:
        assert np.array_equal(after_eval[key].numpy(), before[key].numpy()), key
    after_train = statistics_after(splits["train"][:1], 3.0)
    assert not np.array_equal(after_train["max_activation"].numpy(), before["max_activation"].numpy())


def test_a_finished_cache_is_split_again_when_only_its_split_keys_change(
    tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus, monkeypatch
):
    model, corpus, sae, cache = make_cache(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=40)
    before = CacheReader(tmp_path / "latents", HOOK).row_split()
    script = load_script("data_gen/cache_activations.py")
    monkeypatch.setattr(script, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("no model needed"))
    script.main(model, corpus, sae, CacheArguments(**{**vars(cache), "test_fraction": 0.3}))
    after = CacheReader(tmp_path / "latents", HOOK).row_split_record()
    assert after["test_fraction"] == 0.3 and len(after["row_ids"]["test"]) > len(before["test"])
    stats = json.loads((tmp_path / "stats" / f"{HOOK}.json").read_text())
    assert stats["n_rows"] == len(after["row_ids"]["train"])


def token_list(name: str) -> str:
    return f'the token "{name}", as in "...a {name}"'


def test_twins_by_decoder_cosine_and_token_head_share_a_split():
    """Two latents with decoders at cosine 0.95 and two naming the same first 3 tokens are joined (with each
    other's twins, transitively; one naming only the same first token is not) and always land in one split,
    whatever the seed."""
    gen = torch.Generator().manual_seed(0)
    w_dec = torch.nn.functional.normalize(torch.randn(200, 64, generator=gen), dim=1)
    orthogonal = torch.nn.functional.normalize(w_dec[41] - (w_dec[41] @ w_dec[5]) * w_dec[5], dim=0)
    w_dec[40] = 0.95 * w_dec[5] + (1 - 0.95**2) ** 0.5 * orthogonal  # cosine 0.95 with latent 5
    explained = np.sort(np.r_[np.arange(1, 200, 2), [40]])  # the odd latents and 40 (5's twin)
    plain = {int(lat): token_list(f"w{lat}") for lat in explained}
    plain[9] = 'the token "cat" (also "dog", "cow", "owl"), as in "...a cat"'
    plain[77] = 'the token "cat" (also "dog", "cow"), as in "...the cat"'  # the same first 3 tokens as 9
    plain[13] = 'the token "cat" (also "cow", "dog"), as in "...a cat"'  # the same first token only: no twin
    plain[11] = "Commas in Python lists"  # free text: no head
    rich = {7: token_list("dog"), 77: token_list("dog"), 9: token_list("mat")}  # a second set: 7 ~ 77 there
    groups, record = latent_twins(explained, [plain, rich], w_dec)
    index = {int(lat): i for i, lat in enumerate(explained)}
    assert groups[index[5]] == groups[index[40]]
    assert groups[index[9]] == groups[index[77]] == groups[index[7]]
    assert groups[index[13]] != groups[index[9]]
    assert len(np.unique(groups)) == len(explained) - 3
    assert record == {
        "decoder_cosine": 0.9,
        "decoder_pairs": 1,
        "token_head_pairs": 2,  # (9, 77) in the plain set, (7, 77) in the second
        "groups": 2,
        "latents_in_groups": 5,
        "largest_group": 3,
    }
    fractions = {"validation": 0.2, "test": 0.2, "confirmation": 0.2}
    for seed in range(20):
        parts = split_groups(groups, fractions, np.random.default_rng(seed))
        split_of = {int(explained[i]): s for s, members in parts.items() for i in members}
        assert split_of[5] == split_of[40] and split_of[9] == split_of[77] == split_of[7], seed
    without_decoders = latent_twins(explained, [plain], None)[1]
    assert without_decoders["decoder_pairs"] is None and without_decoders["token_head_pairs"] == 1
