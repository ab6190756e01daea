"""Reliability and security (issue #9) at every entry point: a bad input is one line naming the file or field and
nothing is written; unusual but valid inputs work; writes are atomic and batches resume; weights and prompts are
data, never code (also through MONAI's config parser); `python -m monai.bundle run` prints one line, no traceback."""

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import scripts.engine.inference_engine
import scripts.engine.volume_io
from conftest import BUNDLE_ROOT, SHIPPED_SCALE
from helpers import (
    FAST,
    T2W_TEMPLATE,
    SamplingNet,
    blob_volume,
    files_in,
    python_environment,
    write_bids_image,
    write_dicom_series,
    write_nifti,
    write_raw_nifti,
)
from scripts.cli import literal_override
from scripts.engine.evaluation import Method, run_evaluation
from scripts.engine.inference_engine import load_datalist, load_network_weights, run_batch, run_inference
from scripts.engine.volume_io import atomic_path, load_volume, save_nifti
from scripts.errors import TEXT_FIELDS, UserInputError, check_bundle_run, text_field_refusals
from scripts.prompt import prompt_from_image, tokenize
from scripts.simulator import simulate

# What a prompt would run if anything evaluated it: creates the file PWNED in the working directory.
CODE = "$__import__('os').system('touch PWNED')"
# A valid template whose 4 + 3 decimals push it past the text encoder's 90-token context.
LONG_PROMPT = ("Age: 45.55; Gender: F; Scanner: 1.5 Philips; Modality: FLAIR; Voxel size: (0.45, 0.45, 0.45); "
               "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (12345.67, 123.45, 2345.67, 123.45)")


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in tmp_path, so a prompt that ran as code would leave PWNED there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------
# Inference (run_inference, what the config, the batch and MONAI Label call): every bad input, nothing written


def _good_image(tmp_path):
    return write_nifti(tmp_path / "good.nii.gz", blob_volume((12, 12, 12), np.eye(4), (6, 6, 6)), np.eye(4))


def _nifti(tmp_path, name, data, affine=np.eye(4), dtype=np.float32):
    return write_nifti(tmp_path / name, data, affine, dtype)


def _truncated(tmp_path):
    path = _nifti(tmp_path, "cut.nii.gz", np.random.rand(24, 24, 24))
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    return path


def _with(value, flat_index, data):
    data.flat[flat_index] = value
    return data


def _text_file(tmp_path, name):
    (tmp_path / name).write_text("patient notes, not an image")
    return str(tmp_path / name)


def _empty_folder(tmp_path, name):
    (tmp_path / name).mkdir()
    return str(tmp_path / name)


