"""The prompt layer: template round trips, builders from BIDS/DICOM/NIfTI, aliases, tokenisation, errors, CLI."""

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import python_environment, write_bids_image, write_dicom_series
from scripts.prompt import (
    CONTEXT_LENGTH,
    MODALITIES,
    Prompt,
    PromptError,
    canonical_modality,
    canonical_vendor,
    count_tokens,
    prompt_from_bids,
    prompt_from_dicom,
    prompt_from_image,
    tokenize,
)

OFFICIAL = ("Age: 16; Gender: F; Scanner: 3.0 Siemens; Modality: T1w; Voxel size: (0.8, 0.8, 0.8); "
            "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (2500.0, 2.2, 1000.0, 8.0)")
OFFICIAL_T2VAR = ("Age: 12; Gender: M; Scanner: 3.0 Siemens; Modality: T2w; Voxel size: (0.8, 0.8, 0.8); "
                  "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (3200.0, 563.0, None, T2var)")


@pytest.mark.parametrize("text", [OFFICIAL, OFFICIAL_T2VAR])
def test_official_examples_round_trip_exactly(text):
    assert Prompt.parse(text).render() == text


def test_official_example_fields():
    p = Prompt.parse(OFFICIAL)
    assert (p.age, p.sex, p.field_strength, p.manufacturer, p.modality) == (16, "F", 3.0, "Siemens", "T1w")
    assert (p.voxel_size, p.tr, p.te, p.ti, p.fa) == ((0.8, 0.8, 0.8), 2500.0, 2.2, 1000.0, 8.0)
    assert Prompt.parse(OFFICIAL_T2VAR).fa == "T2var"


def _random_prompt(rng):
    def maybe(value):
        return None if rng.random() < 0.25 else value

    tr = float(rng.uniform(5, 12000))
    te = float(rng.uniform(0, min(tr, 300)))
    return Prompt(
        modality=str(rng.choice(MODALITIES)),
        age=maybe(float(rng.choice([rng.integers(0, 100), rng.uniform(0, 2)]))),
        sex=maybe(str(rng.choice(["M", "F"]))),
        field_strength=maybe(float(rng.choice([1.5, 3.0, 7.0]))),
        manufacturer=maybe(str(rng.choice(["Siemens", "GE", "Philips", "Toshiba"]))),
        voxel_size=maybe(tuple(float(v) for v in rng.uniform(0.3, 6.0, 3))),
        tr=maybe(tr), te=maybe(te), ti=maybe(float(rng.uniform(1, tr))),
        fa=maybe(rng.choice([float(rng.uniform(1, 180)), "T2var"])),
    )


def test_random_records_round_trip_both_ways():
    rng = np.random.default_rng(0)
    for _ in range(400):
        prompt = _random_prompt(rng)
        text = prompt.render()
        assert Prompt.parse(text) == prompt, text
        assert Prompt.parse(text).render() == text


def test_missing_values_render_as_none_and_parse_back():
    text = Prompt("FLAIR").render()
    assert text == ("Age: None; Gender: None; Scanner: None; Modality: FLAIR; Voxel size: None; "
                    "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (None, None, None, None)")
    assert Prompt.parse(text) == Prompt("FLAIR")
    partial = Prompt("PD", field_strength=1.5)
    assert "Scanner: 1.5 None;" in partial.render() and Prompt.parse(partial.render()) == partial
    vendor_only = Prompt("PD", manufacturer="GE")
    assert "Scanner: None GE;" in vendor_only.render() and Prompt.parse(vendor_only.render()) == vendor_only


def test_parse_tolerates_spacing_and_order():
    text = "Modality:  t2*;Age:40 ; Gender: male; Voxel size: ( 1, 1 ,3 )"
    assert Prompt.parse(text) == Prompt("T2star", age=40, sex="M", voxel_size=(1, 1, 3))


@pytest.mark.parametrize("alias,canonical", [
    ("T2*", "T2star"), ("T2S", "T2star"), ("t2starw", "T2star"), ("PDw", "PD"), ("T1Gd", "T1CE"), ("T1c", "T1CE"),
    ("ce-gadolinium T1w", "T1CE"), ("swi", "SWI"), ("flair", "FLAIR"), ("T1", "T1w"), ("T2", "T2w"),
])
def test_modality_aliases(alias, canonical):
    assert canonical_modality(alias) == canonical


