"""Simulator examples: labels checked against the cache, leak-free splits, mixtures, determinism, errors."""

import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import FakeHubApi, build_char_tokenizer, load_script, make_cache

from latentsim.cache import load_cache
from latentsim.config import ConfigError, DatasetArguments, ExplainArguments, parse_config
from latentsim.dataset import activation_bin, quantile_bin, split_ids
from latentsim.explain import write_explanation
from latentsim.interpretation_scores import load_scores
from latentsim.latent_stats import load_statistics

HOOK = "layers.1"


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A tiny cache (3 delphi splits: latent ids need the split start added back) and two interpretation sets."""
    root = tmp_path_factory.mktemp("ds")
    make_cache(root / "cache", tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=60, ctx_len=20)
    explain = load_script("data_gen/explain.py")
    for sampling in ("top", "quantiles"):
        explain.main(ExplainArguments(cache_dir=str(root / "cache"), hookpoint=HOOK, explanations_dir=str(root / "expl"),
                                      sampling=sampling, window=8, min_activations=2))
    return root


def build(root, tiny_model_dir, name, **kwargs):
    args = DatasetArguments(**{
        "cache_dir": str(root / "cache"), "hookpoint": HOOK, "interpretations": [str(root / "expl" / "token_list-quantiles")],
        "simulator_tokenizer": str(tiny_model_dir), "output_dir": str(root / name), "window_min": 4, "window_max": 8,
        "contexts_per_row": 2, "seed": 3, **kwargs})
    load_script("data_gen/build_dataset.py").main(args)
    return {s: pq.read_table(root / name / f"{s}.parquet").to_pylist() for s in ("train", "validation", "test")}


def test_labels_match_the_cache(built, tiny_model_dir):
    data = build(built, tiny_model_dir, "labels", negatives_per_positive=2.0)
    cache = load_cache(built / "cache" / "latents", HOOK)
    truth = {(int(r), int(p), int(lat)): float(a) for (r, p, lat), a in zip(cache.locations.tolist(), cache.activations.tolist(), strict=True)}
    stats = load_statistics(built / "cache" / "stats", HOOK)
    rows = [r for split in data.values() for r in split]
    assert len(rows) > 100
    rng = np.random.default_rng(0)
    for i in rng.choice(len(rows), size=60, replace=False):
        r = rows[i]
        key = (r["row"], r["position"], r["latent"])
        assert r["active"] == int(key in truth), key
        assert r["activation"] == pytest.approx(truth.get(key, 0.0))
        assert r["context_ids"] == cache.tokens[r["row"], r["window_start"]:r["position"] + 1].tolist()
        assert r["window_start"] >= 1 and 4 <= len(r["context_ids"]) <= 8  # position 0 is never in a context
        assert r["completion"][0]["content"] == ("Yes" if r["active"] else "No")
        if r["active"]:
            assert r["activation_bin"] == activation_bin(r["activation"], float(stats["max_activation"][r["latent"]]))
            assert r["quantile_bin"] == quantile_bin(r["activation"], stats["quantile_edges"][r["latent"]].numpy())
    # Latents of the later delphi splits appear with their global ids (the seed's offset bug would lose them).
    assert max(r["latent"] for r in rows if r["active"]) > 42


def test_splits_do_not_leak(built, tiny_model_dir):
    data = build(built, tiny_model_dir, "splits")
    latents = {s: {r["latent"] for r in rows} for s, rows in data.items()}
    row_ids = {s: {r["row"] for r in rows} for s, rows in data.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not latents[a] & latents[b] and not row_ids[a] & row_ids[b]
    contexts = build(built, tiny_model_dir, "ctx_split", split_mode="contexts")
    rows_c = {s: {r["row"] for r in rows} for s, rows in contexts.items()}
    assert not rows_c["train"] & rows_c["test"]
    assert {r["latent"] for r in contexts["train"]} & {r["latent"] for r in contexts["test"]}


def test_positive_selection_and_negative_ratio(built, tiny_model_dir):
    top = build(built, tiny_model_dir, "top1", positives="top_k", top_k=1, negatives_per_positive=3.0)["train"]
    per_context = Counter((r["row"], r["position"]) for r in top if r["active"])
    assert max(per_context.values()) == 1
    kinds = Counter(r["candidate"] for r in top)
    assert kinds["random_negative"] == pytest.approx(3 * kinds["positive"], rel=0.2)
    hard = build(built, tiny_model_dir, "hard", hard_negatives="same_token", hard_negative_fraction=1.0)["train"]
    assert any(r["candidate"] == "hard_negative" for r in hard)
    assert all(r["active"] == 0 for r in hard if r["candidate"] != "positive")


def test_mixture_weights(built, tiny_model_dir):
    sets = [str(built / "expl" / "token_list-quantiles"), str(built / "expl" / "token_list-top")]
    data = build(built, tiny_model_dir, "mix", interpretations=sets, interpretation_weights=[0.8, 0.2],
                 contexts_per_row=6)
    counts = Counter(r["interpretation_source"] for r in data["train"])
    share = counts[sets[0]] / sum(counts.values())
    assert 0.72 < share < 0.88, counts


def test_value_labels(built, tiny_model_dir):
    data = build(built, tiny_model_dir, "value", prompt_format="sim_value_v1", label="quantile_bin",
                 negatives_per_positive=0.0)
    rows = data["train"]
    assert rows and all(r["active"] == 1 for r in rows)
    assert all(r["completion"][0]["content"] == str(r["quantile_bin"]) for r in rows)
    assert len({r["quantile_bin"] for r in rows}) > 3


def test_same_config_gives_identical_bytes(built, tiny_model_dir):
    build(built, tiny_model_dir, "det_a")
    build(built, tiny_model_dir, "det_b")
    for split in ("train", "validation", "test"):
        assert (built / "det_a" / f"{split}.parquet").read_bytes() == (built / "det_b" / f"{split}.parquet").read_bytes()
    stats = json.loads((built / "det_a" / "dataset_stats.json").read_text())
    assert stats["latents_without_interpretation"] > 0  # counted and reported
    assert "prompt format: `sim_v1`" in (built / "det_a" / "README.md").read_text()


def test_judged_token_stays_marked_for_another_tokenizer(built, tiny_model_dir):
    """The simulator may split the text differently from the subject: the marker keeps the judged token clear."""
    rows = build(built, tiny_model_dir, "tok")["train"]
    from transformers import AutoTokenizer

    subject = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    simulator = build_char_tokenizer()
    for r in rows[:30]:
        text = r["prompt"][0]["content"]
        context = text.split("Text: ", 1)[1].split("\n\nInterpretation: ")[0]
        judged = subject.decode(r["context_ids"][-1:])
        assert context == subject.decode(r["context_ids"][:-1]) + f"<<{judged}>>"
        assert context.count("<<") == 1 and context.endswith(">>")
        pieces = simulator.convert_ids_to_tokens(simulator(context, add_special_tokens=False)["input_ids"])
        assert len(pieces) > len(r["context_ids"])  # a genuinely different segmentation...
        assert "".join(pieces).endswith(f"<<{judged}>>".replace(" ", ""))  # ...with the marked token intact


def test_split_ids_partition():
    parts = split_ids(np.arange(100), 0.1, 0.2, np.random.default_rng(0))
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(100))
    assert (len(parts["train"]), len(parts["validation"]), len(parts["test"])) == (70, 10, 20)


def test_bins():
    assert activation_bin(10.0, 10.0) == 9 and activation_bin(0.5, 10.0) == 0 and activation_bin(5.0, 10.0) == 5
    edges = np.linspace(0, 10, 11)
    assert quantile_bin(0.1, edges) == 0 and quantile_bin(9.9, edges) == 9 and quantile_bin(10.0, edges) == 9


def test_clear_errors(built, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="`negatives_per_positive`"):
        DatasetArguments(interpretations=["x"], prompt_format="sim_value_v1", label="quantile_bin")
    with pytest.raises(ConfigError, match="`label`"):
        DatasetArguments(interpretations=["x"], prompt_format="sim_v1", label="quantile_bin", negatives_per_positive=0)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text("interpretations: [x]\npositive: top_k\n")
    with pytest.raises(ConfigError, match="`positive` \\(did you mean `positives`"):
        parse_config((DatasetArguments,), ["--config", str(recipe)])
    with pytest.raises(FileNotFoundError, match="data_gen/explain.py"):
        build(built, tiny_model_dir, "missing", interpretations=[str(tmp_path / "nope")])
    wrong = tmp_path / "wrong_sae"
    write_explanation(wrong, HOOK, 500, "a latent this 64-wide SAE does not have")
    with pytest.raises(ValueError, match="wrong SAE"):
        build(built, tiny_model_dir, "wrong", interpretations=[str(wrong)])
    with pytest.raises(FileNotFoundError, match="`score_path`: .* must be a JSON file"):
        build(built, tiny_model_dir, "no_scores", score_path=str(tmp_path / "nope.json"))
    (tmp_path / "wide.json").write_text(json.dumps({"500": 0.9}))
    with pytest.raises(ValueError, match="`score_path`: .* outside the SAE's 64; wrong SAE"):
        build(built, tiny_model_dir, "wide", score_path=str(tmp_path / "wide.json"))
    (tmp_path / "list.json").write_text("[0.5]")
    with pytest.raises(ValueError, match="`score_files`: .* must be a JSON file"):  # the key the caller names
        load_scores(tmp_path / "list.json", HOOK, 64, key="score_files")


def test_push_to_hub_uploads_the_built_folder(built, tiny_model_dir):
    api = FakeHubApi()
    args = DatasetArguments(cache_dir=str(built / "cache"), hookpoint=HOOK,
                            interpretations=[str(built / "expl" / "token_list-quantiles")],
                            simulator_tokenizer=str(tiny_model_dir), output_dir=str(built / "pushed"), window_min=4,
                            window_max=8, push_to_hub="me/sim")
    load_script("data_gen/build_dataset.py").main(args, api=api)
    (name, repo), (name2, upload) = api.calls
    assert name == "create_repo" and repo == {"repo_id": "me/sim", "repo_type": "dataset", "private": True,
                                               "exist_ok": True}
    assert name2 == "upload_folder" and upload["folder_path"] == str(built / "pushed")
    assert {p.name for p in (built / "pushed").iterdir()} >= {"train.parquet", "validation.parquet", "test.parquet",
                                                              "README.md", "run_config.json"}


def test_decoder_hard_negatives_are_decoder_neighbours(built, tiny_model_dir, tiny_sae_dir):
    rows = build(built, tiny_model_dir, "dec", hard_negatives="decoder", hard_negative_fraction=1.0,
                 negatives_per_positive=1.0)["train"]
    from sae_lens import SAE

    from latentsim.dataset import decoder_neighbours
    from latentsim.explain import load_interpretations

    explained = np.array(sorted(load_interpretations(built / "expl" / "token_list-quantiles", HOOK, 64)))
    neighbours = decoder_neighbours(SAE.load_from_disk(str(tiny_sae_dir)).W_dec.detach(), explained)
    by_context = {}
    for r in rows:
        by_context.setdefault((r["row"], r["position"]), []).append(r)
    hard = [r for r in rows if r["candidate"] == "hard_negative"]
    assert hard
    for r in hard:
        positives = [p["latent"] for p in by_context[(r["row"], r["position"])] if p["active"]]
        assert r["active"] == 0
        assert any(r["latent"] in neighbours[p] for p in positives)


def test_decoder_neighbours_chunking_is_exact():
    from latentsim.dataset import decoder_neighbours

    w = torch.randn(50, 8)
    ids = np.arange(3, 50)
    whole = decoder_neighbours(w, ids, k=4, chunk=1000)
    chunked = decoder_neighbours(w, ids, k=4, chunk=7)
    assert all(np.array_equal(whole[i], chunked[i]) for i in ids)
    cos = torch.nn.functional.normalize(w, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    best = max((j for j in ids if j != 10), key=lambda j: cos[10, j])
    assert whole[10][0] == best and 10 not in whole[10]