BAD_IMAGES = {  # kind: (writer of the input, run_inference keyword arguments, expected part of the message)
    "missing": (lambda t: str(t / "nope.nii.gz"), {}, "nope.nii.gz: no such file or directory"),
    "empty_path": (lambda t: "", {}, "got an empty path"),
    "not_an_image": (lambda t: _text_file(t, "notes.nii.gz"), {}, "notes.nii.gz: not a readable NIfTI image"),
    "truncated": (_truncated, {}, "cut.nii.gz: truncated or corrupt image data"),
    "2d": (lambda t: _nifti(t, "slice.nii.gz", np.random.rand(24, 24)), {}, "a 2D image (shape (24, 24))"),
    "single_slice": (lambda t: _nifti(t, "slice.nii.gz", np.random.rand(24, 24, 1)), {}, "a 2D image"),
    "4d": (lambda t: _nifti(t, "bold.nii.gz", np.random.rand(8, 8, 8, 5)), {},
           "a 4D series of 5 volumes (shape (8, 8, 8, 5)); pick one with --volume_index (0..4)"),
    "4d_index_outside": (lambda t: _nifti(t, "bold.nii.gz", np.random.rand(8, 8, 8, 5)), {"volume_index": 5},
                         "volume_index 5 is outside 0..4"),
    "index_of_3d": (_good_image, {"volume_index": 2}, "volume_index 2 given, but the image holds one volume"),
    "index_not_a_number": (_good_image, {"volume_index": "1"}, "volume_index: expected a whole number"),
    "5d": (lambda t: _nifti(t, "multi.nii.gz", np.random.rand(8, 8, 8, 2, 2)), {}, "got 5 dimensions"),
    "complex": (lambda t: _nifti(t, "phase.nii.gz", np.random.rand(8, 8, 8), dtype=np.complex64), {},
                "expected a grey-scale image of real numbers, got data type complex64"),
    "nan": (lambda t: _nifti(t, "nan.nii.gz", _with(np.nan, 100, np.random.rand(12, 12, 12))), {},
            "nan.nii.gz: 1 NaN/Inf voxels; fix the file, or set them to 0 with --nan_policy repair"),
    "inf": (lambda t: _nifti(t, "inf.nii.gz", _with(-np.inf, 7, np.random.rand(12, 12, 12))), {}, "1 NaN/Inf voxels"),
    "unknown_nan_policy": (_good_image, {"nan_policy": "ignore"}, "nan_policy: expected one of ('refuse', 'repair')"),
    "all_zero": (lambda t: _nifti(t, "zero.nii.gz", np.zeros((12, 12, 12))), {},
                 "a constant image (every voxel is 0.0)"),
    "constant": (lambda t: _nifti(t, "flat.nii.gz", np.full((12, 12, 12), 7.0)), {}, "every voxel is 7.0"),
    "singular_affine": (lambda t: write_raw_nifti(t / "flat_affine.nii.gz", (12, 12, 12),
                                                  np.random.rand(12, 12, 12).astype(np.float32).tobytes("F"),
                                                  sform=[[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]), {},
                        "non-invertible voxel-to-world affine"),
    "nan_affine": (lambda t: write_raw_nifti(t / "nan_affine.nii.gz", (12, 12, 12),
                                             np.random.rand(12, 12, 12).astype(np.float32).tobytes("F"),
                                             sform=[[1, 0, 0, 0], [0, np.nan, 0, 0], [0, 0, 1, 0]]), {},
                   "non-invertible voxel-to-world affine"),
    "absurd_size": (lambda t: write_raw_nifti(t / "huge.nii.gz", (30000, 30000, 30000), b"\0" * 1024), {},
                    "huge.nii.gz (shape (30000, 30000, 30000)): needs about 392.9 TiB of memory, only"),
    "empty_dicom_folder": (lambda t: _empty_folder(t, "series"), {}, "series: no DICOM series found in this directory"),
    "empty_prompt": (_good_image, {"prompt": ""}, "got an empty prompt"),
    "prompt_not_text": (_good_image, {"prompt": 40}, "prompt: expected text"),
    "unknown_modality": (_good_image, {"prompt": "T5w"}, "prompt field 'Modality': expected one of T1w"),
    "unparsable_prompt": (_good_image, {"prompt": "make it look like a T2"}, "prompt: cannot read"),
    "prompt_code": (_good_image, {"prompt": CODE}, "prompt: cannot read \"$__import__('os')"),
    "te_above_tr": (_good_image, {"prompt": T2W_TEMPLATE.replace("(4000.0, 100.0", "(100.0, 4000.0")},
                    "TE 4000.0 ms cannot exceed TR 100.0 ms"),
    "ti_above_tr": (_good_image, {"prompt": "FLAIR; Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  "
                                            "(2000, 100, 2500, 90)"}, "TI 2500.0 ms cannot exceed TR 2000.0 ms"),
    "negative_te": (_good_image, {"prompt": T2W_TEMPLATE.replace("100.0", "-5")},
                    "prompt field 'TE': expected a positive time in ms, got '-5'"),
    "prompt_too_long": (_good_image, {"prompt": LONG_PROMPT}, "prompt is 94 tokens long"),
    "zero_spacing": (_good_image, {"target_spacing": [1.0, 0.0, 1.0]}, "target_spacing: expected 3 positive"),
    "negative_spacing": (_good_image, {"target_spacing": -1.0}, "target_spacing: expected 3 positive"),
    "text_spacing": (_good_image, {"target_spacing": "1mm"}, "target_spacing: expected 3 positive"),
    "nan_spacing": (_good_image, {"target_spacing": [1.0, float("nan"), 1.0]}, "target_spacing"),
    "huge_output": (_good_image, {"target_spacing": 1e-4}, "good.nii.gz: needs about 18.4 PiB of memory, only"),
    "bad_reference": (_good_image, {"reference": "notes.txt"}, "notes.txt: no such file"),
    "output_dir_is_a_file": (_good_image, {"output_dir": "good.nii.gz"}, "is a file, not a folder"),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_inference_refuses_bad_input_in_one_line_and_writes_nothing(in_tmp, kind):
    write, overrides, expected = BAD_IMAGES[kind]
    path = write(in_tmp)
    arguments = {"prompt": "T2w", "output_dir": "out", **overrides}
    with pytest.raises(UserInputError) as raised:
        run_inference(path, arguments.pop("prompt"), arguments.pop("output_dir"), SamplingNet(), inferer=FAST,
                      **arguments)
    assert expected in one_line(raised)
    assert files_in(in_tmp / "out") == [] and not (in_tmp / "PWNED").exists()


def test_nan_repair_is_recorded(tmp_path):
    data = blob_volume((12, 12, 12), np.eye(4), (6, 6, 6))
    data[2, 2, 2] = np.inf
    path = write_nifti(tmp_path / "inf.nii.gz", data, np.eye(4))
    written = run_inference(path, "T2w", str(tmp_path / "out"), SamplingNet(), nan_policy="repair", inferer=FAST,
                            preview=False)
    assert "1 NaN/Inf voxels were set to 0" in json.load(open(written["sidecar"]))["warnings"][0]


def test_refuses_to_overwrite_the_input(tmp_path):
    path = write_nifti(tmp_path / "scan.nii.gz", blob_volume((12, 12, 12), np.eye(4), (6, 6, 6)), np.eye(4))
    os.symlink(path, tmp_path / "scan_T2w.nii.gz")  # the output name resolves to the input file
    before = open(path, "rb").read()
    with pytest.raises(UserInputError, match="would overwrite an input"):
        run_inference(str(tmp_path / "scan.nii.gz"), "T2w", str(tmp_path), SamplingNet(), inferer=FAST)
    assert open(path, "rb").read() == before


def test_dicom_series_too_large_is_refused_with_the_numbers(tmp_path, monkeypatch):
    folder = str(tmp_path / "series")
    write_dicom_series(folder, (100 * np.random.rand(16, 12, 6)).astype(np.int16))
    monkeypatch.setattr(scripts.engine.volume_io, "available_memory_bytes", lambda: 1000)
    with pytest.raises(UserInputError) as raised:
        load_volume(folder)
    # 4 float32 working copies of 16 x 12 x 6 voxels = 18432 bytes
    assert "series (6 DICOM files): needs about 18.0 KiB of memory, only 1000.0 B is available" in one_line(raised)


def test_flip_averaging_counts_its_extra_memory_before_any_work(tmp_path, monkeypatch):
    image = write_nifti(tmp_path / "scan.nii.gz", (0.2 + np.random.rand(5, 5, 5)).astype(np.float32), np.eye(4))
    # output 10 x 10 x 10 at 0.5 mm: 12 bytes per voxel for one prediction, 20 with flip averaging
    monkeypatch.setattr(scripts.engine.volume_io, "available_memory_bytes", lambda: 16000)
    run_inference(image, "T2w", str(tmp_path / "single"), SamplingNet(), target_spacing=0.5, inferer=FAST,
                  preview=False)
    with pytest.raises(UserInputError) as raised:
        run_inference(image, "T2w", str(tmp_path / "averaged"), SamplingNet(), target_spacing=0.5,
                      inferer=FAST.with_options(flip_averaging=True), preview=False)
    assert "output grid (10, 10, 10) for" in one_line(raised) and "needs about 19.5 KiB" in one_line(raised)
    assert not os.path.exists(tmp_path / "averaged") or os.listdir(tmp_path / "averaged") == []


@pytest.mark.parametrize("shape, volume_index", [
    ((8, 8, 8, 1), None),  # a "4D" file of one volume
    ((8, 8, 8, 1, 1), None),  # trailing singleton axes (some converters write 5D)
    ((8, 8, 8, 3, 1), 2),  # a series with a trailing singleton axis: volume_index still picks the volume
    ((8, 8, 8), 0),  # volume 0 of a single volume
])
def test_singleton_axes_and_volume_index_are_valid(tmp_path, shape, volume_index):
    data = 0.5 * np.random.rand(*shape)
    if len(shape) > 3:  # volume v holds values in [v, v + 0.5)
        data += np.arange(shape[3]).reshape((1, 1, 1, -1) + (1,) * (len(shape) - 4))
    volume = load_volume(write_nifti(tmp_path / "v.nii.gz", data, np.eye(4)), volume_index=volume_index)
    assert volume.array.shape == (8, 8, 8) and np.floor(volume.array.min()) == (volume_index or 0)


def test_prompt_text_with_parser_characters_reaches_the_tokenizer_as_text(in_tmp):
    path = _good_image(in_tmp)
    written = run_inference(path, "FLAIR; Scanner: 3.0 $vendor@%x", "out", SamplingNet(), inferer=FAST,
                            preview=False)
    assert "Scanner: 3.0 $vendor@%x; Modality: FLAIR" in json.load(open(written["sidecar"]))["target_prompt"]


def test_metadata_is_data(in_tmp):
    """A BIDS sidecar whose manufacturer is Python code: the prompt carries it as text, nothing runs."""
    sidecar = {"RepetitionTime": 2.3, "EchoTime": 0.003, "MagneticFieldStrength": 3, "Manufacturer": CODE}
    path = write_bids_image(str(in_tmp), "01", "T1w", np.random.rand(8, 8, 8), sidecar)
    text = prompt_from_image(path).render()
    assert "Scanner: 3.0 $__import__('os').system('touch;" in text
    assert tokenize(text).shape == (1, 90) and not (in_tmp / "PWNED").exists()


# ---------------------------------------------------------------------------------------------------------------
# Batch (datalist)


def _datalist(tmp_path, kind):
    path = tmp_path / ("cases.json" if kind != "missing" else "nothing.csv")
    content = {"unreadable": "{ not json", "empty": "[]", "no_prompt": '[{"input_image": "a.nii.gz"}]',
               "unknown_key": '[{"input_image": "a.nii.gz", "prompt": "T2w", "modality": "T2w"}]'}.get(kind)
    if content is not None:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("missing", "nothing.csv: no such datalist file"),
    ("unreadable", "cases.json: unreadable datalist (JSONDecodeError: "),
    ("empty", "expected a non-empty list of cases"),
    ("no_prompt", "case 1 needs 'input_image' and 'prompt'"),
    ("unknown_key", "case 1 has unknown keys ['modality']"),
])
def test_bad_datalist_is_one_line(tmp_path, kind, expected):
    with pytest.raises(UserInputError) as raised:
        load_datalist(_datalist(tmp_path, kind))
    assert expected in one_line(raised)


