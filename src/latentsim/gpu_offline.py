"""The offline GPU check (`bench/gpu_check.sh --offline BUNDLE`, bench/gpu_offline.py): steps that need
nothing but the GPU image and the bundle (latentsim.gpu_bundle), each a subprocess with a timeout, its whole
output kept in `logs/<step>.log`, its numbers in `steps/<step>.json`, and `results.json` rewritten after every
step, so that a hang or a lost machine still leaves what was measured.

Steps (`plan`): `env` (versions, the GPU, offline mode); correctness on whatever device there is
(`dense_exact`: dense and prefix-shared scoring equal to the naive forward in fp32; `bf16_parity`: bf16
against fp32 P(yes); `reload_parity`: train/sft.py on the bundled data, its saved adapter reloaded); speed at
Llama-3.1-8B's exact shape on CUDA, or at a tiny shape on CPU (`sft_speed_*`: bf16 LoRA steps, tokens/s, peak
memory, MFU; `scoring_speed_*`: whole-layer judging against the per-judgment paths); `zero3` and `vllm` where
installed. Everything runs in the repository's root (configs/, train/sft.py), where bench/gpu_offline.py
changes to.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from latentsim.io import atomic_write_json

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of the device name; MFU is quoted
# against the one used, which results.json records.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}
# Llama-3.1-8B's shape (no weights: a random model is built from it on the device).
LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
)
SFT_RECIPE = "configs/sft/llama-3.1-8b_quantiles_top5.yaml"  # batch, length, LoRA and checkpointing of (a)
TRAIN_RECIPE = "configs/sft/smollm2-135m_dense_quickstart.yaml"  # shrunk for the reload check


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    timeout_s: int = 180
    only: str | None = None  # "cuda": skipped without a GPU; "cpu": the tiny rehearsal of a CUDA step
    needs: tuple[str, ...] = ()  # importable modules; without one the step is "not run (not installed)"


def plan() -> list[Step]:
    return [
        Step("env", "versions, the GPU, offline mode, the bf16 peak used for MFU", 90),
        Step("dense_exact", "dense and prefix-shared scoring = the naive forward (fp32, 1e-4)", 240),
        Step(
            "bf16_parity", "bf16 against fp32 P(yes) of a small random model, within the dtype's bound", 240
        ),
        Step(
            "reload_parity", "train/sft.py on the bundled data; its adapter reloaded reproduces P(yes)", 360
        ),
        Step("sft_speed_8b", "bf16 LoRA SFT steps at Llama-3.1-8B's shape", 300, only="cuda"),
        Step("sft_speed_tiny", "the same code at a tiny shape (CPU rehearsal)", 240, only="cpu"),
        Step("scoring_speed_8b", "whole-layer judging vs the per-judgment paths at 8B's shape", 300, "cuda"),
        Step("scoring_speed_tiny", "the same code at a tiny shape (CPU rehearsal)", 240, only="cpu"),
        Step("zero3", "train/sft.py under DeepSpeed ZeRO-3, adapter reload", 360, "cuda", ("deepspeed",)),
        Step("vllm", "P(yes) of vLLM against hf on the eval set's judgments", 360, "cuda", ("vllm",)),
    ]


def why_not_run(step: Step, cuda: bool) -> tuple[str, str] | None:
    """(status, reason) when a step is not to run here; None when it runs."""
    if step.only == "cuda" and not cuda:
        return "skipped", "needs CUDA"
    if step.only == "cpu" and cuda:
        return "skipped", "CPU rehearsal only: the 8B-shape step runs on CUDA"
    missing = [m for m in step.needs if importlib.util.find_spec(m) is None]
    if missing:
        return "not run", f"not installed ({', '.join(missing)})"
    return None


def run_logged(
    argv: list[str], log: Path, timeout_s: float, env: dict | None = None
) -> tuple[int | None, float]:
    """Run argv in its own process group, stdout and stderr into `log`; (exit status or None on timeout,
    seconds). A timed-out run is killed with every process it started."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    return rc, round(time.perf_counter() - start, 1)