@pytest.mark.parametrize("raw,short", [
    ("SIEMENS HEALTHINEERS", "Siemens"), ("Philips Medical Systems", "Philips"), ("GE MEDICAL SYSTEMS", "GE"),
    ("TOSHIBA_MEC", "Toshiba"), ("United Imaging Healthcare", "UIH"), ("Bruker BioSpin", "Bruker"),
])
def test_vendors_are_one_short_word(raw, short):
    assert canonical_vendor(raw) == short


@pytest.mark.parametrize("text,field", [
    ("", "empty"),
    ("Age: 16; Gender: F", "Modality"),
    ("Modality: T9w", "Modality"),
    ("Age: sixteen; Modality: T1w", "Age"),
    ("Age: -3; Modality: T1w", "Age"),
    ("Gender: X; Modality: T1w", "Gender"),
    ("Scanner: 30.0 Siemens; Modality: T1w", "Scanner"),
    ("Modality: T1w; Voxel size: (1, 1)", "Voxel size"),
    ("Modality: T1w; Voxel size: (1, 0, 1)", "Voxel size"),
    ("Modality: T1w; Voxel size: 1 1 1", "Voxel size"),
    ("Modality: T1w; Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (-5.0, 2.0, None, 8.0)", "TR"),
    ("Modality: T1w; Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (5.0, 20.0, None, 8.0)", "TE"),
    ("Modality: T1w; Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (2000.0, 2.0, 2500.0, 8.0)", "TI"),
    ("Modality: T1w; Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (2000.0, 2.0, None, 400)", "FA"),
    ("Modality: T1w; Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (2000.0, 2.0, None)", "Imaging"),
    ("Modality: T1w; Colour: blue", "Colour"),
])
def test_bad_prompts_name_the_field(text, field):
    with pytest.raises(PromptError) as error:
        Prompt.parse(text)
    message = str(error.value)
    assert field in message and "\n" not in message


def test_typed_record_rejects_bad_values_and_unknown_fields():
    with pytest.raises(PromptError, match="TR"):
        Prompt("T1w", tr="fast")
    with pytest.raises(PromptError, match="colour"):
        Prompt("T1w").replace(colour="blue")
    assert Prompt("T1w").replace(te=3.0).te == 3.0


def test_longest_realistic_prompt_fits_the_context():
    # A 2D FLAIR at 1.5 T of an old patient: five-digit TR, long TE/TI, two-decimal voxel sizes, long vendor string.
    longest = Prompt("FLAIR", age=85, sex="M", field_strength=1.5, manufacturer="Philips Medical Systems",
                     voxel_size=(0.86, 0.86, 5.0), tr=11000, te=140, ti=2800, fa=90)
    assert count_tokens(longest.render()) <= CONTEXT_LENGTH
    assert count_tokens(OFFICIAL) == 85
    tokens = tokenize([OFFICIAL, longest.render()])
    assert tuple(tokens.shape) == (2, CONTEXT_LENGTH) and str(tokens.dtype) == "torch.int64"
    assert not tokens[0].equal(tokens[1])


def test_too_long_prompt_is_an_error_with_its_length():
    text = OFFICIAL.replace("Siemens", "Siemens " + "very " * 20)
    with pytest.raises(PromptError, match=r"prompt is \d+ tokens long.*at most 90"):
        tokenize(text)


def test_bids_builder_reads_sidecar_participants_and_header(tmp_path):
    sidecar = {"RepetitionTime": 2.3, "EchoTime": 0.00298, "InversionTime": 0.9, "FlipAngle": 9,
               "MagneticFieldStrength": 3, "Manufacturer": "SIEMENS"}
    path = write_bids_image(str(tmp_path), "01", "acq-mprage_T1w", np.ones((4, 5, 6)), sidecar, zooms=(1.0, 1.2, 1.5),
                            participants=[{"participant_id": "sub-01", "age": 45, "sex": "F", "site": "IXI"}])
    with open(tmp_path / "dataset_description.json", "w") as handle:
        handle.write('{"Name": "t", "BIDSVersion": "1.9.0"}')
    prompt = prompt_from_bids(path)
    assert prompt == Prompt("T1w", age=45, sex="F", field_strength=3.0, manufacturer="Siemens",
                            voxel_size=(1.0, 1.2, 1.5), tr=2300.0, te=2.98, ti=900.0, fa=9.0)
    assert prompt_from_bids(path, age=50, modality="T1CE").render().startswith("Age: 50; Gender: F")