def test_batch_reports_failures_but_finishes_the_rest(in_tmp):
    good = _good_image(in_tmp)
    cases = [{"input_image": str(in_tmp / "missing.nii.gz"), "prompt": "T2w"},
             {"input_image": good, "prompt": CODE},  # a datalist's prompt is text: refused, never run
             {"input_image": good, "prompt": "T2w"}]
    with pytest.raises(UserInputError) as raised:
        run_batch(cases, "out", SamplingNet(), inferer=FAST, preview=False)
    assert "2 of 3 cases failed; first: " in one_line(raised) and "missing.nii.gz: no such file" in str(raised.value)
    assert files_in(in_tmp / "out") == ["good_T2w.json", "good_T2w.nii.gz"] and not (in_tmp / "PWNED").exists()


# ---------------------------------------------------------------------------------------------------------------
# Interruption: atomic writes, resume


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch, interruption):
    path = str(tmp_path / "out" / "image.nii.gz")
    save_nifti(np.ones((4, 4, 4)), np.eye(4), path)
    before = open(path, "rb").read()

    def half_then_interrupt(image, filename):
        open(filename, "wb").write(before[: len(before) // 2])
        raise interruption("killed mid-write")

    monkeypatch.setattr(scripts.engine.volume_io.nib, "save", half_then_interrupt)
    with pytest.raises(interruption):
        save_nifti(np.zeros((4, 4, 4)), np.eye(4), path)
    assert open(path, "rb").read() == before and files_in(tmp_path / "out") == ["image.nii.gz"]


def test_atomic_path_publishes_only_on_success(tmp_path):
    target = tmp_path / "record.json"
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as temporary:
            open(temporary, "w").write("{ half")
            raise RuntimeError("crash")
    assert files_in(tmp_path) == []
    with atomic_path(str(target)) as temporary:
        open(temporary, "w").write("{}")
        assert not target.exists()  # invisible under the final name until complete
    assert target.read_text() == "{}" and files_in(tmp_path) == ["record.json"]


class FailingNet(SamplingNet):
    def encode(self, image, tokens=None, modality=None, condition=None):
        raise RuntimeError("CUDA out of memory (simulated)")


def test_a_failure_during_synthesis_writes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="simulated"):
        run_inference(_good_image(tmp_path), "T2w", str(tmp_path / "out"), FailingNet(), inferer=FAST)
    assert files_in(tmp_path / "out") == []


def _interrupt(paths, state):
    """Leave a finished case as a kill at some moment would: after the image, before its sidecar, or damaged."""
    if state == "sidecar_cut":
        open(paths["sidecar"], "w").write("{ truncated")
    elif state == "killed_before_sidecar":
        os.remove(paths["sidecar"])
    elif state == "image_cut_after_sidecar":
        blob = open(paths["image"], "rb").read()
        open(paths["image"], "wb").write(blob[:100])


@pytest.mark.parametrize("state", ["sidecar_cut", "killed_before_sidecar", "image_cut_after_sidecar"])
def test_batch_resumes_redoing_only_unfinished_cases(tmp_path, state):
    paths = [write_nifti(tmp_path / f"case{i}.nii.gz", blob_volume((12, 12, 12), np.eye(4), (6, 6, 6 + i)),
                         np.eye(4)) for i in range(2)]
    datalist = tmp_path / "cases.csv"
    with open(datalist, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input_image", "prompt", "target_spacing", "input_modality"])
        writer.writerow(["case0.nii.gz", "T2w", "[2, 2, 2]", "FLAIR"])
        writer.writerow(["case1.nii.gz", T2W_TEMPLATE, "", ""])
    cases = load_datalist(str(datalist))
    assert cases[0]["input_image"] == paths[0] and cases[0]["target_spacing"] == [2, 2, 2]
    out = tmp_path / "out"
    first = run_batch(cases, str(out), SamplingNet(), inferer=FAST, preview=False)
    assert [nib.load(p["image"]).shape for p in first] == [(6, 6, 6), (12, 12, 12)]
    assert [json.load(open(p["sidecar"]))["input_modality"] for p in first] == ["FLAIR", None]  # the row's column
    os.utime(first[0]["image"], (1, 1))
    _interrupt(first[1], state)

    run_batch(cases, str(out), SamplingNet(), inferer=FAST, preview=False)
    assert os.path.getmtime(first[0]["image"]) == 1  # finished (its sidecar verifies): skipped
    record = json.load(open(first[1]["sidecar"]))  # redone, and verifiable again
    assert record["output_bytes"] == os.path.getsize(first[1]["image"])
    assert nib.load(first[1]["image"]).shape == (12, 12, 12)

    run_batch(cases, str(out), SamplingNet(), inferer=FAST, preview=False, overwrite=True)
    assert os.path.getmtime(first[0]["image"]) != 1  # asked to: rewritten


# ---------------------------------------------------------------------------------------------------------------
# Weights: missing, corrupt, mismatched, malicious


class CodeOnLoad:
    """A pickle payload that creates a file when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _weights(tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    net = SamplingNet(conv=True)
    if kind == "corrupt":
        path.write_bytes(b"not a checkpoint")
    elif kind == "truncated":
        torch.save(net.state_dict(), path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "not_a_dict":
        torch.save([p.detach() for p in net.parameters()], path)
    elif kind == "non_tensor_values":
        torch.save({**net.state_dict(), "epoch": 3}, path)
    elif kind == "other_network":
        torch.save(SamplingNet().state_dict(), path)
    elif kind == "resized":
        torch.save({**net.state_dict(), "conv.weight": torch.zeros(4, 1, 3, 3, 3)}, path)
    elif kind == "nan_weights":
        torch.save({**net.state_dict(), "conv.bias": torch.tensor([0.0, float("nan")])}, path)
    return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("missing", "missing.pt: no such weights file (train one, or pass --ckpt_path)"),
    ("corrupt", "corrupt.pt: not a loadable weights file"),
    ("truncated", "truncated.pt: not a loadable weights file"),
    ("not_a_dict", "expected a state dict (parameter name -> tensor), got list"),
    ("non_tensor_values", "got a dict holding non-tensor values"),
    ("other_network", "weights do not fit this network config (are --scale and --network_def#input_skip right?): "
                      "missing conv.bias, conv.weight; unexpected none; different shape none"),
    ("resized", "missing none; unexpected none; different shape conv.weight"),
    ("nan_weights", "NaN/Inf values in 1 tensors (first: conv.bias)"),
])
def test_bad_weights_are_one_line(tmp_path, kind, expected):
    with pytest.raises(UserInputError) as raised:
        load_network_weights(SamplingNet(conv=True), _weights(tmp_path, kind))
    assert expected in one_line(raised)


def test_a_checkpoint_crafted_to_run_code_does_not_run_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"conv.weight": CodeOnLoad(str(marker))}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is real: full unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UserInputError) as raised:
        load_network_weights(SamplingNet(conv=True), str(tmp_path / "evil.pt"))
    assert "evil.pt: not a loadable weights file (UnpicklingError: " in one_line(raised)
    assert not marker.exists()
    torch.save(SamplingNet(conv=True).state_dict(), tmp_path / "good.pt")
    assert not load_network_weights(SamplingNet(conv=True), str(tmp_path / "good.pt")).training


# ---------------------------------------------------------------------------------------------------------------
# Simulate and evaluate entry points (the other argument checks are in test_simulator.py / test_evaluation.py)


@pytest.mark.parametrize("arguments, expected", [
    ({"output_dir": "taken.txt"}, "output_dir taken.txt: a file, not a folder"),
    ({"num_subjects": "3"}, "num_subjects: expected a positive integer, got '3'"),
    ({"voxel_mm": 0}, "voxel_mm: expected a positive integer"),
    ({"sites": []}, "sites: expected at least one site preset name"),
    ({"sites": ["IXI", "Atlantis"]}, "sites: unknown site preset(s) ['Atlantis']"),
])
def test_simulate_refuses_bad_arguments_before_writing(in_tmp, arguments, expected):
    (in_tmp / "taken.txt").write_text("")
    with pytest.raises(UserInputError) as raised:
        simulate(**{"output_dir": "dataset", "num_subjects": 1, "progress": False, **arguments})
    assert expected in one_line(raised)
    assert files_in(in_tmp) == ["taken.txt"]


def _tiny_bids(root, source_bytes=None):
    """One HCP-D subject with a T1w (``source_bytes`` replaces its file) and a T2w with its sidecar."""
    image = 100 * blob_volume((10, 10, 10), np.eye(4), (5, 5, 5))
    write_bids_image(str(root), "001", "T2w", image, {"RepetitionTime": 4.0, "EchoTime": 0.1},
                     participants=[{"participant_id": "sub-001", "site": "HCP-D"}])
    source = write_bids_image(str(root), "001", "T1w", image, {"RepetitionTime": 2.3, "EchoTime": 0.003})
    if source_bytes is not None:
        open(source, "wb").write(source_bytes)
    return str(root)


@pytest.mark.parametrize("kind, expected", [
    ("not_bids", "nowhere: not a BIDS dataset (no participants.tsv)"),
    ("output_dir_is_a_file", "output_dir taken.txt: a file, not a folder"),
    ("unknown_subject", "no subjects to evaluate (asked for ['sub-999'])"),
    ("corrupt_source", "sub-001_T1w.nii.gz: not a readable NIfTI image"),
    ("corrupt_target", "sub-001_T2w.nii.gz: not a readable NIfTI image"),
    ("missing_datalist", "pairs.json: no such datalist file"),
    ("malformed_datalist", "broken.json: unreadable datalist (JSONDecodeError: "),
])
def test_evaluate_refuses_bad_input_before_writing(in_tmp, kind, expected):
    (in_tmp / "taken.txt").write_text("")
    (in_tmp / "broken.json").write_text('[{"input": ')
    dataset = _tiny_bids(in_tmp / "bids", b"garbage" if kind == "corrupt_source" else None)
    if kind == "corrupt_target":
        open(in_tmp / "bids" / "sub-001" / "anat" / "sub-001_T2w.nii.gz", "wb").write(b"garbage")
    arguments = {"dataset_dir": "nowhere" if kind == "not_bids" else dataset, "output_dir": "out", "subjects": None,
                 "datalist": None}
    arguments.update({"output_dir_is_a_file": {"output_dir": "taken.txt"},
                      "unknown_subject": {"subjects": ["sub-999"]},
                      "missing_datalist": {"datalist": "pairs.json"},
                      "malformed_datalist": {"datalist": "broken.json"}}.get(kind, {}))
    with pytest.raises(UserInputError) as raised:
        run_evaluation(arguments["dataset_dir"], arguments["output_dir"], [Method("identity", None, "identity")], FAST,
                       subjects=arguments["subjects"], datalist=arguments["datalist"])
    assert expected in one_line(raised)
    assert not (in_tmp / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Text fields are data: config syntax in them refused under `monai.bundle run`, kept literal by `tumsyn`

# How `python -m monai.bundle run` appears in sys.argv (fire parses the rest).
BUNDLE_COMMAND = [os.path.join("site-packages", "monai", "bundle", "__main__.py"), "run", "--config_file", "c.yaml"]


def _as_monai_reads(field, value):
    """The text field's item as MONAI's config parser resolves it, next to other config content it could reach."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({"imports": ["$import os"], "ckpt": "/models/model.pt", field: value,
                           "used": f"$str(@{field})"})
    return parser.get_parsed_content("used")


