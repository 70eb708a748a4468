"""Sparse SAE-latent cache: resumable row shards, finalised into delphi's layout.

Layout of a cache folder:

    shards/<hookpoint>/rows_<a>_<b>.safetensors (+ .json marker)   work in progress, deleted when finalised
    latents/<hookpoint>/<start>_<end>.safetensors + config.json    delphi's layout, the cache proper
    stats/<hookpoint>.safetensors + .json                           per-latent statistics

Each split file holds `locations` [N, 3] = (row, position, latent - start) as uint16 (uint32 when a row or a
relative latent index reaches 2^16), `activations` [N] float16 and the full `tokens` [rows, ctx_len]; `end`
is inclusive and the splits are `linspace(0, d_sae, n_splits + 1)`, exactly as delphi writes them, so delphi
reads our caches and we read its. Differences, all compatible: position 0 (BOS) is never cached; `tokens`
are int32; `config.json` carries delphi's CacheConfig fields plus a `latentsim` block (hookpoint, SAE, corpus
rows, per-file sha256). A shard becomes complete only when its marker (with the shard's sha256) is written
after it, so a killed run loses at most the shard in flight and a rerun redoes exactly the missing shards.
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

from latentsim.errors import BadInputError, MissingInputError
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


def load_verified(path: Path, expected_sha256: str | None = None) -> dict[str, np.ndarray]:
    """Load a safetensors file, checking its sha256 when known; raise CorruptCacheError with the fix."""
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CorruptCacheError(f"{path} is corrupt (sha256 differs from the one recorded when it was written). "
                                "Delete it and rerun the stage to regenerate it.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptCacheError(f"{path} cannot be read as safetensors ({err}). Delete it and rerun the stage.") from err


def write_shard(shard_dir: Path, a: int, b: int, locations: np.ndarray, activations: np.ndarray,
                tokens: np.ndarray) -> Path:
    """Write one row shard, then its completion marker (the marker is what makes it count as done)."""
    path = shard_path(shard_dir, a, b)
    arrays = {"locations": locations.astype(np.int32), "activations": activations.astype(np.float16),
              "tokens": tokens.astype(np.int32)}
    atomic_save(path, lambda tmp: save_file(arrays, str(tmp)))
    atomic_write_json(_marker(path), {"rows": [a, b], "n_nonzero": int(len(activations)), "sha256": sha256_file(path)})
    return path


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


def read_shards(shard_dir: Path, ranges: list[tuple[int, int]]):
    """Concatenate complete row shards: (locations int32 [N,3] with global latents, activations f16, tokens)."""
    locs, acts, toks = [], [], []
    for a, b in ranges:
        path = shard_path(shard_dir, a, b)
        marker = _marker(path)
        if not marker.is_file():
            raise CorruptCacheError(f"{path} has no completion marker; rerun the stage to finish it.")
        data = load_verified(path, json.loads(marker.read_text())["sha256"])
        locs.append(data["locations"])  # int32: half the memory of int64 for a 10M-token cache
        acts.append(data["activations"])
        toks.append(data["tokens"])
    return np.concatenate(locs), np.concatenate(acts), np.concatenate(toks)


# -------------------------------------------------------------------------------------- delphi layout
def write_delphi_splits(latents_dir: Path, hookpoint: str, locations: np.ndarray, activations: np.ndarray,
                        tokens: np.ndarray, width: int, n_splits: int, config: dict) -> Path:
    """Write `latents/<hookpoint>/<start>_<end>.safetensors` + `config.json` (written last: it marks completion)."""
    out = latents_dir / hookpoint
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for start, end in split_bounds(width, n_splits):
        mask = (locations[:, 2] >= start) & (locations[:, 2] <= end)
        loc = locations[mask].copy()
        loc[:, 2] -= start
        small = len(loc) == 0 or (loc[:, 2].max() < 2**16 and loc[:, 0].max() < 2**16 and loc[:, 1].max() < 2**16)
        arrays = {"locations": loc.astype(np.uint16 if small else np.uint32),
                  "activations": activations[mask].astype(np.float16), "tokens": tokens.astype(np.int32)}
        name = f"{start}_{end}.safetensors"
        atomic_save(out / name, lambda tmp, arrays=arrays: save_file(arrays, str(tmp)))
        files[name] = sha256_file(out / name)
    config = {**config, "latentsim": {**config.get("latentsim", {}), "files": files}}
    atomic_write_json(out / "config.json", config)
    return out


@dataclass
class SparseCache:
    """A loaded cache: latent ids are global (split start added back), activations float32."""

    tokens: torch.Tensor       # [rows, ctx_len] int64
    locations: torch.Tensor    # [N, 3] int64: row, position, latent
    activations: torch.Tensor  # [N] float32
    config: dict
    width: int                 # d_sae: the last split file's end + 1

    def subject_tokenizer(self):
        """The subject model's tokenizer: the model recorded in our config block, else delphi's `model_name`."""
        from latentsim.models import load_tokenizer

        ref = self.config.get("latentsim", {}).get("model", {}).get("model", self.config.get("model_name"))
        if not ref:
            raise BadInputError("the cache's config.json names no model (`model_name`); cannot decode its tokens.")
        return load_tokenizer(ref)

    def token_major(self) -> SparseCache:
        """Sorted by (row, position, latent): a context's active latents are contiguous."""
        key = (self.locations[:, 0] * self.tokens.shape[1] + self.locations[:, 1]) * self.width + self.locations[:, 2]
        order = torch.argsort(key)
        return SparseCache(self.tokens, self.locations[order], self.activations[order], self.config, self.width)