def run_steps(
    steps: list[Step],
    out: Path,
    argv_of: Callable[[Step], list[str]],
    budget_s: float,
    header: dict | None = None,
    min_step_s: float = 30.0,
) -> dict:
    """Run each step as a subprocess (argv_of(step)) under its timeout and the overall budget; results.json
    rewritten after every step. A step passes when it exits 0 and its steps/<name>.json says ok; one that
    would get under `min_step_s` of the budget is not run. The `env` step, when first, decides whether CUDA is
    there for the rest."""
    out.mkdir(parents=True, exist_ok=True)
    deadline, t0 = time.monotonic() + budget_s, time.perf_counter()
    record = {"kind": "gpu_offline", **(header or {}), "budget_s": budget_s, "finished": False, "steps": []}
    cuda = False
    for step in steps:
        entry = {"step": step.name, "what": step.what}
        not_run = why_not_run(step, cuda)
        left = deadline - time.monotonic()
        if not_run is None and left < min(min_step_s, step.timeout_s):
            not_run = ("not run", f"the {budget_s:.0f} s budget was spent")
        if not_run is not None:
            entry.update(status=not_run[0], reason=not_run[1])
        else:
            timeout = min(step.timeout_s, left)
            result_path = out / "steps" / f"{step.name}.json"
            result_path.unlink(missing_ok=True)
            # recorded as running first: a machine lost mid-step still says which step it was in
            atomic_write_json(
                out / "results.json", {**record, "steps": [*record["steps"], {**entry, "status": "running"}]}
            )
            rc, seconds = run_logged(argv_of(step), out / "logs" / f"{step.name}.log", timeout)
            result = json.loads(result_path.read_text()) if result_path.is_file() else None
            ok = rc == 0 and bool(result and result.get("ok"))
            status = "timeout" if rc is None else "passed" if ok else "failed"
            entry.update(status=status, rc=rc, seconds=seconds, timeout_s=round(timeout), result=result)
            entry["log"] = f"logs/{step.name}.log"
            if step.name == "env" and result:
                cuda = bool(result.get("cuda"))
                record["device"] = result.get("device")
        record["steps"].append(entry)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        record["passed"] = all(s["status"] not in ("failed", "timeout") for s in record["steps"])
        atomic_write_json(out / "results.json", record)
    record["finished"] = True
    atomic_write_json(out / "results.json", record)
    return record


# ---- the steps (each runs in its own process: bench/gpu_offline.py --step NAME) ----


def device_of():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_peak(name: str, override: float = 0.0) -> tuple[float | None, str]:
    if override:
        return override, "given (--bf16_peak_tflops)"
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return tflops, f"{key} dense bf16 spec"
    return None, f"unknown for {name!r}: pass --bf16_peak_tflops"


def step_env(bundle: Path, out: Path, peak_override: float = 0.0) -> dict:
    from importlib import metadata

    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
    peak, source = bf16_peak(name, peak_override) if cuda else (None, "no GPU")
    versions = {}
    for pkg in (
        "torch",
        "transformers",
        "accelerate",
        "peft",
        "trl",
        "datasets",
        "tokenizers",
        "safetensors",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    recipe_fields = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    return {
        "ok": offline and recipe_fields and all(versions[p] for p in ("trl", "datasets", "peft")),
        "cuda": cuda,
        "device": {
            "name": name,
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            if cuda
            else None,
            "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
            "cuda_runtime": torch.version.cuda,
            "bf16_peak_tflops": peak,
            "bf16_peak_source": source,
        },
        "python": platform.python_version(),
        "versions": versions,
        "hf_hub_offline": offline,
        "recipes_parse": recipe_fields,
        "bundle": json.loads((bundle / "bundle.json").read_text())["requirements"],
    }


def load_tokenizer(bundle: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))


