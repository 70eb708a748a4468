"""The locked confirmation split: refused unless confirmed, every read recorded, a later look marked."""

import json
import shutil

import pytest
from helpers import build_eval_set, load_script, make_explained_cache

from latentsim.config import EvalArguments, PatchArguments, WholeLayerArguments
from latentsim.confirmation import LOOKS_FILE, read_looks, record_look
from latentsim.errors import ConfigError


def test_the_confirmation_split_needs_confirm(tmp_path):
    prior = ["model=prior"]
    with pytest.raises(ConfigError, match="`eval_split`: the confirmation split is locked"):
        EvalArguments(eval_set=str(tmp_path), eval_split="confirmation", baselines=prior)
    with pytest.raises(ConfigError, match="`confirm`"):
        EvalArguments(eval_set=str(tmp_path), confirm=True, baselines=prior)  # on the test split
    with pytest.raises(ConfigError, match="`calibration_split`"):
        EvalArguments(eval_set=str(tmp_path), calibration_split="confirmation", baselines=prior)
    EvalArguments(eval_set=str(tmp_path), eval_split="confirmation", confirm=True, baselines=prior)
    with pytest.raises(ConfigError, match="`split`: the confirmation split is locked"):
        PatchArguments(eval_set=str(tmp_path), split="confirmation")
    PatchArguments(eval_set=str(tmp_path), split="confirmation", confirm=True)
    whole_layer = dict(eval_set=str(tmp_path), output_dir=str(tmp_path), baseline="name=zero-shot")
    with pytest.raises(ConfigError, match="`split`: the confirmation split is locked"):
        WholeLayerArguments(**whole_layer, split="confirmation")
    WholeLayerArguments(**whole_layer, split="confirmation", confirm=True)


def test_a_look_is_recorded_once_and_a_second_one_is_marked(tmp_path, capsys):
    first = record_look(tmp_path, "eval_sweep", tmp_path / "out", ["b", "a"])
    assert first["look"] == 1 and first["looks"] == 1 and first["first"]["simulators"] == ["a", "b"]
    again = record_look(tmp_path, "eval_sweep", tmp_path / "out", ["a", "b"])  # a resumed run: the same look
    assert again["look"] == 1 and len(read_looks(tmp_path)) == 1
    assert "warning" not in capsys.readouterr().out
    second = record_look(tmp_path, "eval_sweep", tmp_path / "out", ["a", "b", "c"])
    assert second["look"] == 2 and second["looks"] == 2 and second["first"] == read_looks(tmp_path)[0]
    assert "look 2 at the confirmation split" in capsys.readouterr().out


def test_the_stages_of_one_plan_are_one_confirmation(tmp_path, monkeypatch, capsys):
    import latentsim.confirmation as confirmation

    monkeypatch.setattr(confirmation, "git_sha", lambda: "abc")
    assert record_look(tmp_path, "eval_sweep", tmp_path / "sweep", ["sim", "prior"])["confirmation"]
    # The same commit's patching and whole layer: the rest of the plan.
    assert record_look(tmp_path, "patch_kl", tmp_path / "patch", ["sim"])["confirmation"]
    assert record_look(tmp_path, "whole_layer", tmp_path / "wl", ["sim", "lexical"])["confirmation"]
    assert "warning" not in capsys.readouterr().out
    # The same stage and folder read with another simulator: a second recipe tried.
    assert not record_look(tmp_path, "patch_kl", tmp_path / "patch", ["sim", "other"])["confirmation"]
    monkeypatch.setattr(confirmation, "git_sha", lambda: "def")  # the recipe changed after the looks
    later = record_look(tmp_path, "whole_layer", tmp_path / "wl2", ["sim"])
    assert not later["confirmation"] and later["look"] == 5
    assert "not a confirmation" in capsys.readouterr().out
    monkeypatch.setattr(confirmation, "git_sha", lambda: "abc+dirty")
    dirty = tmp_path / "dirty"
    assert record_look(dirty, "eval_sweep", dirty / "a", ["sim"])["confirmation"]  # the first look always is
    assert not record_look(dirty, "patch_kl", dirty / "b", ["sim"])["confirmation"]


def test_a_sweep_on_the_confirmation_split_records_its_look(
    tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    make_explained_cache(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    eval_set = build_eval_set(tmp_path, tiny_model_dir)
    # A stand-in confirmation split (build_dataset writes one with confirmation_fraction > 0).
    shutil.copy(eval_set / "test.parquet", eval_set / "confirmation.parquet")
    sweep = load_script("eval/sweep.py").main
    out = tmp_path / "eval"

    def run(baselines):
        sweep(
            EvalArguments(
                eval_set=str(eval_set),
                eval_split="confirmation",
                confirm=True,
                output_dir=str(out),
                baselines=baselines,
            )
        )
        return json.loads((out / eval_set.name / "summary.json").read_text())

    summary = run(["model=prior"])
    assert summary["split"] == "confirmation" and summary["confirmation_look"]["look"] == 1
    assert "look 1 of 1 (the confirmation)" in (out / eval_set.name / "summary.md").read_text()
    assert run(["model=prior"])["confirmation_look"]["look"] == 1  # rerun: skipped, the same look
    later = run(["model=prior", "model=string_match"])
    want = {"look": 2, "looks": 2, "first": None, "confirmation": False}
    assert later["confirmation_look"] | {"first": None} == want
    assert "not a confirmation" in (out / eval_set.name / "summary.md").read_text()
    assert [look["simulators"] for look in json.loads((eval_set / LOOKS_FILE).read_text())] == [
        ["baseline__prior"],
        ["baseline__prior", "baseline__string_match"],
    ]