def cache_is_complete(latents_dir: Path, hookpoint: str) -> bool:
    return (Path(latents_dir) / hookpoint / "config.json").is_file()


def load_cache(latents_dir: str | Path, hookpoint: str) -> SparseCache:
    """Read a delphi-layout cache (ours or delphi's), verifying the sha256 of every file we recorded."""
    folder = Path(latents_dir) / hookpoint
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise MissingInputError(f"{folder} holds no finished cache (no config.json); run data_gen/cache_activations.py.")
    config = json.loads(config_path.read_text())
    recorded = config.get("latentsim", {}).get("files", {})
    files = sorted(folder.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[0]))
    if not files:
        raise MissingInputError(f"{folder} has a config.json but no <start>_<end>.safetensors files.")
    missing = sorted(set(recorded) - {p.name for p in files})
    if missing:
        raise CorruptCacheError(f"{folder} is missing split files {missing}; rerun with `overwrite: true`.")
    # The split files' latent ranges must tile [0, W): a missing one (a delphi cache records no file list)
    # would otherwise read as latents that never fire.
    ranges = [tuple(int(x) for x in p.stem.split("_")[:2]) for p in files]
    expected = 0
    for (start, end), path in zip(ranges, files, strict=True):  # sorted by start
        if start != expected:
            raise CorruptCacheError(f"{folder}: the split files do not tile the latents: {path.name} starts at latent "
                                    f"{start}, latents {expected}-{start - 1} have no file; restore it or rerun "
                                    "data_gen/cache_activations.py with `overwrite: true`.")
        expected = end + 1
    locs, acts, tokens = [], [], None
    for path, (start, _) in zip(files, ranges, strict=True):
        data = load_verified(path, recorded.get(path.name))
        loc = data["locations"].astype(np.int64)
        loc[:, 2] += start
        locs.append(loc)
        acts.append(data["activations"].astype(np.float32))
        if tokens is None and "tokens" in data:
            tokens = data["tokens"].astype(np.int64)
    if tokens is None:
        raise CorruptCacheError(f"{folder}: no split file stores `tokens`; the cache cannot be used.")
    width = ranges[-1][1] + 1
    return SparseCache(torch.from_numpy(tokens), torch.from_numpy(np.concatenate(locs)),
                       torch.from_numpy(np.concatenate(acts)), config, width)


def remove_shards(shard_dir: Path) -> None:
    shutil.rmtree(shard_dir, ignore_errors=True)
    if shard_dir.parent.is_dir() and not any(shard_dir.parent.iterdir()):
        shard_dir.parent.rmdir()


# ------------------------------------------------------------------------------------------- recording
@torch.no_grad()
def record_rows(model, sae, rows: torch.Tensor, layer: int, batch_size: int, progress=None, naive: bool = False):
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
        ids = rows[i:i + batch_size].to(device)
        h = sae_mod.residual_at(model, ids, layer, stop=not naive)[:, 1:, :]  # drop BOS: its norm ruins SAE stats
        b, t, d = h.shape
        tok, lat, val = encode(sae, h.reshape(b * t, d).to(sae.dtype))
        locs.append(torch.stack([tok // t + i, tok % t + 1, lat], dim=1).cpu())
        acts.append(val.float().cpu())
        if progress is not None:
            progress.update(b * (t + 1))
    return torch.cat(locs).numpy(), torch.cat(acts).numpy()