def random_model(shape: dict, tokenizer, device, dtype, seed: int = 0):
    """A randomly initialised Llama of `shape`, built on `device` (no weights read)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = {"vocab_size": len(tokenizer), **shape}
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def bundle_judgments(bundle: Path, n: int):
    """The first `n` judgments of the bundled eval set (sim_v1)."""
    import pandas as pd

    from latentsim.simulators import judgments_of

    df = pd.read_parquet(bundle / "datasets" / "eval" / "test.parquet")
    return judgments_of(df.head(n))[0]


def bundle_interpretations(bundle: Path, n: int) -> list[str]:
    import pandas as pd

    found = []
    for path in sorted((bundle / "datasets").glob("*/*.parquet")):
        found += pd.read_parquet(path, columns=["interpretation"])["interpretation"].tolist()
    unique = list(dict.fromkeys(found))
    if len(unique) < n:
        raise ValueError(f"the bundle has {len(unique)} interpretations, {n} asked for")
    return unique[:n]


def text_and_ends(tokenizer, n_tokens: int, seed: int = 0) -> tuple[str, list[int]]:
    """A text of `n_tokens` bundled words and each token's character end."""
    import random

    from latentsim.gpu_bundle import WORDS

    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(n_tokens))
    ends = [
        end
        for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ]
    return text, ends


def step_dense_exact(bundle: Path, out: Path) -> dict:
    """fp32: DenseScorer.text_logits against one full forward per (interpretation, text); the prefix-shared
    sim_v1 scorer against one full prompt per judgment."""
    import numpy as np
    import torch

    from latentsim.prompts import answer_token_ids
    from latentsim.simulators import scorer_for_model
    from latentsim.simulators.hf import naive_dense_logits, naive_label_logits

    tokenizer, device = load_tokenizer(bundle), device_of()
    model = random_model(TINY, tokenizer, device, torch.float32)
    dense_ids = answer_token_ids("sim_dense_v1", tokenizer)
    interpretations = bundle_interpretations(bundle, 12)
    texts = [text_and_ends(tokenizer, 24, seed) for seed in range(3)]
    dense = scorer_for_model(model, tokenizer, "sim_dense_v1", dense_ids, 8).text_logits(
        interpretations, texts
    )
    dense_diff = 0.0
    for t, (text, ends) in enumerate(texts):
        for i, interp in enumerate(interpretations):
            naive = naive_dense_logits(model, tokenizer, "sim_dense_v1", interp, text, ends, dense_ids)
            aligned = ~np.isnan(naive[:, 0])
            dense_diff = max(dense_diff, float(np.abs(dense[t][i][aligned] - naive[aligned]).max()))
    sim_ids = answer_token_ids("sim_v1", tokenizer)
    judgments = bundle_judgments(bundle, 64)
    scorer = scorer_for_model(model, tokenizer, "sim_v1", sim_ids, 16)
    shared = scorer.label_logits(judgments)
    naive = naive_label_logits(model, tokenizer, [scorer.prompt(j) for j in judgments], sim_ids, 16)
    prefix_diff = float(np.abs(shared - naive).max())
    return {
        "ok": dense_diff < 1e-4 and prefix_diff < 1e-4,
        "device": str(device),
        "tolerance": 1e-4,
        "dense_text_logits_max_abs_diff": dense_diff,
        "dense_judged": len(interpretations) * sum(len(e) for _, e in texts),
        "prefix_shared_max_abs_diff": prefix_diff,
        "prefix_shared_judgments": len(judgments),
    }


