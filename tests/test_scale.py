"""Bounded-memory cache reading: chunked and split-by-split reads equal whole-cache reads, and hold less."""

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script

from latentsim import dataset as dataset_mod
from latentsim.cache_reader import CacheReader, load_cache
from latentsim.config import DatasetArguments, ExplainArguments
from latentsim.dataset import subsample_rows
from latentsim.explain import LatentIndex, SplitLatentIndexes
from latentsim.latent_stats import cache_statistics, latent_statistics, save_training_statistics
from latentsim.scale import write_synthetic_cache

HOOK = "layers.15"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """~20k tokens x 2,048 latents, L0 ~12, 8 split files."""
    folder = tmp_path_factory.mktemp("synthetic")
    write_synthetic_cache(
        folder / "cache",
        n_tokens=20_000,
        width=2048,
        l0=12,
        n_splits=8,
        ctx_len=64,
        shard_rows=40,
        seed=3,
        hookpoint=HOOK,
    )
    return folder


def test_synthetic_cache_has_the_asked_shape(synthetic):
    reader = CacheReader(synthetic / "cache" / "latents", HOOK)
    assert (reader.n_rows, reader.ctx_len, reader.width, len(reader.splits)) == (312, 64, 2048, 8)
    cache = reader.select()
    l0 = len(cache.activations) / (reader.n_rows * (reader.ctx_len - 1))
    assert 11.0 < l0 <= 12.0  # duplicates within a token merged
    assert (cache.locations[:, 1] > 0).all()  # position 0 (BOS) never cached
    keys = (cache.locations[:, 0] * 64 + cache.locations[:, 1]) * 2048 + cache.locations[:, 2]
    assert len(torch.unique(keys)) == len(keys)
    rate = torch.bincount(cache.locations[:, 2], minlength=2048).double()
    assert rate.max() > 20 * rate.median()  # heavy-tailed firing rates, as real SAEs have


def test_chunked_reads_equal_whole_reads(synthetic):
    whole = CacheReader(synthetic / "cache" / "latents", HOOK).select()
    chunked = CacheReader(synthetic / "cache" / "latents", HOOK, chunk_entries=777)
    again = chunked.select()
    assert torch.equal(whole.locations, again.locations) and torch.equal(whole.activations, again.activations)
    rows = np.array([3, 17, 200, 311])
    some = chunked.select(rows=rows, splits=[2, 5])
    keep = (
        torch.isin(whole.locations[:, 0], torch.from_numpy(rows))
        & (whole.locations[:, 2] >= chunked.splits[2].start)
        & (whole.locations[:, 2] <= chunked.splits[5].end)
        & (
            (whole.locations[:, 2] <= chunked.splits[2].end)
            | (whole.locations[:, 2] >= chunked.splits[5].start)
        )
    )
    assert torch.equal(some.locations, whole.locations[keep]) and torch.equal(
        some.activations, whole.activations[keep]
    )
    assert len(some.locations) > 0


def test_statistics_split_by_split_equal_the_whole_cache(synthetic):
    reader = CacheReader(synthetic / "cache" / "latents", HOOK, chunk_entries=1000)
    split_wise = cache_statistics(reader, sample_size=16)
    whole = latent_statistics(load_cache(synthetic / "cache" / "latents", HOOK), 2048, sample_size=16)
    assert split_wise.keys() == whole.keys()
    for key in whole:
        assert torch.equal(split_wise[key], whole[key]), key


