"""The real-data datalist builder on a generated BIDS dataset with deliberately broken entries."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_ROOT
from helpers import write_bids_image
from scripts.data import bids_datalist

T1 = {"RepetitionTime": 2.3, "EchoTime": 0.003, "InversionTime": 0.9, "FlipAngle": 9, "MagneticFieldStrength": 3,
      "Manufacturer": "Siemens"}
T2 = {"RepetitionTime": 3.2, "EchoTime": 0.1, "FlipAngle": 90, "MagneticFieldStrength": 3, "Manufacturer": "Siemens"}
FLAIR = {"RepetitionTime": 9.0, "EchoTime": 0.09, "InversionTime": 2.5, "FlipAngle": 150}
PARTICIPANTS = [{"participant_id": f"sub-{i:02d}", "age": 20 + 5 * i, "sex": "MF"[i % 2]} for i in range(1, 9)]


def _volume(seed, shape=(12, 12, 12)):
    return np.random.default_rng(seed).uniform(0, 100, shape).astype(np.float32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 subjects with T1w + T2w on one grid; sub-02 has two sessions; the broken entries are listed in BROKEN."""
    root = str(tmp_path_factory.mktemp("bids"))
    for index, row in enumerate(PARTICIPANTS, 1):
        subject = row["participant_id"][4:]
        for suffix, sidecar in (("T1w", T1), ("T2w", T2)):
            write_bids_image(root, subject, suffix, _volume(index), sidecar, participants=PARTICIPANTS)
    # sub-02 second session: FLAIR + T1w on a grid of their own
    for suffix, sidecar in (("T1w", T1), ("FLAIR", FLAIR)):
        anat = os.path.join(root, "sub-02", "ses-2", "anat")
        os.makedirs(anat, exist_ok=True)
        stem = os.path.join(anat, f"sub-02_ses-2_{suffix}")
        nib.save(nib.Nifti1Image(_volume(50), np.diag([1.2, 1.2, 1.2, 1.0])), stem + ".nii.gz")
        json.dump(sidecar, open(stem + ".json", "w"))
    # the broken entries
    write_bids_image(root, "01", "FLAIR", _volume(1, (12, 12, 10)), FLAIR)  # not co-registered: other shape
    write_bids_image(root, "03", "FLAIR", _volume(3), {"FlipAngle": 150})  # sidecar without TR/TE
    write_bids_image(root, "04", "PDw", _volume(4), T2)
    os.remove(os.path.join(root, "sub-04", "anat", "sub-04_PDw.json"))  # no sidecar at all
    with open(os.path.join(root, "sub-05", "anat", "sub-05_T2starw.nii.gz"), "wb") as handle:
        handle.write(b"not a nifti file")  # unreadable
    write_bids_image(root, "06", "T2starw", _volume(6), {"RepetitionTime": "fast", "EchoTime": 0.02})  # bad value
    write_bids_image(root, "07", "defacemask", _volume(7), {})  # not an MR contrast TUMSyn knows
    # inheritance: a dataset-level T2starw.json supplies what sub-08's own sidecar lacks (sub-06's own value wins)
    write_bids_image(root, "08", "T2starw", _volume(8), {"FlipAngle": 15})
    json.dump({"RepetitionTime": 0.05, "EchoTime": 0.02, "MagneticFieldStrength": 1.5, "Manufacturer": "Philips"},
              open(os.path.join(root, "T2starw.json"), "w"))
    return root


BROKEN = {
    "sub-01/anat/sub-01_FLAIR.nii.gz": "not on the session's shared grid",
    "sub-03/anat/sub-03_FLAIR.nii.gz": "sidecars lack RepetitionTime, EchoTime",
    "sub-04/anat/sub-04_PDw.nii.gz": "no JSON sidecar, own or inherited",
    "sub-05/anat/sub-05_T2starw.nii.gz": "unreadable image",
    "sub-06/anat/sub-06_T2starw.nii.gz": "no prompt",
    "sub-07/anat/sub-07_defacemask.nii.gz": "is not one of",
}


