#!/usr/bin/env bash
# Issue #10's GPU measurements in one run: inference (engine vs the official demo's loop, fp32 and bf16, both
# scales, 1 mm and 5 mm inputs, the MNI field of view) and training throughput of both stages (fp32 and bf16).
#   bash bench/gpu_suite.sh RESULTS_DIR [DATASET_DIR]
# DATASET_DIR: a BIDS dataset for the training cases (default: the configs' simulated one). Every case's JSON row is
# printed as it finishes; RESULTS_DIR gets one JSON file per benchmark run. Its first version took 470 s on an H200
# up to the A/B runs; the untimed warm-up call per method that inference_speed.py now makes on a GPU adds to that.
set -u
results=${1:?usage: bash bench/gpu_suite.sh RESULTS_DIR [DATASET_DIR]}
dataset=${2:-}
mkdir -p "$results"
here=$(dirname "$0")
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

inference() {  # name, then inference_speed.py arguments
    local name=$1; shift
    $python "$here/inference_speed.py" --device cuda --threads 8 --timeout 180 --output "$results/$name.json" "$@"
}
training() {  # name, then training_speed.py arguments
    local name=$1; shift
    $python "$here/training_speed.py" --device cuda --threads 8 --steps 6 --subjects 4 --timeout 180 \
        --output "$results/$name.json" ${dataset:+--dataset_dir "$dataset"} "$@"
}
# The frame first (182x218x182 mm, from 1 mm and from 5 mm inputs), both scales, then training.
for precision in bf16 fp32; do
    inference "inference_small_mni_$precision" --scales small --source mni --inputs 1mm 5mm --precision $precision
    inference "inference_paper_$precision" --scales paper --inputs 1mm 5mm --precision $precision
    training "training_$precision" --precision $precision
done
# A/B of the GPU defaults (65536 voxels per decode chunk, 4 windows per batch) against the CPU's (4096, 1), and of
# training data loading in worker processes.
inference inference_small_mni_bf16_cpu_chunks --scales small --source mni --inputs 1mm --precision bf16 \
    --query_chunk 4096 --sw_batch_size 1
inference inference_paper_bf16_cpu_chunks --scales paper --inputs 1mm --precision bf16 --query_chunk 4096 \
    --sw_batch_size 1
training training_bf16_workers4 --precision bf16 --stages 2 --num_workers 4
