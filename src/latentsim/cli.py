"""The `__main__` of every entry script: parse the config, run `main`, report the user's errors readably."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from latentsim.config import parse_config
from latentsim.errors import InputError


def run(main: Callable, dataclass_types: tuple[type, ...], args: list[str] | None = None):
    """`main(*parse_config(dataclass_types))`. A configuration or input error (latentsim.errors.InputError) prints
    `error: <message>` on stderr and exits 2; LATENTSIM_DEBUG=1 keeps its traceback. Other exceptions are bugs
    and propagate with theirs."""
    try:
        return main(*parse_config(dataclass_types, args))
    except InputError as err:
        if os.environ.get("LATENTSIM_DEBUG") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
