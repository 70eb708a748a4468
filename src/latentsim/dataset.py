"""Simulator examples: (interpretation, context, label) rows built from the cache under a data mixture.

A context is a window of subject tokens ending at a sampled position of a cache row (never reaching position 0);
its last token is judged. Its labels come straight from the cache (latent ids are global: the cache loader adds
each delphi split's start back, the offset the seed forgot). Splits never leak: in `latents` mode train /
validation / test hold disjoint latents *and* disjoint rows; in `contexts` mode only the rows are disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from latentsim.cache import SparseCache

SPLITS = ("train", "validation", "test")


@dataclass
class ActiveIndex:
    """Token-major lookup: the active latents and values at (row, position)."""

    keys: np.ndarray      # sorted row * ctx_len + position of every entry
    latents: np.ndarray
    values: np.ndarray
    ctx_len: int

    @classmethod
    def build(cls, cache: SparseCache) -> ActiveIndex:
        ordered = cache.token_major()
        loc = ordered.locations.numpy()
        ctx = cache.tokens.shape[1]
        return cls(loc[:, 0] * ctx + loc[:, 1], loc[:, 2], ordered.activations.numpy(), ctx)

    def at(self, row: int, position: int) -> dict[int, float]:
        key = row * self.ctx_len + position
        a, b = np.searchsorted(self.keys, [key, key + 1])
        return dict(zip(self.latents[a:b].tolist(), self.values[a:b].tolist(), strict=True))


def split_ids(ids: np.ndarray, validation_fraction: float, test_fraction: float,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A seeded partition of `ids` into train / validation / test (each sorted)."""
    perm = rng.permutation(np.asarray(ids))
    n_test = max(1, round(len(perm) * test_fraction))
    n_val = max(1, round(len(perm) * validation_fraction))
    return {"test": np.sort(perm[:n_test]), "validation": np.sort(perm[n_test:n_test + n_val]),
            "train": np.sort(perm[n_test + n_val:])}


def activation_bin(value: float, max_value: float) -> int:
    """0-9, linear in the latent's max activation (delphi's floor(10 a / max), 10 folded into 9)."""
    return int(min(9, np.floor(10 * value / max_value))) if max_value > 0 else 0


def quantile_bin(value: float, edges: np.ndarray) -> int:
    """0-9: which decile of the latent's non-zero distribution `value` falls in (edges: 11 quantiles)."""
    return int(min(9, np.searchsorted(edges[1:-1], value, side="right")))


def decoder_neighbours(w_dec: torch.Tensor, latents: np.ndarray, k: int = 16, chunk: int = 1024) -> dict[int, np.ndarray]:
    """The k latents (among `latents`) whose decoder directions are closest in cosine to each latent's.

    Computed in row chunks: a 131k-latent SAE would otherwise need a 131k x 131k similarity matrix.
    """
    ids = torch.as_tensor(latents)
    d = torch.nn.functional.normalize(w_dec[ids].float(), dim=1)
    out = {}
    for a in range(0, len(ids), chunk):
        sims = d[a:a + chunk] @ d.T
        sims[torch.arange(sims.shape[0]), torch.arange(a, a + sims.shape[0])] = -2  # not its own neighbour
        top = torch.topk(sims, k=min(k, len(ids) - 1), dim=1).indices
        for i in range(sims.shape[0]):
            out[int(ids[a + i])] = ids[top[i]].numpy()
    return out


@dataclass
class Candidate:
    latent: int
    kind: str  # positive | random_negative | hard_negative
    activation: float = 0.0


@dataclass
class BuildReport:
    active_without_interpretation: int = 0
    negatives_short: int = 0  # negatives wanted but no eligible latent left


def choose_candidates(active: dict[int, float], pool: np.ndarray, pool_set: set[int], args, rng: np.random.Generator,
                      hard_pool: np.ndarray | None, report: BuildReport) -> list[Candidate]:
    """Positives (all or top-k active latents of the split) and negatives (random, optionally hard)."""
    mine = sorted(((lat, val) for lat, val in active.items() if lat in pool_set), key=lambda x: (-x[1], x[0]))
    if args.positives == "top_k":
        mine = mine[:args.top_k]
    out = [Candidate(lat, "positive", val) for lat, val in mine]
    n_neg = args.negatives_per_context or int(round(args.negatives_per_positive * max(len(mine), 1)))
    if n_neg == 0:
        return out
    taken = set(active)
    n_hard = int(round(n_neg * args.hard_negative_fraction)) if hard_pool is not None else 0
    if n_hard:
        hard = np.array([h for h in np.unique(hard_pool) if h not in taken and h in pool_set])
        pick = rng.choice(hard, size=min(n_hard, len(hard)), replace=False) if len(hard) else []
        out += [Candidate(int(h), "hard_negative") for h in sorted(pick)]
        taken |= {int(h) for h in pick}
    need = n_neg - (len(out) - len(mine))
    # Rejection sampling from the pool: active latents are a tiny share of it.
    picked: set[int] = set()
    tries = 0
    while len(picked) < need and tries < 20:
        draw = pool[rng.integers(0, len(pool), size=2 * need + 8)]
        for lat in draw.tolist():
            if lat not in taken and lat not in picked and len(picked) < need:
                picked.add(lat)
        tries += 1
    report.negatives_short += need - len(picked)
    out += [Candidate(lat, "random_negative") for lat in sorted(picked)]
    return out
