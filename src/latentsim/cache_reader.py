"""Bounded-memory reading of a finished delphi-layout cache: one split file, in chunks, at a time.

A seed-sized cache (10M tokens x 131k latents, L0 50) holds ~500M non-zeros: ~4 GB on disk in delphi's uint16
layout, ~14 GB as int64 locations + float32 activations in memory. `CacheReader` never builds that array. It
parses each split file's safetensors header once and reads `locations` / `activations` in chunks of
`chunk_entries` straight from the file (no memory map: mapped pages would count as resident), keeping only the
entries a stage asks for: some rows (`rows`), a latent split (`split`), or both. Each stage reads what it
needs:

- statistics and explanation sampling: one latent split at a time (a latent lives in exactly one split file);
- dataset and eval-set building: a chunk of cache rows at a time (`select(rows=...)`, token-major);
- patching and the whole layer: the tokens only (`tokens`, int32, loaded once: 40 MB for 10M tokens).

`row_split()` is the cache's row split (latentsim.splits), which every stage reads and none recomputes.

Peak memory then grows with the largest latent split or row chunk, not with the cache. `load_cache`
(latentsim.cache) is `CacheReader(...).select()`: the whole cache, for small caches and tests.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentsim.cache import CorruptCacheError, SparseCache, check_sha256, subject_tokenizer_of
from latentsim.errors import MissingInputError
from latentsim.splits import ROW_SPLIT_FILE

CHUNK_ENTRIES = (
    1 << 23
)  # 8M non-zeros per read: ~64 MB of uint16 locations + activations, ~200 MB filtered as int64
SAFETENSORS_DTYPES = {
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "I32": np.int32,
    "I64": np.int64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}


@dataclass
class TensorSpan:
    """Where one tensor's bytes lie in a safetensors file."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file

    def read(self, path: Path, first: int = 0, count: int | None = None) -> np.ndarray:
        """Rows [first, first + count) of the tensor (all rows by default), read from disk."""
        row_items = int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1
        count = self.shape[0] - first if count is None else min(count, self.shape[0] - first)
        with open(path, "rb") as f:
            f.seek(self.offset + first * row_items * self.dtype.itemsize)
            flat = np.fromfile(f, dtype=self.dtype, count=count * row_items)
        if len(flat) != count * row_items:
            raise CorruptCacheError(
                f"{path} is truncated (tensor ends before its header says); delete it and rerun."
            )
        return flat.reshape((count, *self.shape[1:]))


def safetensors_spans(path: Path) -> dict[str, TensorSpan]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) without reading the data."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as err:
        raise CorruptCacheError(
            f"{path} cannot be read as safetensors ({err}). Delete it and rerun the stage."
        ) from err
    spans = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise CorruptCacheError(
                f"{path}: tensor `{name}` has dtype {info['dtype']}, which a cache never uses."
            )
        spans[name] = TensorSpan(
            np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<"),
            tuple(info["shape"]),
            8 + length + info["data_offsets"][0],
        )
    return spans


@dataclass
class SplitFile:
    """One `<start>_<end>.safetensors` of the cache: latents start..end (inclusive)."""

    path: Path
    start: int
    end: int
    spans: dict[str, TensorSpan]

    @property
    def n_entries(self) -> int:
        return self.spans["activations"].shape[0]


