"""Per-latent statistics computed once from a finished cache (ours or delphi's).

Saved as `stats/<hookpoint>.safetensors`: firing count and rate, max and mean activation, decile edges of the
non-zero distribution (`quantile_edges` [d_sae, 11], 0%..100%) and a sorted sample of each latent's non-zero
activations in CSR form (`sample_values`, `sample_offsets`): evenly spaced order statistics of the full sorted
set, so the sample's quantiles track the true ones (`bin_edges`: K equal-mass bins for any K). Position 0 is
excluded even when a delphi cache has it.

data_gen/cache_activations.py computes them over the training rows of the cache's row split only (firing
rates count training tokens in their denominator too): references, quantile labels, frequency bins and the
whole layer all read them, and none may learn anything from an eval row. `n_rows` (a tensor) and the summary
JSON record which rows they came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from latentsim.cache import SparseCache
from latentsim.cache_reader import CacheReader
from latentsim.errors import MissingInputError
from latentsim.io import atomic_save, atomic_write_json

N_QUANTILE_BINS = 10
PER_LATENT = ("firing_count", "firing_rate", "max_activation", "mean_activation", "quantile_edges")


def latent_statistics(
    cache: SparseCache, width: int, sample_size: int, rows: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """The statistics of an in-memory cache, over `rows` only when given (see cache_statistics for one read a
    split at a time)."""
    keep = cache.locations[:, 1] > 0
    n_rows = cache.tokens.shape[0]
    if rows is not None:
        in_rows = torch.zeros(n_rows, dtype=torch.bool)
        in_rows[torch.as_tensor(np.asarray(rows), dtype=torch.long)] = True
        keep &= in_rows[cache.locations[:, 0]]
        n_rows = len(np.unique(rows))
    n_tokens = n_rows * (cache.tokens.shape[1] - 1)
    out = value_statistics(cache.locations[keep, 2], cache.activations[keep], width, n_tokens, sample_size)
    out["n_rows"] = torch.tensor([n_rows])
    return out


def cache_statistics(
    reader: CacheReader, sample_size: int, rows: np.ndarray | None = None
) -> dict[str, torch.Tensor]:
    """latent_statistics of a cache's `rows` (all by default), one latent split file at a time (a latent lives
    in one split file, so each latent's statistics come from its file alone): peak memory grows with the
    largest split."""
    n_rows = reader.n_rows if rows is None else len(np.unique(rows))
    n_tokens = n_rows * (reader.ctx_len - 1)
    parts = []
    for i, sf in enumerate(tqdm(reader.splits, desc="statistics", unit="split")):
        latents, values = reader.latent_values(i, rows)
        parts.append(
            value_statistics(
                torch.from_numpy(latents).long(),
                torch.from_numpy(values),
                sf.end - sf.start + 1,
                n_tokens,
                sample_size,
            )
        )
        del latents, values
    out = {key: torch.cat([p[key] for p in parts]) for key in PER_LATENT}
    out["sample_values"] = torch.cat([p["sample_values"] for p in parts])
    sample_counts = torch.cat([torch.diff(p["sample_offsets"]) for p in parts])
    out["sample_offsets"] = torch.zeros(reader.width + 1, dtype=torch.long)
    out["sample_offsets"][1:] = torch.cumsum(sample_counts, 0)
    out["n_tokens"] = torch.tensor([n_tokens])
    out["n_rows"] = torch.tensor([n_rows])
    return out


def value_statistics(
    latents: torch.Tensor, values: torch.Tensor, width: int, n_tokens: int, sample_size: int
) -> dict[str, torch.Tensor]:
    """Per-latent statistics of non-zeros given as (latent id in 0..width-1, value), position 0 already left
    out."""
    values = values.double()
    order = torch.argsort(values, stable=True)  # by value ...
    order = order[torch.argsort(latents[order], stable=True)]  # ... then by latent (stable keeps value order)
    latents, values = latents[order], values[order]
    counts = torch.bincount(latents, minlength=width)
    offsets = torch.zeros(width + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(counts, 0)

    max_act = torch.zeros(width, dtype=torch.float64).scatter_reduce(
        0, latents, values, "amax", include_self=False
    )
    sums = torch.zeros(width, dtype=torch.float64).index_add_(0, latents, values)
    mean_act = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))

    probs = torch.linspace(0, 1, N_QUANTILE_BINS + 1, dtype=torch.float64)
    edges = torch.zeros(width, N_QUANTILE_BINS + 1, dtype=torch.float64)
    sample_vals, sample_counts = [], torch.zeros(width, dtype=torch.long)
    for lat in torch.nonzero(counts).flatten().tolist():
        vals = values[offsets[lat] : offsets[lat + 1]]
        edges[lat] = torch.quantile(vals, probs)
        if len(vals) > sample_size:
            vals = vals[torch.linspace(0, len(vals) - 1, sample_size).round().long()]
        sample_vals.append(vals)
        sample_counts[lat] = len(vals)
    sample_offsets = torch.zeros(width + 1, dtype=torch.long)
    sample_offsets[1:] = torch.cumsum(sample_counts, 0)
    return {
        "firing_count": counts,
        "firing_rate": (counts.double() / n_tokens).float(),
        "max_activation": max_act.float(),
        "mean_activation": mean_act.float(),
        "quantile_edges": edges.float(),
        "sample_values": (
            torch.cat(sample_vals) if sample_vals else torch.zeros(0, dtype=torch.float64)
        ).float(),
        "sample_offsets": sample_offsets,
        "n_tokens": torch.tensor([n_tokens]),
    }


def bin_edges(stats: dict, latents: list[int], n_bins: int = N_QUANTILE_BINS) -> np.ndarray:
    """[len(latents), n_bins + 1]: the edges of each latent's n_bins equal-mass bins of its non-zero training
    activations (0%..100%): the exact `quantile_edges` for deciles, else the quantiles of its sorted sample
    (the decile edges interpolated for a latent without one)."""
    deciles = stats["quantile_edges"].numpy()[latents].astype(np.float64)
    if n_bins == N_QUANTILE_BINS:
        return deciles
    values, offsets = stats["sample_values"].numpy(), stats["sample_offsets"].numpy()
    at, decile_at = np.linspace(0, 1, n_bins + 1), np.linspace(0, 1, N_QUANTILE_BINS + 1)
    out = np.zeros((len(latents), n_bins + 1), dtype=np.float64)
    for i, latent in enumerate(latents):
        sample = values[offsets[latent] : offsets[latent + 1]]
        out[i] = np.quantile(sample, at) if len(sample) else np.interp(at, decile_at, deciles[i])
    return out


def stats_summary(stats: dict[str, torch.Tensor], rows: str) -> dict:
    counts = stats["firing_count"]
    n_tokens = int(stats["n_tokens"][0])
    return {
        "rows": rows,
        "n_rows": int(stats["n_rows"][0]),
        "n_tokens_excluding_bos": n_tokens,
        "d_sae": int(counts.numel()),
        "mean_l0": float(counts.sum()) / max(n_tokens, 1),
        "dead_latents": int((counts == 0).sum()),
        "dead_fraction": float((counts == 0).float().mean()),
        "median_firing_rate_alive": float(stats["firing_rate"][counts > 0].median())
        if (counts > 0).any()
        else 0.0,
        "position_0_excluded": True,
    }


def save_statistics(stats_dir: Path, hookpoint: str, stats: dict[str, torch.Tensor], rows: str) -> dict:
    """Write the statistics and their summary JSON; `rows` says which cache rows they count (`train`: the row
    split's training rows; `all`), in both files."""
    stats_dir = Path(stats_dir)
    metadata = {"rows": rows}  # one key: safetensors writes several in no fixed order (n_rows is a tensor)
    atomic_save(
        stats_dir / f"{hookpoint}.safetensors", lambda tmp: save_file(stats, str(tmp), metadata=metadata)
    )
    summary = stats_summary(stats, rows)
    atomic_write_json(stats_dir / f"{hookpoint}.json", summary)
    return summary


def save_training_statistics(reader: CacheReader, stats_dir: Path, sample_size: int) -> dict:
    """The statistics of the training rows of the cache's row split, saved (data_gen/cache_activations.py);
    returns their summary."""
    stats = cache_statistics(reader, sample_size, reader.row_split()["train"])
    return save_statistics(stats_dir, reader.folder.name, stats, "train")


def load_statistics(stats_dir: Path, hookpoint: str) -> dict[str, torch.Tensor]:
    path = Path(stats_dir) / f"{hookpoint}.safetensors"
    if not path.is_file():
        raise MissingInputError(f"{path} not found; it is written by data_gen/cache_activations.py.")
    return load_file(str(path))


def latent_sample(stats: dict[str, torch.Tensor], latent: int) -> np.ndarray:
    """The sorted activation sample of one latent."""
    a, b = stats["sample_offsets"][latent], stats["sample_offsets"][latent + 1]
    return stats["sample_values"][a:b].numpy()
