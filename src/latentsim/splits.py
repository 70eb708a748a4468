"""Train / validation / test (/ confirmation) splits of cache rows and of latents, by groups never cut.

Rows: the cache owns the row split. data_gen/cache_activations.py writes it once, `row_split.json` beside the
cache's config.json (`ensure_row_split`), and every later stage reads it (`CacheReader.row_split`):
data_gen/explain.py and score.py take their examples from its training rows, build_dataset.py builds each
split on its rows. Rows that share a corpus document are grouped (the rows of a document are contiguous, so
groups are contiguous row ranges: latentsim.corpus.CorpusRows) and whole groups are split, so no document has
rows in two splits and a quoted training context never continues into an eval row. Documents are joined into
one token stream, so a chain of rows sharing documents only ends where a row ends exactly at a document's
end: `row_groups` cuts it every `split_group_rows` rows at a separator row, which joins its neighbours' split
when they share one and is otherwise left out of every split (counted; 2% of the quickstart cache's rows, 4%
of the study's, at split_group_rows 8).
A delphi cache records no documents: it is split row by row, and its record says so (`grouping: rows`).

Latents: build_dataset.py splits the explained latents by twin groups (`latent_twins`): latents whose decoder
directions have cosine >= TWIN_COSINE, or whose token-list interpretations name the same first
TWIN_HEAD_TOKENS tokens in the same order (in any of the dataset's interpretation sets), are joined,
transitively, and each group goes to one split, so a held-out latent never has a near copy among the
training latents.

Both use `split_groups`: the groups in a seeded random order, each put in the first of test, validation and
confirmation that it still fits in (each holds at most its share of the members, rounded, and at least one),
else in train. A group larger than an eval split's share therefore always trains; with groups of one member
the split sizes are exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from latentsim.errors import BadInputError, ConfigError
from latentsim.io import atomic_write_json
from latentsim.token_list import parse_token_list

EVAL_SPLITS = ("test", "validation", "confirmation")  # filled in this order
ROW_SPLIT_FILE = "row_split.json"  # in latents/<hookpoint>/, beside the cache's config.json
FRACTION_KEYS = ("validation_fraction", "test_fraction", "confirmation_fraction")
TWIN_COSINE = 0.9  # decoder directions at least this close make two latents twins
TWIN_HEAD_TOKENS = 3  # token-list interpretations that name the same first 3 tokens make two latents twins
SPLIT_KEYS = (*FRACTION_KEYS, "split_group_rows")  # CacheArguments keys that only change the row split


def split_groups(
    groups: np.ndarray, fractions: dict[str, float], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """{split: sorted indices into `groups`} for train and every split of EVAL_SPLITS; `fractions` gives each
    eval split's share of the members (absent or 0: that split stays empty). Members with the same group id go
    to one split."""
    ids, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    targets = {s: max(1, round(len(groups) * fractions[s])) for s in EVAL_SPLITS if fractions.get(s, 0) > 0}
    filled = dict.fromkeys(targets, 0)
    split_of_group = np.zeros(len(ids), dtype=np.int64)  # 0: train; i + 1: EVAL_SPLITS[i]
    for g in rng.permutation(len(ids)).tolist():
        for split, target in targets.items():
            if filled[split] + sizes[g] <= target:
                filled[split] += int(sizes[g])
                split_of_group[g] = EVAL_SPLITS.index(split) + 1
                break
    split_of = split_of_group[inverse]
    out = {"train": np.flatnonzero(split_of == 0)}
    out.update({s: np.flatnonzero(split_of == i + 1) for i, s in enumerate(EVAL_SPLITS)})
    return out


def empty_splits(parts: dict[str, np.ndarray], fractions: dict[str, float]) -> list[str]:
    """The splits that should hold members (train, and every eval split with a share) but hold none."""
    return [
        s for s in ("train", *EVAL_SPLITS) if not len(parts[s]) and (s == "train" or fractions.get(s, 0) > 0)
    ]


def row_groups(documents: np.ndarray, group_rows: int) -> np.ndarray:
    """Per row, its group id, or -1 for a separator row. Consecutive rows share a document unless a row ends
    exactly at a document's end, so left alone a chain of rows sharing documents runs on for dozens of rows.
    Once a group holds `group_rows` rows, the next row that shares a document with both neighbours yet holds
    a document's end (so that the rows before and after it share none) becomes a separator, and the row after
    it starts a new group."""
    documents = np.asarray(documents, dtype=np.int64)
    group = np.zeros(len(documents), dtype=np.int64)
    current, size = -1, 0
    for i in range(len(documents)):
        if i == 0 or documents[i, 0] != documents[i - 1, 1]:  # shares no document with the row before
            current, size = current + 1, 0
        elif (
            size >= group_rows
            and i + 1 < len(documents)
            and documents[i, 1] == documents[i + 1, 0]
            and documents[i - 1, 1] < documents[i + 1, 0]
        ):
            group[i] = -1
            current, size = current + 1, 0
            continue
        group[i] = current
        size += 1
    return group


def documents_in(documents: np.ndarray, rows: np.ndarray) -> int:
    """How many distinct documents the sorted `rows` hold (each row holds documents first..last; a document
    shared by two rows of `rows` next to each other in it is counted once)."""
    first, last = documents[rows, 0], documents[rows, 1]
    return int((last - first + 1).sum() - (first[1:] == last[:-1]).sum())


def cache_fractions(args) -> dict[str, float]:
    """{split: share} of a config holding FRACTION_KEYS."""
    return {key.removesuffix("_fraction"): float(getattr(args, key)) for key in FRACTION_KEYS}


def split_rows(
    documents: np.ndarray | None, n_rows: int, fractions: dict[str, float], seed: int, group_rows: int
) -> dict:
    """The row split of a cache whose rows hold `documents` ([n_rows, 2]: first and last document of each row;
    None: not recorded, every row its own group), as row_split.json records it: the seed, shares and group
    size, how rows were grouped, per split its rows, groups and documents, the separator rows left out, and
    the row ids. A separator row (row_groups) joins the split of the groups on both sides of it when they are
    in the same split; otherwise it holds text of two splits' documents and is left out of every split."""
    groups = np.arange(n_rows) if documents is None else row_groups(documents, group_rows)
    members = np.flatnonzero(groups >= 0)
    parts = split_groups(groups[members], fractions, np.random.default_rng([seed, 1]))
    if empty := empty_splits(parts, fractions):
        raise ConfigError(
            f"config keys `validation_fraction`/`test_fraction`/`confirmation_fraction` (cache): the cache's "
            f"{n_rows} rows form {len(np.unique(groups[members]))} groups (rows sharing a document, cut "
            f"after `split_group_rows` {group_rows}), which leave the {', '.join(empty)} split(s) empty; "
            "cache more rows (`n_rows`), lower `split_group_rows` or change the fractions."
        )
    split_of = np.full(n_rows, -1, dtype=np.int64)
    names = list(parts)
    for k, split in enumerate(names):
        split_of[members[parts[split]]] = k
    left_out = 0
    for i in np.flatnonzero(groups < 0).tolist():  # never the first or last row: its neighbours are grouped
        if split_of[i - 1] == split_of[i + 1]:
            split_of[i] = split_of[i - 1]
        else:
            left_out += 1
    row_ids = {split: np.flatnonzero(split_of == k) for k, split in enumerate(names)}
    summary = {
        split: {
            "rows": len(rows),
            "groups": len(np.unique(groups[rows][groups[rows] >= 0])),
            "documents": None if documents is None else documents_in(documents, rows),
        }
        for split, rows in row_ids.items()
    }
    return {
        "seed": seed,
        **{f"{s}_fraction": fractions.get(s, 0.0) for s in ("validation", "test", "confirmation")},
        "split_group_rows": group_rows,
        "grouping": "rows" if documents is None else "documents",
        "n_rows": n_rows,
        "splits": summary,
        "separator_rows_left_out": left_out,
        "row_ids": {split: rows.tolist() for split, rows in row_ids.items()},
    }


