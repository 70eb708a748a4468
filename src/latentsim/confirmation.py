"""The locked confirmation split: read once, for the final recipe, and every read recorded.

A confirmation split (build_dataset's `confirmation_fraction`: latents and cache rows no recipe choice, lever
or development number reads) is worth something only if it is read once. Two guards:

- a stage reports on it only when its config says `confirm: true` (`require_confirm`, at config time), so no
  development recipe reads it by accident;
- every read is recorded in the eval set's `confirmation_looks.json` (`record_look`): the stage, its output
  folder, the simulators and the git sha. Resuming the same look (same stage, output and simulators) is the
  same look; any other is appended, and the results say which look they are.

One confirmation is one plan: the stages of the final recipe (its sweep, patching, whole layer) read the split
from one clean commit, so looks at the first look's commit are part of the confirmation. A look from another
commit (the recipe changed after a look), from an uncommitted tree, or a stage and output folder read again
with other simulators (a second recipe tried) is not a confirmation, and its results say so.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from latentsim.errors import ConfigError
from latentsim.io import atomic_write_json, git_sha

CONFIRMATION_SPLIT = "confirmation"
LOOKS_FILE = "confirmation_looks.json"


def require_confirm(split: str | None, confirm: bool, key: str) -> None:
    """Refuse a config that reports on the confirmation split without `confirm: true` (and `confirm: true`
    on any other split, which would mean the config is not the one the user thinks)."""
    if split == CONFIRMATION_SPLIT and not confirm:
        raise ConfigError(
            f"config key `{key}`: the confirmation split is locked: it is read once, for the final recipe "
            "(docs/study.md). Report on `test` while choosing; set `confirm: true` in the final recipe's "
            "config to read it."
        )
    if confirm and split != CONFIRMATION_SPLIT:
        raise ConfigError(
            f"config key `confirm`: true only applies to `{key}: {CONFIRMATION_SPLIT}` (got {split!r})."
        )


def read_looks(eval_set_dir: str | Path) -> list[dict]:
    path = Path(eval_set_dir) / LOOKS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def record_look(eval_set_dir: str | Path, stage: str, output: str | Path, simulators: list[str]) -> dict:
    """Record a read of the eval set's confirmation split (or find the same one recorded) and return
    {look: its 1-based number, looks: how many there are, first: the first look's record, confirmation:
    whether this look is part of the first look's plan (module docstring)}."""
    looks = read_looks(eval_set_dir)
    this = {"stage": stage, "output": str(Path(output).resolve()), "simulators": sorted(simulators)}
    same = [i for i, look in enumerate(looks) if {k: look[k] for k in this} == this]
    if same:
        number = same[0] + 1
    else:
        looks.append(
            {**this, "git_sha": git_sha(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        )
        atomic_write_json(Path(eval_set_dir) / LOOKS_FILE, looks)
        number = len(looks)
    confirmation = number == 1 or part_of_first_plan(looks, number - 1)
    if not confirmation:
        print(
            f"[{stage}] warning: look {number} at the confirmation split of {eval_set_dir} (the first: "
            f"{looks[0]['stage']} of {', '.join(looks[0]['simulators'])} at {looks[0]['time']}, commit "
            f"{looks[0]['git_sha']}); numbers read after a first look, from another commit or plan, are "
            "not a confirmation."
        )
    return {"look": number, "looks": len(looks), "first": looks[0], "confirmation": confirmation}


def part_of_first_plan(looks: list[dict], index: int) -> bool:
    """Whether look `index` belongs to the first look's plan: the same clean commit, and no earlier look at
    its stage and output folder read other simulators."""
    look, first = looks[index], looks[0]
    sha = first.get("git_sha")
    if not sha or sha.endswith("+dirty") or look.get("git_sha") != sha:
        return False
    return not any(
        (earlier["stage"], earlier["output"]) == (look["stage"], look["output"])
        and earlier["simulators"] != look["simulators"]
        for earlier in looks[:index]
    )
