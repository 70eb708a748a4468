"""Sparse SAE-latent cache: resumable row shards, finalised into delphi's layout.

Layout of a cache folder:

    shards/<hookpoint>/rows_<a>_<b>.safetensors (+ .json marker)   work in progress, deleted when finalised
    latents/<hookpoint>/<start>_<end>.safetensors + config.json    delphi's layout, the cache proper
    latents/<hookpoint>/row_split.json                              the row split (latentsim.splits)
    stats/<hookpoint>.safetensors + .json                           per-latent statistics (training rows)

Each split file holds `locations` [N, 3] = (row, position, latent - start) as uint16 (uint32 when a row or a
relative latent index reaches 2^16), `activations` [N] float16 and the full `tokens` [rows, ctx_len]; `end`
is inclusive and the splits are `linspace(0, d_sae, n_splits + 1)`, exactly as delphi writes them, so delphi
reads our caches and we read its. Differences, all compatible: position 0 (BOS) is never cached; `tokens`
are int32; each file also holds `documents` [rows, 2] int64, the first and last corpus document of every row
(latentsim.corpus.CorpusRows; delphi ignores it); `config.json` carries delphi's CacheConfig fields plus a
`latentsim` block (hookpoint, SAE, corpus rows, documents and duplicates removed, per-file sha256). A shard
becomes complete only when its marker (with the shard's sha256) is written after it, so a killed run loses at
most the shard in flight and a rerun redoes exactly the missing shards.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from latentsim.errors import BadInputError
from latentsim.io import atomic_save, atomic_write_json, sha256_file

SHARD_PREFIX = "rows_"


class CorruptCacheError(BadInputError, RuntimeError):
    """A cache file is damaged, incomplete or missing; the message says which and how to regenerate it."""


# ----------------------------------------------------------------------------------------- file helpers
def split_bounds(width: int, n_splits: int) -> list[tuple[int, int]]:
    """delphi's latent-range splits: inclusive (start, end) pairs."""
    edges = torch.linspace(0, width, steps=n_splits + 1).long().tolist()
    return [(a, b - 1) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + shard_rows, n_rows)) for a in range(0, n_rows, shard_rows)]


def shard_path(shard_dir: Path, a: int, b: int) -> Path:
    return shard_dir / f"{SHARD_PREFIX}{a:07d}_{b:07d}.safetensors"


def _marker(path: Path) -> Path:
    return path.with_suffix(".json")


def check_sha256(path: Path, expected_sha256: str) -> None:
    """Raise CorruptCacheError (with the fix) when `path` is missing or its sha256 is not the recorded one."""
    if not path.is_file() or sha256_file(path) != expected_sha256:
        raise CorruptCacheError(
            f"{path} is corrupt (sha256 differs from the one recorded when it was written). "
            "Delete it and rerun the stage to regenerate it."
        )


