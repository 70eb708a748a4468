"""Example sampling from the cache, explainers, and loading every interpretation format."""

import json

import numpy as np
import pytest
import torch
from helpers import build_tiny_tokenizer, load_script, make_cache

from latentsim.cache import SparseCache
from latentsim.cache_reader import CacheReader, load_cache
from latentsim.config import ExplainArguments
from latentsim.explain import (
    LatentIndex,
    load_interpretations,
    non_activating_examples,
    sample_examples,
    token_list_explanation,
    write_explanation,
)
from latentsim.token_list import TokenList, parse_token_list


def synthetic_cache() -> SparseCache:
    """4 rows x 9 tokens (windows of 4: positions 0-3 and 4-7; position 8 belongs to no window)."""
    tokens = torch.arange(36).reshape(4, 9) % 30 + 4
    entries = [
        (0, 1, 2, 1.0),
        (0, 2, 2, 3.0),
        (0, 5, 2, 2.0),
        (1, 6, 2, 5.0),
        (2, 3, 2, 0.5),
        (3, 8, 2, 9.0),
        (1, 1, 0, 4.0),
    ]
    loc = torch.tensor([e[:3] for e in entries])
    return SparseCache(tokens, loc, torch.tensor([e[3] for e in entries]), {}, width=3)


def test_activating_windows_take_the_max_per_window():
    index = LatentIndex(synthetic_cache(), window=4)
    windows, maxima = index.activating_windows(2)
    # windows: row*2 + pos//4; position 8 is outside every window
    assert windows.tolist() == [0, 1, 3, 4] and maxima.tolist() == [3.0, 2.0, 5.0, 0.5]
    ex = index.example(2, 0)
    assert ex.tokens.tolist() == synthetic_cache().tokens[0, :4].tolist()
    assert ex.activations.tolist() == [0.0, 1.0, 3.0, 0.0] and ex.max_activation == 3.0


def test_top_and_quantile_sampling():
    index = LatentIndex(synthetic_cache(), window=4)
    rng = np.random.default_rng(0)
    top = sample_examples(index, 2, "top", rng, n_top=2)
    assert [e.max_activation for e in top] == [5.0, 3.0]
    quant = sample_examples(index, 2, "quantiles", rng, n_quantiles=2, per_quantile=1)
    assert [e.quantile for e in quant] == [0, 1]
    assert quant[0].max_activation in (0.5, 2.0) and quant[1].max_activation in (3.0, 5.0)
    with pytest.raises(ValueError, match="sampling"):
        sample_examples(index, 2, "random", rng)


def test_non_activating_examples_never_fire():
    index = LatentIndex(synthetic_cache(), window=4)
    examples = non_activating_examples(index, 2, n=10, rng=np.random.default_rng(0))
    assert len(examples) == 4 and all(e.max_activation == 0 for e in examples)  # 8 windows, 4 active


def test_index_restricted_to_rows_sees_nothing_of_the_others():
    index = LatentIndex(synthetic_cache(), window=4, rows=np.array([1, 3]))
    windows, maxima = index.activating_windows(2)
    assert windows.tolist() == [3] and maxima.tolist() == [5.0]  # row 0's and row 2's windows are gone
    assert (
        index.count(0) == 1 and index.count(2) == 2
    )  # row 1's entries only (row 3's sits outside any window)
    assert index.window_ids().tolist() == [2, 3, 6, 7]
    examples = non_activating_examples(index, 2, n=10, rng=np.random.default_rng(0))
    assert sorted(e.row for e in examples) == [1, 3, 3]