def scored_with_bound(scorers: dict, judgments, dtype, rounded_logits: bool = False) -> dict:
    """P(yes) of each scorer on the judgments, |ΔP(yes)| of the second against the first (its reference), and
    latentsim.parity's bound for `dtype` from the reference's rounding sensitivity: mean and max checked.
    `rounded_logits`: the second rounds its answer logits to `dtype` (vLLM's lm_head output)."""
    import numpy as np

    from latentsim.parity import forward_roundings, layer_count, p_yes_bound
    from latentsim.simulators import probabilities

    logits = {name: scorer.label_logits(judgments) for name, scorer in scorers.items()}
    p = {name: probabilities(value)[:, 1] for name, value in logits.items()}
    reference, other = scorers
    scorer = scorers[reference]
    magnitude = np.abs(logits[reference]).sum(axis=1) if rounded_logits else None
    bound = p_yes_bound(dtype, scorer.sensitivity, forward_roundings(layer_count(scorer.model)), magnitude)
    found = bound.check(p[other] - p[reference])
    return {
        **found,
        "bound": bound.max,
        "p_yes_range": [float(np.min(p[reference])), float(np.max(p[reference]))],
    }


def step_bf16_parity(bundle: Path, out: Path) -> dict:
    import copy

    import torch

    from latentsim.prompts import answer_token_ids
    from latentsim.simulators import scorer_for_model

    tokenizer, device = load_tokenizer(bundle), device_of()
    fp32 = random_model(TINY, tokenizer, device, torch.float32)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    ids, judgments = answer_token_ids("sim_v1", tokenizer), bundle_judgments(bundle, 256)
    scorers = {
        name: scorer_for_model(m, tokenizer, "sim_v1", ids, 32)
        for name, m in (("fp32", fp32), ("bf16", bf16))
    }
    found = scored_with_bound(scorers, judgments, torch.bfloat16)
    return {**found, "device": str(device), "judgments": len(judgments)}


def saved_tiny_model(bundle: Path, out: Path) -> Path:
    """The small random model (fp32 safetensors) with the bundle's tokenizer, saved once per output folder."""
    import torch

    folder = out / "work" / "tiny_model"
    if not (folder / "config.json").is_file():
        tokenizer = load_tokenizer(bundle)
        random_model(TINY, tokenizer, "cpu", torch.float32).save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))
    return folder


def train_tiny(bundle: Path, out: Path, name: str, accelerate_config: str, extra: list[str]) -> dict:
    """train/sft.py (the dense quickstart recipe, shrunk) on the bundle's training mixture and the small
    random model; its eval_results.json's adapter record, the reload difference checked against its bound."""
    import torch

    cuda = torch.cuda.is_available()
    run_dir = out / "work" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed or skipped one
    device_args = ["--bf16", "true", "--dtype", "bfloat16", "--use_cpu", "false"] if cuda else []
    device_args += ["--activation_checkpointing", "true"] if cuda else []  # as the GPU recipes train
    argv = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config, *extra),
        *("train/sft.py", "--config", TRAIN_RECIPE, "--dataset_name", str(bundle / "datasets" / "dense")),
        *("--model_name_or_path", str(saved_tiny_model(bundle, out)), "--output_dir", str(run_dir)),
        *("--max_steps", "8", "--save_steps", "8", "--max_eval_samples", "32", "--lora_r", "8"),
        *("--max_length", "128", "--logging_steps", "1", *device_args),
    ]
    print("$", " ".join(argv), flush=True)
    subprocess.run(argv, check=True)
    adapter = json.loads((run_dir / "eval_results.json").read_text())["adapter"]
    dtype = torch.bfloat16 if cuda else torch.float32
    diff, bound = adapter.get("reload_max_abs_diff_p_yes"), adapter.get("reload_bound_max_p_yes")
    mean, bound_mean = adapter.get("reload_mean_abs_diff_p_yes"), adapter.get("reload_bound_mean_p_yes")
    recorded = None not in (diff, bound, mean, bound_mean)  # train/sft.py's reload check held both bounds
    return {
        "ok": bool(adapter.get("n_parameters")) and recorded and diff <= bound and mean <= bound_mean,
        "device": "cuda" if cuda else "cpu",
        "dtype": str(dtype),
        "reload_max_abs_diff_p_yes": diff,
        "bound": bound,
        "adapter": adapter,
    }


