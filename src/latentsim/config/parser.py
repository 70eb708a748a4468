"""YAML (`--config x.yaml`) + command-line overrides -> the config dataclasses, strictly (TRL's TrlParser)."""

from __future__ import annotations

import difflib
import sys
from dataclasses import fields
from pathlib import Path

from latentsim.config.common import check_dtype
from latentsim.errors import ConfigError


def _given_keys(args: list[str], config: dict) -> list[tuple[str, str]]:
    """(key, where) for every key of the YAML file and every `--key` of the command line."""
    given = [(key, "config file") for key in config if key != "env"]  # TrlParser exports `env:` variables
    for a in args:
        if a.startswith("--") and len(a) > 2:
            given.append((a[2:].split("=", 1)[0], "command line"))
    return given


def _check_keys(dataclass_types: tuple[type, ...], args: list[str], config: dict, config_path: str | None) -> None:
    """Unknown keys first, before any dataclass validates its values (a misspelled key must never hide behind
    another check's error, e.g. transformers' bf16/GPU check of SFTConfig)."""
    valid = sorted({f.name for t in dataclass_types for f in fields(t)})
    accepted = set(valid) | {f"no_{k}" for k in valid}  # HfArgumentParser's `--no_<flag>` for bools
    unknown = [(k, where) for k, where in _given_keys(args, config) if k not in accepted]
    if not unknown:
        return
    hints = []
    for key, where in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f"`{key}` ({where})" + (f" (did you mean `{close[0]}`?)" if close else ""))
    raise ConfigError(f"{config_path or 'command line'}: unknown config key(s) {', '.join(hints)}. Remove them or "
                      f"fix the spelling; valid keys: {', '.join(valid)}.")


def parse_config(dataclass_types: tuple[type, ...], args: list[str] | None = None) -> tuple:
    """Parse strictly: an unknown key (YAML or command line) is an error naming the file, the key and the closest
    valid key, reported before any value is validated; then each dataclass validates its values."""
    import yaml
    from trl import ModelConfig, TrlParser

    args = list(sys.argv[1:] if args is None else args)
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    config = {}
    if config_path is not None:
        if not Path(config_path).is_file():
            raise ConfigError(f"--config {config_path}: no such file.")
        try:
            config = yaml.safe_load(Path(config_path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{config_path}: not valid YAML ({err}).") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{config_path}: must hold a YAML mapping of config keys.")
    rest = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    _check_keys(dataclass_types, rest, config, config_path)
    try:
        parsed = tuple(TrlParser(dataclass_types).parse_args_and_config(args))
    except ConfigError:
        raise
    except ValueError as err:  # a value TRL or transformers refuse while building their dataclasses
        raise ConfigError(f"{config_path or 'command line'}: {err}") from None
    for obj in parsed:
        if isinstance(obj, ModelConfig):  # TRL's dataclass: its dtype reaches from_pretrained unchecked
            check_dtype("dtype", obj.dtype)
    return parsed