def test_token_list_explanation_names_the_strongest_tokens():
    tok = build_tiny_tokenizer()
    ids = tok("the cat sat on a mat", add_special_tokens=False)["input_ids"]
    from latentsim.explain import Example

    acts = [np.array([0, 2.0, 0, 0, 0, 0]), np.array([0, 0, 0, 0, 0, 1.0]), np.array([0, 3.0, 0, 0, 0, 0])]
    examples = [Example(0, 0, np.array(ids), a.astype(np.float32)) for a in acts]
    text = token_list_explanation(examples, tok)
    # "cat" carries 5.0 of activation, "mat" 1.0; the example is the strongest window (a WordLevel decode
    # joins tokens without spaces).
    assert text == 'the token "cat" (also "mat"), as in "...thecat"'


def test_richer_token_list_names_more_tokens_what_they_follow_and_more_contexts():
    tok = build_tiny_tokenizer()
    from latentsim.explain import Example

    ids = [
        np.array(tok(t, add_special_tokens=False)["input_ids"])
        for t in ("the cat sat", "a mat sat", "the dog sat")
    ]
    acts = [np.array([0, 3.0, 0]), np.array([0, 2.0, 0]), np.array([0, 1.0, 0]), np.array([0, 0.5, 0])]
    examples = [
        Example(0, 0, i, a.astype(np.float32))
        for i, a in zip([ids[0], ids[1], ids[2], ids[0]], acts, strict=True)
    ]
    text = token_list_explanation(examples, tok, n_tokens=5, context=1, n_contexts=3, n_preceding=2)
    # weights: cat 3.5, mat 2, dog 1; before them: "the" 4.5, "a" 2. The repeated "...thecat" is quoted once.
    assert text == (
        'the token "cat" (also "mat", "dog"), often after "the", "a", '
        'as in "...thecat" and "...amat" and "...thedog"'
    )
    assert (
        token_list_explanation(examples, tok, n_contexts=1)
        == 'the token "cat" (also "mat", "dog"), as in "...thecat"'
    )
    # Read back, each cue in its place: the "often after" tokens are not tokens it fires on.
    assert parse_token_list(text) == TokenList(
        ("cat", "mat", "dog"), ("the", "a"), ("thecat", "amat", "thedog")
    )
    plain = parse_token_list(token_list_explanation(examples, tok, n_contexts=1))
    assert plain == TokenList(("cat", "mat", "dog"), (), ("thecat",))


def test_token_list_parser_reads_names_that_look_like_its_own_syntax():
    """Names are JSON strings: quotes, commas, `(also` and `, as in` inside a name stay inside it; contexts
    (quoted as written) split only where the next one opens with `...`."""
    text = (
        'the token ", as in " (also "\\"", " (also"), often after "\\n", as in "...say " and " no" and "...x"'
    )
    assert parse_token_list(text) == TokenList(
        tokens=(", as in ", '"', " (also"), preceding=("\n",), contexts=('say " and " no', "x")
    )
    assert parse_token_list("Commas inside Python lists") is None
    assert parse_token_list('the token "x", as in nothing quoted') is None


def test_load_every_format(tmp_path):
    folder = tmp_path / "delphi"
    write_explanation(folder, "layers.3", 7, "commas in lists")
    (folder / "layers.3_latent9.txt").write_text('"plain json string"')
    assert load_interpretations(folder, "layers.3", width=10) == {
        7: "commas in lists",
        9: "plain json string",
    }
    (tmp_path / "seed.json").write_text(json.dumps({"1": "a", "4": "b"}))
    assert load_interpretations(tmp_path / "seed.json", "layers.3", width=10) == {1: "a", 4: "b"}
    (tmp_path / "np.json").write_text(
        json.dumps([{"modelId": "m", "layer": "3-res-16k", "index": "2", "description": "dates"}])
    )
    assert load_interpretations(tmp_path / "np.json", "layers.3", width=10) == {2: "dates"}


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: write_explanation(p, "layers.4", 1, "x"), "explains hookpoint 'layers.4'"),
        (lambda p: write_explanation(p, "layers.3", 50, "x"), "outside the SAE's 10 latents"),
        (lambda p: (p / "notes.txt").write_text("x"), "not named"),
    ],
)
def test_interpretations_for_another_sae_are_refused(tmp_path, setup, message):
    folder = tmp_path / "set"
    folder.mkdir()
    setup(folder)
    with pytest.raises(ValueError, match=message):
        load_interpretations(folder, "layers.3", width=10)


