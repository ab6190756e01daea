#!/usr/bin/env bash
# Stage-2 runs on a lent GPU machine, where a 40-subject training set cannot travel: it is simulated there
# (configs/simulate.yaml: 40 subjects, seed 0, every second one with realism, the unet scale's data), then
# each named run trains concurrently with the same config and defaults plus its overrides, stopped after
# TIME_LIMIT seconds if it has not finished; its best validated network is exported to RESULTS_DIR/<name>.pt.
#   bash bench/gpu_stage2.sh RESULTS_DIR TIME_LIMIT NAME "OVERRIDES" [NAME "OVERRIDES" ...]
# e.g. bash bench/gpu_stage2.sh out 480 onehot "--scale unet --conditioning onehot" text "--scale unet"
set -u
results=${1:?usage: bash bench/gpu_stage2.sh RESULTS_DIR TIME_LIMIT NAME OVERRIDES [...]}
limit=${2:?time limit in seconds}
shift 2
python=${PYTHON:-python3}
data=${DATA_DIR:-/tmp/tumsyn_train}
workers=${WORKERS_PER_RUN:-6}
mkdir -p "$results"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s)
[ -f "$data/participants.tsv" ] || $python -m monai.bundle run --config_file bundle/configs/simulate.yaml \
    --output_dir "$data" --num_subjects 40 --seed 0 --realism 0.5 --workers 14 > "$results/simulate.log" 2>&1
echo "simulated in $(( $(date +%s) - start )) s"
pids=()
while [ $# -ge 2 ]; do
    name=$1; overrides=$2; shift 2
    # shellcheck disable=SC2086  # the overrides are separate words
    ( timeout "$limit" $python -m monai.bundle run training --config_file bundle/configs/stage2_train.yaml \
        --dataset_dir "$data" --output_dir "/tmp/stage2_$name" --device cuda --num_workers "$workers" \
        --progress_bar false $overrides > "$results/$name.log" 2>&1
      checkpoints=/tmp/stage2_$name/checkpoints  # the best validated epoch, else the last one (a run cut short)
      best=$(ls "$checkpoints/model_best.pt" 2>/dev/null || ls -t "$checkpoints"/checkpoint_*.pt 2>/dev/null | head -1)
      [ -n "$best" ] && PYTHONPATH=bundle:${PYTHONPATH:-} $python -c \
        "import sys; from scripts.train.trainers import export_network_weights as e; e(sys.argv[1], sys.argv[2])" \
        "$best" "$results/$name.pt"
      echo "$name: done after $(( $(date +%s) - start )) s; $(grep -c 'Got new best' "$results/$name.log") new bests" ) &
    pids+=($!)
done
wait "${pids[@]}"