def test_split_latent_indexes_match_the_whole_index_with_a_fraction_of_the_memory(synthetic):
    reader = CacheReader(synthetic / "cache" / "latents", HOOK)
    rows = np.arange(0, reader.n_rows, 2)
    tracemalloc.start()
    whole = LatentIndex(reader.select(), window=16, rows=rows)
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    latents = np.nonzero(np.diff(whole.offsets))[0]
    expected = {int(lat): whole.activating_windows(int(lat)) for lat in latents}
    del whole
    tracemalloc.start()
    indexes = SplitLatentIndexes(reader, window=16, rows=rows)
    for lat in latents.tolist():  # ascending: each split is read once
        windows, maxima = indexes.of(lat).activating_windows(lat)
        assert np.array_equal(windows, expected[lat][0]) and np.array_equal(maxima, expected[lat][1])
    split_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert split_peak < 0.4 * whole_peak  # 8 split files: one at a time
    assert np.array_equal(
        indexes.counts(),
        np.bincount(reader.select(rows=rows).locations[:, 2].numpy(), minlength=reader.width),
    )


def test_datasets_built_in_row_chunks_are_byte_identical(synthetic, monkeypatch, tmp_path):
    cache = synthetic / "cache"
    reader = CacheReader(cache / "latents", HOOK)
    save_training_statistics(reader, cache / "stats", 16)
    load_script("data_gen/explain.py").main(
        ExplainArguments(
            cache_dir=str(cache),
            hookpoint=HOOK,
            explanations_dir=str(tmp_path / "explanations"),
            set_name="tl",
            explainer="token_list",
            sampling="quantiles",
            window=16,
            min_activations=3,
        )
    )
    build = load_script("data_gen/build_dataset.py").main

    def built(name: str, **extra) -> dict[str, bytes]:
        build(
            DatasetArguments(
                cache_dir=str(cache),
                hookpoint=HOOK,
                interpretations=[str(tmp_path / "explanations" / "tl")],
                simulator_tokenizer=str(cache / "tokenizer"),
                window_min=8,
                window_max=12,
                contexts_per_row=2,
                hard_negatives="same_token",
                output_dir=str(tmp_path / name),
                **extra,
            )
        )
        return {s: (tmp_path / name / f"{s}.parquet").read_bytes() for s in ("train", "validation", "test")}

    reference = built("whole")  # the default chunk holds every row of this cache
    monkeypatch.setattr(dataset_mod, "INDEX_ENTRIES", 500)  # ~1 row per chunk
    assert built("chunked") == reference
    capped = built("capped", max_rows_per_split=5)
    assert capped != reference
    import pandas as pd

    assert pd.read_parquet(tmp_path / "capped" / "test.parquet")["row"].nunique() <= 5


def test_subsample_rows_is_seeded_and_optional():
    splits = {"train": np.arange(0, 50), "test": np.arange(50, 60)}
    assert subsample_rows(splits, 0, 1) is splits
    a, b = subsample_rows(splits, 7, 1), subsample_rows(splits, 7, 1)
    assert all(np.array_equal(a[s], b[s]) for s in splits)
    assert len(a["train"]) == 7 and len(a["test"]) == 7 and np.all(np.diff(a["train"]) > 0)
    assert set(a["train"]) <= set(splits["train"]) and not np.array_equal(
        a["train"], subsample_rows(splits, 7, 2)["train"]
    )


def test_scale_benchmark_measures_every_stage_in_its_own_process(tmp_path):
    import json

    from latentsim.config import ScaleArguments

    out = tmp_path / "scale"
    load_script("bench/scale.py").main(
        ScaleArguments(
            sizes=[8192],
            width=1024,
            l0=8,
            n_splits=4,
            ctx_len=64,
            explain_latents=40,
            max_rows_per_split=16,
            output_dir=str(out),
        )
    )
    result = json.loads((out / "results.json").read_text())["sizes"]["8192"]
    assert len(result["stages"]) == 5
    assert all(s["seconds"] > 0 and 0.01 < s["peak_rss_gb"] < 8 for s in result["stages"].values())
    assert 7.0 < result["mean_l0"] <= 8.0 and result["non_zeros"] > 7 * 128 * 63
    assert not (out / "tokens_8192" / "cache").exists()  # deleted unless keep_caches
    assert len(list((out / "tokens_8192" / "explanations" / "token_list").glob("*.txt"))) == 40