def step_reload_parity(bundle: Path, out: Path) -> dict:
    import torch

    config = (
        "configs/accelerate/single_gpu.yaml" if torch.cuda.is_available() else "configs/accelerate/cpu.yaml"
    )
    return train_tiny(bundle, out, "sft_single", config, [])


def step_zero3(bundle: Path, out: Path) -> dict:
    return train_tiny(
        bundle, out, "sft_zero3", "configs/accelerate/deepspeed_zero3.yaml", ["--num_processes", "1"]
    )


def step_vllm(bundle: Path, out: Path) -> dict:
    """The small random model's P(yes) on the eval set's judgments, vLLM against hf, both bf16."""
    import torch

    from latentsim.simulators import ScoringOptions, load_scorer

    model, judgments = str(saved_tiny_model(bundle, out)), bundle_judgments(bundle, 256)
    scorers = {}
    for backend in ("hf", "vllm"):
        options = ScoringOptions(backend=backend, dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3)
        scorers[backend] = load_scorer(model, "sim_v1", options)[0]
    found = scored_with_bound(scorers, judgments, torch.bfloat16, rounded_logits=True)
    for scorer in scorers.values():
        scorer.release()
    return {**found, "judgments": len(judgments)}


def matmul_tflops(device, dtype, n: int, reps: int = 10) -> float:
    """Achieved TFLOP/s of an n x n x n matrix product on `device` right now (the same run's calibration)."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_memory_gib(device) -> float:
    import resource

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (the process's RSS)


def lora_flops_per_token(n_matmul: int, layers: int, seq: int, hidden: int) -> dict[str, float]:
    """Model FLOPs of a LoRA step per token: forward 2N + causal attention 2 L T d, and a backward that
    computes input gradients only (the base is frozen) costing as much again; recomputation by activation
    checkpointing is counted apart (hardware FLOPs), LoRA's own small matmuls not at all."""
    forward = 2 * n_matmul + 2 * layers * seq * hidden
    return {"model": 2 * forward, "with_recompute": 3 * forward}


def step_sft_speed(bundle: Path, out: Path, shape_name: str, peak_override: float = 0.0) -> dict:
    """bf16 LoRA SFT steps on a random model of `shape_name`'s shape with the GPU recipe's batch, length,
    LoRA and checkpointing (SFT_RECIPE): tokens/s, peak memory, MFU against the card's bf16 peak."""
    import statistics

    import torch
    import yaml
    from peft import LoraConfig, get_peft_model

    recipe = yaml.safe_load(Path(SFT_RECIPE).read_text())
    device, tokenizer = device_of(), load_tokenizer(bundle)
    big = shape_name == "8b"
    shape = LLAMA_8B if big else TINY
    batch, seq = (recipe["per_device_train_batch_size"], recipe["max_length"]) if big else (4, 64)
    warmup, timed = (2, 6) if big else (1, 3)
    start = time.perf_counter()
    model = random_model(shape, tokenizer, device, torch.bfloat16)
    build_s = time.perf_counter() - start
    vocab = model.config.vocab_size
    n_matmul = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if recipe.get("activation_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    lora = LoraConfig(
        r=recipe["lora_r"],
        lora_alpha=recipe["lora_alpha"],
        lora_dropout=recipe["lora_dropout"],
        target_modules=recipe["lora_target_modules"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(recipe["learning_rate"]))
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + timed):
        sync(device)
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        losses.append(float(loss.detach()))
        if i >= warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens_per_s = batch * seq / step_s
    flops = lora_flops_per_token(n_matmul, shape["num_hidden_layers"], seq, shape["hidden_size"])
    achieved = {k: v * tokens_per_s / 1e12 for k, v in flops.items()}
    peak, source = (
        bf16_peak(torch.cuda.get_device_name(0), peak_override) if device.type == "cuda" else (None, "")
    )
    gemm = matmul_tflops(device, torch.bfloat16, 8192 if device.type == "cuda" else 256)
    return {
        "ok": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
        "shape": shape_name,
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in params),
        "batch": [batch, seq],
        "activation_checkpointing": bool(recipe.get("activation_checkpointing")),
        "lora": {"r": lora.r, "alpha": lora.lora_alpha, "target_modules": recipe["lora_target_modules"]},
        "build_seconds": round(build_s, 2),
        "step_seconds": [round(t, 4) for t in times],
        "tokens_per_s": tokens_per_s,
        "peak_memory_gib": round(peak_memory_gib(device), 2),
        "model_flops_per_token": flops["model"],
        "achieved_model_tflops": achieved["model"],
        "achieved_tflops_with_recompute": achieved["with_recompute"],
        "bf16_peak_tflops": peak,
        "bf16_peak_source": source,
        "mfu": achieved["model"] / peak if peak else None,
        "bf16_matmul_tflops": gemm,
        "pct_of_matmul": 100 * achieved["model"] / gemm,
        "losses": [round(x, 4) for x in losses],
    }


