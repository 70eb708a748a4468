#!/usr/bin/env bash
# The GPU check, from a fresh clone on a machine with one GPU (bench/gpu_check.py says what it runs):
#   bench/gpu_check.sh                  build .venv (training) and .venv-vllm (vLLM), install the embedded
#                                       models, run it, write outputs/gpu_check/results.json (exit 1 when a
#                                       check fails)
#   bench/gpu_check.sh --dry_run true   print its plan; install nothing
# Offline, on a GPU machine with no network (docs/gpu-check.md; bench/gpu_offline.py says what it runs):
#   bench/gpu_check.sh --offline BUNDLE [--output_dir DIR] [--budget_s 360]
#                                       install the bundle's wheels (no index) over the machine's Python
#                                       (PYTHON, default python3: its torch is used), Hub offline, run the
#                                       steps into outputs/gpu_check_offline/ (exit 1 when a step fails)
set -euo pipefail
if [ "${1:-}" = "--offline" ]; then
  [ $# -ge 2 ] && [ -f "$2/bundle.json" ] || {
    echo "error: usage: bench/gpu_check.sh --offline BUNDLE [ARGS]; BUNDLE must hold bundle.json" \
      "(build it with ./launch.sh gpu_check --bundle DIR)"; exit 2; }
  bundle=$(cd "$2" && pwd); shift 2
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  out=outputs/gpu_check_offline
  args=("$@")
  for ((i = 0; i < ${#args[@]} - 1; i++)); do [ "${args[i]}" = "--output_dir" ] && out=${args[i+1]}; done
  mkdir -p "$out"
  PY=${PYTHON:-python3}
  # Nothing leaves the machine: no package index, no pip config (its find-links or index), the Hub offline.
  export PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  site=${LATENTSIM_SITE:-$(mktemp -d)/site}
  export HF_HOME="$site.hf_home"
  rm -rf "$site"
  # --no-deps: the machine's own torch, tokenizers, ... stay; requirements.txt pins one version of each wheel
  # and pip picks the file that fits this Python.
  "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    --find-links "$bundle/wheels" -r "$bundle/requirements.txt" > "$out/install.log" 2>&1 || {
    tail -20 "$out/install.log"; echo "error: installing $bundle failed (log: $out/install.log)"; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  exec "$PY" bench/gpu_offline.py --bundle "$bundle" "$@"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec ./launch.sh gpu_check "$@"
