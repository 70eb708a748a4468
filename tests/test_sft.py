"""Simulator finetuning on tiny assets: learning, label masking, truncation, resume, NaN guard, saved
adapters."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script, run_accelerate, sft_args

from latentsim.metrics import reliability, roc_auc
from latentsim.prompts import render_prompt, unmark_context
from latentsim.training import (
    NonFiniteGuard,
    answer_metrics,
    answer_probabilities,
    check_adapter,
    check_prompt_format,
    dataset_judgments,
    fit_contexts,
    load_sim_dataset,
    resolve_resume,
)

HOOK = "layers.1"


def losses(out: Path) -> list[float]:
    state = json.loads(
        sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
        .joinpath("trainer_state.json")
        .read_text()
    )
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_training_learns_saves_a_clean_adapter_and_matches_eval(dataset_dir, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    base_before = {
        k: v.clone()
        for k, v in AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict().items()
    }
    load_script("train/sft.py").main(
        *sft_args(dataset_dir, tiny_model_dir, out, training={"eval_strategy": "steps", "eval_steps": 6})
    )
    curve = losses(out)
    assert np.mean(curve[-3:]) < np.mean(curve[:3])  # it learns (the label prior at least)
    summary = check_adapter(out)
    assert summary["r"] == 4 and summary["n_tensors"] > 0
    results = json.loads((out / "eval_results.json").read_text())
    assert results["adapter"]["reload_max_abs_diff_p_yes"] < 1e-5
    assert {
        f"eval_{k}" for k in ("recall", "precision", "f1", "auc", "ece", "mean_p_yes", "accuracy")
    } <= set(results["metrics"])  # NaN where undefined (precision with no predicted positive) reads back too
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: peft" in card

    # The adapter loads with plain PEFT on the untouched base model and gives the P(yes) the training eval
    # saw.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert all(torch.equal(base.state_dict()[k], v) for k, v in base_before.items())
    model = PeftModel.from_pretrained(base, str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    val = load_sim_dataset(str(dataset_dir))["validation"].select(range(32))
    yes_no = [tok.convert_tokens_to_ids("No"), tok.convert_tokens_to_ids("Yes")]
    probs = answer_probabilities(model, tok, dataset_judgments(val), yes_no)
    metrics = answer_metrics(probs[:, 1], np.asarray(val["active"]))
    assert metrics["mean_p_yes"] == pytest.approx(results["metrics"]["eval_mean_p_yes"], abs=1e-5)
    assert metrics["auc"] == pytest.approx(results["metrics"]["eval_auc"], abs=1e-6)

    # A rerun of the finished run is skipped: no step past max_steps, no new checkpoint, the results
    # untouched.
    before = (out / "eval_results.json").read_bytes()
    load_script("train/sft.py").main(*sft_args(dataset_dir, tiny_model_dir, out))
    assert (out / "eval_results.json").read_bytes() == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-6"]


def test_only_the_answer_and_end_of_turn_are_supervised(dataset_dir, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    ds = load_sim_dataset(str(dataset_dir))["train"].select(range(16))
    _, training, _ = sft_args(dataset_dir, tiny_model_dir, tmp_path)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=training, train_dataset=ds, processing_class=tok)
    for ex, row in zip(trainer.train_dataset, ds, strict=True):
        supervised = [t for t, label in zip(ex["input_ids"], ex["labels"], strict=True) if label != -100]
        assert tok.convert_ids_to_tokens(supervised) == [row["completion"][0]["content"], "<eos>"]


def test_long_examples_lose_context_never_labels(dataset_dir, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    split = load_sim_dataset(str(dataset_dir))["train"].select(range(40))

    def length(messages):
        ids = tok.apply_chat_template(messages, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    lengths = [length(p + c) for p, c in zip(split["prompt"], split["completion"], strict=True)]
    limit = max(lengths) - 2  # the longest examples must drop two context tokens
    fitted, n = fit_contexts(split, tok, limit)
    assert n == sum(n_tok > limit for n_tok in lengths) > 0
    for before, after in zip(split, fitted, strict=True):
        assert length(after["prompt"] + after["completion"]) <= limit
        assert after["completion"] == before["completion"]
        prefix_old, judged_old = unmark_context(before["context"])
        prefix_new, judged_new = unmark_context(after["context"])
        assert judged_new == judged_old  # the judged token, question and interpretation untouched:
        assert after["prompt"] == render_prompt(
            "sim_v1", after["context"], before["interpretation"], before["score"]
        )
        kept = prefix_new.split()
        assert not kept or prefix_old.split()[-len(kept) :] == kept  # only the start of the context is cut
    with pytest.raises(ValueError, match="even without context"):
        fit_contexts(split, tok, 10)


def test_resume_reproduces_the_uninterrupted_loss_curve(dataset_dir, tiny_model_dir, tmp_path, monkeypatch):
    main = load_script("train/sft.py").main
    main(*sft_args(dataset_dir, tiny_model_dir, tmp_path / "full"))

    def stop_at_step_6(
        self, args, state, control, **kwargs
    ):  # the same run, killed right after its step-6 checkpoint
        control.should_training_stop = state.global_step == 6

    with monkeypatch.context() as patch:
        patch.setattr(NonFiniteGuard, "on_step_end", stop_at_step_6)
        main(*sft_args(dataset_dir, tiny_model_dir, tmp_path / "split"))
    assert len(losses(tmp_path / "split")) == 6
    (tmp_path / "split" / "checkpoint-7").mkdir()  # an incomplete checkpoint from a crash: skipped
    main(*sft_args(dataset_dir, tiny_model_dir, tmp_path / "split"))  # resume: auto
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "full"), abs=1e-6)


def test_resume_paths(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10").mkdir()  # incomplete
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert resolve_resume("never", str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-10"), str(tmp_path))


def test_non_finite_guard():
    guard = NonFiniteGuard(patience=1)
    state = type("S", (), {"global_step": 3})()
    guard.on_log(None, state, None, logs={"loss": float("nan")})  # tolerated once
    with pytest.raises(FloatingPointError, match="non-finite"):
        guard.on_log(None, state, None, logs={"grad_norm": float("inf")})
    guard = NonFiniteGuard(patience=1)
    guard.on_log(None, state, None, logs={"loss": float("nan")})
    guard.on_log(None, state, None, logs={"loss": 0.5})  # a finite value resets the count
    guard.on_log(None, state, None, logs={"loss": float("nan")})


def test_adapter_checks(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2}))
    cases = [
        ({"a.lora_A.weight": torch.tensor([1.0, float("nan")])}, "NaN"),
        ({"a.lora_A.weight": torch.zeros(0)}, "empty"),
        ({"lm_head.weight": torch.ones(2)}, "non-LoRA"),
        ({}, "holds no tensors"),
    ]
    for tensors, message in cases:
        save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=message):
            check_adapter(tmp_path)


def test_prompt_format_mismatch_is_refused(dataset_dir):
    with pytest.raises(ValueError, match="rendered with \\['sim_v1'\\]"):
        check_prompt_format(load_sim_dataset(str(dataset_dir)), "sim_value_v1")


def test_metrics_by_hand():
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.1])
    y = np.array([1, 1, 1, 0, 0])
    m = answer_metrics(p, y)
    assert m["recall"] == pytest.approx(2 / 3) and m["precision"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["mean_p_yes"] == pytest.approx(0.54)
    assert m["auc"] == pytest.approx(5 / 6)
    assert answer_metrics(np.array([0.5]), np.array([1]))["recall"] == 1.0  # p >= threshold counts as yes
    nothing_flagged = answer_metrics(np.array([0.2, 0.1]), np.array([1, 0]))
    assert np.isnan(nothing_flagged["precision"]) and nothing_flagged["recall"] == 0.0  # NaN where undefined
    assert roc_auc(p, y) == pytest.approx(
        5 / 6
    )  # pairs (pos > neg): 0.9 and 0.8 beat both; 0.3 beats 0.1 only
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert reliability(np.array([0.95, 0.95]), np.array([1, 1]))["ece"] == pytest.approx(0.05)


def test_accelerate_launch_ddp_on_two_cpu_processes(dataset_dir, tiny_model_dir, tmp_path):
    state = run_accelerate("configs/accelerate/multi_cpu.yaml", dataset_dir, tiny_model_dir, tmp_path / "ddp")
    n_train = len(load_sim_dataset(str(dataset_dir))["train"])
    first = next(e for e in state["log_history"] if "loss" in e)
    assert first["epoch"] == pytest.approx(2 * 4 / n_train)  # two processes x 4 rows per step
    assert check_adapter(tmp_path / "ddp")["n_tensors"] > 0


def test_deepspeed_zero2_on_cpu_saves_a_non_empty_adapter(dataset_dir, tiny_model_dir, tmp_path):
    pytest.importorskip("deepspeed")
    state = run_accelerate(
        "configs/accelerate/deepspeed_zero2_cpu.yaml",
        dataset_dir,
        tiny_model_dir,
        tmp_path / "z2",
        extra=("--ddp_backend", "gloo"),
    )
    assert (tmp_path / "z2" / "checkpoint-4" / "global_step4").is_dir()  # a DeepSpeed checkpoint
    assert state["global_step"] == 4
    summary = check_adapter(tmp_path / "z2")  # ZeRO must not leave empty or non-finite LoRA tensors
    assert summary["n_parameters"] > 0


def test_deepspeed_zero3_on_cpu_checks_the_reload_on_every_rank(dataset_dir, tiny_model_dir, tmp_path):
    """Defect: the reload check ran the trained model's forward on rank 0 alone, which hangs under ZeRO-3
    (each layer's forward gathers its shards from every rank). Two ZeRO-3 processes must finish, with the
    check done, checkpointing reentrant."""
    pytest.importorskip("deepspeed")
    run_accelerate(
        "configs/accelerate/deepspeed_zero3_cpu.yaml",
        dataset_dir,
        tiny_model_dir,
        tmp_path / "z3",
        extra=("--ddp_backend", "gloo", "--activation_checkpointing", "true"),
    )
    results = json.loads((tmp_path / "z3" / "eval_results.json").read_text())
    adapter = results["adapter"]
    assert adapter["reload_max_abs_diff_p_yes"] <= adapter["reload_bound_max_p_yes"] < 1e-4  # fp32's bound
    assert adapter["reload_mean_abs_diff_p_yes"] <= adapter["reload_bound_mean_p_yes"]
    # PEFT + ZeRO-3 + checkpointing: reentrant where the Trainer reads it (TRL issue 2514).
    assert "activation checkpointing: {'use_reentrant': True}" in (tmp_path / "z3.stderr.txt").read_text()
    assert check_adapter(tmp_path / "z3")["n_parameters"] > 0


def test_reload_keeps_the_adapter_dtype_it_trained_in(tiny_model_dir, tmp_path):
    """DeepSpeed's bf16 trains the LoRA weights in bf16; PEFT reloads them in fp32 unless told otherwise: the
    reload check must rebuild the model that trained, bf16 LoRA on a bf16 base."""
    import types

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from latentsim.training import reload_adapter, trained_dtypes

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert trained_dtypes(model) == (torch.bfloat16, torch.float32)  # PEFT's own upcast
    model = model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine holds it
    assert trained_dtypes(model) == (torch.bfloat16, torch.bfloat16)
    model.save_pretrained(str(tmp_path / "adapter"))
    trainer = types.SimpleNamespace(
        args=types.SimpleNamespace(output_dir=str(tmp_path / "adapter"), device="cpu")
    )
    reloaded = reload_adapter(trainer, str(tiny_model_dir), torch.bfloat16, torch.bfloat16)
    assert trained_dtypes(reloaded) == (torch.bfloat16, torch.bfloat16)
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16),
        str(tmp_path / "adapter"),
    )
    assert trained_dtypes(plain) == (torch.bfloat16, torch.float32)  # what the check would have compared
    saved = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    again = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_peft_zero3_checkpointing_reaches_the_model_reentrant(
    dataset_dir, tiny_model_dir, tmp_path, monkeypatch
):
    """TRL forces use_reentrant=True for PEFT + ZeRO-3 into the deprecated gradient_checkpointing_kwargs,
    after the Trainer resolved activation_checkpointing_kwargs from it (transformers >= 5.23): the model would
    checkpoint non-reentrant. The setting must reach the model's checkpointing function; ZeRO-3 is faked
    where the run reads it (its DeepSpeed engine needs a launch: the ZeRO-3 run below checks the real one)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from latentsim.errors import ConfigError
    from latentsim.prompts import answer_token_ids
    from latentsim.training import SimulatorTrainer, checkpointing_keywords, load_sim_dataset

    script, training, model_args = sft_args(
        dataset_dir, tiny_model_dir, tmp_path, training={"activation_checkpointing": True}
    )
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    data = load_sim_dataset(str(dataset_dir))

    def trained(args):
        """The model after one training step (the Trainer turns checkpointing on inside train())."""
        trainer = SimulatorTrainer(
            model=AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
            args=args,
            train_dataset=data["train"],
            processing_class=tok,
            peft_config=get_peft_config(model_args),
            answer_ids=answer_token_ids("sim_v1", tok),
            binary=True,
        )
        trainer.train()
        return trainer.model

    training.max_steps, training.save_strategy = 1, "no"
    assert checkpointing_keywords(trained(copy.deepcopy(training))) == {"use_reentrant": False}  # default
    monkeypatch.setattr("latentsim.training.zero_stage", lambda args: 3)
    assert checkpointing_keywords(trained(copy.deepcopy(training))) == {"use_reentrant": True}
    training.activation_checkpointing_kwargs = {"use_reentrant": False}
    with pytest.raises(ConfigError, match="use_reentrant"):
        trained(training)


def test_training_sets_mix_by_weight(dataset_dir):
    from latentsim.training import mix_train_sets

    a = load_sim_dataset(str(dataset_dir))["train"]
    b = a.select(range(200))
    mixed = mix_train_sets([a, b], [3.0, 1.0], seed=0)
    share = sum(i == 0 for i in mixed["dataset_index"]) / len(mixed)
    assert 0.68 < share < 0.82 and len(mixed) > 200
    assert mix_train_sets([a], [], seed=0) is a