@pytest.mark.parametrize("value", [
    "$import antigravity",  # an import statement
    "\"$__import__('os').getcwd()\"",  # fire unquotes it into an expression
    '{"_target_": "os.system", "command": "touch PWNED"}',  # fire turns a "{...}" argument into a dict
    f'["{CODE}"]',  # ... and a "[...]" argument into a list, whose items MONAI parses
    "@##ckpt",  # a relative reference
    "FLAIR; Scanner: 3.0 @#ckpt",  # ... rewritten wherever it stands
])
def test_bundle_run_refuses_every_form_of_config_syntax_in_a_text_field(value):
    refused = text_field_refusals(BUNDLE_COMMAND + ["--prompt", value, "--scale", "$1"])
    assert list(refused) == ["prompt"]  # other overrides are config, the user's to trust
    assert refused["prompt"].startswith("prompt: ") and "a prompt is plain text" in refused["prompt"]


@pytest.mark.parametrize("value", ["T2w", T2W_TEMPLATE, "FLAIR; Age: 70", "FLAIR; Scanner: 3.0 $vendor@x",
                                   "scans/sub-01 (2)/T1w.nii.gz", "50% dose; T1CE"])
def test_text_without_config_syntax_reaches_the_bundle_as_given(in_tmp, value):
    from fire.parser import DefaultParseValue

    assert text_field_refusals(BUNDLE_COMMAND + ["--prompt", value]) == {}
    assert DefaultParseValue(value) == value and _as_monai_reads("prompt", value) == value


