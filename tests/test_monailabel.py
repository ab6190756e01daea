"""The MONAI Label app (apps/monailabel), in two ways.

In process, in the bundle's own environment (every ``make test``, so CI): the infer task's work
(``lib.synthesis``: the bundle's network, inferer and engine on a request) and the start-up checks (``lib.settings``)
run without a server and without monailabel installed.

Served for real (marked ``slow``, so outside ``make test`` and CI; ``make test-label`` runs them): start the server on
loopback over a studies folder of small simulated scans, call its infer REST endpoint, check the returned NIfTI.
monailabel lives in its own environment (.venv-label, ``make label-env``); the server is started from that
environment whatever Python runs pytest. Without it these tests skip, or fail under ``CI=true``.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest

from conftest import BUNDLE_ROOT

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABEL_VENV = os.path.join(REPO_ROOT, ".venv-label")
MONAILABEL = os.path.join(LABEL_VENV, "bin", "monailabel")
LABEL_ENV_BUILT = os.path.join(LABEL_VENV, ".installed")  # written by `make label-env` once the env is complete
APP_DIR = os.path.join(REPO_ROOT, "apps", "monailabel")
STARTUP_TIMEOUT_S = 240  # imports of monailabel + torch + open_clip and the network build on a busy 2-core machine
TEMPLATE = ("Age: 45; Gender: F; Scanner: 3.0 Siemens; Modality: FLAIR; Voxel size: (1.0, 1.5, 2.0); "
            "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (9000.0, 81.0, 2500.0, 150.0)")


def app_module(name: str):
    """A module of the app, imported as the server imports it: with the app folder on ``sys.path``."""
    if APP_DIR not in sys.path:
        sys.path.insert(0, APP_DIR)
    return importlib.import_module(name)


settings = app_module("lib.settings")
synthesis = app_module("lib.synthesis")


def scan_affine() -> np.ndarray:
    """A non-trivial scan geometry: first axis flipped (LAS), anisotropic voxels, an off-centre origin."""
    return np.array([[-2.0, 0.0, 0.0, 30.0], [0.0, 2.0, 0.0, -21.0], [0.0, 0.0, 2.5, -12.0], [0.0, 0.0, 0.0, 1.0]])


def simulated_scan(shape=(20, 24, 16)) -> np.ndarray:
    """An off-centre ellipsoidal 'head' with a brighter inner blob, zero background (so flips would show)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    head = ((grid[0] - 0.15) / 0.7) ** 2 + (grid[1] / 0.8) ** 2 + ((grid[2] + 0.1) / 0.75) ** 2 < 1
    blob = ((grid[0] - 0.35) ** 2 + (grid[1] - 0.3) ** 2 + grid[2] ** 2) < 0.1
    rng = np.random.default_rng(0)
    return (head * (300.0 + 20.0 * rng.standard_normal(shape)) + blob * 200.0).astype(np.float32)


def corners_world(affine: np.ndarray, shape) -> np.ndarray:
    """World coordinates of the field of view's outer corners (voxel index -0.5 and n - 0.5 on every axis)."""
    low, high = np.full(3, -0.5), np.asarray(shape, dtype=float) - 0.5
    return np.stack([(affine @ [*low, 1])[:3], (affine @ [*high, 1])[:3]])


def world_centroid(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    voxels = np.argwhere(image > 0).mean(axis=0)
    return (affine @ [*voxels, 1])[:3]


def assert_synthesized_in_place(image, data, source, params):
    """The template prompt's result: FOV 40 x 48 x 40 mm at its (1.0, 1.5, 2.0) mm, i.e. 40 x 32 x 20 voxels (not the
    input's 20 x 24 x 16), in the input's world position and orientation."""
    assert data.shape == (40, 32, 20)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (1.0, 1.5, 2.0), atol=1e-5)
    np.testing.assert_allclose(corners_world(image.affine, data.shape), corners_world(source.affine, source.shape),
                               atol=1e-4)
    np.testing.assert_allclose(np.sign(image.affine[:3, :3]), np.sign(source.affine[:3, :3]))  # LAS stays LAS
    # The synthesized head lies where the input's does (an axis flip would move it by ~6 mm).
    assert np.linalg.norm(world_centroid(data, image.affine) - world_centroid(source.get_fdata(), source.affine)) < 1.5
    assert np.isfinite(data).all() and data.max() > 0 and (data == 0).any()
    assert params["output_shape"] == [40, 32, 20] and params["target_prompt"] == TEMPLATE


