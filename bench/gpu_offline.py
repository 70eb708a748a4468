"""The offline GPU check: what a bare GPU machine with no network can measure, from a bundle built here.

    ./launch.sh gpu_check --bundle DIR        build the bundle (<= 60 MiB) on this machine
    bench/gpu_check.sh --offline DIR          on the GPU machine: install it (--no-index), run this script
    ./launch.sh gpu_check --rehearse          on CPU: bundle, a fresh image-like venv, the check offline

Steps (latentsim.gpu_offline.plan), each a subprocess of this script (`--step NAME`) with a timeout and the
overall `budget_s`; outputs/gpu_check_offline/results.json is rewritten after each, each step's whole output
is kept in logs/<step>.log. Correctness (dense scoring = the naive forward in fp32, bf16 vs fp32 P(yes), the
reload parity of an adapter trained by train/sft.py) runs on the device there is; the speed steps run at
Llama-3.1-8B's shape on CUDA (random weights built on the device) and at a tiny shape on CPU; ZeRO-3 and vLLM
run where installed. Exit 1 when a step fails or times out (skipped and not-run steps do not fail the check).
"""

import os
import sys
from pathlib import Path

from latentsim.cli import run
from latentsim.config.bench import GpuOfflineArguments
from latentsim.errors import MissingInputError
from latentsim.io import provenance

DATACLASSES = (GpuOfflineArguments,)


def print_record(record: dict) -> None:
    for step in record["steps"]:
        result = step.get("result") or {}
        numbers = {
            k: result[k]
            for k in (
                "tokens_per_s",
                "mfu",
                "peak_memory_gib",
                "ratio_vs_naive",
                "ratio_vs_sim_v1_prefix_shared",
                "max_abs_diff",
                "reload_max_abs_diff_p_yes",
                "dense_text_logits_max_abs_diff",
            )
            if result.get(k) is not None
        }
        shown = " ".join(f"{k}={v:.4g}" for k, v in numbers.items())
        seconds = f" {step['seconds']} s" if "seconds" in step else ""
        print(f"[gpu_offline] {step['step']}: {step['status']}{seconds} {step.get('reason', '')}{shown}")


def main(args: GpuOfflineArguments) -> None:
    from latentsim import gpu_bundle

    bundle, out = Path(args.bundle or ".").resolve(), Path(args.output_dir).resolve()
    os.chdir(
        Path(__file__).resolve().parents[1]
    )  # the steps read configs/ and run train/, data_gen/ from here
    if args.build_bundle:
        manifest = gpu_bundle.build_bundle(Path(args.build_bundle).resolve())
        print(
            f"[gpu_bundle] {args.build_bundle}: {manifest['bytes'] / 2**20:.1f} MiB "
            f"(limit {manifest['limit_bytes'] / 2**20:.0f}); wheels: {', '.join(manifest['requirements'])}"
        )
        return
    if args.rehearse:
        rc, seconds = gpu_bundle.rehearse(out, args.budget_s)
        print(f"[gpu_check rehearsal] exit {rc}; seconds {seconds}; results: {out / 'out' / 'results.json'}")
        sys.exit(rc)

    from latentsim.gpu_offline import plan, run_one, run_steps

    if not (bundle / "bundle.json").is_file():
        raise MissingInputError(
            f"config key `bundle`: {bundle} has no bundle.json; build one with "
            "./launch.sh gpu_check --bundle DIR."
        )
    if args.step:
        run_one(args.step, bundle, out, args.bf16_peak_tflops)
        return

    def argv_of(step):
        return [
            *(sys.executable, str(Path(__file__).resolve()), "--bundle", str(bundle)),
            *("--output_dir", str(out), "--step", step.name),
            *("--bf16_peak_tflops", str(args.bf16_peak_tflops)),
        ]

    header = {"bundle": str(bundle), "provenance": provenance("gpu_offline", {"gpu_offline": args}, None)}
    record = run_steps(plan(), out, argv_of, args.budget_s, header)
    print_record(record)
    print(f"[gpu_offline] {'passed' if record['passed'] else 'FAILED'} in {record['seconds']} s: {out}")
    if not record["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    run(main, DATACLASSES)
