"""The activation cache: round trip, delphi-layout interop, resume without loss or duplicates, corruption."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script, make_cache
from safetensors.numpy import load_file, save_file

from latentsim import cache as cache_mod
from latentsim.cache import (
    CorruptCacheError,
    SparseCache,
    record_rows,
    shard_ranges,
    split_bounds,
)
from latentsim.cache_reader import CacheReader, load_cache
from latentsim.config import CacheArguments, CorpusArguments, ModelArguments, SAEArguments
from latentsim.corpus import corpus_rows
from latentsim.errors import MissingInputError
from latentsim.latent_stats import latent_sample, latent_statistics, load_statistics
from latentsim.models import load_model_and_tokenizer
from latentsim.sae import load_sae

ROOT = Path(__file__).resolve().parents[1]
HOOK = "layers.1"


def cache_script():
    return load_script("data_gen/cache_activations.py")


def sorted_entries(locations, activations):
    order = np.lexsort((locations[:, 2], locations[:, 1], locations[:, 0]))
    return locations[order], activations[order]


def test_cache_roundtrip_matches_the_naive_encoding(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    args = make_cache(tmp_path / "c", tiny_model_dir, tiny_sae_dir, tiny_corpus)
    cache = load_cache(tmp_path / "c" / "latents", HOOK)

    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    rows = corpus_rows(args[1], tok).tokens
    sae = load_sae(args[2], d_model=16)
    naive_loc, naive_act = record_rows(model, sae, rows, layer=1, batch_size=7, naive=True)
    got_loc, got_act = sorted_entries(cache.locations.numpy(), cache.activations.numpy())
    naive_loc, naive_act = sorted_entries(naive_loc, naive_act)
    assert torch.equal(cache.tokens, rows)
    assert np.array_equal(got_loc, naive_loc)
    assert np.allclose(got_act, naive_act.astype(np.float16).astype(np.float32), rtol=0, atol=0)
    assert (cache.locations[:, 1] > 0).all()  # position 0 (BOS) is never cached
    assert len(np.unique(got_loc, axis=0)) == len(got_loc)
    assert cache.width == 64 and not (tmp_path / "c" / "shards").exists()

    cfg = cache.config
    assert cfg["cache_ctx_len"] == 12 and cfg["n_splits"] == 3 and cfg["model_name"] == str(tiny_model_dir)
    assert cfg["latentsim"]["position_0_excluded"] is True and cfg["latentsim"]["row_start"] == 3
    run_config = json.loads((tmp_path / "c" / "run_config.json").read_text())
    assert run_config["seed"] == 5 and run_config["config"]["sae"]["hookpoint"] == HOOK
    assert run_config["versions"]["torch"] == torch.__version__


def test_fast_and_naive_recording_agree_on_a_non_topk_path(tiny_model_dir, tiny_sae_dir, monkeypatch):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir))
    sae = load_sae(SAEArguments(hookpoint=HOOK, sae_path=str(tiny_sae_dir)))
    rows = torch.randint(4, 40, (5, 9))
    fast = sorted_entries(*record_rows(model, sae, rows, 1, batch_size=2))
    monkeypatch.setattr("latentsim.sae.is_topk", lambda sae: False)  # forces dense encode + nonzero
    dense = sorted_entries(*record_rows(model, sae, rows, 1, batch_size=3))
    assert np.array_equal(fast[0], dense[0]) and np.allclose(fast[1], dense[1], atol=1e-6)


def delphi_read(folder: Path):
    """delphi's loader (latents/loader.py TensorBuffer), reimplemented: glob, parse start, add it back."""
    locs, acts, tokens = [], [], None
    for file in sorted(folder.glob("*.safetensors"), key=lambda f: int(f.stem.split("_")[0])):
        start, _end = (int(x) for x in file.stem.split("_"))
        data = load_file(str(file))
        assert data["locations"].dtype in (np.uint16, np.uint32) and data["activations"].dtype == np.float16
        loc = data["locations"].astype(np.int64)
        loc[:, 2] += start
        locs.append(loc)
        acts.append(data["activations"])
        tokens = data["tokens"].astype(np.int64)
    return np.concatenate(locs), np.concatenate(acts), tokens