@pytest.fixture(scope="module")
def bundle_synthesis():
    """The app's synthesis of this repository's bundle (its inference config and shipped weights), default T2w."""
    return synthesis.Synthesis.from_bundle(BUNDLE_ROOT)


@pytest.fixture
def scan(tmp_path, monkeypatch):
    """A small simulated T1w scan; temporary files go under tmp_path/tmp, so a test sees what a request leaves."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tempfile.tempdir)
    path = str(tmp_path / "sim01_T1w.nii.gz")
    nib.save(nib.Nifti1Image(simulated_scan(), scan_affine()), path)
    return path


def test_synthesis_super_resolves_to_the_prompt_voxel_size_in_world_space(bundle_synthesis, scan):
    result, params = bundle_synthesis(scan, {"prompt": TEMPLATE})
    image, source = nib.load(result), nib.load(scan)
    data = np.asarray(image.dataobj, dtype=np.float32)

    # the result is a fresh temporary NIfTI (MONAI Label sends it, then deletes it), nothing else is left behind
    assert os.listdir(tempfile.tempdir) == [os.path.basename(result)] and result.endswith(".nii.gz")
    assert data.dtype == np.float32
    assert_synthesized_in_place(image, data, source, params)
    assert set(params) == set(synthesis.RESULT_FIELDS)


def test_synthesis_reads_its_options_from_the_request(bundle_synthesis, scan):
    result, params = bundle_synthesis(scan, {"prompt": "PD", "target_spacing": "4, 4, 5"})
    assert nib.load(result).shape == (10, 12, 8)  # downsampling works the same way: 40 x 48 x 40 mm at 4 x 4 x 5 mm
    assert "Modality: PD" in params["target_prompt"] and "Voxel size: (4.0, 4.0, 5.0)" in params["target_prompt"]
    # a blank prompt (what a client's empty form field sends) is the app's default; a number is one spacing
    _, params = bundle_synthesis(scan, {"prompt": " ", "target_spacing": 4})
    assert "Modality: T2w" in params["target_prompt"] and params["output_shape"] == [10, 12, 10]
    # an inferer option holds for its request only
    _, params = bundle_synthesis(scan, {"prompt": "PD", "target_spacing": "4", "flip_averaging": "true"})
    assert params["mirror_images_averaged"] == 8
    _, params = bundle_synthesis(scan, {"prompt": "PD", "target_spacing": "4", "flip_averaging": ""})
    assert params["mirror_images_averaged"] == 1


@pytest.mark.parametrize("request_params, named", [
    ({"prompt": "Banana"}, "Banana"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": "PD", "target_spacing": "1 mm"}, "target_spacing"),
    ({"prompt": "PD", "target_spacing": "4, 4, -5"}, "target_spacing"),
    ({"prompt": "PD", "flip_averaging": "often"}, "flip_averaging"),
    ({"prompt": "PD", "input_modality": "T3w"}, "input_modality"),
])
def test_a_bad_request_is_one_line_and_leaves_nothing(bundle_synthesis, scan, request_params, named):
    with pytest.raises(ValueError) as error:  # the server answers it as a 422 with this detail
        bundle_synthesis(scan, request_params)
    message = str(error.value)
    assert named in message and "\n" not in message and len(message) < 500
    assert os.listdir(tempfile.tempdir) == []


def test_an_unreadable_image_is_a_bad_request(bundle_synthesis, scan):
    with open(scan, "wb") as handle:
        handle.write(b"not an image")
    with pytest.raises(ValueError, match="sim01_T1w.nii.gz"):
        bundle_synthesis(scan, {"prompt": "PD"})
    assert os.listdir(tempfile.tempdir) == []


def test_start_up_settings(tmp_path):
    """Loopback unless asked otherwise (monailabel's own default host is 0.0.0.0), and the served bundle's version."""
    assert settings.requested_host(["monailabel", "start_server", "--app", "a", "--studies", "s"]) == "0.0.0.0"
    assert settings.requested_host(["monailabel", "start_server", "--host", "127.0.0.1"]) == "127.0.0.1"
    assert settings.requested_host(["uvicorn", "main:app"]) is None  # not started by start_server: unknown
    for host in ("127.0.0.1", "localhost", "::1", None):
        settings.check_loopback(host, allow_remote=False)
    for host in ("0.0.0.0", "192.0.2.7", "example.org"):
        with pytest.raises(ValueError, match=f"--host {host}: this app serves on loopback only"):
            settings.check_loopback(host, allow_remote=False)
        settings.check_loopback(host, allow_remote=True)

    assert settings.bundle_path({}, APP_DIR) == os.path.realpath(BUNDLE_ROOT)  # the repository's bundle by default
    assert settings.bundle_path({"bundle": BUNDLE_ROOT}, str(tmp_path)) == os.path.realpath(BUNDLE_ROOT)
    with pytest.raises(ValueError, match="not a TUMSyn bundle folder"):
        settings.bundle_path({}, str(tmp_path))
    with open(os.path.join(BUNDLE_ROOT, "configs", "metadata.json")) as handle:
        assert settings.bundle_version(BUNDLE_ROOT) == json.load(handle)["version"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def non_loopback_address() -> str | None:
    """This machine's outward address (no packet is sent: a UDP connect only picks the route), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def copy_app(app_dir) -> str:
    """A copy of the app to serve: start_server writes logs/, model/ and bin/ into the app folder (the copy then
    needs ``--conf bundle``, its default being the bundle beside the app in this repository)."""
    shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("__pycache__", "logs", "model", "bin"))
    return str(app_dir)