@pytest.mark.parametrize("text", [CODE, "$import antigravity", "@ckpt", "%evil.yaml#payload", "@##ckpt",
                                  "a::b#c", "it's \"quoted\", \\x40 \u00fc", ""])
def test_tumsyn_hands_any_text_to_monai_as_a_literal(in_tmp, text):
    (in_tmp / "evil.yaml").write_text(f'payload: "{CODE}"\n')
    for field in TEXT_FIELDS:
        assert _as_monai_reads(field, literal_override(field, text)) == text
    assert literal_override("prompt", None) is None  # the config's default
    with pytest.raises(UserInputError, match=r"^prompt: expected text, got \{'_target_': 'os.system'\} \(fire read "):
        literal_override("prompt", {"_target_": "os.system"})
    assert not (in_tmp / "PWNED").exists()


# ---------------------------------------------------------------------------------------------------------------
# One line on the command line


def test_check_bundle_run_makes_user_errors_one_line_under_monai_bundle_run_only(capsys, monkeypatch):
    delegated = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: delegated.append(exc))
    before = sys.excepthook
    check_bundle_run(["/usr/bin/tumsyn", "infer", "--prompt", CODE])  # tumsyn (or any program) prints its own
    assert sys.excepthook is before
    check_bundle_run(BUNDLE_COMMAND)
    try:
        raise RuntimeError("Failed to evaluate ConfigExpression") from UserInputError("scan.nii.gz: a 2D image")
    except RuntimeError as error:
        sys.excepthook(type(error), error, error.__traceback__)
    assert capsys.readouterr().err == "error: scan.nii.gz: a 2D image\n" and delegated == []
    bug = KeyError("a bug")
    sys.excepthook(KeyError, bug, None)
    assert delegated == [(KeyError, bug, None)]  # not a user error: the usual traceback
    with pytest.raises(UserInputError, match="^prompt: .* would run as Python code"):
        check_bundle_run(BUNDLE_COMMAND + ["--prompt", CODE])


def test_importing_the_bundle_changes_nothing_in_monai_or_sys():
    """Every module of `scripts` imported, as under `python -m monai.bundle run` with a code prompt: MONAI's parser
    classes and sys.excepthook are the objects they were before."""
    code = """
import importlib, pkgutil, sys
sys.argv = ["/venv/monai/bundle/__main__.py", "run", "--prompt", "$1"]
from monai.bundle import ConfigParser
from monai.bundle.config_item import ConfigComponent, ConfigExpression, ConfigItem
from monai.bundle.reference_resolver import ReferenceResolver
classes = (ConfigParser, ConfigComponent, ConfigExpression, ConfigItem, ReferenceResolver)
def state():
    return [dict(vars(c)) for c in classes], sys.excepthook
before = state()
import scripts
names = [m.name for m in pkgutil.walk_packages(scripts.__path__, "scripts.")]
for name in names:
    importlib.import_module(name)
assert state() == before, [c.__name__ for c, a, b in zip(classes, before[0], state()[0]) if a != b]
print(len(names), "modules")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=python_environment(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-2]) >= 40


@pytest.fixture(scope="module")
def shipped_scale_weights(tmp_path_factory):
    """Untrained weights at the configs' default scale."""
    from scripts.nets.tumsyn_net import build_tumsyn_net

    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(build_tumsyn_net(SHIPPED_SCALE).state_dict(), path)
    return str(path)