def test_builds_splits_and_reports_every_skipped_image(dataset, tmp_path):
    datalist = bids_datalist.build_datalist(dataset, val_fraction=0.25, test_fraction=0.125, seed=3)
    assert {s["image"]: s["reason"] for s in datalist["skipped"]}.keys() == BROKEN.keys()
    for entry in datalist["skipped"]:
        assert BROKEN[entry["image"]] in entry["reason"], entry
    subjects = {split: {s["subject"] for s in datalist[split]} for split in ("training", "validation", "test")}
    assert [len(subjects[s]) for s in ("training", "validation", "test")] == [5, 2, 1]
    assert set.union(*subjects.values()) == {p["participant_id"] for p in PARTICIPANTS}  # by subject, disjoint
    assert sum(map(len, subjects.values())) == 8
    sessions = {(s["subject"], s["session"]): s
                for split in ("training", "validation", "test") for s in datalist[split]}
    assert sessions["sub-02", "ses-2"]["paired"] == ["sub-02/ses-2/anat/sub-02_ses-2_FLAIR.nii.gz",
                                                     "sub-02/ses-2/anat/sub-02_ses-2_T1w.nii.gz"]
    first = sessions["sub-01", None]
    assert [i["modality"] for i in first["images"]] == ["FLAIR", "T1w", "T2w"]  # kept for stage 1 ...
    assert len(first["paired"]) == 2  # ... but only the co-registered ones pair
    t1 = next(i for i in first["images"] if i["modality"] == "T1w")
    assert t1["prompt"].startswith("Age: 25; Gender: F; Scanner: 3.0 Siemens; Modality: T1w")
    assert "(2300.0, 3.0, 900.0, 9.0)" in t1["prompt"]
    t2star = next(i for i in sessions["sub-08", None]["images"] if i["modality"] == "T2star")
    assert "Scanner: 1.5 Philips" in t2star["prompt"] and "(50.0, 20.0, None, 15.0)" in t2star["prompt"], t2star
    assert len(sessions["sub-08", None]["paired"]) == 3
    # deterministic, and another seed gives another split
    assert bids_datalist.build_datalist(dataset, 0.25, 0.125, seed=3) == datalist
    other = bids_datalist.build_datalist(dataset, 0.25, 0.125, seed=4)
    assert {s["subject"] for s in other["validation"]} != subjects["validation"]


def test_command_writes_a_datalist_the_stage_configs_read(dataset, tmp_path, capsys):
    from monai.bundle import ConfigWorkflow

    output = tmp_path / "datalist.json"
    # python -m scripts.data.bids_datalist DATASET --output datalist.json --val_fraction 0.25 --test_fraction 0
    bids_datalist.main([dataset, "--output", str(output), "--val_fraction", "0.25", "--test_fraction", "0"])
    report = capsys.readouterr().out
    assert "skipped 6" in report and "sub-05/anat/sub-05_T2starw.nii.gz: unreadable image" in report
    train, val = bids_datalist.stage2_datalists(str(output))
    assert all(len(item["images"]) >= 2 for item in train) and val
    written = json.load(open(output))
    assert {item["subject"] for item in train} == {
        "_".join(filter(None, (s["subject"], s["session"]))) for s in written["training"] if len(s["paired"]) >= 2}
    stage1_train, stage1_val = bids_datalist.stage1_datalists(str(output))
    assert len(stage1_train) + len(stage1_val) == 8 * 2 + 2 + 1 + 1  # every usable image, co-registered or not
    # the stage-2 config takes the datalist (`--datalist`) in place of its own scan of dataset_dir
    workflow = ConfigWorkflow(
        config_file=os.path.join(BUNDLE_ROOT, "configs", "stage2_train.yaml"), workflow_type="train",
        dataset_dir=dataset, output_dir=str(tmp_path / "out"), device="cpu",
        datalist=str(output))
    assert [i["images"] for i in workflow.parser.get_parsed_content("train#datalist")] == [i["images"] for i in train]


def test_bad_arguments_fail_with_clear_errors(dataset, tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        bids_datalist.build_datalist(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="test_fraction"):
        bids_datalist.build_datalist(dataset, test_fraction=1.5)
    with pytest.raises(ValueError, match="expected a datalist"):
        json.dump({"training": []}, open(tmp_path / "bad.json", "w"))
        bids_datalist.read_datalist(str(tmp_path / "bad.json"), "training")
