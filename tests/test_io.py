"""Atomic writes and provenance."""

import json
from dataclasses import dataclass

import pytest

from latentsim.io import atomic_write_json, atomic_write_text, current_umask, provenance, write_run_config


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's 0600


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(AttributeError):
        atomic_write_text(target, None)  # fails while writing the temp file
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


@dataclass
class Args:
    learning_rate: float = 1.0e-4
    hub_token: str = "hf_" + "s" * 34  # built at run time so no token-looking literal is committed
    n_tokens: int = 7


def test_run_config_has_provenance_and_no_secrets(tmp_path):
    path = write_run_config(tmp_path, "stage_x", {"args": Args()}, seed=3)
    record = json.loads(path.read_text())
    assert record["stage"] == "stage_x" and record["seed"] == 3
    assert record["config"]["args"] == {"learning_rate": 1.0e-4, "n_tokens": 7}
    assert "hf_sss" not in path.read_text()
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    assert "git_sha" in record and record["python"]


def test_provenance_converts_paths_and_tuples():
    from pathlib import Path

    record = json.loads(json.dumps(provenance("s", {"path": Path("/x"), "t": (1, 2)}, None)))
    assert record["config"] == {"path": "/x", "t": [1, 2]}


def test_command_line_secrets_are_redacted():
    from latentsim.io import redact_argv

    argv = [
        "sft.py",
        "--hub_token",
        "abc",
        "--api_key=xyz",
        "--lr",
        "1e-4",
        "hf_" + "a" * 34,
        "--n_tokens",
        "5",
    ]
    assert redact_argv(argv) == [
        "sft.py",
        "--hub_token",
        "***",
        "--api_key=***",
        "--lr",
        "1e-4",
        "***",
        "--n_tokens",
        "5",
    ]


def test_a_key_added_since_a_run_differs_only_off_its_default(tmp_path):
    from latentsim.io import config_differences

    @dataclass
    class Old:
        learning_rate: float = 1.0e-4

    @dataclass
    class New:
        learning_rate: float = 1.0e-4
        n_contexts: int = 1

    write_run_config(tmp_path, "stage_x", {"args": Old()}, seed=3)
    assert config_differences(tmp_path, {"args": New()}, set()) == []
    assert config_differences(tmp_path, {"args": New(n_contexts=3)}, set()) == ["args.n_contexts: None -> 3"]
    assert config_differences(tmp_path, {"args": New(learning_rate=2.0e-4)}, set()) == [
        "args.learning_rate: 0.0001 -> 0.0002"
    ]