def _bundle_run(config, cwd, *overrides):
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle", "configs",
                            f"{config}.yaml"), *overrides]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize("case", ["code_prompt", "truncated_input", "simulate_zero_subjects", "evaluate_code_datalist",
                                  "stage2_code_datalist"])
def test_bundle_run_prints_one_line_and_exits_1(tmp_path, shipped_scale_weights, case):
    """Real `python -m monai.bundle run`: a user error is the last stderr line, no traceback, no output."""
    if case.endswith("code_datalist"):  # refused by the configs' first initialize item, before MONAI evaluates it
        config = "evaluate" if case.startswith("evaluate") else "stage2_train"
        done = _bundle_run(config, tmp_path, "--datalist", CODE, "--output_dir", "out")
        expected = "error: datalist: \"$__import__('os').system('touch PWNED')\" would run as Python code"
    elif case == "simulate_zero_subjects":
        done = _bundle_run("simulate", tmp_path, "--output_dir", "dataset", "--num_subjects", "0")
        expected = "error: num_subjects: expected a positive integer, got 0"
    else:
        image = _truncated(tmp_path) if case == "truncated_input" else _good_image(tmp_path)
        prompt = CODE if case == "code_prompt" else "T2w"
        done = _bundle_run("inference", tmp_path, "--input_image", image, "--prompt", prompt, "--output_dir", "out",
                           "--ckpt_path", shipped_scale_weights)
        expected = ("error: prompt: \"$__import__('os').system('touch PWNED')\" would run as Python code"
                    if case == "code_prompt" else f"error: {image}: truncated or corrupt image data")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-3000:]
    assert lines[-1].startswith(expected) and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "PWNED").exists() and files_in(tmp_path / "out") == []
    assert files_in(tmp_path / "dataset") == []


@pytest.mark.parametrize("value, expected", [(False, False), ("false", False), ("False", False), ("0", False),
                                             ("no", False), (True, True), ("true", True), ("1", True)])
def test_yes_no_overrides_mean_what_they_say(value, expected, monkeypatch):
    """`--progress_bar false` reaches the config as the string 'false' (fire only turns `False` into a bool)."""
    from monai.bundle import ConfigParser

    from scripts.simulator.generate import realism_subjects

    parser = ConfigParser()
    parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "inference.yaml"))
    parser["amp"] = value
    assert parser.get_parsed_content("inferer").settings["amp"] is expected
    parser.read_config(os.path.join(BUNDLE_ROOT, "configs", "simulate.yaml"))
    parser["realism"] = value
    calls = []
    monkeypatch.setattr(scripts.simulator, "simulate", lambda **arguments: calls.append(arguments))
    parser.get_parsed_content("run#0")
    assert realism_subjects(1, calls[0]["realism"]) == [expected]  # a share of subjects; yes/no words are 1 and 0
    for config in ("stage1_train.yaml", "stage2_train.yaml"):
        parser.read_config(os.path.join(BUNDLE_ROOT, "configs", config))
        handlers = parser["train"]["handlers"]
        (logs,) = [h for h in handlers if h.get("_target_", "").endswith("EngineLogs")]
        parser["progress_bar"] = value
        assert parser.get_parsed_content(f"train#handlers#{handlers.index(logs)}").progress_bar is expected, config


def test_a_yes_no_override_that_is_neither_is_one_line():
    from scripts.errors import config_flag

    with pytest.raises(UserInputError, match=r"^progress_bar: expected true or false, got 'maybe'$"):
        config_flag("maybe", "progress_bar")


# ---------------------------------------------------------------------------------------------------------------
# Nothing lost, nothing leaked: batch outputs, hostile prompts, broken headers, full disks


def _csv(path, rows, header=("input_image", "prompt", "target_spacing")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _patients_with_one_file_name(tmp_path):
    for number, site in enumerate(("siteA", "siteB")):
        (tmp_path / site).mkdir()
        write_nifti(tmp_path / site / "sub-01_T1w.nii.gz", blob_volume((12, 12, 12), np.eye(4), (6, 6, 4 + 3 * number)),
                    np.eye(4))
    return _csv(tmp_path / "cases.csv", [["siteA/sub-01_T1w.nii.gz", "FLAIR", ""],
                                         ["siteB/sub-01_T1w.nii.gz", "FLAIR", ""],
                                         ["siteA/sub-01_T1w.nii.gz", "FLAIR", "[2,2,2]"]])


def test_batch_rows_sharing_a_file_name_or_input_each_get_their_output(tmp_path, caplog):
    """Two patients' files of one name and one image at two spacings: three outputs; a rerun skips exactly the rows
    its sidecars record (input content, prompt, spacing), and says it skipped them."""
    cases = load_datalist(_patients_with_one_file_name(tmp_path))
    out = tmp_path / "out"
    written = run_batch(cases, str(out), SamplingNet(), inferer=FAST, preview=False)
    assert [os.path.relpath(p["image"], out) for p in written] == [
        os.path.join("siteA", "sub-01_T1w_FLAIR.nii.gz"), os.path.join("siteB", "sub-01_T1w_FLAIR.nii.gz"),
        os.path.join("siteA", "sub-01_T1w_FLAIR_2x2x2mm.nii.gz")]
    assert [nib.load(p["image"]).shape for p in written] == [(12, 12, 12), (12, 12, 12), (6, 6, 6)]
    assert [json.load(open(p["sidecar"]))["input_image"] for p in written] == [c["input_image"] for c in cases]
    for paths in written:
        os.utime(paths["image"], (1, 1))

    caplog.clear()
    with caplog.at_level("INFO", logger="scripts.engine.inference_engine"):
        run_batch(cases, str(out), SamplingNet(), inferer=FAST, preview=False)
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping") for m in messages) == 3 and not any(m.startswith("wrote") for m in messages)
    assert all(os.path.getmtime(p["image"]) == 1 for p in written)

    # siteB's scan replaced under the same name: its row is no longer the one recorded, so it is redone
    write_nifti(tmp_path / "siteB" / "sub-01_T1w.nii.gz", blob_volume((12, 12, 12), np.eye(4), (4, 4, 4)), np.eye(4))
    caplog.clear()
    with caplog.at_level("INFO", logger="scripts.engine.inference_engine"):
        run_batch(cases, str(out), SamplingNet(), inferer=FAST, preview=False)
    assert [os.path.getmtime(p["image"]) == 1 for p in written] == [True, False, True]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("wrote")] == [
        f"wrote {written[1]['image']}"]


