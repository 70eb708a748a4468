"""eval/sweep.py and eval/report.py end to end on tiny assets: real LoRA checkpoints, baselines, resume,
refusals."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import build_eval_set, load_script, make_explained_cache, sft_args
from sklearn.metrics import roc_auc_score

from latentsim.config import DatasetArguments, EvalArguments
from latentsim.explain import load_interpretations
from latentsim.simulators.hf import HFScorer

HOOK = "layers.1"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """A cache, a training mixture, held-out eval sets (binary, value, and one sharing latents with training)
    and a LoRA run with checkpoints at steps 6 and 12."""
    root = tmp_path_factory.mktemp("eval")
    make_explained_cache(root, tiny_model_dir, tiny_sae_dir, tiny_corpus, samplings=("quantiles", "top"))
    build = load_script("data_gen/build_dataset.py").main
    common = dict(
        cache_dir=str(root / "cache"),
        hookpoint=HOOK,
        simulator_tokenizer=str(tiny_model_dir),
        interpretations=[str(root / "expl" / "token_list-quantiles")],
        window_min=4,
        window_max=6,
        contexts_per_row=2,
        validation_fraction=0.2,
        test_fraction=0.2,
        seed=3,
    )
    build(DatasetArguments(**common, positives="top_k", top_k=3, output_dir=str(root / "mix")))
    build_eval_set(root, tiny_model_dir)  # every positive, 6 uniform negatives per context
    build(
        DatasetArguments(
            **common,
            positives="all",
            negatives_per_positive=0,
            label="quantile_bin",
            prompt_format="sim_value_v1",
            output_dir=str(root / "eval_value"),
        )
    )
    build(
        DatasetArguments(
            **{**common, "split_mode": "contexts"},
            positives="all",
            negatives_per_context=6,
            output_dir=str(root / "eval_seen"),
        )
    )
    load_script("train/sft.py").main(*sft_args(root / "mix", tiny_model_dir, root / "run"))
    return root


def sweep(assets, tiny_model_dir, out, **kw):
    args = dict(
        eval_set=str(assets / "eval_set"),
        run_dirs=[str(assets / "run")],
        output_dir=str(out),
        baselines=[
            f"model={tiny_model_dir},name=zero",
            f"model={tiny_model_dir},shots=2,name=two",
            f"model={tiny_model_dir},interpretations={assets / 'expl' / 'token_list-top'},name=top",
        ],
        batch_size=4,
    )
    args.update(kw)
    load_script("eval/sweep.py").main(EvalArguments(**args))
    return out / Path(args["eval_set"]).name


def test_eval_set_holds_all_actives_and_fixed_negatives(assets):
    test = pd.read_parquet(assets / "eval_set" / "test.parquet")
    per_context = test.groupby(["row", "position"])
    assert (per_context["active"].apply(lambda a: (a == 0).sum()) == 6).all()
    assert (per_context["n_active"].first() >= per_context["active"].sum()).all()
    # The eval set's held-out latents are the training mixture's test latents (same seed and fractions).
    mix_test = set(pd.read_parquet(assets / "mix" / "test.parquet")["latent"])
    mix_train = set(pd.read_parquet(assets / "mix" / "train.parquet")["latent"])
    assert mix_test <= set(test["latent"]) and not set(test["latent"]) & mix_train


def test_sweep_scores_checkpoints_and_baselines(assets, tiny_model_dir, tmp_path):
    root = sweep(assets, tiny_model_dir, tmp_path / "eval")
    names = [r["simulator"] for r in json.loads((root / "summary.json").read_text())["rows"]]
    # checkpoint-12 is the final adapter (training ended on a save step): scored once, as `final`.
    assert names == ["run__checkpoint-6", "run__final", "baseline__zero", "baseline__two", "baseline__top"]
    test = pd.read_parquet(assets / "eval_set" / "test.parquet")
    for name in names:
        record = json.loads((root / name / "results.json").read_text())
        assert record["eval_set"]["prompt_format"] == "sim_v1" and record["scoring"]["backend"] == "hf"
        assert record["provenance"]["seed"] == 22 and "transformers" in record["provenance"]["versions"]
        preds = pd.read_parquet(root / name / "predictions_test.parquet")
        # Every metric can be recomputed from the predictions.
        aucs = [
            roc_auc_score(g["active"], g["p_yes"])
            for _, g in preds.groupby("context_id")
            if g["active"].nunique() == 2
        ]
        assert record["results"]["binary"]["per_context"]["auc"]["median"] == pytest.approx(np.median(aucs))
        assert np.allclose(preds["p_yes"], 1 / (1 + np.exp(preds["logit_0"] - preds["logit_1"])), atol=1e-6)
        if name != "baseline__top":
            assert len(preds) == len(test)
        assert (root / name / "predictions_validation.parquet").is_file()
    final = pd.read_parquet(root / "run__final" / "predictions_test.parquet")
    ckpt6 = pd.read_parquet(root / "run__checkpoint-6" / "predictions_test.parquet")
    assert json.loads((root / "run__final" / "results.json").read_text())["simulator"]["step"] == 12
    assert np.abs(ckpt6["p_yes"] - final["p_yes"]).max() > 1e-4  # checkpoints really differ
    zero = pd.read_parquet(root / "baseline__zero" / "predictions_test.parquet")
    assert np.abs(zero["p_yes"] - final["p_yes"]).max() > 1e-4  # the adapter was detached for the baseline
    two = pd.read_parquet(root / "baseline__two" / "predictions_test.parquet")
    assert np.abs(zero["p_yes"] - two["p_yes"]).max() > 1e-4  # few-shot examples reach the prompt
    summary = (root / "summary.md").read_text()
    assert all(n in summary for n in names)


def test_a_run_under_control_scores_its_final_adapter_on_other_texts(assets, tiny_model_dir, tmp_path):
    """`<run>,control=...`: the final adapter only, in a folder of its own, scored by the hf backend (an empty
    interpretation renders) on the very judgments of the real final adapter, with its gap to it."""
    run = str(assets / "run")
    controls = [f"{run},control=empty", f"{run},control=shuffled"]
    root = sweep(assets, tiny_model_dir, tmp_path, run_dirs=[run, *controls], baselines=[])
    names = [r["simulator"] for r in json.loads((root / "summary.json").read_text())["rows"]]
    assert names == ["run__checkpoint-6", "run__final", "run__final__empty", "run__final__shuffled"]
    final = pd.read_parquet(root / "run__final" / "predictions_test.parquet")
    for control in ("empty", "shuffled"):
        record = json.loads((root / f"run__final__{control}" / "results.json").read_text())
        assert record["simulator"]["control"] == control and record["simulator"]["step"] == 12
        preds = pd.read_parquet(root / f"run__final__{control}" / "predictions_test.parquet")
        assert preds[["context_id", "latent"]].equals(final[["context_id", "latent"]])
        assert np.abs(preds["p_yes"] - final["p_yes"]).max() > 1e-4
        assert record["results"]["control_gap"]["real"] == "run__final"


def test_sweep_resumes_and_skips_finished(assets, tiny_model_dir, tmp_path, monkeypatch):
    root = sweep(assets, tiny_model_dir, tmp_path / "eval")
    before = {
        n.name: (n / "results.json").read_bytes() for n in root.iterdir() if (n / "results.json").is_file()
    }
    calls = []
    original = HFScorer.label_logits
    monkeypatch.setattr(
        HFScorer,
        "label_logits",
        lambda self, judgments, progress=None: (
            calls.append(len(judgments)) or original(self, judgments, progress)
        ),
    )
    sweep(assets, tiny_model_dir, tmp_path / "eval")
    assert calls == []  # nothing rescored
    assert before == {n: (root / n / "results.json").read_bytes() for n in before}
    # An interrupted simulator: its validation predictions exist, test and results do not.
    (root / "baseline__zero" / "results.json").unlink()
    (root / "baseline__zero" / "predictions_test.parquet").unlink()
    sweep(assets, tiny_model_dir, tmp_path / "eval")
    assert calls == [len(pd.read_parquet(assets / "eval_set" / "test.parquet"))]
    with pytest.raises(ValueError, match="another setup"):
        sweep(assets, tiny_model_dir, tmp_path / "eval", max_contexts=3)
    sweep(
        assets,
        tiny_model_dir,
        tmp_path / "eval",
        max_contexts=3,
        overwrite=True,
        run_dirs=[],
        baselines=[f"model={tiny_model_dir},name=zero"],
    )
    assert pd.read_parquet(root / "baseline__zero" / "predictions_test.parquet")["context_id"].nunique() == 3
    # Fewer calibration contexts than test ones: another spec, and only the calibration split shrinks.
    with pytest.raises(ValueError, match="calibration_contexts"):
        sweep(
            assets,
            tiny_model_dir,
            tmp_path / "eval",
            max_contexts=3,
            calibration_contexts=2,
            run_dirs=[],
            baselines=[f"model={tiny_model_dir},name=zero"],
        )
    sweep(
        assets,
        tiny_model_dir,
        tmp_path / "cal",
        max_contexts=3,
        calibration_contexts=2,
        run_dirs=[],
        baselines=["model=prior"],
    )
    prior = tmp_path / "cal" / "eval_set" / "baseline__prior"
    # A folder finished before `calibration_contexts` existed answers the default (0: as max_contexts), not 2.
    zero = root / "baseline__zero" / "spec.json"
    zero.write_text(
        json.dumps({k: v for k, v in json.loads(zero.read_text()).items() if k != "calibration_contexts"})
    )
    calls.clear()
    sweep(
        assets,
        tiny_model_dir,
        tmp_path / "eval",
        max_contexts=3,
        run_dirs=[],
        baselines=[f"model={tiny_model_dir},name=zero"],
    )
    assert calls == []
    with pytest.raises(ValueError, match="calibration_contexts"):
        sweep(
            assets,
            tiny_model_dir,
            tmp_path / "eval",
            max_contexts=3,
            calibration_contexts=2,
            run_dirs=[],
            baselines=[f"model={tiny_model_dir},name=zero"],
        )
    assert pd.read_parquet(prior / "predictions_test.parquet")["context_id"].nunique() == 3
    assert pd.read_parquet(prior / "predictions_validation.parquet")["context_id"].nunique() == 2


def test_mismatched_prompt_format_or_template_is_refused(assets, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="prompt format 'sim_v1'.*sim_value_v1"):
        sweep(assets, tiny_model_dir, tmp_path / "a", eval_set=str(assets / "eval_value"), baselines=[])
    run = tmp_path / "run"
    shutil.copytree(assets / "run", run)
    for folder in [run, *run.glob("checkpoint-*")]:
        for f in folder.glob("chat_template.jinja"):
            f.write_text(f.read_text().replace("assistant", "bot"))
    with pytest.raises(ValueError, match="chat template"):
        sweep(assets, tiny_model_dir, tmp_path / "b", run_dirs=[str(run)], baselines=[])


def test_latents_seen_in_training_are_refused(assets, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="trained on .* latents of the eval set"):
        sweep(
            assets,
            tiny_model_dir,
            tmp_path / "a",
            eval_set=str(assets / "eval_seen"),
            baselines=[],
            include_checkpoints=False,
        )
    sweep(
        assets,
        tiny_model_dir,
        tmp_path / "b",
        eval_set=str(assets / "eval_seen"),
        baselines=[],
        include_checkpoints=False,
        allow_seen_latents=True,
    )
    # The cache split again (as cache_activations.py does when its split keys change): some eval (or
    # calibration) rows trained the simulator. Never allowed. (An external interpretation set, which records
    # no rows: ours would be refused when building.)
    external = tmp_path / "external.json"
    external.write_text(json.dumps(load_interpretations(assets / "expl" / "token_list-quantiles", HOOK, 64)))
    split_file = assets / "cache" / "latents" / HOOK / "row_split.json"
    original = split_file.read_text()
    ids = json.loads(original)["row_ids"]
    swapped = {
        "train": ids["test"],
        "validation": ids["validation"],
        "test": ids["train"],
        "confirmation": [],
    }
    try:
        split_file.write_text(json.dumps({**json.loads(original), "row_ids": swapped}))
        load_script("data_gen/build_dataset.py").main(
            DatasetArguments(
                cache_dir=str(assets / "cache"),
                hookpoint=HOOK,
                simulator_tokenizer=str(tiny_model_dir),
                interpretations=[str(external)],
                window_min=4,
                window_max=6,
                contexts_per_row=2,
                validation_fraction=0.2,
                test_fraction=0.2,
                seed=4,
                split_mode="contexts",
                positives="all",
                negatives_per_context=6,
                output_dir=str(tmp_path / "eval_rows"),
            )
        )
    finally:
        split_file.write_text(original)
    with pytest.raises(
        ValueError, match="trained on .* cache rows of the eval set's (test|validation) split"
    ):
        sweep(
            assets,
            tiny_model_dir,
            tmp_path / "c",
            eval_set=str(tmp_path / "eval_rows"),
            baselines=[],
            include_checkpoints=False,
            allow_seen_latents=True,
        )


def test_value_sweep_and_report_renders_in_chromium(assets, tiny_model_dir, tmp_path):
    sweep(
        assets,
        tiny_model_dir,
        tmp_path / "eval",
        run_dirs=[],
        include_checkpoints=False,
        baselines=[f"model={tiny_model_dir},name=zero"],
    )
    root = sweep(
        assets,
        tiny_model_dir,
        tmp_path / "eval",
        eval_set=str(assets / "eval_value"),
        run_dirs=[],
        baselines=[f"model={tiny_model_dir},name=zero", f"model={tiny_model_dir},name=two,shots=2"],
    )
    two = pd.read_parquet(root / "baseline__two" / "predictions_test.parquet")
    record = json.loads((root / "baseline__zero" / "results.json").read_text())
    preds = pd.read_parquet(root / "baseline__zero" / "predictions_test.parquet")
    mean = preds[[f"p_digit_{d}" for d in range(10)]].to_numpy() @ np.arange(10)
    assert record["results"]["value"]["mean_vs_quantile_bin"]["pearson"] == pytest.approx(
        np.corrcoef(mean, preds["quantile_bin"])[0, 1]
    )
    # The solved examples reach the prompt: P(digit) moves by more than fp32 batching noise (~1e-7) allows.
    assert np.abs(two["p_digit_0"] - preds["p_digit_0"]).max() > 1e-6

    from latentsim.config import ReportArguments

    page = load_script("eval/report.py").main(ReportArguments(sweep_dir=str(tmp_path / "eval")))
    figures = sorted(p.name for p in (page.parent / "figures").glob("*.png"))
    assert "eval_set_threshold_sweep.png" in figures and "eval_value_value_vs_activation.png" in figures
    text = page.read_text()
    assert text.count("<table>") == 2 and text.count("data:image/png;base64,") == len(figures)
    summary = json.loads((tmp_path / "eval" / "eval_set" / "summary.json").read_text())
    auc = next(r for r in summary["rows"] if r["simulator"] == "baseline__zero")["auc"]
    markdown = (page.parent / "report.md").read_text()  # the headline tables, for a README to quote
    assert "## eval_set (" in markdown and "## eval_value (" in markdown
    assert f"| baseline__zero | {auc:.3f} [" in markdown
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (./launch.sh test installs it)")
    dom = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert f'data-images-rendered="{len(figures)}"' in dom and 'data-tables="2"' in dom
    assert "baseline__zero" in dom


def test_hub_branches_are_swept(assets, tiny_model_dir, tmp_path):
    """`hub_runs`: main and every step-N branch of a published adapter repo (fake Hub API, no network)."""
    import types

    class FakeApi:
        def list_repo_refs(self, repo_id):
            names = ["main", "step-000000006", "other"]
            return types.SimpleNamespace(branches=[types.SimpleNamespace(name=n) for n in names])

        def snapshot_download(self, repo_id, revision, local_dir):
            source = assets / "run" if revision == "main" else assets / "run" / "checkpoint-6"
            Path(local_dir).mkdir(parents=True)
            for f in source.iterdir():
                if f.is_file():
                    shutil.copy2(f, local_dir)
            shutil.copy2(
                assets / "run" / "run_config.json", local_dir
            )  # publish.py stages the run-level files

    out = tmp_path / "eval"
    load_script("eval/sweep.py").main(
        EvalArguments(
            eval_set=str(assets / "eval_set"), hub_runs=["me/sim"], output_dir=str(out), batch_size=8
        ),
        api=FakeApi(),
    )
    root = out / "eval_set"
    names = [r["simulator"] for r in json.loads((root / "summary.json").read_text())["rows"]]
    assert names == ["me--sim@step-000000006", "me--sim@main"]
    local = sweep(assets, tiny_model_dir, tmp_path / "local", baselines=[])
    for hub_name, local_name in (
        ("me--sim@main", "run__final"),
        ("me--sim@step-000000006", "run__checkpoint-6"),
    ):
        a = pd.read_parquet(root / hub_name / "predictions_test.parquet")
        b = pd.read_parquet(local / local_name / "predictions_test.parquet")
        assert np.abs(a["p_yes"] - b["p_yes"]).max() < 1e-6


def test_few_shot_examples_are_solved_correctly(assets):
    from latentsim.eval_set import EvalSet
    from latentsim.simulators import few_shot_messages

    for eval_set, fmt in (("eval_set", "sim_v1"), ("eval_value", "sim_value_v1")):
        train = pd.read_parquet(assets / eval_set / "train.parquet")
        opened = EvalSet.open(assets / eval_set)
        assert (opened.prompt_format, opened.label) == (fmt, "active" if fmt == "sim_v1" else "quantile_bin")
        messages = few_shot_messages(opened, 4, 0, None, False)
        assert [m["role"] for m in messages] == ["user", "assistant"] * 4
        for user, answer in zip(messages[::2], messages[1::2], strict=True):
            row = train[train["prompt"].apply(lambda p, u=user: p[0]["content"] == u["content"])].iloc[0]
            assert answer["content"] == row["completion"][0]["content"]
        if fmt == "sim_v1":  # half of them positive
            assert sorted(m["content"] for m in messages[1::2]) == ["No", "No", "Yes", "Yes"]


def test_patch_kl_ceiling_checks_and_simulators(assets, tiny_model_dir, tmp_path):
    """Simulated latents patched into the subject model: SAE + error gives KL 0, f = 1 equals the SAE, a
    perfect simulator with oracle values equals the SAE, and a simulator's false positives are inserted."""
    from latentsim.config import PatchArguments
    from latentsim.eval_set import EvalSet

    test = EvalSet.open(assets / "eval_set").split("test")
    keep = sorted(test["context_id"].unique())[:4]
    test = test[test["context_id"].isin(keep)]
    sweep_root = tmp_path / "eval" / "eval_set"
    for name, p_yes in (("perfect", test["active"].astype(float)), ("contrarian", 1.0 - test["active"])):
        (sweep_root / name).mkdir(parents=True)
        test.assign(p_yes=p_yes.to_numpy())[["context_id", "latent", "active", "p_yes"]].to_parquet(
            sweep_root / name / "predictions_test.parquet"
        )
        (sweep_root / name / "results.json").write_text(json.dumps({"results": {}}))
    result = load_script("eval/patch_kl.py").main(
        PatchArguments(
            eval_set=str(assets / "eval_set"),
            sweep_dir=str(tmp_path / "eval"),
            thresholds=["0.5"],
            values=["oracle", "median", "predicted"],
            value_simulator=str(tiny_model_dir),
            fractions=[0.0, 0.5, 1.0],
            mean_contexts=4,
            seed=0,
        )
    )
    per = pd.read_parquet(sweep_root / "patch_kl" / "per_context.parquet").set_index(["context_id", "source"])
    assert result["n_contexts"] == 4 and result["kl_direction"].startswith("KL(p_clean || p_patched)")
    sae = per.xs("sae", level="source")
    assert (sae["kl_judged"] > 1e-6).all()  # the tiny SAE is lossy: the checks below can fail
    assert (per.xs("sae_plus_error", level="source")[["kl_judged", "kl_all"]].abs() < 1e-6).all().all()
    for column in ("kl_judged", "kl_all", "ce_judged"):  # ce_judged: NaN at a row's last position (no next)
        top1 = per.xs("fraction:top:1", level="source")[column]
        assert np.allclose(top1, sae[column], atol=1e-6, equal_nan=True)
        # no_latents (b_dec) is the f = 0 point: the floor, far below the SAE
        assert np.allclose(
            per.xs("fraction:top:0", level="source")[column],
            per.xs("no_latents", level="source")[column],
            atol=1e-6,
            equal_nan=True,
        )
    assert (per.xs("no_latents", level="source")["kl_all"] > sae["kl_all"]).all()
    assert np.allclose(
        per.xs("sim:perfect@0.5:oracle", level="source")["kl_judged"], sae["kl_judged"], atol=1e-6
    )
    contrarian = result["sources"]["sim:contrarian@0.5:oracle"]["inserted"]
    n_neg = (test["active"] == 0).sum() / 4
    assert contrarian["false_positives"] == pytest.approx(n_neg) and contrarian["true_positives"] == 0
    assert not np.allclose(
        per.xs("sim:contrarian@0.5:oracle", level="source")["kl_judged"],
        per.xs("no_simulator", level="source")["kl_judged"],
    )
    # Predicted values (an untuned value simulator's digits through the deciles) differ from the oracle's.
    predicted = per.xs("sim:perfect@0.5:predicted", level="source")["kl_judged"]
    # (the tiny model barely reacts to a value: equal values give bit-equal KL, any change does not)
    assert np.isfinite(predicted).all() and (predicted != sae["kl_judged"]).any()
    # Clean CE is the model's own next-token loss at the judged position.
    assert (per.xs("clean", level="source")["kl_judged"] == 0).all()


