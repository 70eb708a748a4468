"""YAML (`--config x.yaml`) + command-line overrides -> the config dataclasses, strictly (TRL's TrlParser)."""

from __future__ import annotations

import difflib
import sys
from dataclasses import fields
from pathlib import Path

from trl import TrlParser

from latentsim.config.common import check_dtype
from latentsim.errors import ConfigError

LISTED_KEYS_MAX = 40  # beyond this (SFTConfig has ~200 keys) an unknown-key error points to --help instead


class _Parser(TrlParser):
    """TrlParser whose argparse errors (`--ctx_len abc`, a missing value) raise ConfigError instead of
    printing the usage text and exiting, so they read like every other config error."""

    where = "command line"

    def error(self, message):
        raise ConfigError(f"{self.where}: {message} (see --help).")


def _check_keys(
    dataclass_types: tuple[type, ...], args: list[str], config: dict, config_path: str | None
) -> None:
    """Unknown keys first, before any dataclass validates its values (a misspelled key must never hide behind
    another check's error, e.g. transformers' bf16/GPU check of SFTConfig)."""
    valid = sorted({f.name for t in dataclass_types for f in fields(t)})
    accepted = set(valid) | {f"no_{k}" for k in valid}  # HfArgumentParser's `--no_<flag>` for bools
    given = {
        config_path: [k for k in config if k != "env"],  # TrlParser exports `env:` variables
        "command line": [a[2:].split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2],
    }
    problems, n_unknown = [], 0
    for where, keys in given.items():
        hints = []
        for key in (k for k in keys if k not in accepted):
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"`{key}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
        if hints:
            problems.append(f"{where}: unknown config key{'s' * (len(hints) > 1)} {', '.join(hints)}")
        n_unknown += len(hints)
    if not problems:
        return
    listing = (
        f"valid keys: {', '.join(valid)}"
        if len(valid) <= LISTED_KEYS_MAX
        else f"`{Path(sys.argv[0]).name} --help` lists the {len(valid)} valid keys"
    )
    raise ConfigError(
        f"{'; '.join(problems)}. Remove or respell {'them' if n_unknown > 1 else 'it'}; {listing}."
    )


def _split_config_arg(args: list[str]) -> tuple[str | None, list[str]]:
    """(the `--config` file, the other arguments); `--config=FILE` is accepted too."""
    config_path, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 == len(args):
                raise ConfigError("command line: `--config` needs a YAML file after it.")
            config_path, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--config="):
            config_path = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    return config_path, rest


def _read_config(config_path: str) -> dict:
    import yaml

    if not Path(config_path).is_file():
        raise ConfigError(f"--config {config_path}: no such file.")
    try:
        config = yaml.safe_load(Path(config_path).read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_path}: not valid YAML ({err}).") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: must hold a YAML mapping of config keys.")
    return config


def parse_config(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple:
    """Parse strictly: an unknown key (YAML or command line) is an error naming the file, the key and the
    closest valid key, reported before any value is validated; then each dataclass validates its values. Every
    problem is a ConfigError naming the file or `command line`."""
    from trl import ModelConfig

    config_path, rest = _split_config_arg(list(sys.argv[1:] if args is None else args))
    where = config_path or "command line"
    config = _read_config(config_path) if config_path is not None else {}
    if not {"-h", "--help"} & set(rest):  # --help prints the valid keys and exits
        _check_keys(dataclass_types, rest, config, config_path)
    parser = _Parser(dataclass_types)
    parser.where = where
    try:
        parsed = tuple(
            parser.parse_args_and_config(rest + (["--config", config_path] if config_path else []))
        )
    except ConfigError:
        raise
    except ValueError as err:  # a value TRL or transformers refuse while building their dataclasses
        raise ConfigError(f"{where}: {err}") from None
    for obj in parsed:
        if isinstance(obj, ModelConfig):  # TRL's dataclass: its dtype reaches from_pretrained unchecked
            check_dtype("dtype", obj.dtype)
    return parsed