def test_missing_interpretations_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_gen/explain.py"):
        load_interpretations(tmp_path / "nope", "layers.3", width=10)


@pytest.mark.parametrize("explainer", ["token_list", "llm"])
def test_explain_script_writes_resumable_sets(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus, explainer):
    make_cache(tmp_path / "cache", tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=24, ctx_len=16)
    script = load_script("data_gen/explain.py")
    args = ExplainArguments(
        cache_dir=str(tmp_path / "cache"),
        hookpoint="layers.1",
        explanations_dir=str(tmp_path / "expl"),
        explainer=explainer,
        window=8,
        min_activations=3,
        max_latents=5 if explainer == "llm" else 0,
        explainer_model=str(tiny_model_dir),
        max_new_tokens=4,
        batch_size=2,
    )
    script.main(args)
    set_dir = tmp_path / "expl" / f"{explainer}-quantiles"
    report = json.loads((set_dir / "explain_report.json").read_text())
    cache = load_cache(tmp_path / "cache" / "latents", "layers.1")
    train = CacheReader(tmp_path / "cache" / "latents", "layers.1").row_split()["train"]
    in_train = np.isin(cache.locations[:, 0].numpy(), train)
    counts = np.bincount(cache.locations[in_train, 2].numpy(), minlength=64)  # examples: training rows only
    assert report["too_rare"] == int((counts < 3).sum())
    assert report["explained"] + len(report["empty_outputs"]) == report["eligible"]
    loaded = load_interpretations(set_dir, "layers.1", width=64)
    assert len(loaded) == report["explained"] and all(counts[lat] >= 3 for lat in loaded)
    before = {p.name: p.stat().st_mtime_ns for p in set_dir.glob("*.txt")}
    script.main(args)  # a rerun explains nothing again
    assert {p.name: p.stat().st_mtime_ns for p in set_dir.glob("*.txt")} == before


def test_explain_script_on_a_vllm_client_writes_each_latents_first_line(
    tmp_path, monkeypatch, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    """backend vllm (a stand-in engine behind the real VLLMClient): messages go in calls of the client's
    prompts_per_call, each answer's first line is written to its own latent, an empty answer is reported."""
    from latentsim import llm_client

    make_cache(tmp_path / "cache", tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=24, ctx_len=16)
    calls = []

    def generate(llm, ids, max_new_tokens):
        calls.append(len(ids))
        start = sum(calls[:-1])
        return [f'"answer {start + i}"\nsecond line' if start + i != 2 else "\n" for i in range(len(ids))]

    monkeypatch.setattr(llm_client, "require_vllm", lambda: None)
    monkeypatch.setattr(llm_client, "load_llm", lambda *a, **k: "engine")
    monkeypatch.setattr(llm_client, "vllm_generate", generate)
    monkeypatch.setattr(llm_client.VLLMClient, "prompts_per_call", 2)
    args = ExplainArguments(
        cache_dir=str(tmp_path / "cache"),
        hookpoint="layers.1",
        explanations_dir=str(tmp_path / "expl"),
        explainer="llm",
        backend="vllm",
        window=8,
        min_activations=3,
        max_latents=5,
        explainer_model=str(tiny_model_dir),
    )
    load_script("data_gen/explain.py").main(args)
    set_dir = tmp_path / "expl" / "llm-quantiles"
    report = json.loads((set_dir / "explain_report.json").read_text())
    assert calls == [2, 2, 1]
    loaded = load_interpretations(set_dir, "layers.1", width=64)
    latents = sorted(loaded) + report["empty_outputs"]
    assert len(latents) == 5 and len(report["empty_outputs"]) == 1
    assert sorted(loaded.values()) == ["answer 0", "answer 1", "answer 3", "answer 4"]
