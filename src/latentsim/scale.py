"""A synthetic cache of any size, for the scale benchmark (bench/scale.py) and the bounded-memory tests.

`write_synthetic_cache` writes what data_gen/cache_activations.py writes, through the same code: row shards
(`write_shard`), finalised into delphi's layout (`finalise_shards`), plus a WordLevel subject tokenizer the
cache's config names, and the cache's row split (every row its own document: the rows are drawn
independently). Each token gets `l0` latents drawn with replacement from a heavy-tailed firing
distribution (a few latents fire on ~1% of tokens, most far less often; duplicates within a token are merged,
so the L0 comes out a little under `l0`), activations exponential. No model is needed: speed and memory do not
depend on what the latents mean.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from latentsim.cache import finalise_shards, remove_shards, shard_ranges, write_shard
from latentsim.cache_reader import CacheReader
from latentsim.io import atomic_write_json
from latentsim.splits import ensure_row_split

SYNTHETIC_WORDS = 4096  # subject vocabulary: w0 .. w4095, plus the answers a simulator tokenizer needs
ANSWERS = ["Yes", "No", *map(str, range(10))]


def word_level_tokenizer(words: list[str]):
    """A whitespace WordLevel tokenizer over `words` (after <unk> <bos> <eos> <pad>), with a ChatML-style chat
    template: tiny, offline, and every word one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<bos>", "<eos>", "<pad>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}<bos> {{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}<bos> assistant {% endif %}"
    )
    return fast


def write_tokenizer(folder: Path) -> Path:
    """The synthetic vocabulary's tokenizer, saved (also a simulator tokenizer: `Yes` / `No` / digits are
    single tokens)."""
    word_level_tokenizer(ANSWERS + [f"w{i}" for i in range(SYNTHETIC_WORDS)]).save_pretrained(str(folder))
    return folder


def firing_distribution(width: int, rng: np.random.Generator) -> np.ndarray:
    """Cumulative firing probabilities of `width` latents: Zipf-like (rank + 10)^-0.9 in a random latent
    order."""
    weights = (np.arange(width) + 10.0) ** -0.9
    weights = weights[rng.permutation(width)]
    return np.cumsum(weights / weights.sum())


def write_synthetic_cache(
    cache_dir: str | Path,
    n_tokens: int,
    width: int,
    l0: int,
    n_splits: int,
    ctx_len: int = 256,
    shard_rows: int = 128,
    seed: int = 0,
    hookpoint: str = "layers.15",
) -> Path:
    """`cache_dir/latents/<hookpoint>` (delphi layout) with ~`n_tokens` tokens in rows of `ctx_len`
    (position 0 a BOS, never cached, as in our caches); returns the latents folder."""
    cache_dir = Path(cache_dir)
    rng = np.random.default_rng(seed)
    tokenizer_dir = write_tokenizer(cache_dir / "tokenizer")
    n_rows = max(1, round(n_tokens / ctx_len))
    cdf = firing_distribution(width, rng)
    shard_dir = cache_dir / "shards" / hookpoint
    ranges = shard_ranges(n_rows, shard_rows)
    for a, b in tqdm(ranges, desc="synthetic shards", unit="shard"):
        tokens = rng.integers(4 + len(ANSWERS), 4 + len(ANSWERS) + SYNTHETIC_WORDS, size=(b - a, ctx_len))
        tokens[:, 0] = 1  # <bos>
        n_tok = (b - a) * (ctx_len - 1)
        # i.i.d. draws, fast: inverse-CDF lookups of sorted uniforms, then a random order (exchangeable
        # again).
        latents = np.searchsorted(cdf, np.sort(rng.random(n_tok * l0))).clip(max=width - 1)[
            rng.permutation(n_tok * l0)
        ]
        keys = np.sort(
            np.repeat(np.arange(n_tok, dtype=np.int64), l0) * width + latents
        )  # by token, then latent
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]]  # duplicates within a token merged
        token_index, latents = np.divmod(keys, width)
        locations = np.stack(
            [a + token_index // (ctx_len - 1), 1 + token_index % (ctx_len - 1), latents], axis=1
        )
        activations = rng.exponential(1.0, size=len(keys)).astype(np.float32)
        documents = np.repeat(np.arange(a, b)[:, None], 2, axis=1)
        write_shard(shard_dir, a, b, locations, activations, tokens, documents, 0)
    config = {
        "dataset_repo": "synthetic",
        "n_splits": n_splits,
        "n_tokens": n_rows * ctx_len,
        "ctx_len": ctx_len,
        "model_name": str(tokenizer_dir),
        "latentsim": {
            "hookpoint": hookpoint,
            "model": {"model": str(tokenizer_dir)},
            "synthetic": {"width": width, "l0": l0, "seed": seed},
        },
    }
    out = finalise_shards(shard_dir, ranges, cache_dir / "latents", hookpoint, width, n_splits, config)
    remove_shards(shard_dir)
    reader = CacheReader(cache_dir / "latents", hookpoint)
    ensure_row_split(reader, {"validation": 0.1, "test": 0.1}, seed, group_rows=1)
    atomic_write_json(
        cache_dir / "synthetic.json",
        {"n_rows": n_rows, "ctx_len": ctx_len, "width": width, "l0": l0, "n_splits": n_splits, "seed": seed},
    )
    return out


def measured(cmd: list[str], log: Path, cwd: Path) -> dict:
    """Run `cmd` in `cwd`; its wall time and the peak resident memory of that process alone."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed (exit {proc.returncode}); its output is in {log}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def print_table(results: dict) -> None:
    """bench/scale.py's results as the markdown table the docs quote: seconds / peak RSS per stage and
    size."""
    sizes = list(results["sizes"])
    print("\n| stage | " + " | ".join(f"{int(s) / 1e6:g}M tokens: s / peak RSS GB" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name in results["sizes"][sizes[0]]["stages"]:
        cells = [results["sizes"][s]["stages"][name] for s in sizes]
        print(
            f"| {name} | " + " | ".join(f"{c['seconds']:.0f} / {c['peak_rss_gb']:.2f}" for c in cells) + " |"
        )
    print(
        "| non-zeros (L0) | "
        + " | ".join(
            f"{results['sizes'][s]['non_zeros'] / 1e6:.0f}M ({results['sizes'][s]['mean_l0']})" for s in sizes
        )
        + " |"
    )