def load_verified(path: Path, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """Load a safetensors file, checking its sha256 when known; raise CorruptCacheError with the fix."""
    if expected_sha256 is not None:
        check_sha256(path, expected_sha256)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptCacheError(
            f"{path} cannot be read as safetensors ({err}). Delete it and rerun the stage."
        ) from err


def write_shard(
    shard_dir: Path,
    a: int,
    b: int,
    locations: np.ndarray,
    activations: np.ndarray,
    tokens: np.ndarray,
    documents: np.ndarray,
    duplicates_removed: int,
    stream_state: dict | None = None,
) -> Path:
    """Write one row shard (with its rows' documents, latentsim.corpus.CorpusRows), then its completion marker
    (the marker is what makes it count as done; it records the duplicate documents removed up to the shard's
    last row). A streamed corpus's position after the shard's last row (latentsim.corpus.StreamedRows.state)
    goes into the marker."""
    path = shard_path(shard_dir, a, b)
    arrays = {
        "locations": locations.astype(np.int32),
        "activations": activations.astype(np.float16),
        "tokens": tokens.astype(np.int32),
        "documents": documents.astype(np.int64),
    }
    atomic_save(path, lambda tmp: save_file(arrays, str(tmp)))
    marker = {
        "rows": [a, b],
        "n_nonzero": int(len(activations)),
        "duplicates_removed": int(duplicates_removed),
        "sha256": sha256_file(path),
    }
    atomic_write_json(_marker(path), marker | ({"stream_state": stream_state} if stream_state else {}))
    return path


def stream_states(shard_dir: Path, ranges: list[tuple[int, int]]) -> dict[int, dict]:
    """{corpus row: stream state} saved by the finished shards of `ranges` (any rank's) that recorded one."""
    states = {}
    for a, b in ranges:
        marker = _marker(shard_path(shard_dir, a, b))
        try:
            state = json.loads(marker.read_text()).get("stream_state") if marker.is_file() else None
        except json.JSONDecodeError:
            state = None
        if state:
            states[state["row"]] = state
    return states


def completed_shards(shard_dir: Path, ranges: list[tuple[int, int]]) -> set[tuple[int, int]]:
    """Shards whose marker exists and whose file still matches it; anything else will be (re)written."""
    done = set()
    for a, b in ranges:
        path = shard_path(shard_dir, a, b)
        marker = _marker(path)
        if not (path.is_file() and marker.is_file()):
            continue
        try:
            expected = json.loads(marker.read_text())["sha256"]
        except (json.JSONDecodeError, KeyError):
            continue
        if sha256_file(path) == expected:
            done.add((a, b))
        else:
            print(f"[latentsim] {path.name} does not match its marker; it will be regenerated.", flush=True)
    return done


def verified_shard_paths(shard_dir: Path, ranges: list[tuple[int, int]]) -> list[Path]:
    """The row shards of `ranges`, each checked against its completion marker's sha256."""
    paths = []
    for a, b in ranges:
        path = shard_path(shard_dir, a, b)
        marker = _marker(path)
        if not marker.is_file():
            raise CorruptCacheError(f"{path} has no completion marker; rerun the stage to finish it.")
        check_sha256(path, json.loads(marker.read_text())["sha256"])
        paths.append(path)
    return paths


# -------------------------------------------------------------------------------------- delphi layout
def finalise_shards(
    shard_dir: Path,
    ranges: list[tuple[int, int]],
    latents_dir: Path,
    hookpoint: str,
    width: int,
    n_splits: int,
    config: dict,
) -> Path:
    """Write `latents/<hookpoint>/<start>_<end>.safetensors` + `config.json` (written last: it marks
    completion) from complete row shards, one latent split at a time: each split file gathers its latents from
    every shard in row order, so peak memory is one split file plus one shard, never the whole cache (the
    shards are read once per split). Each file holds the tokens of every row, as delphi's do, and their
    documents; `config.json` records the documents the rows hold and the duplicates removed before them."""
    paths = verified_shard_paths(shard_dir, ranges)
    out = latents_dir / hookpoint
    out.mkdir(parents=True, exist_ok=True)
    files, tokens, documents = {}, None, None
    for start, end in split_bounds(width, n_splits):
        locs, acts, toks, docs = [], [], [], []
        for path in paths:
            data = load_verified(path)
            mask = (data["locations"][:, 2] >= start) & (data["locations"][:, 2] <= end)
            locs.append(data["locations"][mask])
            acts.append(data["activations"][mask])
            if tokens is None:  # gathered on the first split's pass
                toks.append(data["tokens"])
                docs.append(data["documents"])
        if tokens is None:
            tokens = np.concatenate(toks).astype(np.int32)
            documents = np.concatenate(docs).astype(np.int64)
        loc = np.concatenate(locs)
        loc[:, 2] -= start
        small = len(loc) == 0 or (
            loc[:, 2].max() < 2**16 and loc[:, 0].max() < 2**16 and loc[:, 1].max() < 2**16
        )
        arrays = {
            "locations": loc.astype(np.uint16 if small else np.uint32),
            "activations": np.concatenate(acts).astype(np.float16),
            "tokens": tokens,
            "documents": documents,
        }
        del locs, acts, toks, docs, loc
        name = f"{start}_{end}.safetensors"
        atomic_save(out / name, lambda tmp, arrays=arrays: save_file(arrays, str(tmp)))
        files[name] = sha256_file(out / name)
    last_marker = json.loads(_marker(paths[-1]).read_text())
    corpus_documents = {
        "documents": int(documents[-1, 1] - documents[0, 0] + 1) if len(documents) else 0,
        "duplicates_removed": last_marker["duplicates_removed"],
        "duplicate": "the same text once whitespace runs are collapsed and case folded (latentsim.corpus)",
    }
    config = {
        **config,
        "latentsim": {**config.get("latentsim", {}), "documents": corpus_documents, "files": files},
    }
    atomic_write_json(out / "config.json", config)
    return out


def subject_tokenizer_of(config: dict):
    """The subject model's tokenizer: the model recorded in a cache config's `latentsim` block, else delphi's
    `model_name`."""
    from latentsim.models import load_tokenizer

    ref = config.get("latentsim", {}).get("model", {}).get("model", config.get("model_name"))
    if not ref:
        raise BadInputError(
            "the cache's config.json names no model (`model_name`); cannot decode its tokens."
        )
    return load_tokenizer(ref)


@dataclass
class SparseCache:
    """A loaded cache: latent ids are global (split start added back), activations float32."""

    tokens: torch.Tensor  # [rows, ctx_len] int64
    locations: torch.Tensor  # [N, 3] int64: row, position, latent
    activations: torch.Tensor  # [N] float32
    config: dict
    width: int  # d_sae: the last split file's end + 1

    def subject_tokenizer(self):
        return subject_tokenizer_of(self.config)

    def token_major(self) -> SparseCache:
        """Sorted by (row, position, latent): a context's active latents are contiguous."""
        key = (
            self.locations[:, 0] * self.tokens.shape[1] + self.locations[:, 1]
        ) * self.width + self.locations[:, 2]
        order = torch.argsort(key)
        return SparseCache(
            self.tokens, self.locations[order], self.activations[order], self.config, self.width
        )


def cache_is_complete(latents_dir: Path, hookpoint: str) -> bool:
    return (Path(latents_dir) / hookpoint / "config.json").is_file()


def delphi_config(model_args, corpus_args, sae_args, args, d_sae: int) -> dict:
    """The cache's config.json: delphi's CacheConfig fields + model_name, and our own block."""
    from latentsim.models import EMBEDDED_MODELS, describe_model_source, embedded_name
    from latentsim.sae import ACTIVE_THRESHOLD

    name = embedded_name(model_args.model_name_or_path)
    return {
        "dataset_repo": corpus_args.corpus,
        "dataset_split": corpus_args.corpus_split,
        "dataset_name": corpus_args.corpus_config_name or "",
        "dataset_column": corpus_args.corpus_text_column,
        "batch_size": args.batch_size,
        "cache_ctx_len": corpus_args.ctx_len,
        "n_tokens": corpus_args.n_rows * corpus_args.ctx_len,
        "n_splits": args.n_splits,
        # delphi loads the tokenizer from model_name: give it a Hub id it can resolve.
        "model_name": EMBEDDED_MODELS[name].hub_equivalent if name else model_args.model_name_or_path,
        "latentsim": {
            "hookpoint": sae_args.hookpoint,
            "d_sae": d_sae,
            "model": describe_model_source(model_args.model_name_or_path),
            "sae": {
                "sae_path": sae_args.sae_path,
                "sae_release": sae_args.sae_release,
                "sae_id": sae_args.sae_id,
            },
            "row_start": corpus_args.row_start,
            "n_rows": corpus_args.n_rows,
            "seed": corpus_args.seed,
            "corpus_streaming": corpus_args.corpus_streaming,
            "position_0_excluded": True,
            "active_threshold": ACTIVE_THRESHOLD,
            "row_index": "rows are indices into `tokens`; corpus row = row_start + row",
        },
    }


def remove_shards(shard_dir: Path) -> None:
    shutil.rmtree(shard_dir, ignore_errors=True)
    if shard_dir.parent.is_dir() and not any(shard_dir.parent.iterdir()):
        shard_dir.parent.rmdir()


# ------------------------------------------------------------------------------------------- recording
@torch.no_grad()
def record_rows(
    model, sae, rows: torch.Tensor, layer: int, batch_size: int, progress=None, naive: bool = False
):
    """Sparse latents of `rows` [n, ctx_len] at the residual after `layer`, position 0 excluded.

    Stops the forward at the hook and keeps TopK latents sparse. `naive=True` is delphi's way, kept as the
    benchmark baseline: full forward with logits, dense latents, then nonzero. Returns numpy (locations [N,3]
    int64 with row indices relative to `rows`, activations float32 [N]). `progress` (tqdm) advances per token.
    """
    from latentsim import sae as sae_mod

    encode = sae_mod.encode_dense_nonzero if naive else sae_mod.encode_sparse
    device = next(model.parameters()).device
    locs, acts = [], []
    for i in range(0, rows.shape[0], batch_size):
        ids = rows[i : i + batch_size].to(device)
        h = sae_mod.residual_at(model, ids, layer, stop=not naive)[
            :, 1:, :
        ]  # drop BOS: its norm ruins SAE stats
        b, t, d = h.shape
        tok, lat, val = encode(sae, h.reshape(b * t, d).to(sae.dtype))
        locs.append(torch.stack([tok // t + i, tok % t + 1, lat], dim=1).cpu())
        acts.append(val.float().cpu())
        if progress is not None:
            progress.update(b * (t + 1))
    return torch.cat(locs).numpy(), torch.cat(acts).numpy()