def describe_row_split(record: dict) -> str:
    """A row_split.json record in a phrase (the cache's log line, the dataset card)."""
    if record["grouping"] == "rows":
        return (
            "row by row (the cache records no documents, as delphi's: a document's rows may be in two splits)"
        )
    parts = ", ".join(
        f"{s} {v['rows']} rows ({v['documents']} documents)" for s, v in record["splits"].items() if v["rows"]
    )
    return f"by whole documents: {parts}; {record['separator_rows_left_out']} separator rows left out"


def is_row_split(record: dict | None, fractions: dict[str, float], seed: int, group_rows: int) -> bool:
    """Whether a row_split.json record was made with this seed, these shares and this group size."""
    wanted = {"seed": seed, "split_group_rows": group_rows}
    wanted.update({f"{s}_fraction": fractions.get(s, 0.0) for s in ("validation", "test", "confirmation")})
    return record is not None and all(record.get(k) == v for k, v in wanted.items())


def ensure_row_split(reader, fractions: dict[str, float], seed: int, group_rows: int) -> bool:
    """Write the row split of the finished cache `reader` (a CacheReader) unless it already records this one
    (same seed, shares and group size); returns whether it was (re)written. A latentsim cache without
    document records predates them and is refused; a delphi cache is split row by row."""
    if is_row_split(reader.row_split_record(required=False), fractions, seed, group_rows):
        return False
    if reader.documents is None and "latentsim" in reader.config:
        raise BadInputError(
            f"{reader.folder} was written by an older data_gen/cache_activations.py that did not record each "
            "row's documents, so its rows cannot be split by document; rerun it with `overwrite: true`."
        )
    record = split_rows(reader.documents, reader.n_rows, fractions, seed, group_rows)
    atomic_write_json(Path(reader.folder) / ROW_SPLIT_FILE, record)
    return True


