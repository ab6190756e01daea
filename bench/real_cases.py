"""Two more real patients, for measuring the shipped model on cases its settings were not chosen on.

    python bench/real_cases.py --preprocessing CLONE --aurora CLONE --output DIR
    python -m monai.bundle run --config_file bundle/configs/evaluate.yaml --dataset_dir DIR --eval_downsample 4 ...

Writes a BIDS dataset laid out like ../shared/data/real/bids (T1w, T2w, FLAIR, ce-gadolinium T1w; sidecars that know
only that the images are brain-extracted, so every prompt field but the modality is None) with two subjects, read
with ``git cat-file`` from local clones of two public repositories (nothing is downloaded; the blobs are pinned):
- sub-TCGAFG6692: TCGA-FG-6692 (TCIA TCGA-LGG, a Siemens lower-grade glioma case), BrainLesion/preprocessing commit
  7754299, ``example/example_data/OtherEXampleFromTCIA/OtherEXampleFromTCIA_brainles/raw_bet/``: the pipeline and
  commit of the shared case (SRI24, 1 mm, 240x240x155, brain-extracted, int16 with interpolation negatives, LPS).
- sub-BraTSMET00110: BraTS-MET-00110-000 (a BraTS 2023 brain-metastasis case), BrainLesion/AURORA commit b7fe853,
  ``example/data/``: SRI24, 1 mm, skull-stripped, int16 without negatives, RAS.
Both are for measurement only: never train on them, never commit them (docs/real_data.md has the results).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

# subject -> BIDS suffix -> git blob of the image (the path it had at the commit named in the docstring)
CASES = {
    "preprocessing": {"TCGAFG6692": {
        "T1w": "0e9568c96a9ca543ee715ea01b1cda9e48f6e3d3",  # OtherEXampleFromTCIA_t1_bet_raw.nii.gz
        "T2w": "ae0aaa6b6610003b231c1722f686d0636bcb8aeb",  # ..._t2_bet_raw.nii.gz
        "FLAIR": "2ee940d0ee04db79b0064b790d0726fb248d306d",  # ..._fla_bet_raw.nii.gz
        "ce-gadolinium_T1w": "dfb67fc2f0358b41be23fdfcbf7c513df8c5ad7e",  # ..._t1c_bet_raw.nii.gz
    }},
    "aurora": {"BraTSMET00110": {
        "T1w": "c7d615e1bba855b5c5e726e6469ea7466a737695",  # BraTS-MET-00110-000-t1n.nii.gz
        "T2w": "e8116ed8e71a336ae388ca9c3af268524c5d912c",  # ...-t2w.nii.gz
        "FLAIR": "444768af82b73d038f7d0148ce48d58a3646e25a",  # ...-t2f.nii.gz
        "ce-gadolinium_T1w": "a22803e4e757078382d33305aa0b8f9a82be94b1",  # ...-t1c.nii.gz
    }},
}


def git_blob(clone: str, blob: str) -> bytes:
    """The bytes of ``blob`` in the git repository ``clone``, or one line saying it is not there."""
    result = subprocess.run(["git", "-C", clone, "cat-file", "blob", blob], capture_output=True)
    if result.returncode != 0:
        raise SystemExit(f"{clone}: git blob {blob} not found (clone the repository with its history)")
    return result.stdout


def write_dataset(clones: dict[str, str], output_dir: str) -> None:
    participants = ["participant_id\tage\tsex"]
    for repository, subjects in CASES.items():
        for subject, images in subjects.items():
            anat = os.path.join(output_dir, f"sub-{subject}", "anat")
            os.makedirs(anat, exist_ok=True)
            for suffix, blob in images.items():
                stem = os.path.join(anat, f"sub-{subject}_{suffix}")
                with open(stem + ".nii.gz", "wb") as handle:
                    handle.write(git_blob(clones[repository], blob))
                with open(stem + ".json", "w") as handle:
                    json.dump({"SkullStripped": True}, handle)
            participants.append(f"sub-{subject}\tn/a\tn/a")
    with open(os.path.join(output_dir, "participants.tsv"), "w") as handle:
        handle.write("\n".join(participants) + "\n")
    with open(os.path.join(output_dir, "dataset_description.json"), "w") as handle:
        json.dump({"Name": "TUMSyn held-out real cases (TCGA-FG-6692, BraTS-MET-00110-000)", "BIDSVersion": "1.8.0",
                   "DatasetType": "raw", "License": "see bench/real_cases.py in the TUMSyn repository"}, handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preprocessing", required=True, help="git clone of github.com/BrainLesion/preprocessing")
    parser.add_argument("--aurora", required=True, help="git clone of github.com/BrainLesion/AURORA")
    parser.add_argument("--output", required=True, help="BIDS dataset folder to write")
    args = parser.parse_args()
    write_dataset({"preprocessing": args.preprocessing, "aurora": args.aurora}, args.output)
    print(f"wrote {args.output}: sub-{' sub-'.join(s for subjects in CASES.values() for s in subjects)}")


if __name__ == "__main__":
    main()