class CacheReader:
    """A finished cache folder (`latents/<hookpoint>`, ours or delphi's), checked on open, read in chunks."""

    def __init__(self, latents_dir: str | Path, hookpoint: str, chunk_entries: int = CHUNK_ENTRIES):
        self.folder = Path(latents_dir) / hookpoint
        self.chunk_entries = chunk_entries
        config_path = self.folder / "config.json"
        if not config_path.is_file():
            raise MissingInputError(
                f"{self.folder} holds no finished cache (no config.json); run data_gen/cache_activations.py."
            )
        self.config = json.loads(config_path.read_text())
        self.splits = self._open_splits(self.config.get("latentsim", {}).get("files", {}))
        self.width = self.splits[-1].end + 1  # d_sae: the last split file's end + 1
        with_tokens = [s for s in self.splits if "tokens" in s.spans]
        if not with_tokens:
            raise CorruptCacheError(
                f"{self.folder}: no split file stores `tokens`; the cache cannot be used."
            )
        self.tokens = with_tokens[0].spans["tokens"].read(with_tokens[0].path).astype(np.int32)
        self.n_rows, self.ctx_len = self.tokens.shape
        # [rows, 2] first and last corpus document of each row; None for a cache that does not record them.
        self.documents = (
            with_tokens[0].spans["documents"].read(with_tokens[0].path).astype(np.int64)
            if "documents" in with_tokens[0].spans
            else None
        )

    def _open_splits(self, recorded: dict[str, str]) -> list[SplitFile]:
        files = sorted(self.folder.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0]))
        if not files:
            raise MissingInputError(
                f"{self.folder} has a config.json but no <start>_<end>.safetensors files."
            )
        missing = sorted(set(recorded) - {p.name for p in files})
        if missing:
            raise CorruptCacheError(
                f"{self.folder} is missing split files {missing}; rerun with `overwrite: true`."
            )
        splits, expected = [], 0
        for path in files:
            start, end = (int(x) for x in path.stem.split("_")[:2])
            # The files' latent ranges must tile [0, W): a missing one (a delphi cache records no file list)
            # would otherwise read as latents that never fire.
            if start != expected:
                raise CorruptCacheError(
                    f"{self.folder}: the split files do not tile the latents: {path.name} starts "
                    f"at latent {start}, latents {expected}-{start - 1} have no file; restore it or "
                    "rerun data_gen/cache_activations.py with `overwrite: true`."
                )
            expected = end + 1
            if path.name in recorded:
                check_sha256(path, recorded[path.name])
            spans = safetensors_spans(path)
            if not {"locations", "activations"} <= set(spans):
                raise CorruptCacheError(
                    f"{path} lacks `locations` or `activations`; it is not a cache split file."
                )
            splits.append(SplitFile(path, start, end, spans))
        return splits

    @property
    def n_nonzero(self) -> int:
        return sum(s.n_entries for s in self.splits)

    def split_of(self, latent: int) -> int:
        return next(i for i, s in enumerate(self.splits) if s.start <= latent <= s.end)

    def chunks(self, split: int):
        """(locations [m, 3] as stored, activations float16) of one split file, `chunk_entries` at a time."""
        sf = self.splits[split]
        for first in range(0, sf.n_entries, self.chunk_entries):
            yield (
                sf.spans["locations"].read(sf.path, first, self.chunk_entries),
                sf.spans["activations"].read(sf.path, first, self.chunk_entries),
            )

    def row_mask(self, rows: np.ndarray | None) -> np.ndarray | None:
        """A boolean [n_rows] mask of `rows` (None: every row, no mask)."""
        if rows is None:
            return None
        keep = np.zeros(self.n_rows, dtype=bool)
        keep[np.asarray(rows, dtype=np.int64)] = True
        return keep

    def entry_chunks(self, split: int, rows: np.ndarray | None = None):
        """The non-zeros of one split file (those of `rows` only, when given), `chunk_entries` at a time and
        in file order: locations int64 [m, 3] with global latent ids, activations float32."""
        keep_row = self.row_mask(rows)
        start = self.splits[split].start
        for loc, act in self.chunks(split):
            if keep_row is not None:
                mask = keep_row[loc[:, 0]]
                loc, act = loc[mask], act[mask]
            loc = loc.astype(np.int64)
            loc[:, 2] += start
            yield loc, act.astype(np.float32)

    def entries(self, split: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """entry_chunks of one split file, concatenated."""
        parts = list(self.entry_chunks(split, rows))
        if not parts:
            return np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def select(self, rows: np.ndarray | None = None, splits: list[int] | None = None) -> SparseCache:
        """A SparseCache of the given rows and latent splits (all by default). Row ids stay global."""
        parts = [self.entries(i, rows) for i in (range(len(self.splits)) if splits is None else splits)]
        locations = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 3), dtype=np.int64)
        activations = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, dtype=np.float32)
        return SparseCache(
            torch.from_numpy(self.tokens.astype(np.int64)),
            torch.from_numpy(locations),
            torch.from_numpy(activations),
            self.config,
            self.width,
        )

    def rows_per_chunk(self, max_entries: int) -> int:
        """How many rows hold ~`max_entries` non-zeros, from the cache's mean per row (at least one)."""
        return max(1, int(max_entries // max(1.0, self.n_nonzero / max(self.n_rows, 1))))

    def latent_values(self, split: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(latent ids relative to the split's start, int32; activations float32) of one split file (those of
        `rows` only, when given), position 0 left out (even when a delphi cache has it): what the statistics
        need, at 8 bytes a non-zero."""
        keep_row = self.row_mask(rows)
        lats, vals = [], []
        for loc, act in self.chunks(split):
            keep = loc[:, 1] > 0
            if keep_row is not None:
                keep &= keep_row[loc[:, 0]]
            lats.append(loc[keep, 2].astype(np.int32))
            vals.append(act[keep].astype(np.float32))
        if not lats:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
        return np.concatenate(lats), np.concatenate(vals)

    def subject_tokenizer(self):
        return subject_tokenizer_of(self.config)

    def row_split_record(self, required: bool = True) -> dict | None:
        """The cache's row_split.json (latentsim.splits.split_rows); missing: MissingInputError with the fix
        (`required`) or None."""
        path = self.folder / ROW_SPLIT_FILE
        if not path.is_file():
            if not required:
                return None
            raise MissingInputError(
                f"{self.folder} records no row split ({ROW_SPLIT_FILE}): it is a delphi cache or one made "
                "by an older data_gen/cache_activations.py. Run data_gen/cache_activations.py on it (same "
                "config and output_dir: it records the split of a finished cache without recomputing it; "
                "an older latentsim cache needs `overwrite: true`)."
            )
        record = json.loads(path.read_text())
        if record["n_rows"] != self.n_rows:
            raise CorruptCacheError(
                f"{path} splits {record['n_rows']} rows, the cache has {self.n_rows}; delete it and rerun "
                "data_gen/cache_activations.py to record the split again."
            )
        return record

    def row_split(self) -> dict[str, np.ndarray]:
        """{split: its sorted row ids} for train, validation, test and confirmation (empty when the cache
        keeps no confirmation rows)."""
        return {s: np.asarray(r, dtype=np.int64) for s, r in self.row_split_record()["row_ids"].items()}


def load_cache(latents_dir: str | Path, hookpoint: str) -> SparseCache:
    """Read a whole delphi-layout cache (ours or delphi's) into memory, verifying the sha256 of every file we
    recorded. For small caches (tests); stages that must scale read through CacheReader."""
    return CacheReader(latents_dir, hookpoint).select()