# ------------------------------------------------------------------------------------------ latent twins
def token_head(text: str) -> tuple[str, ...] | None:
    """The first TWIN_HEAD_TOKENS tokens a token-list interpretation names (its strongest; all of them when it
    names fewer), in order; None for free text. One shared first token is not enough: hundreds of latents fire
    most on `,` or ` the` in different settings, and joining them would send them all to train."""
    parsed = parse_token_list(text)
    return tuple(parsed.tokens[:TWIN_HEAD_TOKENS]) if parsed is not None and parsed.tokens else None


def decoder_twin_pairs(w_dec, latents: np.ndarray, threshold: float = TWIN_COSINE, chunk: int = 1024):
    """[m, 2] index pairs (i < j, into `latents`) whose decoder rows (`w_dec`, a torch tensor [W, d]) have
    cosine >= `threshold`; computed `chunk` rows at a time (a 131k-latent SAE has no room for the whole
    similarity matrix)."""
    import torch

    d = torch.nn.functional.normalize(w_dec[torch.as_tensor(latents)].float(), dim=1)
    pairs = []
    for a in range(0, len(latents), chunk):
        i, j = torch.nonzero(d[a : a + chunk] @ d.T >= threshold, as_tuple=True)
        keep = j > i + a
        pairs.append(torch.stack([i[keep] + a, j[keep]], dim=1))
    return torch.cat(pairs).numpy() if pairs else np.zeros((0, 2), dtype=np.int64)


def head_pair_count(groups: list[np.ndarray], n: int, distinct: bool) -> int:
    """How many latent pairs share a head: the sum over groups of their pairs, or (`distinct`: the groups of
    several interpretation sets may repeat a pair) the distinct pairs, which are listed to be counted."""
    if not distinct:
        return int(sum(len(m) * (len(m) - 1) // 2 for m in groups))
    keys = [m[a] * n + m[b] for m in groups for a, b in [np.triu_indices(len(m), k=1)]]
    return len(np.unique(np.concatenate(keys))) if keys else 0


def latent_twins(
    explained: np.ndarray, interpretations: list[dict[int, str]], w_dec=None
) -> tuple[np.ndarray, dict]:
    """(per latent of `explained`, its twin group id; the record dataset_stats.json keeps). Twins: decoder
    cosine >= TWIN_COSINE (`w_dec` None: the cache records no SAE, not checked) or the same token-list head
    (`token_head`) in one of the interpretation sets; groups are the connected components of either
    relation."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(explained)
    decoder = decoder_twin_pairs(w_dec, explained) if w_dec is not None and n else np.zeros((0, 2), np.int64)
    edges, head_groups = [decoder], []
    for texts in interpretations:
        heads: dict[tuple[str, ...], list[int]] = {}
        for i, latent in enumerate(explained.tolist()):
            head = token_head(texts[latent]) if latent in texts else None
            if head is not None:
                heads.setdefault(head, []).append(i)
        head_groups += [np.asarray(m) for m in heads.values() if len(m) > 1]
    # A star per head group joins it (its pairs are only counted).
    edges += [np.stack([np.full(len(m) - 1, m[0]), m[1:]], axis=1) for m in head_groups]
    edges = np.concatenate(edges)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    sizes = np.bincount(group, minlength=1)
    return group.astype(np.int64), {
        "decoder_cosine": TWIN_COSINE,
        "decoder_pairs": None if w_dec is None else len(decoder),
        "token_head_pairs": head_pair_count(head_groups, n, distinct=len(interpretations) > 1),
        "groups": int((sizes > 1).sum()),
        "latents_in_groups": int(sizes[sizes > 1].sum()),
        "largest_group": int(sizes.max()) if n else 0,
    }
