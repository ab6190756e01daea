#!/usr/bin/env bash
# Issue #10's GPU measurements in one run: inference (engine vs the official demo's loop, fp32 and bf16, both
# scales, 1 mm and 5 mm inputs, the MNI field of view), training throughput of both stages, and A/B runs.
#   bash bench/gpu_suite.sh RESULTS_DIR [DATASET_DIR]
# DATASET_DIR: a BIDS dataset for the training cases (default: the configs' simulated one). Every case's JSON row is
# printed as it finishes; RESULTS_DIR gets one JSON file per benchmark run. Every GPU timing is the median of 3 warm
# calls (each method runs once untimed first).
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
    $python "$here/inference_speed.py" --device cuda --threads 8 --timeout 180 --repeats 3 \
        --output "$results/$name.json" "$@"
}
training() {  # name, then training_speed.py arguments
    local name=$1; shift
    $python "$here/training_speed.py" --device cuda --threads 8 --steps 6 --subjects 4 --timeout 180 \
        --output "$results/$name.json" ${dataset:+--dataset_dir "$dataset"} "$@"
}
# Most wanted first (a time limit cuts the tail): the frame (182x218x182 mm, from 1 mm and from 5 mm inputs)
# at both scales, stage-2 training, a profile, then bf16 at the small scale, the synthetic head, training data
# loading in workers and A/B runs of engine settings.
inference inference_small_mni_fp32 --scales small --source mni --inputs 1mm 5mm --precision fp32
# The small scale is bound by kernel launches on a GPU (bench/README.md): fewer, larger cut windows launch fewer
# (96^3, its GPU default since 0.2.6, against the CPU's 64^3 and against 128^3).
inference inference_small_mni_fp32_roi64 --scales small --source mni --inputs 1mm 5mm --methods engine --roi_size 64
inference inference_small_mni_fp32_roi128 --scales small --source mni --inputs 1mm 5mm --methods engine --roi_size 128
# The paper scale on a real head's share of the grid (the demo subject in the MNI frame, random weights).
inference inference_paper_mni_bf16 --scales paper --source mni --inputs 1mm 5mm --precision bf16
inference inference_paper_mni_fp32 --scales paper --source mni --inputs 1mm 5mm --precision fp32
training training_fp32_stage2 --precision fp32 --stages 2
# Where a warm call's GPU time goes, and each convolution kind by kernel path.
timeout 180 $python "$here/profile_engine.py" --scale paper --source mni --precision bf16 \
    --output "$results/profile_paper_mni_bf16.json" 2>&1 | tail -32
timeout 180 $python "$here/profile_engine.py" --scale small --source mni --precision fp32 \
    --output "$results/profile_small_mni_fp32.json" 2>&1 | tail -32
$python "$here/conv_paths.py" --device cuda --precision bf16 --output "$results/conv_paths_bf16.json" | tail -24
inference inference_small_mni_bf16 --scales small --source mni --inputs 1mm 5mm --precision bf16
inference inference_paper_fp32 --scales paper --inputs 1mm 5mm --precision fp32
training training_fp32_stage2_workers4 --precision fp32 --stages 2 --scales small --num_workers 4
# Engine only: whole windows (one shape, so sw_batch_size batches them) and larger decode chunks.
inference inference_small_mni_fp32_whole_windows --scales small --source mni --inputs 1mm --methods engine \
    --crop_margin none
inference inference_small_mni_fp32_chunk262144 --scales small --source mni --inputs 1mm --methods engine \
    --query_chunk 262144
inference inference_paper_bf16 --scales paper --inputs 1mm 5mm --precision bf16
training training_fp32_stage1 --precision fp32 --stages 1 --scales small
training training_fp32_stage1_workers4 --precision fp32 --stages 1 --scales small --num_workers 4
