"""Controls that read the wrong thing: a simulator given another latent's interpretation, or none at all.

How much a simulator reads the interpretation is the gap between its AUC with the real texts and its AUC with
texts that say nothing about the judged latent, on the same judgments (latentsim.sweep pairs them). A sweep
spec's `control=` picks one (latentsim.config.eval):

- `shuffled`: every latent is shown the interpretation of ANOTHER latent of its own split whose firing rate is
  close. Why frequency-matched: a text also tells how often its latent fires (a token list of common tokens
  against one of a rare word), and a firing-rate prior alone ranks well at a token. A text drawn from any
  other latent would change that cue too, and the gap would mix "reads what the latent fires on" with "reads
  how often it fires"; matching the rate leaves only the first. So the split's latents are put into quantile
  bins of log firing rate (equal counts; equal rates share a bin), and within each bin the texts go round a
  seeded random cycle: each latent takes the text of the next latent in a random order of its bin, a
  derangement (no latent keeps its own text) and a permutation (every text is shown once). Latents with
  identical texts (twins) would make the swap a no-op: among a few seeded orders the one that shows fewest
  latents a text equal to their own is kept, and their count is recorded. A bin of one latent has nobody to
  swap with: it joins the neighbouring bin nearest in log firing rate. The record counts the latents whose
  text came from their own bin (`matched_within_bin`) and from a neighbouring one.
- `empty`: every interpretation is the empty string (sim_v1 renders `Interpretation: ` with nothing after it,
  a dense format `Latent: ` before the text).

An eval set's splits hold disjoint latents (split_mode: latents), so each split is shuffled among its own
latents; where splits share latents (split_mode: contexts) those splits are shuffled as one group, so a latent
reads one text in every split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from latentsim.errors import BadInputError
from latentsim.simulators.reference import FIRING_RATE_FLOOR

CONTROLS = ("shuffled", "empty")
SPLIT_FILES = ("train", "validation", "test")  # an eval set's split files, where its stats do not list them
DEFAULT_BINS = 10  # quantile bins of log firing rate (fewer when a split has under 20 latents)
ORDERS_TRIED = 20  # seeded random orders per bin, when twins' identical texts make a swap a no-op


@dataclass
class Shuffle:
    """The `shuffled` control of one group of latents."""

    texts: dict[int, str]  # latent -> the text it is shown (another latent's)
    source: dict[int, int]  # latent -> the latent whose text it is shown
    bins: dict[int, int] = field(default_factory=dict)  # latent -> its firing-rate bin, before merging
    n_bins: int = 0
    matched_within_bin: int = 0  # latents shown a text of their own bin
    matched_neighbouring_bin: int = 0  # shown a neighbouring bin's text (a one-latent bin's swaps)
    same_text: int = 0  # latents shown a text equal to their own (twins), after the best of ORDERS_TRIED

    def record(self) -> dict:
        return {
            "latents": len(self.texts),
            "bins": self.n_bins,
            "matched_within_bin": self.matched_within_bin,
            "matched_neighbouring_bin": self.matched_neighbouring_bin,
            "same_text": self.same_text,
        }


def firing_rate_bins(log_rate: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile bins (0..k-1, ordered by rate) of `log_rate`: edges at its quantiles, so bins hold about equal
    counts and equal rates share a bin (empty bins dropped)."""
    edges = np.quantile(log_rate, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.unique(np.searchsorted(edges, log_rate, side="right"), return_inverse=True)[1]


def merge_single_bins(bins: np.ndarray, log_rate: np.ndarray) -> np.ndarray:
    """`bins` with every one-latent bin joined to its neighbouring bin nearest in log firing rate (relabelled
    0..k-1 in rate order), as long as there are two bins."""
    bins = bins.copy()
    while True:
        labels, counts = np.unique(bins, return_counts=True)
        single = labels[counts == 1]
        if not len(single) or len(labels) < 2:
            return np.unique(bins, return_inverse=True)[1]
        b = int(np.flatnonzero(labels == single[0])[0])
        value = log_rate[bins == labels[b]][0]
        gaps = {
            n: abs(
                value - (log_rate[bins == labels[n]].max() if n < b else log_rate[bins == labels[n]].min())
            )
            for n in (b - 1, b + 1)
            if 0 <= n < len(labels)
        }
        bins[bins == labels[b]] = labels[min(gaps, key=gaps.get)]


def shuffled_interpretations(
    texts: dict[int, str], firing_rate: np.ndarray, seed, n_bins: int = DEFAULT_BINS
) -> Shuffle:
    """The `shuffled` control of `texts` ({latent: interpretation}; the module docstring says why and how):
    each latent is shown another latent's text from its firing-rate bin. `firing_rate` is indexed by global
    latent id; `seed` seeds numpy's generator (an int or a sequence of ints). Deterministic per seed."""
    latents = np.array(sorted(texts), dtype=np.int64)
    if len(latents) < 2:
        raise BadInputError(
            f"control=shuffled needs at least 2 latents with an interpretation in a split; found "
            f"{len(latents)}. Build an eval set with more held-out latents."
        )
    rng = np.random.default_rng(seed)
    log_rate = np.log(np.maximum(np.asarray(firing_rate, dtype=float)[latents], FIRING_RATE_FLOOR))
    bins = firing_rate_bins(log_rate, max(1, min(n_bins, len(latents) // 2)))
    groups = merge_single_bins(bins, log_rate)
    source = {}
    for g in range(groups.max() + 1):
        members = latents[groups == g]
        best = None
        for _ in range(ORDERS_TRIED):
            order = members[rng.permutation(len(members))]
            cycle = dict(zip(order.tolist(), np.roll(order, -1).tolist(), strict=True))
            same = sum(texts[a] == texts[b] for a, b in cycle.items())
            if best is None or same < best[0]:
                best = (same, cycle)
            if not same:
                break
        source.update(best[1])
    bin_of = dict(zip(latents.tolist(), bins.tolist(), strict=True))
    within = sum(bin_of[a] == bin_of[b] for a, b in source.items())
    return Shuffle(
        texts={a: texts[b] for a, b in source.items()},
        source=source,
        bins=bin_of,
        n_bins=int(bins.max() + 1),
        matched_within_bin=within,
        matched_neighbouring_bin=len(source) - within,
        same_text=sum(texts[a] == texts[b] for a, b in source.items()),
    )


def split_latent_groups(eval_set) -> list[tuple[list[str], dict[int, str]]]:
    """[(splits, {latent: its interpretation in their rows})]: the eval set's split files, those sharing a
    latent merged into one group. A latent's text is its first row's (eval sets hold one text per latent)."""
    groups: list[tuple[list[str], dict[int, str]]] = []
    for split in list(eval_set.stats.get("splits", {})) or SPLIT_FILES:  # as dataset_stats.json lists them
        path = eval_set.path / f"{split}.parquet"
        if not path.is_file():
            continue
        rows = pd.read_parquet(path, columns=["latent", "interpretation"]).drop_duplicates("latent")
        texts, names = dict(zip(rows["latent"].astype(int), rows["interpretation"], strict=True)), [split]
        for group in [g for g in groups if g[1].keys() & texts.keys()]:
            groups.remove(group)
            names, texts = group[0] + names, {**group[1], **texts}
        groups.append((names, texts))
    return groups


def control_interpretations(
    control: str, eval_set, seed: int, interpretations: dict[int, str] | None = None
) -> tuple[dict[int, str], dict]:
    """({latent: the text the control shows}, what it did) for every latent of the eval set's splits:
    `interpretations` (another set than the rows' own, e.g. a baseline's `interpretations=`) replaces the
    rows' texts (latents it lacks are left out, as the real run drops them). `shuffled` is seeded by `seed`
    and the group's index."""
    if control not in CONTROLS:
        raise BadInputError(f"unknown control {control!r}; known: {', '.join(CONTROLS)}.")
    shown, record = {}, {"control": control, "splits": {}}
    firing_rate = eval_set.statistics["firing_rate"].double().numpy() if control == "shuffled" else None
    for index, (splits, texts) in enumerate(split_latent_groups(eval_set)):
        if interpretations is not None:
            texts = {lat: interpretations[lat] for lat in texts if lat in interpretations}
        if control == "empty":
            shown.update(dict.fromkeys(texts, ""))
            record["splits"]["+".join(splits)] = {"latents": len(texts)}
            continue
        shuffle = shuffled_interpretations(texts, firing_rate, [seed, index])
        shown.update(shuffle.texts)
        record["splits"]["+".join(splits)] = shuffle.record()
    return shown, record
