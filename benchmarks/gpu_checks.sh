#!/bin/bash
# Every check that needs a GPU machine, in one run of about 10 minutes (a lent machine has 15 minutes in all):
#   bash benchmarks/gpu_checks.sh OUT_DIR
# GPU timing runs alone on the GPU (cores 0-3): one GPT layer per published H100 shape against the planner,
# the engine's one-GPU runs against the planner (with their energy), one step's kernel profile of the
# configs benchmarks/results/h100-step-profile.json keeps, the host's dispatch and the step's parts. Meanwhile the CPU pipeline
# bubble runs on cores 4-11 (4 single-threaded gloo ranks, each with a core of its own and spare cores for
# gloo's threads) and, on equal devices (--fixed-ms), on cores 12-15. Then the CUDA tests and the README's default `apogee train` side by side. Each part
# writes its own log under OUT_DIR and its failure does not stop the others.
# Run from the repository root; apogee is taken from src/ (its dependencies, tomli-w included, must be
# importable: pip install -e . where the machine allows, else wheels on PYTHONPATH). CSV= names the
# published runs when ../shared is not beside the checkout.
set -u
OUT=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*" >> "$OUT/timeline.txt"; }
CSV=${CSV:-../shared/planner/published-runs.csv}
(taskset -c 4-11 timeout 330 python3 benchmarks/pipeline_bubble.py --pp 4 --dim 768 --steps 6 \
    --dump "$OUT/bubble" > "$OUT/bubble.txt" 2>&1; stamp "bubble rc $?") &
(taskset -c 12-15 timeout 360 python3 benchmarks/pipeline_bubble.py --pp 4 --dim 32 --seq 32 --steps 3 \
    --fixed-ms 200 --port 29700 > "$OUT/bubble-fixed.txt" 2>&1; stamp "bubble fixed rc $?") &
taskset -c 0-3 timeout 75 python3 benchmarks/gpu_layer_shapes.py --csv "$CSV" --mb 1,2,4 \
    --out "$OUT/layers.json" > "$OUT/layers.txt" 2>&1; stamp "layers rc $?"
taskset -c 0-3 timeout 220 python3 benchmarks/planner_vs_measured_gpu.py --out "$OUT/engine-runs.json" \
    --gemm-table benchmarks/results/gemm-h100.json > "$OUT/engine-runs.log" 2>&1; stamp "engine runs rc $?"
taskset -c 0-3 timeout 130 python3 benchmarks/gpu_step_profile.py --only "llama-1b mb1,llama-1b mb4,x4" \
    --out "$OUT/profile.json" > "$OUT/profile.log" 2>&1; stamp "profile rc $?"
taskset -c 0-3 timeout 130 python3 benchmarks/gpu_host_dispatch.py --out "$OUT/host-dispatch.json" \
    > "$OUT/host-dispatch.log" 2>&1; stamp "host dispatch rc $?"
(taskset -c 0-1 timeout 120 python3 -m pytest tests/gpu -q -rs -p no:logging > "$OUT/gpu-tests.log" 2>&1; stamp "gpu tests rc $?") &
(cd /tmp && taskset -c 2-3 timeout 120 python3 -m apogee.cli train --set train.steps=60 > "$OUT/train-default.log" 2>&1; stamp "train rc $?") &
wait
stamp "done"
