"""Atomic writes and provenance (`run_config.json`) shared by every stage.

Every file we write goes to a temporary file in the destination folder and is then renamed over the target
with `os.replace`, so a killed job leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from latentsim.errors import ConfigError

# Packages whose versions are recorded in every run_config.json.
TRACKED_PACKAGES = (
    "latentsim",
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "sae-lens",
    "safetensors",
    "gguf",
    "numpy",
)
# Keys whose values must never reach a log or a saved config (hub_token, HF_TOKEN, wandb api_key, ...).
SECRET_KEY_RE = re.compile(r"(^|_)(token|api_key|password|secret)$", re.IGNORECASE)


@contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path next to `target`; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_save(target: str | os.PathLike, save_fn: Callable[[Path], None]) -> None:
    """Run `save_fn(tmp_path)` (e.g. safetensors' save_file) and move the result onto `target`."""
    with atomic_path(target) as tmp:
        save_fn(tmp)


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, enums and tuples to plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items() if not _is_secret_key(str(k))}
    if isinstance(obj, list | tuple | set):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value") and type(obj).__module__ != "builtins" and hasattr(type(obj), "__members__"):
        return obj.value  # Enum
    if isinstance(obj, str | int | float | bool) or obj is None:
        return obj
    return repr(obj)


def _is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY_RE.search(key))


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with secret values (`--hub_token X`, `--hub_token=X`, `hf_...`) replaced by ***."""
    out = []
    for i, arg in enumerate(argv):
        flag, eq, _ = arg.partition("=")
        if eq and _is_secret_key(flag.lstrip("-")):
            arg = f"{flag}=***"
        elif i > 0 and argv[i - 1].startswith("-") and _is_secret_key(argv[i - 1].lstrip("-")):
            arg = "***"
        elif re.fullmatch(r"hf_[A-Za-z0-9]{20,}", arg):
            arg = "***"
        out.append(arg)
    return out


def git_sha(repo_dir: str | os.PathLike | None = None) -> str | None:
    """The commit of the latentsim checkout (with `+dirty` if it has uncommitted changes), or None."""
    repo_dir = Path(repo_dir) if repo_dir else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(stage: str, configs: dict[str, Any], seed: int | None) -> dict[str, Any]:
    """What produced an artifact: stage name, resolved configs, git sha, package versions, seed, command."""
    return {
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "git_sha": git_sha(),
        "command": " ".join(redact_argv(sys.argv)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": package_versions(),
        "config": to_jsonable(configs),
    }


def write_run_config(
    output_dir: str | os.PathLike, stage: str, configs: dict[str, Any], seed: int | None
) -> Path:
    """Write `run_config.json` into `output_dir` (first thing every stage does) and return its path."""
    path = Path(output_dir) / "run_config.json"
    atomic_write_json(path, provenance(stage, configs, seed))
    return path


def config_differences(output_dir: str | os.PathLike, configs: dict[str, Any], ignore: set[str]) -> list[str]:
    """Keys (`section.key`) whose values differ from the run recorded in `output_dir/run_config.json`.

    A stage that finds finished work calls this before skipping it, so a changed config is never answered with
    results of the old one. Keys in `ignore` (`section.key`, e.g. speed-only settings) are not compared.
    """
    path = Path(output_dir) / "run_config.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text()).get("config", {})
    new = to_jsonable(configs)
    # A key added after the run was recorded, left at its default, is no difference: defaults of new keys keep
    # the old behaviour (that is how keys are added here).
    defaults = {
        section: to_jsonable(
            {f.name: f.default for f in dataclasses.fields(c) if f.default is not dataclasses.MISSING}
        )
        for section, c in configs.items()
        if dataclasses.is_dataclass(c)
    }
    diffs = []
    for section in sorted(set(old) | set(new)):
        old_s, new_s = old.get(section, {}), new.get(section, {})
        for key in sorted(set(old_s) | set(new_s)):
            name = f"{section}.{key}"
            if (
                key not in old_s
                and key in defaults.get(section, {})
                and new_s.get(key) == defaults[section][key]
            ):
                continue
            if name not in ignore and old_s.get(key) != new_s.get(key):
                diffs.append(f"{name}: {old_s.get(key)!r} -> {new_s.get(key)!r}")
    return diffs


def require_same_config(
    output_dir: str | os.PathLike,
    configs: dict[str, Any],
    ignore: set[str],
    what: str,
    fix: str,
    finished: str | None = None,
) -> None:
    """Raise when `output_dir` holds `what` made with another config (naming the keys that differ and `fix`).
    With `finished` (a glob), only finished work binds the config: a folder holding no matching file yet (a
    first run that failed early) may be rerun with a corrected config."""
    if finished is not None and not any(Path(output_dir).glob(finished)):
        return
    diffs = config_differences(output_dir, configs, ignore)
    if diffs:
        raise ConfigError(f"{output_dir} holds {what} made with another config ({'; '.join(diffs)}); {fix}.")


# Every eval stage (sweep, patch_kl, generate) records what it measured, and what produced it, in
# <its folder>/results.json; written and read only through these two.
RESULTS_FILE = "results.json"


# What a results.json holds, by the stage that wrote it: its first key, `kind`, says which reader applies.
RESULT_KINDS = (
    "simulator_sweep",
    "patch_kl",
    "whole_layer",
    "generation",
    "bench_scale",
    "external_scores",
    "value_scores",
)


def write_results(folder: str | os.PathLike, record: dict, kind: str) -> None:
    """A stage's results.json: `{"kind": kind, **record}`, written atomically."""
    if kind not in RESULT_KINDS:
        raise ValueError(f"unknown results kind {kind!r}; add it to latentsim.io.RESULT_KINDS.")
    atomic_write_json(
        Path(folder) / RESULTS_FILE, {"kind": kind, **{k: v for k, v in record.items() if k != "kind"}}
    )


def read_results(folder: str | os.PathLike) -> dict | None:
    """The results.json record in `folder`, or None when the stage has not finished there."""
    path = Path(folder) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