def test_bids_builder_modalities_from_file_names(tmp_path):
    participants = [{"participant_id": "sub-02", "age": 30, "sex": "M"}]
    expected = {"ce-gadolinium_T1w": "T1CE", "T2w": "T2w", "FLAIR": "FLAIR", "PDw": "PD", "T2starw": "T2star",
                "swi": "SWI", "acq-cor3mm_PDw": "PD"}
    for suffix, modality in expected.items():
        path = write_bids_image(str(tmp_path), "02", suffix, np.ones((3, 3, 3)), {"EchoTime": 0.01},
                                participants=participants)
        prompt = prompt_from_bids(path)
        assert (prompt.modality, prompt.te, prompt.age) == (modality, 10.0, 30.0)


def test_bids_builder_errors(tmp_path):
    with pytest.raises(PromptError, match="no such image"):
        prompt_from_bids(str(tmp_path / "missing_T1w.nii.gz"))
    path = write_bids_image(str(tmp_path), "03", "dwi", np.ones((3, 3, 3)), {})
    with pytest.raises(PromptError, match="modality"):
        prompt_from_bids(path)
    assert prompt_from_bids(path, modality="T2w").modality == "T2w"
    path = write_bids_image(str(tmp_path), "03", "T1w", np.ones((3, 3, 3)), {"RepetitionTime": "long"})
    with pytest.raises(PromptError, match="RepetitionTime"):
        prompt_from_bids(path)
    broken = tmp_path / "sub-03" / "anat" / "sub-03_T2w.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(PromptError, match="not a readable NIfTI"):
        prompt_from_bids(str(broken))


def test_nifti_without_sidecar_gives_voxel_size(tmp_path):
    path = str(tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([0.9, 0.9, 5.0, 1.0])), path)
    assert prompt_from_image(path, modality="FLAIR") == Prompt("FLAIR", voxel_size=(0.9, 0.9, 5.0))


def test_dicom_builder_reads_the_header(tmp_path):
    folder = str(tmp_path / "series")
    write_dicom_series(folder, np.zeros((8, 6, 3)), spacing=(0.5, 0.5, 3.0), SeriesDescription="AX T2 FLAIR",
                       RepetitionTime=9000, EchoTime=120, InversionTime=2500, FlipAngle=150,
                       MagneticFieldStrength=1.5, Manufacturer="GE MEDICAL SYSTEMS", PatientAge="067Y", PatientSex="M")
    expected = Prompt("FLAIR", age=67, sex="M", field_strength=1.5, manufacturer="GE", voxel_size=(0.5, 0.5, 3.0),
                      tr=9000.0, te=120.0, ti=2500.0, fa=150.0)
    assert prompt_from_dicom(folder) == expected
    assert prompt_from_image(os.path.join(folder, "slice000.dcm")) == expected
    infant = str(tmp_path / "infant")
    write_dicom_series(infant, np.zeros((4, 4, 2)), SeriesDescription="t1_mprage_sag post Gd", PatientAge="006M")
    prompt = prompt_from_dicom(infant)
    assert prompt.modality == "T1CE" and prompt.age == 0.5


def test_dicom_builder_errors(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"hello")
    with pytest.raises(PromptError, match="not a readable DICOM"):
        prompt_from_dicom(str(tmp_path / "junk.dcm"))
    with pytest.raises(PromptError, match="no such file"):
        prompt_from_image(str(tmp_path / "nothing"))


def _cli(*args):
    code = "from scripts.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=python_environment(), timeout=120)


def test_cli_prints_the_prompt_as_last_line(tmp_path):
    sidecar = {"RepetitionTime": 3.2, "EchoTime": 0.565, "MagneticFieldStrength": 3, "Manufacturer": "Siemens"}
    path = write_bids_image(str(tmp_path), "04", "T2w", np.ones((3, 3, 3)), sidecar, zooms=(0.8, 0.8, 0.8),
                            participants=[{"participant_id": "sub-04", "age": 12, "sex": "M"}])
    result = _cli("prompt", path, "--fa", "T2var")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == OFFICIAL_T2VAR.replace("563.0", "565.0")


def test_cli_bad_input_is_one_line(tmp_path):
    result = _cli("prompt", str(tmp_path / "missing.nii.gz"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "missing.nii.gz" in result.stderr
    assert "Traceback" not in result.stderr