def test_closed_loop_generation_and_its_page(assets, tiny_model_dir, tmp_path):
    from latentsim.config import GenerateArguments

    out = tmp_path / "generate"
    result = load_script("eval/generate.py").main(
        GenerateArguments(
            eval_set=str(assets / "eval_set"),
            prompts=["the cat sat on", "one two"],
            max_new_tokens=5,
            sources=["clean", "sae", "fraction:top:1", "fraction:random:0.5", "simulator"],
            simulator_model=str(tiny_model_dir),
            n_inactive=4,
            window=6,
            output_dir=str(out),
        )
    )
    by = {(g["prompt"], g["source"].split(" (")[0]): g for g in result["generations"]}
    for prompt in ("the cat sat on", "one two"):
        assert by[(prompt, "clean")]["kl"] == [0.0] * 5 and by[(prompt, "clean")]["recovered"] == 1.0
        sae, top1 = by[(prompt, "sae")], by[(prompt, "fraction:top:1")]
        assert sae["token_ids"] == top1["token_ids"] and np.allclose(sae["kl"], top1["kl"], atol=1e-6)
        assert max(sae["kl"]) > 1e-6  # the lossy tiny SAE moves the distribution: the checks can fail
        assert 0 < by[(prompt, "fraction:random:0.5")]["recovered"] < 1
        sim = by[(prompt, "simulator")]
        assert len(sim["tokens"]) == 5 and 0 <= sim["recovered"] <= 1
    page = out / "generation.html"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (./launch.sh test installs it)")
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count('class="generation"') == 2 and dom.count('class="tok"') == 2 * 5 * 5