def test_batch_rows_that_would_write_one_file_are_refused_up_front(tmp_path):
    _good_image(tmp_path)
    datalist = _csv(tmp_path / "cases.csv", [["good.nii.gz", "T2w", ""], ["good.nii.gz", "FLAIR", ""],
                                             ["good.nii.gz", T2W_TEMPLATE, ""]])
    with pytest.raises(UserInputError) as raised:
        run_batch(load_datalist(datalist), str(tmp_path / "out"), SamplingNet(), inferer=FAST, preview=False)
    assert f"cases 1 and 3 would both write {tmp_path / 'out' / 'good_T2w.nii.gz'}" in one_line(raised)
    assert files_in(tmp_path / "out") == []


@pytest.mark.parametrize("prefix", ["$", "@", "%"])
def test_text_fields_starting_with_parser_prefixes_are_never_expanded(in_tmp, prefix):
    """Every text field, each parser prefix: refused in one line under `python -m monai.bundle run` (quoting the value
    as typed, never what it would expand to), handed to MONAI as literal text by `tumsyn`."""
    (in_tmp / "secret.json").write_text('{"key": "TOP-SECRET"}')
    text = {"$": CODE, "@": "@ckpt", "%": "%secret.json#key"}[prefix]
    for field in TEXT_FIELDS:
        refused = text_field_refusals(BUNDLE_COMMAND + [f"--{field}", text])
        assert list(refused) == [field] and refused[field].startswith(f"{field}: {text!r} would ")
        assert _as_monai_reads(field, literal_override(field, text)) == text
    assert "TOP-SECRET" not in str(text_field_refusals(BUNDLE_COMMAND + ["--prompt=" + text]))
    assert text_field_refusals(["/usr/bin/tumsyn", "infer", "--prompt", text]) == {}
    assert not (in_tmp / "PWNED").exists()


@pytest.mark.parametrize("prefix", ["$", "@", "%"])
def test_bundle_run_never_expands_a_prompt(tmp_path, shipped_scale_weights, prefix):
    """Real `python -m monai.bundle run`: each parser prefix in --prompt ends as one line quoting the prompt as typed,
    never another file's or item's content, nothing written."""
    (tmp_path / "secret.json").write_text('{"key": "TOP-SECRET"}')
    prompt, expected = {"$": (CODE, "would run as Python code"), "@": ("@ckpt_path", "an '@' reference"),
                        "%": (f"%{tmp_path / 'secret.json'}#key", "a '%' macro")}[prefix]
    done = _bundle_run("inference", tmp_path, "--input_image", _good_image(tmp_path), "--prompt", prompt,
                       "--output_dir", "out", "--ckpt_path", shipped_scale_weights)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("error: prompt: ") and expected in last, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "TOP-SECRET" not in done.stderr + done.stdout
    assert shipped_scale_weights not in last and files_in(tmp_path / "out") == [] and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("prefix", ["$", "@", "%"])
