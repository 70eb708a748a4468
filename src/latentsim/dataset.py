"""Simulator examples: (interpretation, context, label) rows built from the cache under a data mixture.

A context is a window of subject tokens ending at a sampled position of a cache row (never reaching
position 0); its last token is judged. Its labels come straight from the cache (latent ids are global: the
cache loader adds each delphi split's start back, the offset the seed forgot). Splits never leak: their rows
are the cache's row split (whole documents: latentsim.splits, recorded by data_gen/cache_activations.py, never
recomputed here), and in `latents` mode train / validation / test also hold disjoint latents, twins
(latentsim.splits.latent_twins) always on one side; in `contexts` mode only the rows are disjoint. With
`confirmation_fraction` > 0 a fourth, locked split, confirmation (its latents x the cache's confirmation
rows), holds latents and rows that no other split has, in either mode.

data_gen/build_dataset.py reads its inputs, then for each split: `build_split` (its rows), `split_summary`;
last `dataset_card`. One seeded generator is shared by the splits in order, so a config and seed give the same
bytes.

Negatives are `uniform` over the split's latents (a firing-rate prior then ranks most positives above them:
the active latents of a token are mostly frequent ones, a uniform draw mostly rare ones) or
`frequency_matched` (FrequencyBins: their log firing rates distributed like the context's positives').
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from latentsim.cache import SparseCache
from latentsim.cache_reader import CacheReader
from latentsim.config import DatasetArguments, SAEArguments
from latentsim.errors import ConfigError
from latentsim.latent_stats import bin_edges
from latentsim.prompts import get_format, marked_context, render_completion, render_prompt
from latentsim.sae import load_sae
from latentsim.simulators.reference import FIRING_RATE_FLOOR
from latentsim.splits import describe_row_split, empty_splits, latent_twins, split_groups

SPLITS = ("train", "validation", "test")
# Non-zeros held in memory while building (a chunk of a split's rows, token-major): ~1 GB at 16M.
INDEX_ENTRIES = 1 << 24


@dataclass
class ActiveIndex:
    """Token-major lookup: the active latents and values at (row, position)."""

    keys: np.ndarray  # sorted row * ctx_len + position of every entry
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


def explained_latents(interpretations: list[dict[int, str]], scores: dict[int, float] | None) -> np.ndarray:
    """The latents with an interpretation in at least one set (and a score, when scores are given), sorted."""
    explained = np.array(sorted(set().union(*interpretations)), dtype=np.int64)
    if scores is not None:
        explained = explained[[lat in scores for lat in explained.tolist()]]
    return explained


def dataset_splits(args: DatasetArguments) -> tuple[str, ...]:
    """The splits a dataset is built with: train, validation, test, and confirmation when it has a share."""
    return SPLITS + (("confirmation",) if args.confirmation_fraction > 0 else ())


def cache_decoder(cache: CacheReader, hookpoint: str) -> torch.Tensor | None:
    """W_dec of the SAE the cache records (None for a cache that records none, as delphi's)."""
    sae_info = cache.config.get("latentsim", {}).get("sae")
    return load_sae(SAEArguments(hookpoint=hookpoint, **sae_info)).W_dec.detach() if sae_info else None


def check_confirmation(args: DatasetArguments, row_split: dict[str, np.ndarray]) -> None:
    """A confirmation share exactly when the cache keeps confirmation rows: its locked latents must be held
    out of every dataset built on those rows, and it cannot exist without them."""
    n_rows = len(row_split.get("confirmation", ()))
    if n_rows and not args.confirmation_fraction:
        raise ConfigError(
            f"config key `confirmation_fraction`: the cache keeps {n_rows} confirmation rows, so every "
            "dataset built on it holds confirmation latents out; set confirmation_fraction > 0 (the same "
            "share and seed in every dataset of this cache), or re-split the cache with "
            "confirmation_fraction: 0."
        )
    if args.confirmation_fraction and not n_rows:
        raise ConfigError(
            "config key `confirmation_fraction`: the cache keeps no confirmation rows; rerun "
            "data_gen/cache_activations.py with confirmation_fraction > 0 (only its split and statistics are "
            "redone), or set confirmation_fraction: 0."
        )


def split_pools(
    explained: np.ndarray,
    row_split: dict[str, np.ndarray],
    args: DatasetArguments,
    rng: np.random.Generator,
    twin_groups: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """({split: its latents}, {split: its cache rows}) for dataset_splits(args). Latents are split by
    `twin_groups` (latentsim.splits.latent_twins; None: every latent its own group): disjoint in `latents`
    mode; in `contexts` mode train / validation / test share the explained latents less the confirmation
    ones, which are the same in both modes (one draw). The rows are the cache's row split (`row_split`,
    CacheReader.row_split)."""
    check_confirmation(args, row_split)
    groups = np.arange(len(explained)) if twin_groups is None else twin_groups
    names = dataset_splits(args)
    if args.split_mode == "contexts" and not args.confirmation_fraction:
        return {s: explained for s in SPLITS}, {s: row_split[s] for s in names}
    fractions = {
        "validation": args.validation_fraction,
        "test": args.test_fraction,
        "confirmation": args.confirmation_fraction,
    }
    parts = split_groups(groups, fractions, rng)
    if empty := empty_splits(parts, fractions):
        raise ConfigError(
            f"config keys `validation_fraction`/`test_fraction`: the {len(explained)} explained "
            f"latents ({len(np.unique(groups))} twin groups) leave the {', '.join(empty)} split(s) "
            "empty; explain more latents or change the fractions."
        )
    latent_splits = {s: explained[parts[s]] for s in names}
    if args.split_mode == "contexts":
        shared = np.setdiff1d(explained, latent_splits["confirmation"])
        latent_splits.update({s: shared for s in SPLITS})
    return latent_splits, {s: row_split[s] for s in names}


def dataset_pools(
    explained: np.ndarray,
    cache: CacheReader,
    interpretations: list[dict[int, str]],
    args: DatasetArguments,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """split_pools over the latents' twin groups (the decoders of the cache's SAE, the token-list heads of
    `interpretations`) and the cache's row split; also the twins' record for dataset_stats.json."""
    groups, twins = latent_twins(explained, interpretations, cache_decoder(cache, args.hookpoint))
    latent_splits, row_splits = split_pools(explained, cache.row_split(), args, rng, groups)
    return latent_splits, row_splits, twins


def subsample_rows(row_splits: dict[str, np.ndarray], max_rows: int, seed: int) -> dict[str, np.ndarray]:
    """`max_rows_per_split`: a seeded random `max_rows` of each split's rows (sorted), from a generator of its
    own (the mixture's other draws are unchanged); 0 keeps every row."""
    if not max_rows:
        return row_splits
    rng = np.random.default_rng([seed, 2])
    return {
        s: np.sort(rng.choice(r, size=min(max_rows, len(r)), replace=False)) for s, r in row_splits.items()
    }


def activation_bin(value: float, max_value: float) -> int:
    """0-9, linear in the latent's max activation (delphi's floor(10 a / max), 10 folded into 9)."""
    return int(min(9, np.floor(10 * value / max_value))) if max_value > 0 else 0


def quantile_bin(value: float, edges: np.ndarray) -> int:
    """0..K-1: which of the latent's K equal-mass bins of its non-zero distribution `value` falls in (edges:
    K + 1 quantiles; the deciles' 11 give 0-9)."""
    return int(min(len(edges) - 2, np.searchsorted(edges[1:-1], value, side="right")))


def decoder_neighbours(
    w_dec: torch.Tensor, latents: np.ndarray, k: int = 16, chunk: int = 1024
) -> dict[int, np.ndarray]:
    """The k latents (among `latents`) whose decoder directions are closest in cosine to each latent's.

    Computed in row chunks: a 131k-latent SAE would otherwise need a 131k x 131k similarity matrix.
    """
    ids = torch.as_tensor(latents)
    d = torch.nn.functional.normalize(w_dec[ids].float(), dim=1)
    out = {}
    for a in range(0, len(ids), chunk):
        sims = d[a : a + chunk] @ d.T
        sims[torch.arange(sims.shape[0]), torch.arange(a, a + sims.shape[0])] = -2  # not its own neighbour
        top = torch.topk(sims, k=min(k, len(ids) - 1), dim=1).indices
        for i in range(sims.shape[0]):
            out[int(ids[a + i])] = ids[top[i]].numpy()
    return out


def same_token_latents(reader: CacheReader) -> dict[int, np.ndarray]:
    """{token id: the latents that fire on it somewhere in the cache} (`hard_negatives: same_token`), read a
    chunk of a split file at a time."""
    pairs = []
    for i in range(len(reader.splits)):
        for loc, _ in reader.entry_chunks(i):
            tokens = reader.tokens[loc[:, 0], loc[:, 1]].astype(np.int64)  # int64 before the product
            pairs.append(np.unique(tokens * reader.width + loc[:, 2]))
    keys = np.unique(np.concatenate(pairs)) if pairs else np.zeros(0, dtype=np.int64)
    token, latent = np.divmod(keys, reader.width)  # sorted by token, then latent
    starts = np.flatnonzero(np.r_[True, token[1:] != token[:-1]]) if len(token) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(token)]
    return {int(token[a]): latent[a:b] for a, b in zip(starts, ends, strict=True)}


@dataclass
class Candidate:
    latent: int
    kind: str  # positive | random_negative | hard_negative
    activation: float = 0.0
    negative_kind: str = ""  # its draw: uniform | frequency_matched | hard ("" for a positive)


@dataclass
class BuildReport:
    active_without_interpretation: int = 0
    negatives_short: int = 0  # negatives wanted but no eligible latent left
    negatives_off_bin: int = (
        0  # `frequency_matched`: negatives taken from a neighbouring bin (theirs ran out)
    )
    latents_never_active: int = 0  # `per_latent`: pool latents that never fire in the split's rows (left out)


@dataclass
class FrequencyBins:
    """`negative_sampling: frequency_matched` (and the matched half of `mixed`): one split's latents binned by
    log firing rate, to draw a context's negatives so that their firing rates are distributed like its
    positives' (a firing-rate prior then ranks positives and negatives alike).

    - Bins: edges at `n_bins` + 1 evenly spaced quantiles (numpy's linear) of the pool's log firing rates
      (floored at FIRING_RATE_FLOOR, as the `prior` baseline does); a latent's bin is where its log rate falls
      among the inner edges (tied rates share a bin; duplicate edges leave bins empty, and no positive is ever
      in an empty bin).
    - Target: the bin shares of the context's positives; a context without positives gets the shares positives
      have at a random token (each bin's summed firing rate).
    - Draw, for `need` negatives: `need` bins by one `rng.choice` with the target as probabilities; then, bin
      by bin in ascending order, that many latents uniformly without replacement among the bin's eligible
      latents (in the pool, not active at the token, not already a hard negative).
    - Fallback: what a bin cannot supply comes from the nearest bin with eligible latents left (the lower on a
      tie), counted in `BuildReport.negatives_off_bin`; with none left anywhere, in `negatives_short`.

    Every draw comes from the shared generator in this fixed order, so a config and seed give the same bytes.
    """

    bin_of: dict[int, int]  # pool latent -> its bin
    members: list[np.ndarray]  # per bin, its pool latents (sorted)
    random_token_shares: np.ndarray  # per bin, the share of a random token's active pool latents

    @classmethod
    def build(cls, pool: np.ndarray, firing_rate: np.ndarray, n_bins: int) -> FrequencyBins:
        pool = np.sort(np.asarray(pool, dtype=np.int64))
        rate = firing_rate[pool].astype(np.float64)
        log_rate = np.log(np.maximum(rate, FIRING_RATE_FLOOR))
        edges = np.quantile(log_rate, np.linspace(0, 1, n_bins + 1)) if len(pool) else np.zeros(n_bins + 1)
        bins = np.searchsorted(edges[1:-1], log_rate, side="right")
        members = [pool[bins == b] for b in range(n_bins)]
        mass = np.bincount(bins, weights=rate, minlength=n_bins)
        if mass.sum() <= 0:  # no latent of the pool ever fired: weigh the bins by their size instead
            mass = np.array([len(m) for m in members], dtype=np.float64)
        return cls(
            dict(zip(pool.tolist(), bins.tolist(), strict=True)),
            members,
            mass / mass.sum() if mass.sum() > 0 else mass,
        )

    def draw(
        self, positives: list[int], need: int, taken: set[int], rng: np.random.Generator, report: BuildReport
    ) -> list[int]:
        """Up to `need` distinct pool latents outside `taken`, matched in frequency to `positives` (see the
        class)."""
        if need <= 0 or not any(len(m) for m in self.members):
            return []
        n_bins = len(self.members)
        counts = np.bincount([self.bin_of[lat] for lat in positives], minlength=n_bins).astype(np.float64)
        target = counts / counts.sum() if counts.sum() else self.random_token_shares
        wanted = np.bincount(rng.choice(n_bins, size=need, p=target), minlength=n_bins)
        taken_ids = np.fromiter(taken, dtype=np.int64, count=len(taken))
        eligible: dict[int, np.ndarray] = {}  # filled lazily: only the bins drawn from are scanned

        def left(b: int) -> np.ndarray:
            if b not in eligible:
                eligible[b] = without(self.members[b], taken_ids)
            return eligible[b]

        def take(b: int, k: int) -> list[int]:
            pick = rng.choice(left(b), size=k, replace=False)
            eligible[b] = without(left(b), pick)
            return pick.tolist()

        picked, short = [], {}
        for b in np.flatnonzero(wanted).tolist():
            k = min(int(wanted[b]), len(left(b)))
            picked += take(b, k) if k else []
            if wanted[b] > k:
                short[b] = int(wanted[b]) - k
        for b, missing in short.items():
            for c in sorted(range(n_bins), key=lambda c, b=b: (abs(c - b), c)):
                k = min(missing, len(left(c)))
                if k:
                    picked += take(c, k)
                    report.negatives_off_bin += k
                    missing -= k
                if not missing:
                    break
        return picked


def without(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`sorted_ids` less those in `ids`, still sorted: a binary search per id (a bin of a 131k-latent SAE
    holds thousands of latents, a context takes a few dozen)."""
    at = np.searchsorted(sorted_ids, ids)
    hit = at < len(sorted_ids)
    hit[hit] = sorted_ids[at[hit]] == ids[hit]
    return np.delete(sorted_ids, at[hit])


def uniform_negatives(pool: np.ndarray, need: int, taken: set[int], rng: np.random.Generator) -> set[int]:
    """Up to `need` distinct latents of `pool` outside `taken`, uniformly (`negative_sampling: uniform`, and
    the uniform half of `mixed`)."""
    # Rejection sampling from the pool: active latents are a tiny share of it.
    picked: set[int] = set()
    tries = 0
    while len(picked) < need and tries < 20:
        draw = pool[rng.integers(0, len(pool), size=2 * need + 8)]
        for lat in draw.tolist():
            if lat not in taken and lat not in picked and len(picked) < need:
                picked.add(lat)
        tries += 1
    return picked


def choose_candidates(
    active: dict[int, float],
    pool: np.ndarray,
    pool_set: set[int],
    args,
    rng: np.random.Generator,
    hard_pool: np.ndarray | None,
    report: BuildReport,
    frequency_bins: FrequencyBins | None = None,
) -> list[Candidate]:
    """Positives (all or top-k active latents of the split) and negatives (random, optionally hard): the
    random ones uniform over `pool` (`negative_sampling: uniform`), matched in firing rate to the positives
    (`frequency_matched`, from `frequency_bins`), or (`mixed`) half of each: the uniform half drawn first
    (ceil), then the matched half among the latents still free, so no latent is a candidate twice. Each
    negative records its draw in `negative_kind`: the dictionary-wide extrapolations read only the uniform
    ones, the AUCs every candidate."""
    mine = sorted(((lat, val) for lat, val in active.items() if lat in pool_set), key=lambda x: (-x[1], x[0]))
    if args.positives == "top_k":
        mine = mine[: args.top_k]
    out = [Candidate(lat, "positive", val) for lat, val in mine]
    n_neg = args.negatives_per_context or int(round(args.negatives_per_positive * max(len(mine), 1)))
    if n_neg == 0:
        return out
    taken = set(active)
    n_hard = int(round(n_neg * args.hard_negative_fraction)) if hard_pool is not None else 0
    if n_hard:
        hard = np.array([h for h in np.unique(hard_pool) if h not in taken and h in pool_set])
        pick = rng.choice(hard, size=min(n_hard, len(hard)), replace=False) if len(hard) else []
        out += [Candidate(int(h), "hard_negative", negative_kind="hard") for h in sorted(pick)]
        taken |= {int(h) for h in pick}
    need = n_neg - (len(out) - len(mine))
    n_uniform = {"uniform": need, "frequency_matched": 0}.get(args.negative_sampling, need - need // 2)
    uniform = uniform_negatives(pool, n_uniform, taken, rng) if n_uniform else set()
    matched = (
        frequency_bins.draw([lat for lat, _ in mine], need - n_uniform, taken | uniform, rng, report)
        if need > n_uniform
        else []
    )
    report.negatives_short += need - len(uniform) - len(matched)
    out += [Candidate(lat, "random_negative", negative_kind="uniform") for lat in sorted(uniform)]
    out += [Candidate(lat, "random_negative", negative_kind="frequency_matched") for lat in sorted(matched)]
    return out


@dataclass
class BuildInputs:
    """What the examples of every split are drawn from, read once: the cache's tokens and active latents, the
    interpretation sets with their mixture weights, optional scores, the latents' bin statistics and firing
    rates, and the lookup `hard_negatives` asks for."""

    tokens: np.ndarray  # [rows, ctx_len] subject token ids
    reader: CacheReader  # the cache, read a chunk of rows at a time (index_rows)
    subject_tokenizer: object
    interpretations: list[dict[int, str]]  # one {latent: text} per set of `args.interpretations`
    weights: np.ndarray  # the sets' mixture weights
    scores: dict[int, float] | None
    explained: set[int]
    max_activation: np.ndarray
    quantile_edges: np.ndarray
    value_edges: np.ndarray | None  # dense value formats: [d_sae, K + 1], each latent's K bins' edges
    firing_rate: np.ndarray  # per latent, share of the cache's tokens it fires on
    same_token: dict[int, np.ndarray] | None  # `hard_negatives: same_token`, see same_token_latents
    neighbours: dict[int, np.ndarray] | None  # `hard_negatives: decoder`, see decoder_neighbours
    index: ActiveIndex | None = None  # the active latents of the rows being built (index_rows)

    def index_rows(self, rows: np.ndarray) -> None:
        """Load the active latents of `rows` only (dropping the previous rows'): memory holds one chunk of
        rows."""
        self.index = None
        self.index = ActiveIndex.build(self.reader.select(rows=rows))

    @classmethod
    def load(
        cls,
        args: DatasetArguments,
        cache: CacheReader,
        interpretations: list[dict[int, str]],
        scores: dict[int, float] | None,
        stats: dict,
        explained: np.ndarray,
    ) -> BuildInputs:
        tokens = cache.tokens.astype(np.int64)
        ctx_len = tokens.shape[1]
        if args.window_min > ctx_len - 1 or args.contexts_per_row > ctx_len - args.window_min:
            raise ConfigError(
                f"config keys `window_min`/`contexts_per_row`: {args.contexts_per_row} windows of at "
                f"least {args.window_min} tokens do not fit rows of {ctx_len} tokens (position 0 is "
                "never used)."
            )
        neighbours = None
        if args.hard_negatives == "decoder":
            neighbours = decoder_neighbours(cache_decoder(cache, args.hookpoint), explained)
        return cls(
            tokens=tokens,
            reader=cache,
            subject_tokenizer=cache.subject_tokenizer(),
            interpretations=interpretations,
            weights=np.array(args.interpretation_weights or [1.0] * len(interpretations), dtype=float),
            scores=scores,
            explained=set(explained.tolist()),
            max_activation=stats["max_activation"].numpy(),
            quantile_edges=stats["quantile_edges"].numpy(),
            value_edges=(
                bin_edges(stats, list(range(len(stats["quantile_edges"]))), fmt.value_bins)
                if (fmt := get_format(args.prompt_format)).value_bins
                else None
            ),
            firing_rate=stats["firing_rate"].numpy(),
            same_token=same_token_latents(cache) if args.hard_negatives == "same_token" else None,
            neighbours=neighbours,
        )

    def hard_pool(self, active: dict[int, float], judged_token: int, pool_set: set[int]) -> np.ndarray | None:
        """The hard-negative candidates of one context (None without hard negatives): latents that fire on the
        judged token elsewhere, or the decoder neighbours of the split's active latents."""
        if self.same_token is not None:
            return self.same_token.get(judged_token, np.zeros(0, dtype=np.int64))
        if self.neighbours is not None:
            positives = [lat for lat in active if lat in pool_set]
            return (
                np.concatenate([self.neighbours[lat] for lat in positives])
                if positives
                else np.zeros(0, np.int64)
            )
        return None

    def pick_interpretation(self, latent: int, rng: np.random.Generator) -> int:
        """Which interpretation set explains `latent` in this example: drawn by mixture weight among the sets
        that have it (no draw when only one does)."""
        usable = [i for i, interpretations in enumerate(self.interpretations) if latent in interpretations]
        if len(usable) == 1:
            return usable[0]
        w = self.weights[usable] / self.weights[usable].sum()
        return usable[int(rng.choice(len(usable), p=w))]


def build_split(
    split: str,
    rows: np.ndarray,
    pool: np.ndarray,
    inputs: BuildInputs,
    args: DatasetArguments,
    rng: np.random.Generator,
    report: BuildReport,
) -> list[dict]:
    """The examples of one split: for each of its cache rows, `contexts_per_row` judged positions (windows of
    `window_min`..`window_max` tokens ending there), and per position one row per candidate latent of `pool`
    (choose_candidates). `rng` is shared by the splits: every draw happens in a fixed order."""
    if args.candidates == "per_latent":
        return build_latent_major_split(split, rows, pool, inputs, args, rng, report)
    pool_set = set(pool.tolist())
    chunk_rows = inputs.reader.rows_per_chunk(INDEX_ENTRIES)
    frequency_bins = (
        FrequencyBins.build(pool, inputs.firing_rate, args.frequency_bins)
        if args.negative_sampling in ("frequency_matched", "mixed")
        else None
    )
    ctx_len = inputs.tokens.shape[1]
    out = []
    for i, row in enumerate(tqdm(rows.tolist(), desc=f"examples ({split})", unit="row")):
        if i % chunk_rows == 0:  # rows are read in chunks, in order: the draws are those of one pass
            inputs.index_rows(rows[i : i + chunk_rows])
        # Distinct judged positions per row; the window [end - length + 1, end] never holds position 0.
        for end in sorted(
            rng.choice(
                np.arange(args.window_min, ctx_len), size=args.contexts_per_row, replace=False
            ).tolist()
        ):
            length = int(rng.integers(args.window_min, min(args.window_max, end) + 1))
            window = inputs.tokens[row, end - length + 1 : end + 1]
            active = inputs.index.at(row, end)
            report.active_without_interpretation += sum(1 for lat in active if lat not in inputs.explained)
            hard_pool = inputs.hard_pool(active, int(window[-1]), pool_set)
            candidates = choose_candidates(
                active, pool, pool_set, args, rng, hard_pool, report, frequency_bins
            )
            if not candidates:
                continue
            judged = JudgedContext.of(inputs, args, row, end, length)
            out += [judged.example(cand, inputs, args, rng) for cand in candidates]
    return out


def latent_contexts(
    index: ActiveIndex, rows: np.ndarray, pool: np.ndarray, first_position: int, ctx_len: int
) -> dict[int, np.ndarray]:
    """{latent of `pool`: the keys (row * ctx_len + position) of its active positions in `rows`, positions >=
    `first_position`, sorted}; latents that never fire there are absent."""
    row_of, position = index.keys // ctx_len, index.keys % ctx_len
    keep = np.isin(row_of, rows) & (position >= first_position) & np.isin(index.latents, pool)
    keys, latents = index.keys[keep], index.latents[keep]
    order = np.lexsort((keys, latents))
    keys, latents = keys[order], latents[order]
    starts = np.flatnonzero(np.r_[True, latents[1:] != latents[:-1]]) if len(latents) else np.zeros(0, int)
    ends = np.r_[starts[1:], len(latents)]
    return {int(latents[a]): keys[a:b] for a, b in zip(starts, ends, strict=True)}


def build_latent_major_split(
    split: str,
    rows: np.ndarray,
    pool: np.ndarray,
    inputs: BuildInputs,
    args: DatasetArguments,
    rng: np.random.Generator,
    report: BuildReport,
) -> list[dict]:
    """`candidates: per_latent`: for each latent of `pool` that fires in the split's rows, up to
    `contexts_per_latent` of its active positions (uniformly, without replacement) and as many positions of
    the same rows where it is inactive, each judged at the end of a window as in build_split. The inactive
    ones are uniform, or (`hard_negatives: same_token`) a `hard_negative_fraction` of them on a token the
    latent fires on in these rows, so that naming the token is not enough. A firing-rate prior ranks all of
    one latent's contexts alike: per-latent AUC measures reading the context alone."""
    ctx_len = inputs.tokens.shape[1]
    inputs.index_rows(rows)  # every row of the split: its contexts are drawn from all of them
    fires = latent_contexts(inputs.index, rows, pool, args.window_min, ctx_len)
    report.latents_never_active += len(pool) - len(fires)
    n_positions = ctx_len - args.window_min
    # Every judgeable position of the split's rows, as keys grouped by token (for same-token inactive
    # contexts).
    keys_all = (rows[:, None] * ctx_len + np.arange(args.window_min, ctx_len)[None, :]).ravel()
    token_of = inputs.tokens.reshape(-1)[keys_all]
    by_token = (
        {int(t): keys_all[token_of == t] for t in np.unique(token_of)}
        if args.hard_negatives != "none"
        else {}
    )
    out = []
    for latent in tqdm(sorted(fires), desc=f"examples ({split}, per latent)", unit="latent"):
        keys = fires[latent]
        fired = set(keys.tolist())
        k = min(args.contexts_per_latent, len(keys))
        active_keys = np.sort(rng.choice(keys, size=k, replace=False))
        hard: list[int] = []
        if by_token:
            tokens = np.unique(inputs.tokens.reshape(-1)[keys])
            same = np.concatenate([by_token[int(t)] for t in tokens])
            same = same[~np.isin(same, keys)]
            n_hard = min(int(round(k * args.hard_negative_fraction)), len(same))
            hard = sorted(rng.choice(same, size=n_hard, replace=False).tolist()) if n_hard else []
        inactive: set[int] = set()
        want = k - len(hard)
        for _ in range(20):  # rejection: a latent is inactive at almost every position
            if len(inactive) == want:
                break
            draw = (
                rows[rng.integers(0, len(rows), size=2 * k)] * ctx_len
                + args.window_min
                + rng.integers(0, n_positions, size=2 * k)
            )
            for key in draw.tolist():
                if len(inactive) < want and key not in inactive and key not in fired and key not in hard:
                    inactive.add(key)
        report.negatives_short += want - len(inactive)
        chosen = (
            [(int(x), "positive") for x in active_keys]
            + [(x, "hard_negative") for x in hard]
            + [(x, "random_negative") for x in sorted(inactive)]
        )
        for key, kind in chosen:
            row, end = divmod(key, ctx_len)
            length = int(rng.integers(args.window_min, min(args.window_max, end) + 1))
            judged = JudgedContext.of(inputs, args, row, end, length)
            out.append(
                judged.example(Candidate(latent, kind, judged.active.get(latent, 0.0)), inputs, args, rng)
            )
    return out


@dataclass
class JudgedContext:
    """One judged context of a split: its window of subject tokens, the marked context text, the active
    latents at the judged token, and (dense formats) the window's text with every token's labels."""

    row: int
    end: int
    window: np.ndarray
    context: str
    active: dict[int, float]
    dense: DenseWindow | None

    @classmethod
    def of(
        cls, inputs: BuildInputs, args: DatasetArguments, row: int, end: int, length: int
    ) -> JudgedContext:
        window = inputs.tokens[row, end - length + 1 : end + 1]
        tok = inputs.subject_tokenizer
        context = marked_context(tok.decode(window[:-1].tolist()), tok.decode(window[-1:].tolist()))
        dense = (
            dense_window(tok, window, [inputs.index.at(row, p) for p in range(end - length + 1, end + 1)])
            if get_format(args.prompt_format).dense
            else None
        )
        return cls(row, end, window, context, inputs.index.at(row, end), dense)

    def example(
        self, cand: Candidate, inputs: BuildInputs, args: DatasetArguments, rng: np.random.Generator
    ) -> dict:
        """The dataset row judging `cand` here (its interpretation drawn by mixture weight)."""
        fmt = get_format(args.prompt_format)
        judged_fmt = fmt.judges if fmt.dense else fmt.name  # dense rows also carry their judgment's prompt
        src = inputs.pick_interpretation(cand.latent, rng)
        interpretation = inputs.interpretations[src][cand.latent]
        is_active = cand.kind == "positive"
        a_bin = activation_bin(cand.activation, inputs.max_activation[cand.latent]) if is_active else -1
        q_bin = quantile_bin(cand.activation, inputs.quantile_edges[cand.latent]) if is_active else -1
        label = {"active": int(is_active), "activation_bin": a_bin, "quantile_bin": q_bin}[args.label]
        score = inputs.scores[cand.latent] if inputs.scores is not None else None
        return {
            "prompt": render_prompt(judged_fmt, self.context, interpretation, score),
            "completion": render_completion(judged_fmt, label),
            "latent": cand.latent,
            "row": self.row,
            "position": self.end,
            "window_start": self.end - len(self.window) + 1,
            "context": self.context,
            "context_ids": self.window.tolist(),
            "n_active": len(self.active),
            "n_active_explained": sum(1 for lat in self.active if lat in inputs.explained),
            "active": int(is_active),
            "activation": float(cand.activation),
            "activation_bin": a_bin,
            "quantile_bin": q_bin,
            "candidate": cand.kind,
            "negative_kind": cand.negative_kind,
            "interpretation": interpretation,
            "interpretation_source": args.interpretations[src],
            "score": score,
            "prompt_format": args.prompt_format,
            **(
                self.dense.labels_of(
                    cand.latent, None if inputs.value_edges is None else inputs.value_edges[cand.latent]
                )
                if self.dense
                else {}
            ),
        }


@dataclass
class DenseWindow:
    """A context's text for dense formats: the decoded window, each subject token's character end in it (-1
    where a token's text is not a prefix extension, e.g. half of a multi-byte character: that token stays
    unlabelled), and the active latents at each of its positions."""

    text: str
    token_ends: list[int]
    active: list[dict[int, float]]

    def labels_of(self, latent: int, edges: np.ndarray | None = None) -> dict:
        """The dense columns of one candidate: a 0/1 label and the activation at every window token (-1:
        none); with the edges of the latent's K bins (dense value formats) also `token_bins`: 0 where
        inactive, 1 + the activation's bin where active (-1: unaligned)."""
        labels = [
            int(latent in a) if e >= 0 else -1 for a, e in zip(self.active, self.token_ends, strict=True)
        ]
        out = {
            "text": self.text,
            "token_ends": self.token_ends,
            "token_labels": labels,
            "token_activations": [float(a.get(latent, 0.0)) for a in self.active],
        }
        if edges is not None:
            out["token_bins"] = [
                -1 if y < 0 else (1 + quantile_bin(a[latent], edges) if y else 0)
                for a, y in zip(self.active, labels, strict=True)
            ]
        return out


def dense_window(tokenizer, window: np.ndarray, active: list[dict[int, float]]) -> DenseWindow:
    ids = window.tolist()
    text = tokenizer.decode(ids)
    ends, last = [], 0
    for i in range(len(ids)):
        prefix = tokenizer.decode(ids[: i + 1])
        aligned = text.startswith(prefix) and len(prefix) > last
        ends.append(len(prefix) if aligned else -1)
        last = len(prefix) if aligned else last
    return DenseWindow(text, ends, active)


def split_summary(rows: list[dict], pool: np.ndarray, n_cache_rows: int) -> dict:
    """Counts of one built split for dataset_stats.json and the card."""
    return {
        "examples": len(rows),
        "positives": sum(r["active"] for r in rows),
        "contexts": len({(r["row"], r["position"]) for r in rows}),
        "latents": len({r["latent"] for r in rows}),
        "latent_pool": len(pool),
        "rows": n_cache_rows,
        "candidates": dict(Counter(r["candidate"] for r in rows)),
        **(
            {
                "token_labels": sum(sum(v >= 0 for v in r["token_labels"]) for r in rows),
                "token_positives": sum(sum(v == 1 for v in r["token_labels"]) for r in rows),
                "tokens_unaligned": sum(sum(v < 0 for v in r["token_labels"]) for r in rows),
            }
            if rows and "token_labels" in rows[0]
            else {}
        ),
    }


def negative_sampling_summary(args: DatasetArguments, report: BuildReport) -> dict:
    """dataset_stats.json's record of frequency-matched negatives (`frequency_matched`, `mixed`); empty for
    `uniform` (its files stay as they were)."""
    if args.negative_sampling == "uniform":
        return {}
    return {
        "negative_sampling": args.negative_sampling,
        "frequency_bins": args.frequency_bins,
        "negatives_off_bin": report.negatives_off_bin,
    }


def twins_text(twins: dict) -> str:
    decoder = (
        "decoders not compared (the cache records no SAE)"
        if twins["decoder_pairs"] is None
        else f"{twins['decoder_pairs']} decoder pairs"
    )
    return (
        f"{decoder}, {twins['token_head_pairs']} token-head pairs, {twins['groups']} groups of "
        f"{twins['latents_in_groups']} latents (largest {twins['largest_group']})"
    )


def confirmation_text(stats: dict) -> str:
    if "confirmation" not in stats["splits"]:
        return ""
    return (
        "\n- confirmation (locked: read once, for the final recipe): its latents and the cache's "
        "confirmation rows are in no other split"
    )


def dataset_card(args: DatasetArguments, cache_config: dict, stats: dict) -> str:
    """The dataset's README.md: Hub metadata (one parquet file per split), how it was built, per-split
    counts."""
    lat = cache_config.get("latentsim", {})
    files = "\n".join(f"  - split: {s}\n    path: {s}.parquet" for s in dataset_splits(args))
    mixed = stats.get("negative_sampling") == "mixed"
    share = "half of the negatives, the other half uniform; " if mixed else ""
    matched = (
        f"\n- negative sampling: `{stats['negative_sampling']}` ({share}log firing rates distributed like "
        f"the positives', over {stats['frequency_bins']} quantile bins of each split's latents; "
        f"{stats['negatives_off_bin']} negatives from a neighbouring bin; column `negative_kind`)"
        if "negative_sampling" in stats
        else ""
    )
    negatives = (
        f"{args.negatives_per_context} per context"
        if args.negatives_per_context
        else f"{args.negatives_per_positive} per positive"
    )
    candidates = (
        f"latent-major: per latent, up to {args.contexts_per_latent} contexts where it fires and as many "
        f"where it does not ({stats.get('latents_never_active', 0)} latents never fire in their split's rows)"
        if args.candidates == "per_latent"
        else f"positives `{args.positives}`{f' (top {args.top_k})' if args.positives == 'top_k' else ''}, "
        f"negatives {negatives} (hard: {args.hard_negatives})"
    )
    return (
        f"""---
configs:
- config_name: default
  data_files:
{files}
tags: [latentsim, sae, interpretability, simulator]
---
# Simulator examples: {Path(args.output_dir).name}

Built by `data_gen/build_dataset.py` (latentsim) in TRL conversational prompt-completion format.

- subject model: {lat.get("model", {}).get("model", cache_config.get("model_name"))}, hookpoint \
`{args.hookpoint}`
- SAE: {json.dumps(lat.get("sae"))} ({stats["width"]} latents)
- interpretations: {", ".join(args.interpretations)} (weights {args.interpretation_weights or "equal"})
- prompt format: `{args.prompt_format}`, label `{args.label}`, {candidates}{matched}
- score in prompt: {args.score_path or "no"}
- split mode: `{args.split_mode}` (train/validation/test disjoint \
in {"latents and rows" if args.split_mode == "latents" else "rows"}); rows: the cache's row split, \
{describe_row_split(stats["row_split"])}
- latent twins (decoder cosine >= {stats["latent_twins"]["decoder_cosine"]} or the same top 3 named tokens), \
each group in one split: {twins_text(stats["latent_twins"])}{confirmation_text(stats)}

| split | examples | positives | contexts | latents |
|---|---|---|---|---|
"""
        + "\n".join(
            f"| {s} | {v['examples']} | {v['positives']} | {v['contexts']} | {v['latents']} |"
            for s, v in stats["splits"].items()
        )
        + f"""

Active latents without an interpretation (left out, counted): {stats["active_without_interpretation"]}.
Latents of the SAE without an interpretation: {stats["latents_without_interpretation"]}.
"""
    )
