"""Train / validation / test splits of latents and of cache rows.

The row split is a function of the cache's row count, the fractions and the seed alone, so the stages that
must agree on it compute it independently: data_gen/explain.py and score.py take their examples from the
training rows only (an interpretation never quotes an eval context), build_dataset.py builds its splits on the
same rows.
"""

from __future__ import annotations

import numpy as np


def split_ids(
    ids: np.ndarray, validation_fraction: float, test_fraction: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """A seeded partition of `ids` into train / validation / test (each sorted)."""
    perm = rng.permutation(np.asarray(ids))
    n_test = max(1, round(len(perm) * test_fraction))
    n_val = max(1, round(len(perm) * validation_fraction))
    return {
        "test": np.sort(perm[:n_test]),
        "validation": np.sort(perm[n_test : n_test + n_val]),
        "train": np.sort(perm[n_test + n_val :]),
    }


def split_rows(
    n_rows: int, validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """The cache's row split: a function of the row count, fractions and seed alone (its own generator, not
    the latent split's), so data_gen/explain.py draws the same one and interprets from the training rows
    only."""
    return split_ids(np.arange(n_rows), validation_fraction, test_fraction, np.random.default_rng([seed, 1]))