def test_our_cache_has_delphis_layout(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    make_cache(tmp_path / "c", tiny_model_dir, tiny_sae_dir, tiny_corpus)
    folder = tmp_path / "c" / "latents" / HOOK
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["0_20.safetensors", "21_41.safetensors", "42_63.safetensors", "config.json", "row_split.json"]
    )
    assert [p.name for p in (tmp_path / "c" / "latents").iterdir()] == [
        HOOK
    ]  # delphi lists modules from here
    assert split_bounds(131072, 5)[0] == (0, 26213) and split_bounds(131072, 5)[-1] == (104857, 131071)
    for file in folder.glob("*.safetensors"):
        start, end = (int(x) for x in file.stem.split("_"))
        rel = load_file(str(file))["locations"][:, 2].astype(np.int64)
        assert ((rel >= 0) & (rel <= end - start)).all()  # latent column relative to the split start
    d_loc, d_act, d_tok = delphi_read(folder)
    ours = load_cache(tmp_path / "c" / "latents", HOOK)
    assert np.array_equal(
        sorted_entries(d_loc, d_act)[0], sorted_entries(ours.locations.numpy(), ours.activations.numpy())[0]
    )
    assert np.array_equal(d_tok, ours.tokens.numpy())
    config = json.loads((folder / "config.json").read_text())
    assert {"model_name", "cache_ctx_len", "n_tokens", "n_splits", "dataset_repo", "batch_size"} <= set(
        config
    )


def test_we_read_a_cache_written_by_delphi(tmp_path):
    """delphi's writer: uint32 locations, int64 tokens, position 0 included, no latentsim block in
    config.json."""
    folder = tmp_path / "latents" / "layers.11"
    folder.mkdir(parents=True)
    tokens = np.arange(10 * 5, dtype=np.int64).reshape(10, 5)
    entries = [(0, 0, 3, 50.0), (0, 2, 3, 1.5), (1, 4, 3, 2.5), (1, 1, 120, 0.5), (0, 3, 130, 4.0)]
    entries += [(r, 1, 7, 1.0) for r in range(10)]  # latent 7 fires once in every row
    for start, end in [(0, 99), (100, 199)]:
        sel = [e for e in entries if start <= e[2] <= end]
        save_file(
            {
                "locations": np.array([[r, p, lat - start] for r, p, lat, _ in sel], dtype=np.uint32),
                "activations": np.array([v for *_, v in sel], dtype=np.float16),
                "tokens": tokens,
            },
            str(folder / f"{start}_{end}.safetensors"),
        )
    (folder / "config.json").write_text(json.dumps({"model_name": "google/gemma-2-9b", "cache_ctx_len": 5}))
    cache = load_cache(tmp_path / "latents", "layers.11")
    assert cache.width == 200
    got = sorted(
        (*map(int, loc), float(a)) for loc, a in zip(cache.locations, cache.activations, strict=True)
    )
    assert got == sorted(entries)
    stats = latent_statistics(cache, width=200, sample_size=10)
    assert stats["firing_count"][3] == 2  # the position-0 entry (50.0) is excluded
    assert stats["max_activation"][3] == pytest.approx(2.5)
    assert int(stats["n_tokens"][0]) == 10 * 4
    with pytest.raises(MissingInputError, match="records no row split.*Run data_gen/cache_activations.py"):
        CacheReader(tmp_path / "latents", "layers.11").row_split()

    # Brought into a run folder, the cache gets its row split (row by row: delphi records no documents) and
    # the statistics of its training rows, without loading any model or SAE.
    cache_script().main(
        ModelArguments(model_name_or_path=str(tmp_path / "no-model")),
        CorpusArguments(corpus=str(tmp_path / "no-corpus")),
        SAEArguments(hookpoint="layers.11", sae_path=str(tmp_path / "no-sae")),
        CacheArguments(output_dir=str(tmp_path), validation_fraction=0.2, test_fraction=0.2),
    )
    record = CacheReader(tmp_path / "latents", "layers.11").row_split_record()
    assert record["grouping"] == "rows" and record["splits"]["test"]["documents"] is None
    train = record["row_ids"]["train"]
    assert [record["splits"][s]["rows"] for s in ("train", "validation", "test")] == [6, 2, 2]
    stats = load_statistics(tmp_path / "stats", "layers.11")
    assert stats["firing_count"].shape == (200,) and stats["firing_count"][7] == 6
    assert stats["firing_count"][3] == sum(r in train for r in (0, 1))
    assert stats["firing_rate"][7] == pytest.approx(1 / 4)  # training tokens in the denominator too

    # delphi records no file list: a lost split file must not read as 100 latents that never fire.
    (folder / "0_99.safetensors").unlink()
    with pytest.raises(
        CorruptCacheError,
        match="do not tile the latents: 100_199.safetensors starts at latent 100, latents 0-99 have no file",
    ):
        load_cache(tmp_path / "latents", "layers.11")