def test_generation_simulator_judges_held_out_latents_only(assets, tiny_model_dir):
    import torch

    from latentsim.config import GenerateArguments
    from latentsim.generation import SimulatorSource
    from latentsim.models import load_tokenizer

    interpretations = load_interpretations(assets / "expl" / "token_list-quantiles", HOOK, 64)
    trained = set(pd.read_parquet(assets / "mix" / "train.parquet")["latent"])
    args = dict(eval_set=str(assets / "eval_set"), simulator_run=str(assets / "run"), n_inactive=4, window=6)
    source = SimulatorSource(
        GenerateArguments(**args), interpretations, torch.ones(64), load_tokenizer(str(tiny_model_dir))
    )
    assert set(source.interpretations) == set(interpretations) - trained and source.seen_latents_kept == len(
        trained
    )
    z = torch.zeros(64)
    z[sorted(trained)[0]] = 2.0  # a training latent, active: the simulator never rewrites it
    out, _ = source(z, [1, 5, 6, 7])
    assert out[sorted(trained)[0]] == 2.0
    everything = SimulatorSource(
        GenerateArguments(**args, allow_seen_latents=True),
        interpretations,
        torch.ones(64),
        load_tokenizer(str(tiny_model_dir)),
    )
    assert set(everything.interpretations) == set(interpretations)


def test_patched_positions_are_the_judged_tokens(assets):
    """The position patch_kl rewrites is the cache token each simulator judged: the last of the eval row's
    context ids (subject tokenizer) and the token marked in its prompt, whatever the simulator's tokenizer."""
    from latentsim.eval_set import EvalSet, context_row_position
    from latentsim.prompts import INTERPRETATION_MARK, MARK_CLOSE, MARK_OPEN, TEXT_MARK

    eval_set = EvalSet.open(assets / "eval_set")
    cache = eval_set.cache
    assert (
        eval_set.layer == int(HOOK.split(".")[-1])
        and eval_set.subject_model == cache.config["latentsim"]["model"]["model"]
    )
    subject = cache.subject_tokenizer()
    test = eval_set.split("test")
    for r in test.itertuples(index=False):
        row, pos = context_row_position(r.context_id)
        assert (row, pos) == (r.row, r.position)
        assert int(cache.tokens[row, pos]) == int(r.context_ids[-1])
        text = r.prompt[0]["content"].split(TEXT_MARK)[1].split(INTERPRETATION_MARK)[0]
        assert text.endswith(MARK_OPEN + subject.decode([int(cache.tokens[row, pos])]) + MARK_CLOSE)
