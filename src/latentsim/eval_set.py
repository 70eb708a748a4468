"""One handle on an eval set (a data_gen/build_dataset.py folder of held-out latents) and what it was built
from.

eval/sweep.py, eval/patch_kl.py and eval/generate.py all need the same things of an eval set: its prompt
format and width, its splits, the cache it was built from (tokens at the exact recorded positions), the SAE of
that cache, the latents' statistics and the hook layer. `EvalSet.open(path)` gives them, so that a schema
change touches one place. A context is (cache row, judged position); its id packs both into one integer.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from latentsim.config import SAEArguments, hookpoint_layer
from latentsim.errors import BadInputError, MissingInputError
from latentsim.prompts import get_format

CONTEXT_ID_STRIDE = 1_000_000  # > any cache row length: row * stride + position is unique and sorts by row
SPLIT_COLUMNS = {"context", "interpretation", "n_active", "n_active_explained", "prompt_format"}


def context_id(row, position):
    """The id of the context judged at `position` of cache row `row` (ints or integer arrays/Series)."""
    return row * CONTEXT_ID_STRIDE + position


def context_row_position(cid: int) -> tuple[int, int]:
    """(cache row, judged position) of a context id."""
    return divmod(int(cid), CONTEXT_ID_STRIDE)


@dataclass
class EvalSet:
    path: Path
    stats: dict  # dataset_stats.json: prompt_format, label, width, splits
    build: dict  # the build_dataset config it was made with (cache_dir, hookpoint, interpretations, ...)
    prompt_format: str
    label: str  # the label column its answers encode: `active` or a bin column
    width: int  # the SAE's number of latents
    hookpoint: str
    cache_dir: Path

    @classmethod
    def open(cls, path: str | Path) -> EvalSet:
        path = Path(path)
        for name in ("dataset_stats.json", "run_config.json"):
            if not (path / name).is_file():
                raise MissingInputError(
                    f"config key `eval_set`: {path / name} is missing; build the eval set with "
                    "data_gen/build_dataset.py."
                )
        stats = json.loads((path / "dataset_stats.json").read_text())
        build = json.loads((path / "run_config.json").read_text())["config"]["dataset"]
        return cls(
            path,
            stats,
            build,
            stats["prompt_format"],
            stats["label"],
            stats["width"],
            build["hookpoint"],
            Path(build["cache_dir"]),
        )

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def binary(self) -> bool:
        return get_format(self.prompt_format).label == "active"

    @property
    def latent_major(self) -> bool:
        """Built with `candidates: per_latent`: each latent judged on a fixed number of active and inactive
        contexts."""
        return self.stats.get("candidates", "per_context") == "per_latent"

    @property
    def layer(self) -> int:
        return hookpoint_layer(self.hookpoint)

    def require_binary(self, what: str) -> None:
        if not self.binary:
            raise BadInputError(
                f"config key `eval_set`: {self.path} is a value eval set ({self.prompt_format}); "
                f"{what} needs the binary one."
            )

    def require_uniform_negatives(self) -> None:
        """The dictionary-wide extrapolations (expected latents flagged, precision at L0, the L0-matched
        threshold) read the scored inactive candidates as a uniform sample of the inactive latents;
        frequency-matched negatives over-represent frequent latents, and reweighting them is not implemented
        yet. A `mixed` set qualifies: the extrapolations read its uniform half only (its `negative_kind`
        column, latentsim.metrics.uniform_negative_mask)."""
        sampling = self.stats.get("negative_sampling", "uniform")
        if sampling not in ("uniform", "mixed"):
            raise BadInputError(
                f"config key `eval_set`: {self.path} draws its negatives `{sampling}`; eval/sweep.py's "
                "dictionary-wide extrapolations need uniformly drawn ones (negative_sampling: uniform or "
                "mixed, configs/data/eval_quantiles.yaml). Frequency-matched sets serve training mixtures."
            )

    def split(self, split: str, max_contexts: int = 0, seed: int = 0) -> pd.DataFrame:
        """One split's rows with their `context_id`; `max_contexts` > 0 keeps a seeded sample of its
        contexts."""
        path = self.path / f"{split}.parquet"
        if not path.is_file():
            raise MissingInputError(
                f"config key `eval_set`: {path} does not exist; build it with data_gen/build_dataset.py."
            )
        df = pd.read_parquet(path)
        missing = SPLIT_COLUMNS - set(df.columns)
        if missing:
            raise BadInputError(
                f"{path} lacks columns {sorted(missing)}: it was built by an older build_dataset; rebuild it."
            )
        df["context_id"] = context_id(df["row"].astype(np.int64), df["position"].astype(np.int64))
        if max_contexts:
            ids = np.sort(df["context_id"].unique())
            if len(ids) > max_contexts:
                keep = np.random.default_rng(seed).choice(ids, size=max_contexts, replace=False)
                df = df[df["context_id"].isin(keep)]
        return df.reset_index(drop=True)

    @functools.cached_property
    def cache(self):
        """The cache the eval set was built from, opened (not loaded: CacheReader reads what is asked for)."""
        from latentsim.cache_reader import CacheReader

        return CacheReader(self.cache_dir / "latents", self.hookpoint)

    @functools.cached_property
    def tokens(self):
        """The cache's tokens [rows, ctx_len] (torch int64): the ones every context was judged on."""
        import torch

        return torch.from_numpy(self.cache.tokens.astype(np.int64))

    @property
    def subject_model(self) -> str:
        """The model reference the cache was recorded with."""
        return self.cache.config["latentsim"]["model"]["model"]

    def sae_arguments(self) -> SAEArguments | None:
        """The SAE the cache was encoded with (None for a cache that does not record it, e.g. delphi's)."""
        info = self.cache.config.get("latentsim", {}).get("sae")
        return SAEArguments(hookpoint=self.hookpoint, **info) if info else None

    def load_sae(self, device="cpu"):
        from latentsim.sae import load_sae

        sae_args = self.sae_arguments()
        if sae_args is None:
            raise BadInputError(
                f"{self.cache_dir / 'latents' / self.hookpoint}/config.json does not record its SAE; "
                "patching needs a cache written by data_gen/cache_activations.py."
            )
        return load_sae(sae_args, device=device)

    def decoder_weights(self) -> np.ndarray | None:
        """W_dec of the cache's SAE (for the decoder alignment); None when the cache does not record its
        SAE."""
        return self.load_sae().W_dec.detach().float().numpy() if self.sae_arguments() else None

    @functools.cached_property
    def statistics(self) -> dict:
        """Per-latent statistics of the cache (latentsim.latent_stats)."""
        from latentsim.latent_stats import load_statistics

        return load_statistics(self.cache_dir / "stats", self.hookpoint)

    def decile_edges(self, device="cpu"):
        """[W, 11] deciles of each latent's non-zero activations; column 5 is its median."""
        return self.statistics["quantile_edges"].to(device)

    @property
    def judged_width(self) -> int:
        """The dictionary a simulator answers for: the latents with an interpretation (not the SAE's width: it
        cannot be asked about the unexplained ones, and most dead latents are among them)."""
        return int(self.stats["latents_with_interpretation"])

    @staticmethod
    def judged_l0(df: pd.DataFrame) -> float:
        """Mean number of explained latents active at the judged tokens (the budget the L0-matched threshold
        and precision at L0 aim at)."""
        return float(df.groupby("context_id")["n_active_explained"].first().mean())

    def interpretations(self, path: str | None = None) -> dict[int, str]:
        """The interpretations of the eval set's (first) interpretation set, or of another set at `path`
        (checked against this eval set's hookpoint and SAE width)."""
        from latentsim.explain import load_interpretations

        return load_interpretations(path or self.build["interpretations"][0], self.hookpoint, self.width)