def test_tumsyn_infer_reads_a_prompt_as_given(tmp_path, shipped_scale_weights, prefix):
    """Real `tumsyn infer`: the prompt reaches the bundle's prompt parser as typed, which refuses it as a prompt in one
    line; nothing runs, nothing of another item or file shows, nothing is written."""
    (tmp_path / "secret.json").write_text('{"key": "TOP-SECRET"}')
    prompt = {"$": CODE, "@": "@ckpt_path", "%": f"%{tmp_path / 'secret.json'}#key"}[prefix]
    done = subprocess.run([sys.executable, "-c", "from scripts.cli import main; main()", "infer", "--input_image",
                           _good_image(tmp_path), "--prompt", prompt, "--output_dir", "out", "--ckpt_path",
                           shipped_scale_weights], capture_output=True, text=True, cwd=tmp_path,
                          env=python_environment(), timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and last.startswith("tumsyn: error: prompt") and repr(prompt)[:40] in last, \
        done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "TOP-SECRET" not in done.stderr + done.stdout
    assert shipped_scale_weights not in last and files_in(tmp_path / "out") == [] and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("pixdim", [[1.0, 0.0, 1.0], [1.0, -2.0, 1.0], [1.0, float("nan"), 1.0]])
def test_a_header_voxel_size_of_zero_or_below_is_refused(in_tmp, pixdim):
    path = write_raw_nifti(in_tmp / "pixdim.nii.gz", (12, 12, 12),
                           blob_volume((12, 12, 12), np.eye(4), (6, 6, 6)).tobytes("F"), pixdim=pixdim)
    with pytest.raises(UserInputError) as raised:
        run_inference(path, "T2w", "out", SamplingNet(), inferer=FAST)
    assert one_line(raised).startswith(f"{path}: voxel size (pixdim) {pixdim} in the header is zero, negative")
    assert files_in(in_tmp / "out") == []


def test_evaluate_writes_the_pairs_it_could_score_and_reports_the_others(in_tmp, caplog):
    for name, landmark in (("a", 5), ("b", 6)):
        for kind in ("input", "target"):
            write_nifti(in_tmp / f"{name}_{kind}.nii.gz", 100 * blob_volume((10, 10, 10), np.eye(4), (landmark,) * 3),
                        np.eye(4))
    (in_tmp / "b_input.nii.gz").write_bytes(b"garbage")
    (in_tmp / "pairs.json").write_text(json.dumps([{"input": f"{n}_input.nii.gz", "target": f"{n}_target.nii.gz",
                                                    "prompt": "T2w", "subject": n} for n in "ab"]))
    with caplog.at_level("ERROR", logger="scripts.engine.evaluation"), pytest.raises(UserInputError) as raised:
        run_evaluation(None, "out", [Method("identity", None, "identity")], FAST, datalist="pairs.json")
    assert one_line(raised).startswith("evaluate: 1 of 2 cases failed (metrics of the other 1 written to out); "
                                       "first: b input->T2w: ") and "b_input.nii.gz: not a readable" in one_line(raised)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["b input->T2w"]
    with open(in_tmp / "out" / "metrics.csv") as handle:
        assert [row["subject"] for row in csv.DictReader(handle)] == ["a"]
    assert {"metrics.md", "metrics.png", "summary.csv"} <= set(files_in(in_tmp / "out"))


def _no_space(*arguments, **keywords):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failing", ["image", "preview", "sidecar", "sidecar_rename"])
def test_a_full_disk_names_the_file_and_leaves_no_case_that_looks_finished(tmp_path, monkeypatch, failing):
    image, out = _good_image(tmp_path), tmp_path / "out"
    first = run_inference(image, "T2w", str(out), SamplingNet(), inferer=FAST)  # a finished earlier run
    publish = scripts.engine.volume_io._publish

    def publish_but_the_sidecar(temporary, path):
        (_no_space if path.endswith(".json") else publish)(temporary, path)

    target, replacement = {"image": (scripts.engine.volume_io.nib, "save"),
                           "preview": (scripts.engine.inference_engine, "save_preview"),
                           "sidecar": (scripts.engine.inference_engine.json, "dump"),
                           "sidecar_rename": (scripts.engine.volume_io, "_publish")}[failing]
    monkeypatch.setattr(target, replacement, publish_but_the_sidecar if failing == "sidecar_rename" else _no_space)
    with pytest.raises(UserInputError) as raised:
        run_batch([{"input_image": image, "prompt": "T2w"}], str(out), SamplingNet(), inferer=FAST, overwrite=True)
    assert one_line(raised).startswith(f"{first['image']}: could not write this case's files (OSError: [Errno 28] "
                                       f"No space left on device)")
    assert not any(name.startswith(".tmp-") for name in files_in(out))
    finished = scripts.engine.inference_engine.is_finished(first)
    # failed before any rename: the earlier case stands; failed among the renames: the new image has no sidecar
    assert finished is (failing != "sidecar_rename")
    assert files_in(out) == (["good_T2w.nii.gz", "good_T2w.png"] if failing == "sidecar_rename" else
                             ["good_T2w.json", "good_T2w.nii.gz", "good_T2w.png"])
    monkeypatch.undo()
    run_batch([{"input_image": image, "prompt": "T2w"}], str(out), SamplingNet(), inferer=FAST)
    assert scripts.engine.inference_engine.is_finished(first)


def test_a_killed_runs_temporary_files_are_removed_by_the_next_run(tmp_path):
    from helpers import python_environment

    image, out = _good_image(tmp_path), tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from scripts.engine.volume_io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as temporary:\n"
        "    open(temporary, 'wb').write(b'half an image')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(out / "good_T2w.nii.gz")], env=python_environment())
    assert killed.returncode == -9
    (left,) = files_in(out)
    assert left.startswith(".tmp-") and left.endswith("-good_T2w.nii.gz")
    old_style = out / ".tmp-1a2b3c4d-good_T2w.json"  # before 0.5.2 (no process id): removed once an hour old
    old_style.write_text("{")
    os.utime(old_style, (1, 1))
    live = out / f".tmp-{os.getpid()}-0123abcd-other.nii.gz"  # a running writer's file is kept
    live.write_text("")
    run_batch([{"input_image": image, "prompt": "T2w"}], str(out), SamplingNet(), inferer=FAST, preview=False)
    assert files_in(out) == [live.name, "good_T2w.json", "good_T2w.nii.gz"]


@pytest.mark.parametrize("prompt", ["A" * 10000, "FLAIR; Age: " + "9" * 10000, "T2w; Voxel size: " + "(1, " * 3000])
def test_error_lines_stay_short_whatever_the_input(in_tmp, prompt):
    with pytest.raises(UserInputError) as raised:
        run_inference(_good_image(in_tmp), prompt, "out", SamplingNet(), inferer=FAST)
    assert len(one_line(raised)) <= 300 and one_line(raised).startswith("prompt")
    long_path = str(in_tmp / ("x" * 200) / ("y" * 200 + ".nii.gz"))
    with pytest.raises(UserInputError) as raised:
        load_volume(long_path)
    assert len(one_line(raised)) <= 300 and one_line(raised).endswith(": no such file or directory")


def test_a_spreadsheet_csv_with_bom_and_crlf_is_read(tmp_path):
    _good_image(tmp_path)
    (tmp_path / "cases.csv").write_bytes(b"\xef\xbb\xbfinput_image,prompt,target_spacing\r\n"
                                         b"good.nii.gz,T2w,\"[2, 2, 2]\"\r\ngood.nii.gz,FLAIR,\r\n")
    cases = load_datalist(str(tmp_path / "cases.csv"))
    assert [(c["input_image"], c["prompt"], c["target_spacing"]) for c in cases] == [
        (str(tmp_path / "good.nii.gz"), "T2w", [2, 2, 2]), (str(tmp_path / "good.nii.gz"), "FLAIR", None)]


def test_a_bad_target_spacing_in_a_csv_names_its_row(tmp_path):
    datalist = _csv(tmp_path / "cases.csv", [["a.nii.gz", "T2w", "[1, 1, 1]"], ["b.nii.gz", "T2w", "[2, 2"]])
    with pytest.raises(UserInputError) as raised:
        load_datalist(datalist)
    assert one_line(raised).startswith(f"{datalist}: case 2: unreadable target_spacing '[2, 2' (JSONDecodeError")


def test_the_sidecar_names_the_inference_flag_for_the_input_contrast(tmp_path):
    written = run_inference(_good_image(tmp_path), "T2w", str(tmp_path / "out"), SamplingNet(), inferer=FAST,
                            preview=False)
    warnings = " ".join(json.load(open(written["sidecar"]))["warnings"])
    assert "cannot tell the modality" in warnings and "(--input_modality)" in warnings
    assert "(--modality)" not in warnings


def test_a_declared_huge_grid_is_refused_before_any_allocation(tmp_path, monkeypatch):
    import tracemalloc

    path = write_raw_nifti(tmp_path / "forged.nii.gz", (1000, 1000, 1000), b"\0" * 4096)
    monkeypatch.setattr(scripts.engine.volume_io, "available_memory_bytes", lambda: 2**50)  # memory would allow it
    tracemalloc.start()
    try:
        with pytest.raises(UserInputError) as raised:
            load_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert one_line(raised).startswith(f"{path}: truncated or corrupt image data (the header declares shape "
                                       f"(1000, 1000, 1000) of float32, 3.7 GiB, more than the file can hold)")
    assert peak < 50 * 2**20  # not the 4 GB the header declares
