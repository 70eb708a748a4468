"""The GPU check: the vLLM, bf16 and DeepSpeed paths run for real on one GPU, in <= 8 minutes from a fresh
clone.

    bench/gpu_check.sh [--dry_run true]     (the shell script builds both environments, then runs this)

Steps, each a subprocess with its time and exit status, all into outputs/gpu_check/:
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
import subprocess
import sys
import time
from pathlib import Path

from latentsim.cli import run
from latentsim.config import GpuCheckArguments
from latentsim.gpu_check import checks, plan
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

    records, t0 = [], time.perf_counter()
    for name, argv in steps:
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True)
        records.append(
            {
                "step": name,
                "argv": argv,
                "rc": result.returncode,
                "seconds": round(time.perf_counter() - start, 1),
                "stderr_tail": result.stderr[-2000:],
            }
        )
        print(f"[gpu_check] {name}: rc {result.returncode}, {records[-1]['seconds']} s", flush=True)
    found = checks(out)
    passed = all(r["rc"] == 0 for r in records) and all(c["ok"] for c in found.values())
    atomic_write_json(
        out / "results.json",
        {
            "passed": passed,
            "seconds": round(time.perf_counter() - t0, 1),
            "steps": records,
            "checks": found,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "provenance": provenance("gpu_check", {"gpu_check": args}, None),
        },
    )
    print(
        f"[gpu_check] {'passed' if passed else 'FAILED'}: {json.dumps(found)}\n"
        f"[gpu_check] {out / 'results.json'}"
    )
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    run(main, DATACLASSES)
