"""The GPU check: the vLLM, bf16 and DeepSpeed paths run for real on one GPU from a fresh clone (the two
environments' installs take minutes first; on a GPU machine without network: bench/gpu_check.sh --offline).

    bench/gpu_check.sh [--dry_run true]     (the shell script builds both environments, then runs this)

Steps, each a subprocess under a timeout (`step_timeout_s`), its output in logs/<step>.log, results.json
rewritten after each, all into outputs/gpu_check/:
1. data: the embedded SmolLM2 (and Gemma-3, the second base model) converted; the quickstart's recipes shrunk:
   an SAE, a cache, token-list interpretations, a sim_v1 training mixture and an eval set.
2. train_single_gpu: 8 bf16 LoRA steps, accelerate single_gpu; train_zero3: the same under DeepSpeed ZeRO-3 on
   one process. Each adapter must be non-empty and reload to the trained model's P(yes) within the bf16
   tolerance (train/sft.py checks both; here their records are read back).
3. sweep_hf, sweep_vllm: the same eval set, adapter and baselines (SmolLM2 zero-shot, then Gemma-3 zero-shot:
   the vLLM sweep switches base model, so the first engine must be shut down before the second is built) on
   both backends; P(yes) compared judgment by judgment.
Writes outputs/gpu_check/results.json (steps, checks, versions, the GPU) and exits 1 when a check fails.
"""

import json
import sys
import time
from pathlib import Path

from latentsim.cli import run
from latentsim.config import GpuCheckArguments
from latentsim.gpu_check import checks, plan
from latentsim.gpu_offline import run_logged
from latentsim.io import atomic_write_json, provenance

DATACLASSES = (GpuCheckArguments,)


def main(args: GpuCheckArguments) -> None:
    out = Path(args.output_dir)
    steps = plan(str(out))
    if args.dry_run:
        for name, argv in steps:
            print(f"[gpu_check] {name}: {' '.join(argv)}")
        print(f"[gpu_check] then: checks -> {out / 'results.json'} (dry run: nothing ran)")
        return
    import torch

    # results.json is rewritten before and after every step: a machine lost or a step killed mid-way still
    # says which steps passed and which one it was in; each step's whole output is kept in logs/<step>.log.
    record = {"kind": "gpu_check", "finished": False, "passed": False, "steps": []}
    record["provenance"] = provenance("gpu_check", {"gpu_check": args}, None)
    t0 = time.perf_counter()
    for name, argv in steps:
        record["steps"].append({"step": name, "argv": argv, "status": "running", "log": f"logs/{name}.log"})
        atomic_write_json(out / "results.json", record)
        rc, seconds = run_logged(argv, out / "logs" / f"{name}.log", args.step_timeout_s)
        status = "timeout" if rc is None else "passed" if rc == 0 else "failed"
        record["steps"][-1].update(status=status, rc=rc, seconds=seconds)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out / "results.json", record)
        print(f"[gpu_check] {name}: {status} (rc {rc}), {seconds} s; log {out}/logs/{name}.log", flush=True)
    found = checks(out)
    passed = all(s["status"] == "passed" for s in record["steps"]) and all(c["ok"] for c in found.values())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None  # after the steps: CUDA here
    record.update(finished=True, passed=passed, checks=found, gpu=gpu)
    atomic_write_json(out / "results.json", record)
    print(
        f"[gpu_check] {'passed' if passed else 'FAILED'}: {json.dumps(found)}\n"
        f"[gpu_check] {out / 'results.json'}"
    )
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    run(main, DATACLASSES)
