#!/usr/bin/env bash
# The GPU check, from a fresh clone on a machine with one GPU (<= 8 minutes; bench/gpu_check.py says what it runs):
#   bench/gpu_check.sh                  install latentsim[gpu,dev] and the embedded models, run it, write
#                                       outputs/gpu_check/results.json (exit 1 when a check fails)
#   bench/gpu_check.sh --dry_run true   print its plan; install nothing beyond the base environment
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec ./launch.sh gpu_check "$@"
