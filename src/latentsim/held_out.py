"""What a finetuned simulator saw in training, and refusing to score it on any of it.

A simulator's training data are build_dataset folders (its run records them). Scoring it on a cache row it
trained on measures memory, not simulation, so eval rows (the eval split and the calibration split alike) must
never be training rows; its training latents are refused too unless asked for (`allow_seen_latents`: the
`contexts` split mode's question), and always on the locked confirmation split, which no simulator may have
seen any part of. Row and latent ids only mean the same thing within one cache and hookpoint:
training data from another cache is not compared.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import pandas as pd

from latentsim.errors import BadInputError

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def training_split(folder: Path) -> tuple[frozenset[int], frozenset[int], tuple[str, str]]:
    """(rows, latents, (cache folder, hookpoint)) of a build_dataset train split, read once per process."""
    df = pd.read_parquet(folder / "train.parquet", columns=["row", "latent"])
    build = json.loads((folder / "run_config.json").read_text())["config"]["dataset"]
    return (
        frozenset(df["row"].tolist()),
        frozenset(df["latent"].tolist()),
        (str(Path(build["cache_dir"]).resolve()), build["hookpoint"]),
    )


def training_rows_and_latents(
    sim, cache: tuple[str, str] | None = None, strict: bool = True
) -> tuple[set[int], set[int]]:
    """The cache rows and latents of a finetuned simulator's training splits (those built on `cache` only,
    when given). A training set that is not a local build_dataset folder is refused (`strict`) or logged."""
    rows, latents = set(), set()
    for name in sim.train_datasets:
        folder = Path(name)
        if not (folder / "train.parquet").is_file() or not (folder / "run_config.json").is_file():
            if strict:
                raise BadInputError(
                    f"{sim.name}: its training data {name} is not a local build_dataset folder; the "
                    "held-out rows and latents cannot be checked."
                )
            logger.warning(
                "%s: cannot check held-out rows and latents against %s (not a local build_dataset folder)",
                sim.name,
                name,
            )
            continue
        r, lat, source = training_split(folder.resolve())
        if cache is None or source == cache:
            rows |= r
            latents |= lat
    return rows, latents


def refuse_seen(sim, eval_set, frames: dict[str, pd.DataFrame], allow_seen_latents: bool) -> None:
    """Refuse eval splits (`frames`: {split: judgments}) holding rows, or latents, a finetuned simulator
    trained on (latents: unless `allow_seen_latents`, never on the confirmation split)."""
    cache = (str(Path(eval_set.cache_dir).resolve()), eval_set.hookpoint)
    rows, latents = training_rows_and_latents(sim, cache, strict=False)
    for split, df in frames.items():
        if seen := sorted(rows & set(df["row"].tolist())):
            raise BadInputError(
                f"{sim.name} was trained on {len(seen)} cache rows of the eval set's {split} split "
                f"(e.g. {seen[:5]}); build the eval set and the training mixture from the same cache and "
                "the same row split (its row_split.json)."
            )
        locked = split == "confirmation"
        if (seen := sorted(latents & set(df["latent"].tolist()))) and (locked or not allow_seen_latents):
            raise BadInputError(
                f"{sim.name} was trained on {len(seen)} latents of the eval set's {split} split (e.g. "
                f"{seen[:5]}); evaluate on held-out latents (same seed and fractions as the training "
                "mixture, split_mode: latents)"
                + ("; the confirmation split allows none." if locked else " or set allow_seen_latents: true.")
            )
