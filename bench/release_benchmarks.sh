#!/usr/bin/env bash
# The model card's tables, in one run on the shipped weights with the configs' defaults (run from the repository root):
#   bash bench/release_benchmarks.sh OUT [REAL_BIDS] [-- extra evaluate overrides]
# OUT/sim_1mm: held-out simulated subjects (seed 1000) on a 1 mm truth grid, every task; OUT/real_{1,2,4}mm: a real
# BIDS dataset at 1 mm and block-averaged to 2 and 4 mm; OUT/real_thick5: its images thickened to 5 mm axial slices
# and restored in their own contrast. Each folder gets evaluate's metrics.csv / metrics.md / metrics.png.
set -eu
out=${1:?usage: bash bench/release_benchmarks.sh OUT [REAL_BIDS] [-- overrides]}
real=${2:-../shared/data/real/bids}
shift $(( $# >= 2 ? 2 : 1 ))
[ "${1:-}" = "--" ] && shift
python=${PYTHON:-.venv/bin/python}
evaluate() {  # name, then evaluate overrides
    local name=$1; shift
    local start=$(date +%s)
    $python -m monai.bundle run --config_file bundle/configs/evaluate.yaml --output_dir "$out/$name" "$@" \
        > "$out/$name.log" 2>&1
    echo "$name: $(( $(date +%s) - start )) s"
}
mkdir -p "$out"
evaluate sim_1mm "$@"
if [ -d "$real" ]; then
    evaluate real_1mm --dataset_dir "$real" "$@"
    evaluate real_2mm --dataset_dir "$real" --eval_downsample 2 "$@"
    evaluate real_4mm --dataset_dir "$real" --eval_downsample 4 "$@"
    evaluate real_thick5 --dataset_dir "$real" --thicken 5 "$@"
fi
