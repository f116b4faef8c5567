#!/bin/bash
# Every check that needs a GPU machine, in one run (a lent machine's minutes are few):
#   bash benchmarks/gpu_checks.sh OUT_DIR
# GPU timing runs alone on the GPU (cores 0-3); the CPU pipeline bubble runs meanwhile on cores 8-15
# (4 single-threaded gloo ranks); then the CUDA tests, the README's default `apogee train`, and the
# step profile. Each part writes its own log under OUT_DIR and its failure does not stop the others.
# Run from the repository root; apogee is taken from src/ (its dependencies, tomli-w included, must be
# importable: pip install -e . where the machine allows, else wheels on PYTHONPATH).
set -u
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" >> "$OUT/timeline.txt"; }
CSV=${CSV:-../shared/planner/published-runs.csv}
(taskset -c 8-15 timeout 300 python3 benchmarks/pipeline_bubble.py --pp 4 --dim 768 > "$OUT/bubble.txt" 2>&1; stamp "bubble rc $?") &
taskset -c 0-3 timeout 150 python3 benchmarks/gemm_table.py --csv "$CSV" --engine-configs --reps 10 \
    --out "$OUT/gemm.json" > "$OUT/gemm.log" 2>&1; stamp "gemm rc $?"
taskset -c 0-3 timeout 240 python3 benchmarks/planner_vs_measured_gpu.py --out "$OUT/engine-runs.json" \
    --gemm-table "$OUT/gemm.json" > "$OUT/engine-runs.log" 2>&1; stamp "engine runs rc $?"
taskset -c 0-3 timeout 120 python3 benchmarks/gpu_step_profile.py --only "llama-1b mb4,llama3-8b" \
    --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1; stamp "profile rc $?"
(taskset -c 0-1 timeout 200 python3 -m pytest tests/gpu -q -rs -p no:logging > "$OUT/gpu-tests.log" 2>&1; stamp "gpu tests rc $?") &
(cd /tmp && taskset -c 2-3 timeout 200 python3 -m apogee.cli train --set train.steps=60 > "$OUT/train-default.log" 2>&1; stamp "train rc $?") &
wait
stamp "done"