def test_statistics_are_exact(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 1.0, size=300).astype(np.float32)
    locations = np.stack([np.arange(300) // 10, np.arange(300) % 10 + 1, np.full(300, 2)], axis=1)
    cache = SparseCache(
        torch.zeros(30, 11, dtype=torch.long),
        torch.from_numpy(locations),
        torch.from_numpy(values),
        {},
        width=4,
    )
    stats = latent_statistics(cache, width=4, sample_size=50)
    assert stats["firing_count"].tolist() == [0, 0, 300, 0]
    assert stats["firing_rate"][2] == pytest.approx(1.0)
    assert stats["max_activation"][2] == pytest.approx(values.max())
    assert stats["mean_activation"][2] == pytest.approx(values.mean(), rel=1e-5)
    assert np.allclose(
        stats["quantile_edges"][2].numpy(), np.quantile(values, np.linspace(0, 1, 11)), atol=1e-5
    )
    sample = latent_sample(stats, 2)
    assert len(sample) == 50 and np.all(np.diff(sample) >= 0)
    assert sample[0] == pytest.approx(values.min()) and sample[-1] == pytest.approx(values.max())
    assert len(latent_sample(stats, 0)) == 0


def test_token_major_groups_a_contexts_latents():
    locations = torch.tensor([[1, 2, 5], [0, 3, 1], [1, 2, 0], [0, 1, 7]])
    cache = SparseCache(torch.zeros(2, 4, dtype=torch.long), locations, torch.arange(4.0), {}, width=8)
    ordered = cache.token_major()
    assert ordered.locations.tolist() == [[0, 1, 7], [0, 3, 1], [1, 2, 0], [1, 2, 5]]
    assert ordered.activations.tolist() == [3.0, 1.0, 2.0, 0.0]


def test_resume_after_interruption_loses_and_duplicates_nothing(
    tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus, monkeypatch
):
    make_cache(tmp_path / "full", tiny_model_dir, tiny_sae_dir, tiny_corpus)
    reference = load_cache(tmp_path / "full" / "latents", HOOK)

    real_write = cache_mod.write_shard
    written = []

    def write_then_die(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # killed while the third shard is in flight
        written.append(args[1])
        return real_write(*args, **kwargs)

    script = cache_script()
    monkeypatch.setattr(script, "write_shard", write_then_die)
    args = (
        ModelArguments(model_name_or_path=str(tiny_model_dir)),
        CorpusArguments(corpus=str(tiny_corpus), ctx_len=12, n_rows=20, row_start=3, seed=5),
        SAEArguments(hookpoint=HOOK, sae_path=str(tiny_sae_dir)),
        CacheArguments(
            output_dir=str(tmp_path / "resumed"), batch_size=4, shard_rows=6, n_splits=3, split_group_rows=2
        ),
    )
    with pytest.raises(KeyboardInterrupt):
        script.main(*args)
    shard_dir = tmp_path / "resumed" / "shards" / HOOK
    assert len(list(shard_dir.glob("*.json"))) == 2  # two shard markers
    # A partial shard (file without marker) from the killed run must be regenerated, not trusted.
    (shard_dir / "rows_0000012_0000018.safetensors").write_bytes(b"partial")

    recorded = []
    monkeypatch.setattr(script, "write_shard", lambda *a, **k: recorded.append(a[1]) or real_write(*a, **k))
    script.main(*args)
    assert recorded == [12, 18]  # only the unfinished shards ran again
    resumed = load_cache(tmp_path / "resumed" / "latents", HOOK)
    assert torch.equal(resumed.tokens, reference.tokens)
    assert torch.equal(resumed.locations, reference.locations)
    assert torch.equal(resumed.activations, reference.activations)

    recorded.clear()
    args[3].batch_size = 2  # speed-only settings may change
    script.main(*args)  # a finished cache is skipped entirely
    assert recorded == []
    args[1].n_rows = 21
    with pytest.raises(ValueError, match="corpus.n_rows: 20 -> 21"):
        script.main(*args)
    train = CacheReader(tmp_path / "resumed" / "latents", HOOK).row_split()["train"]
    assert load_statistics(tmp_path / "resumed" / "stats", HOOK)["firing_count"].sum() == int(
        np.isin(resumed.locations[:, 0].numpy(), train).sum()
    )


def test_resume_refuses_shards_of_another_config(
    tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus, monkeypatch
):
    script = cache_script()
    monkeypatch.setattr(script, "finalise_shards", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    base = dict(model_name_or_path=str(tiny_model_dir))
    corpus = CorpusArguments(corpus=str(tiny_corpus), ctx_len=12, n_rows=8, seed=5)
    sae = SAEArguments(hookpoint=HOOK, sae_path=str(tiny_sae_dir))
    cache_args = CacheArguments(output_dir=str(tmp_path), shard_rows=4)
    with pytest.raises(KeyboardInterrupt):
        script.main(ModelArguments(**base), corpus, sae, cache_args)
    corpus.seed = 6
    with pytest.raises(ValueError, match="another config.*corpus.seed: 5 -> 6"):
        script.main(ModelArguments(**base), corpus, sae, cache_args)


def test_corrupt_files_are_detected_with_a_clear_error(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    make_cache(tmp_path / "c", tiny_model_dir, tiny_sae_dir, tiny_corpus)
    split = tmp_path / "c" / "latents" / HOOK / "21_41.safetensors"
    data = bytearray(split.read_bytes())
    data[-3] ^= 0xFF  # flip bits in the payload: still parses, wrong values
    split.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="21_41.safetensors is corrupt.*rerun"):
        load_cache(tmp_path / "c" / "latents", HOOK)

    shard_dir = tmp_path / "shards"
    arrays = (np.zeros((2, 3), np.int64), np.ones(2, np.float32), np.zeros((6, 4), np.int64))
    cache_mod.write_shard(shard_dir, 0, 6, *arrays, np.zeros((6, 2), np.int64), 0)
    (shard_dir / "rows_0000000_0000006.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptCacheError, match="rows_0000000_0000006.safetensors is corrupt"):
        cache_mod.verified_shard_paths(shard_dir, shard_ranges(6, 6))
    assert cache_mod.completed_shards(shard_dir, shard_ranges(6, 6)) == set()  # a rerun regenerates it


def test_streamed_corpus_cache_resumes_from_the_saved_stream_position(
    tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus, monkeypatch
):
    import dataclasses

    from latentsim.corpus import StreamedRows

    model, corpus, sae, cache = make_cache(tmp_path / "plain", tiny_model_dir, tiny_sae_dir, tiny_corpus)
    corpus = dataclasses.replace(corpus, corpus_streaming=True)
    cache_script().main(model, corpus, sae, dataclasses.replace(cache, output_dir=str(tmp_path / "whole")))
    whole = load_cache(tmp_path / "whole" / "latents", HOOK)
    _, tok = load_model_and_tokenizer(str(tiny_model_dir))
    assert torch.equal(
        whole.tokens, corpus_rows(corpus, tok).tokens
    )  # the stream's rows 3..22, in the corpus's order
    assert not torch.equal(
        whole.tokens, load_cache(tmp_path / "plain" / "latents", HOOK).tokens
    )  # not shuffled
    assert whole.config["latentsim"]["corpus_streaming"] is True

    # Killed before finalising; the last two shards lost. The rerun starts reading at the stream position that
    # shard (6, 12) saved (corpus row 3 + 12), not at the start of the corpus.
    part = dataclasses.replace(cache, output_dir=str(tmp_path / "part"))
    with monkeypatch.context() as patch:
        patch.setattr(
            "latentsim.cache.finalise_shards", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
        )
        with pytest.raises(KeyboardInterrupt):
            cache_script().main(model, corpus, sae, part)
    for a, b in ((12, 18), (18, 20)):
        path = cache_mod.shard_path(tmp_path / "part" / "shards" / HOOK, a, b)
        path.unlink()
        path.with_suffix(".json").unlink()
    restored, restore = [], StreamedRows.restore
    monkeypatch.setattr(
        StreamedRows, "restore", lambda self, state: (restored.append(state["row"]), restore(self, state))
    )
    cache_script().main(model, corpus, sae, part)
    assert restored == [0, 15]  # the stream's start, then the saved position
    for name in sorted(p.name for p in (tmp_path / "whole" / "latents" / HOOK).iterdir()):
        assert (tmp_path / "part" / "latents" / HOOK / name).read_bytes() == (
            tmp_path / "whole" / "latents" / HOOK / name
        ).read_bytes(), name
