"""The `__main__` of every entry script: parse the config, run `main`, report the user's errors readably.

    python -m latentsim.cli check SCRIPT [--config x.yaml] [--key value ...]
    python -m latentsim.cli accelerate-launch [accelerate launch options] SCRIPT [ARGS ...]

`check` parses SCRIPT's config exactly as its `__main__` would and stops. `accelerate-launch` is `accelerate
launch` ending with the training processes' exit status instead of accelerate's traceback of the failed child
(which has printed its own `error: ...`). launch.sh's `sft` runs the first, then the second.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from latentsim.config import parse_config
from latentsim.errors import InputError, MissingInputError

USAGE = (
    "usage: python -m latentsim.cli check SCRIPT [--config x.yaml] [--key value ...]\n"
    "       python -m latentsim.cli accelerate-launch [accelerate launch options] SCRIPT [ARGS ...]"
)


@contextmanager
def readable_errors():
    """A configuration or input error (latentsim.errors.InputError) prints `error: <message>` on stderr and
    exits 2; LATENTSIM_DEBUG=1 keeps its traceback. Other exceptions are bugs and propagate with theirs."""
    try:
        yield
    except InputError as err:
        if os.environ.get("LATENTSIM_DEBUG") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def run(main: Callable, dataclass_types: tuple[type, ...], args: list[str] | None = None):
    """`main(*parse_config(dataclass_types))`, with the user's errors reported readably
    (`readable_errors`)."""
    with readable_errors():
        return main(*parse_config(dataclass_types, args))


def check(script: str, args: list[str]) -> tuple:
    """Parse `script`'s config (its DATACLASSES) from `args` without running the script."""
    path = Path(script)
    if not path.is_file():
        raise MissingInputError(f"{script}: no such entry script.")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not as __main__: defines DATACLASSES and main, runs nothing
    return parse_config(module.DATACLASSES, args)


def accelerate_launch(args: list[str]) -> int:
    """`accelerate launch ARGS`; returns the exit status of the (first) failed training process, or 0."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(launch_command_parser().parse_args(args))
    except subprocess.CalledProcessError as err:  # one process, or DeepSpeed's launcher
        return err.returncode if err.returncode > 0 else 1
    except ChildFailedError as err:  # several processes (torchrun): each has printed its own error
        exitcode = err.get_first_failure()[1].exitcode
        return exitcode if exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    verb = sys.argv[1] if len(sys.argv) > 2 else None
    if verb == "check":
        sys.argv = sys.argv[2:]  # as the script sees them: its name in usage and error messages
        with readable_errors():
            check(sys.argv[0], sys.argv[1:])
    elif verb == "accelerate-launch":
        sys.exit(accelerate_launch(sys.argv[2:]))
    else:
        sys.exit(USAGE)
