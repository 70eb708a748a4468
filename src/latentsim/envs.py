"""The two environments that run the stages, their exact pins, and which one runs a stage.

Training needs transformers >= 5.23 (every SFT recipe sets `activation_checkpointing`) and every vLLM release
caps transformers below that (0.32 <5.20, 0.33 <5.21, 0.34 <5.23), so the two never share a venv: training and
every `backend: hf` stage run in the training environment (`.venv`), the stages whose config sets `backend:
vllm` in the vLLM environment (`.venv-vllm`); launch.sh chooses with `env`. Each is pinned exactly by a pip
constraints file, `constraints/<env>.txt`, and described for the recipe test (tests/test_recipes_env.py) by
`constraints/<env>.fields.json`: the config fields its pinned libraries' dataclasses accept.

    python -m latentsim.envs env SCRIPT [ARGS]   print `train` or `vllm`: the environment that runs this stage
    python -m latentsim.envs snapshot ENV        rewrite constraints/ENV.fields.json from this interpreter's
                                                 libraries (refused unless they are ENV's pinned versions)
    python -m latentsim.envs lock ENV            re-resolve constraints/ENV.txt from its `# roots:` and
                                                 `# extras:` lines against the package index
                                                 (`pip install --dry-run --report`; nothing is installed)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from latentsim.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
ENVIRONMENTS = ("train", "vllm")
VENVS = {"train": ".venv", "vllm": ".venv-vllm"}  # launch.sh's VENV (default .venv) and setup_vllm's venv
# The dataclasses of other packages that entry scripts parse configs into (train/sft.py) and the packages
# whose versions decide their fields: a snapshot records both.
THIRD_PARTY_DATACLASSES = ("trl.SFTConfig", "trl.ModelConfig")
FIELD_PACKAGES = ("transformers", "trl")
USAGE = (
    "usage: python -m latentsim.envs env SCRIPT [ARGS]\n"
    "       python -m latentsim.envs snapshot {train,vllm}\n"
    "       python -m latentsim.envs lock {train,vllm}"
)


def constraints_path(env: str, root: Path = ROOT) -> Path:
    return root / "constraints" / f"{env}.txt"


def snapshot_path(env: str, root: Path = ROOT) -> Path:
    return root / "constraints" / f"{env}.fields.json"


def normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): `Typing_Extensions` -> `typing-extensions`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """{normalized name: version} of a constraints file's `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise ValueError(f"{path}: `{line}` is not an exact `name==version` pin")
            pins[normalize(name)] = version.strip()
    return pins


def read_header(path: Path, key: str) -> list[str]:
    """The words of a constraints file's `# key: ...` line (`roots`, `extras`)."""
    for line in path.read_text().splitlines():
        if line.startswith(f"# {key}:"):
            return line.split(":", 1)[1].split()
    raise ValueError(f"{path}: no `# {key}:` line")


def stage_env(args: list[str]) -> str:
    """`vllm` when the stage's backend is vLLM (its `--config` file's `backend`, overridden by `--backend X`
    on the command line), else `train`. An unreadable config is the stage's own error to report: `train`."""
    backend = None
    for i, arg in enumerate(args):
        value = args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("--config="):
            arg, value = "--config", arg.split("=", 1)[1]
        if arg == "--config" and value and Path(value).is_file():
            import yaml

            try:
                config = yaml.safe_load(Path(value).read_text())
            except (yaml.YAMLError, UnicodeDecodeError):
                config = None
            if isinstance(config, dict) and isinstance(config.get("backend"), str):
                backend = config["backend"]
    for i, arg in enumerate(args):  # the command line overrides the file, as in parse_config
        if arg == "--backend" and i + 1 < len(args):
            backend = args[i + 1]
        elif arg.startswith("--backend="):
            backend = arg.split("=", 1)[1]
    return "vllm" if backend == "vllm" else "train"


def python_for(args: list[str], root: Path = ROOT) -> Path:
    """The python of the environment that runs `SCRIPT ARGS` (launch.sh builds both)."""
    env = stage_env(args)
    venv = os.environ.get("VENV", VENVS["train"]) if env == "train" else VENVS[env]
    return root / venv / "bin" / "python"


def dataclass_key(cls: type) -> str:
    """`trl.SFTConfig` for trl.trainer.sft_config.SFTConfig: its package and name."""
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def field_names(cls: type) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(cls))


def live_snapshot(env: str) -> dict:
    """This interpreter's versions of FIELD_PACKAGES and the fields of THIRD_PARTY_DATACLASSES."""
    found = {}
    for key in THIRD_PARTY_DATACLASSES:
        package, name = key.split(".", 1)
        found[key] = field_names(getattr(importlib.import_module(package), name))
    return {
        "environment": env,
        "constraints": str(constraints_path(env).relative_to(ROOT)),
        "command": f"python -m latentsim.envs snapshot {env}",
        "versions": {p: metadata.version(p) for p in FIELD_PACKAGES},
        "dataclasses": found,
    }