def start_server(app_dir: str, studies: str, port: int, host_args: list[str], log_path: str) -> subprocess.Popen:
    # The monailabel script runs `python -m monailabel.main`: the environment's python must come first on PATH.
    env = {**os.environ, "PATH": os.path.dirname(MONAILABEL) + os.pathsep + os.environ["PATH"],
           "MONAI_LABEL_TASKS_TRAIN": "false", "MONAI_LABEL_TASKS_STRATEGY": "false",
           "MONAI_LABEL_TASKS_SCORING": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen([MONAILABEL, "start_server", "--app", app_dir, "--studies", studies, *host_args,
                                 "--port", str(port), "--conf", "bundle", BUNDLE_ROOT],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=studies)


def wait_until_serving(server: subprocess.Popen, url: str, log_path: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"server exited ({server.returncode}) during start-up:\n{open(log_path).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/info/", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    pytest.fail(f"server not serving after {STARTUP_TIMEOUT_S} s:\n{open(log_path).read()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@dataclass
class Served:
    url: str  # the documented server: --host 127.0.0.1
    port: int
    studies: str
    default_host: subprocess.Popen  # the same command without --host (monailabel's default would be 0.0.0.0)
    default_host_port: int
    default_host_log: str


def require_label_env() -> None:
    """Skip without .venv-label; under CI=true fail instead, so a run that cannot test the server never looks green."""
    if os.path.exists(LABEL_ENV_BUILT):
        return
    reason = ".venv-label (the MONAI Label environment) is absent: build it with `make label-env`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (under CI=true a server test that cannot run fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Both servers over a studies folder holding a small simulated scan, started together (start-up is mostly
    imports, ~30 s on a busy machine, so in parallel they cost about one)."""
    require_label_env()
    root = tmp_path_factory.mktemp("monailabel")
    studies = os.path.join(root, "studies")
    os.makedirs(studies)
    nib.save(nib.Nifti1Image(simulated_scan(), scan_affine()), os.path.join(studies, "sim01_T1w.nii.gz"))
    port, default_host_port = free_port(), free_port()
    log_path, default_host_log = os.path.join(root, "loopback.log"), os.path.join(root, "default_host.log")
    server = start_server(copy_app(root / "loopback"), studies, port, ["--host", "127.0.0.1"], log_path)
    default_host = start_server(copy_app(root / "default_host"), studies, default_host_port, [], default_host_log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(server, url, log_path)
        yield Served(url, port, studies, default_host, default_host_port, default_host_log)
    finally:
        for process in (server, default_host):
            if process.poll() is None:
                stop(process)


def infer(url: str, image_id: str, params: dict) -> tuple[nib.Nifti1Image, dict]:
    """POST /infer/tumsyn?image=<id> with ``params``; the multipart answer's NIfTI and result params."""
    body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
    request = urllib.request.Request(f"{url}/infer/tumsyn?image={image_id}", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        content_type, payload = response.headers["Content-Type"], response.read()
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    parts = {}
    for part in payload.split(b"--" + boundary)[1:-1]:
        head, _, content = part.strip(b"\r\n").partition(b"\r\n\r\n")
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        parts[name] = content
    image = nib.Nifti1Image.from_bytes(gzip.decompress(parts["image"]))
    return image, json.loads(parts["params"])


@pytest.mark.slow
def test_infer_super_resolves_to_the_prompt_voxel_size_in_world_space(served):
    url, studies = served.url, served.studies
    info = json.load(urllib.request.urlopen(url + "/info/", timeout=30))
    assert info["models"]["tumsyn"]["type"] == "others"
    assert info["models"]["tumsyn"]["config"]["prompt"] == "T2w"
    with open(os.path.join(REPO_ROOT, "bundle", "configs", "metadata.json")) as handle:
        assert info["version"] == json.load(handle)["version"]  # the app reports the served bundle's version

    started = time.monotonic()
    image, params = infer(url, "sim01_T1w", {"prompt": TEMPLATE})
    seconds = time.monotonic() - started
    data = np.asarray(image.dataobj, dtype=np.float32)
    source = nib.load(os.path.join(studies, "sim01_T1w.nii.gz"))

    assert_synthesized_in_place(image, data, source, params)
    print(f"infer (super-resolution) took {seconds:.1f} s")


@pytest.mark.slow
def test_modality_prompt_target_spacing_and_a_bad_prompt(served):
    image, params = infer(served.url, "sim01_T1w", {"prompt": "PD", "target_spacing": "4, 4, 5"})
    assert image.shape == (10, 12, 8)  # downsampling works the same way: 40 x 48 x 40 mm at 4 x 4 x 5 mm
    assert "Modality: PD" in params["target_prompt"] and "Voxel size: (4.0, 4.0, 5.0)" in params["target_prompt"]
    assert np.isfinite(np.asarray(image.dataobj)).all()

    with pytest.raises(urllib.error.HTTPError) as error:
        infer(served.url, "sim01_T1w", {"prompt": "Banana"})
    assert error.value.code == 422  # the bundle's one-line reason, not a bare 500
    assert "Banana" in json.loads(error.value.read())["detail"]


@pytest.mark.slow
def test_served_on_loopback_only(served):
    """Not reachable on this machine's outward address; without --host (monailabel's default 0.0.0.0) the app
    refuses to start unless --conf allow_remote true."""
    address = non_loopback_address()
    if address is not None:
        with socket.socket() as probe, pytest.raises(OSError):
            probe.settimeout(5)
            probe.connect((address, served.port))

    try:
        served.default_host.wait(timeout=STARTUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the server started without --host is still running")
    log = open(served.default_host_log).read()
    assert served.default_host.returncode != 0
    assert "--host 0.0.0.0: this app serves on loopback only" in log, log[-3000:]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", served.default_host_port)) != 0