def step_scoring_speed(bundle: Path, out: Path, shape_name: str) -> dict:
    """latentsim.bench.bench_dense_scoring on a random model of `shape_name`'s shape: whole-layer judging
    (DenseScorer.text_logits, every latent at every token) against dense per-judgment scoring and the
    prefix-shared sim_v1 (hf) path, judgments/s and tokens computed per judgment. bf16 on CUDA, where its
    fp32 exactness check does not apply (dense_exact checks that); fp32 on CPU, where it does."""
    import torch

    from latentsim.bench import bench_dense_scoring

    device, tokenizer = device_of(), load_tokenizer(bundle)
    big = shape_name == "8b"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(LLAMA_8B if big else TINY, tokenizer, device, dtype)
    n_latents, n_tokens, positions = (64, 64, 4) if big else (16, 24, 2)
    interpretations = bundle_interpretations(bundle, n_latents)
    text, ends = text_and_ends(tokenizer, n_tokens)
    gemm = matmul_tflops(device, dtype, 8192 if device.type == "cuda" else 256)
    result = bench_dense_scoring(
        model,
        tokenizer,
        interpretations,
        text,
        ends,
        list(range(n_tokens // 2, n_tokens // 2 + positions)),
        batch_size=64,
        repeats=2,
        calibration_gflops=gemm * 1e3,
    )
    exact_applies = dtype == torch.float32
    if not exact_applies:
        result["exact"] = None
        result["exactness_check"] = "fp32 only (see dense_exact); bf16 difference reported"
    per_s = result["judgments_per_s"]
    return {
        "ok": bool(result["exact"]) if exact_applies else all(v > 0 for v in per_s.values()),
        "shape": shape_name,
        "device": str(device),
        "dtype": str(dtype),
        "peak_memory_gib": round(peak_memory_gib(device), 2),
        **result,
    }


STEPS = {
    "dense_exact": step_dense_exact,
    "bf16_parity": step_bf16_parity,
    "reload_parity": step_reload_parity,
    "zero3": step_zero3,
    "vllm": step_vllm,
    "sft_speed_8b": lambda b, o, peak=0.0: step_sft_speed(b, o, "8b", peak),
    "sft_speed_tiny": lambda b, o, peak=0.0: step_sft_speed(b, o, "tiny", peak),
    "scoring_speed_8b": lambda b, o, peak=0.0: step_scoring_speed(b, o, "8b"),
    "scoring_speed_tiny": lambda b, o, peak=0.0: step_scoring_speed(b, o, "tiny"),
}


def run_one(name: str, bundle: Path, out: Path, peak_override: float = 0.0) -> dict:
    """One step in this process; its record into steps/<name>.json."""
    if name == "env":
        result = step_env(bundle, out, peak_override)
    elif name.startswith(("sft_speed", "scoring_speed")):
        result = STEPS[name](bundle, out, peak_override)
    else:
        result = STEPS[name](bundle, out)
    atomic_write_json(out / "steps" / f"{name}.json", result)
    return result