def accepted_keys(script_dataclasses: tuple[type, ...], snapshot: dict) -> tuple[set[str], list[str]]:
    """(the config keys a script accepts in the snapshot's environment, the third-party dataclasses the
    snapshot lacks). latentsim's own dataclasses are the same in every environment: their fields are read
    live."""
    keys, missing = set(), []
    for cls in script_dataclasses:
        if cls.__module__.split(".")[0] == "latentsim":
            keys |= set(field_names(cls))
        elif dataclass_key(cls) in snapshot["dataclasses"]:
            keys |= set(snapshot["dataclasses"][dataclass_key(cls)])
        else:
            missing.append(dataclass_key(cls))
    return keys, missing


def recipe_problems(recipe: Path, script_dataclasses: tuple[type, ...], snapshot: dict) -> list[str]:
    """Why `recipe` cannot be parsed in the snapshot's environment: keys no dataclass there accepts, or
    dataclasses the snapshot does not describe. Empty when it parses."""
    import yaml

    config = yaml.safe_load(recipe.read_text()) or {}
    keys, missing = accepted_keys(script_dataclasses, snapshot)
    at = ", ".join(f"{p} {v}" for p, v in snapshot["versions"].items())
    problems = [
        f"{recipe}: {snapshot['constraints']} has no snapshot of {name}; "
        f"rerun `{snapshot['command']}` in that environment"
        for name in missing
    ]
    unknown = sorted(k for k in config if k != "env" and k not in keys)  # TrlParser exports `env:` variables
    if unknown:
        problems.append(
            f"{recipe}: the {snapshot['environment']} environment ({at}) does not accept "
            f"{', '.join(f'`{k}`' for k in unknown)}"
        )
    return problems


def write_snapshot(env: str) -> Path:
    pins = read_pins(constraints_path(env))
    snapshot = live_snapshot(env)
    wrong = {p: v for p, v in snapshot["versions"].items() if pins.get(p) != v}
    if wrong:
        raise SystemExit(
            f"error: this python has {wrong}, {constraints_path(env).name} pins "
            f"{ {p: pins.get(p) for p in wrong} }; run the snapshot in a venv with the pinned versions"
        )
    atomic_write_json(snapshot_path(env), snapshot)
    return snapshot_path(env)


def lock(env: str) -> Path:
    """Resolve the environment's roots and extras on the package index (pip's resolver, no install) and
    rewrite its constraints file with every package pinned. `--isolated`: no local pip configuration, indexes
    or constraints take part; only PIP_CERT is passed on."""
    path = constraints_path(env)
    roots, extras = read_header(path, "roots"), read_header(path, "extras")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cert = ["--cert", os.environ["PIP_CERT"]] if os.environ.get("PIP_CERT") else []
        cmd = [sys.executable, "-m", "pip", "--isolated", *cert, "install", "--dry-run", "--ignore-installed"]
        cmd += ["--quiet", "--report", str(report), "-e", f"{ROOT}[{','.join(extras)}]", *roots]
        subprocess.run(cmd, check=True)
        write_lock(path, json.loads(report.read_text()))
    return path


def write_lock(path: Path, report: dict) -> None:
    """Rewrite a constraints file from a `pip install --report` of its roots: its `#` header kept, the
    `Resolved by` line renewed, every package but latentsim pinned exactly."""
    keep = [
        line for line in path.read_text().splitlines() if line.startswith("#") and "Resolved by" not in line
    ]
    pins = sorted(
        (normalize(r["metadata"]["name"]), r["metadata"]["version"])
        for r in report["install"]
        if normalize(r["metadata"]["name"]) != "latentsim"
    )
    env = report.get("environment", {})
    python = env.get("python_full_version", ".".join(map(str, sys.version_info[:3])))
    where = f"{env.get('platform_system', sys.platform)} {env.get('platform_machine', os.uname().machine)}"
    resolved = (
        f"# Resolved by pip {report.get('pip_version', '?')} for CPython {python} on {where}, "
        f"{_dt.date.today().isoformat()}."
    )
    atomic_write_text(path, "\n".join([*keep, resolved, *(f"{n}=={v}" for n, v in pins)]) + "\n")


def main(argv: list[str]) -> None:
    if len(argv) >= 1 and argv[0] == "env":
        print(stage_env(argv[1:]))
    elif len(argv) == 2 and argv[0] in ("snapshot", "lock") and argv[1] in ENVIRONMENTS:
        print((write_snapshot if argv[0] == "snapshot" else lock)(argv[1]))
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
