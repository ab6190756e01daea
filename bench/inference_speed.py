"""Seconds and peak memory to synthesise one 1 mm whole-brain volume: the engine vs the official demo's loop.

    .venv/bin/python bench/inference_speed.py [--scales unet paper] [--inputs 1mm 5mm] [--fov_scale 1.0]
                                              [--threads 2] [--device cpu|cuda] [--precision fp32|bf16]
                                              [--source subject|mni|real|synthetic] [--query_chunk N]
                                              [--sw_batch_size N] [--crop_margin N|none] [--roi_size N]
                                              [--cudnn_benchmark] [--repeats N]

Each (scale, input) case runs in its own subprocess; inside it both methods run one after the other on the same
network and input, so the speed-up is a ratio measured side by side:
- ``engine``: the ``inferer`` that ``configs/inference.yaml`` builds (its window, overlap and chunk settings; every
  output voxel decoded once, background neither encoded nor decoded);
- ``demo``: the official demo's scheme: fixed 60^3 input crops (25 % overlap), each encoded and decoded on its own
  dense output grid, overlapping predictions averaged.
Both run the same network in the same state (its convolutions channels-last, as the engine leaves them), decode
in chunks of the same size and at the same precision (``--precision bf16``: the engine's GPU autocast, the loop
inside the same autocast), so the ratio measures the two schemes, not two implementations of one step.
Both outputs are set to 0 outside the input's head (``foreground_mask``), as the written image is. Quality: the
PSNR between the two (data range 1), and at 1 mm from a subject (``subject``, ``mni``, ``real``) each one's PSNR
against that subject's T2w inside its brain.

Inputs: ``subject`` (default for the shipped scale, unet: the shipped weights on the embedded demo subject, its 1 mm
T1w and its 0.9 x 0.9 x 5 mm axial FLAIR: brain-extracted, on a grid cropped tightly around the head), ``mni`` (the
same two images zero-padded to the MNI152 1 mm field of view, 182 x 218 x 182 mm, the frame TUMSyn's official
preprocessing registers inputs to), ``real`` (the real patient of ``../shared/data/real/bids``, 1 mm only: its
brain-extracted T1w on the SRI24 atlas grid, 240 x 240 x 155, reference its T2w) or
``synthetic`` (default for the paper scale: an ellipsoidal 'brain' filling 37 % of a 182x218x182 mm volume, at 1 mm
and at 1 x 1 x 5 mm; a real head in that frame fills 24 %). The paper scale has no trained weights: it runs with
random weights on any source, so ``--scales paper --source mni`` times it on the demo subject's head.
``--fov_scale`` keeps the central fraction of the field of view per axis (the paper scale on a CPU: see
bench/README.md). Peak memory is the process's resident high-water mark (``VmHWM``, reset before each method),
``rss_start`` the resident size before synthesis, and on a GPU also ``torch.cuda.max_memory_allocated``. On a GPU
each method runs once untimed first (``*_first_call_seconds``: what one volume in a fresh process pays), so the
timings are warm calls; ``--repeats N`` times N calls and reports their median (``*_seconds_all``: each one);
``--cudnn_benchmark`` lets cuDNN time its convolution algorithms per input shape.
Prints a table and writes ``bench/results/inference_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

from isolated_case import run_isolated

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "bundle"))

BRAIN_SHAPE_1MM = (182, 218, 182)  # MNI152 1 mm grid
SYNTHETIC_SPACING = {"1mm": (1.0, 1.0, 1.0), "5mm": (1.0, 1.0, 5.0)}  # the second: a 5 mm axial clinical scan
SUBJECT_ANAT = os.path.join(REPO, "bundle", "data", "demo", "sub-001", "anat")
SUBJECT_FILES = {"1mm": "sub-001_T1w.nii.gz", "5mm": "sub-001_acq-ax5mm_FLAIR.nii.gz"}
REFERENCE_FILE = "sub-001_T2w.nii.gz"
SHIPPED_SCALE = "unet"  # the scale of bundle/models/model.pt (configs/inference.yaml's default)
REAL_ANAT = os.path.join(os.path.dirname(REPO), "shared", "data", "real", "bids", "sub-TCGADU7294", "anat")
REAL_FILES = {"1mm": "sub-TCGADU7294_T1w.nii.gz", "reference": "sub-TCGADU7294_T2w.nii.gz"}
PROMPT = ("Age: 30; Gender: F; Scanner: 3.0 Siemens; Modality: T2w; Voxel size: (1.0, 1.0, 1.0); "
          "Imaging parameter TR(ms), TE(ms), TI(ms), and FA(degree):  (4000.0, 100.0, None, 90.0)")
DEMO_CROP = 60  # the official demo's crop side (input voxels)


def synthetic_brain(shape, seed=0):
    """A smooth ellipsoidal 'brain' with a zero background, normalised like a real input."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(a**2 for a in axes) < 0.8
    texture = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    return (inside * (0.6 + 0.2 * texture / texture.std())).clip(0).astype(np.float32)


def demo_crop_loop(network, image, tokens, out_shape, query_chunk, amp, overlap=0.25):
    """The official demo's inference: every crop decoded on its own output grid, overlaps averaged."""
    import torch

    from scripts.engine.synthesis_engine import _autocast, _window_starts
    from scripts.nets.liif import make_coord

    device = next(network.parameters()).device
    in_shape = image.shape[1:]
    ratio = [o / i for o, i in zip(out_shape, in_shape)]
    total, count = torch.zeros(out_shape), torch.zeros(out_shape)
    crop = [min(DEMO_CROP, n) for n in in_shape]
    starts = [_window_starts(n, c, overlap) for n, c in zip(in_shape, crop)]
    with torch.inference_mode(), _autocast(device, amp):
        for z in starts[0]:
            for y in starts[1]:
                for x in starts[2]:
                    corner = (z, y, x)
                    window = image[None, :, z : z + crop[0], y : y + crop[1], x : x + crop[2]].to(device)
                    # One layout copy per crop: channels-last, the layout the decoder gathers codes from fastest.
                    latent = network.encode(window, tokens.to(device)).contiguous(memory_format=torch.channels_last_3d)
                    # Output voxels whose centres lie in the crop, on the crop's own coordinate grid.
                    low = [math.ceil(c * r - 0.5) for c, r in zip(corner, ratio)]
                    high = [math.ceil((c + n) * r - 0.5) for c, n, r in zip(corner, crop, ratio)]
                    size = [h - lo for lo, h in zip(low, high)]
                    ranges = [(-1 + 2 * ((lo / r) - c) / n, -1 + 2 * ((h / r) - c) / n)
                              for lo, h, r, c, n in zip(low, high, ratio, corner, crop)]
                    coords = make_coord(size, ranges)[None].to(device)
                    cell = torch.tensor([2 / (r * n) for r, n in zip(ratio, crop)], device=device).expand_as(coords)
                    prediction = torch.cat([network.query(latent, coords[:, i : i + query_chunk],
                                                          cell[:, i : i + query_chunk], chunk_size=query_chunk)
                                            for i in range(0, coords.shape[1], query_chunk)], 1)
                    region = tuple(slice(lo, h) for lo, h in zip(low, high))
                    total[region] += prediction.reshape(size).float().cpu()
                    count[region] += 1
    return total / count


def _memory_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_memory(device) -> None:
    import torch

    with open("/proc/self/clear_refs", "w") as handle:  # "5" resets VmHWM to the current resident size
        handle.write("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _central_crop(array, fraction):
    box = tuple(slice((n - max(2, round(n * fraction))) // 2, (n - max(2, round(n * fraction))) // 2
                      + max(2, round(n * fraction))) for n in array.shape)
    return array[box]


def load_case(source: str, input_name: str, fov_scale: float):
    """(normalised input [D, H, W] in RAS+ voxel order, its voxel size, reference or None) for one input."""
    import nibabel as nib
    import numpy as np

    from scripts.data.intensity import normalize_intensity

    if source == "synthetic":
        spacing = SYNTHETIC_SPACING[input_name]
        fov_mm = [n * fov_scale for n in BRAIN_SHAPE_1MM]
        shape = tuple(max(2, round(f / s)) for f, s in zip(fov_mm, spacing))
        return synthetic_brain(shape), spacing, None
    if source == "real":
        if input_name != "1mm":
            raise SystemExit("--source real: only --inputs 1mm (the real case has no thick-slice scan)")
        input_path, reference_path = (os.path.join(REAL_ANAT, REAL_FILES[k]) for k in ("1mm", "reference"))
    else:
        input_path = os.path.join(SUBJECT_ANAT, SUBJECT_FILES[input_name])
        reference_path = os.path.join(SUBJECT_ANAT, REFERENCE_FILE) if input_name == "1mm" else None

    def load(path):
        image = nib.as_closest_canonical(nib.load(path))
        return image, np.asarray(image.dataobj, dtype=np.float32)

    image, array = load(input_path)
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    reference = load(reference_path)[1] if reference_path else None
    if source == "mni":  # centre the head in the MNI field of view, in millimetres along each axis
        pad = [max(0, round(fov / s) - n) for fov, s, n in zip(BRAIN_SHAPE_1MM, spacing, array.shape)]
        widths = [(p // 2, p - p // 2) for p in pad]
        array = np.pad(array, widths)
        reference = None if reference is None else np.pad(reference, widths)
    array = _central_crop(normalize_intensity(array), fov_scale)
    if reference is not None:
        reference = _central_crop(normalize_intensity(reference), fov_scale)
    return array, spacing, reference


def config_inferer(scale: str, precision: str, overrides: dict):
    """The ``inferer`` of ``configs/inference.yaml`` at ``scale`` (no progress bar), its autocast on for ``bf16``,
    with the given values of its top-level keys (``query_chunk``, ``sw_batch_size``, ``crop_margin``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(REPO, "bundle", "configs", "inference.yaml"))
    parser["inferer"]["progress"] = False
    parser["scale"] = scale
    parser["amp"] = precision == "bf16"
    parser.update(overrides)
    return parser.get_parsed_content("inferer")


def prepare_case(scale: str, input_name: str, source: str, fov_scale: float, threads: int, device_name: str,
                 precision: str, overrides: dict, cudnn_benchmark: bool = False):
    """One case's (input array, voxel size, reference or None, output shape, network on the device, inferer): the
    shipped weights at their scale (random ones at the other scales, which have none; and on the synthetic head)."""
    import numpy as np
    import torch

    from scripts.engine.inference_engine import load_network_weights, output_grid
    from scripts.engine.synthesis_engine import channels_last_convolutions
    from scripts.nets.tumsyn_net import build_tumsyn_net

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    array, spacing, reference = load_case(source, input_name, fov_scale)
    out_shape, _ = output_grid(array.shape, np.diag([*spacing, 1.0]), (1.0, 1.0, 1.0))
    network = build_tumsyn_net(scale).eval()
    if scale == SHIPPED_SCALE and source != "synthetic":
        load_network_weights(network, os.path.join(REPO, "bundle", "models", "model.pt"))
    network = channels_last_convolutions(network.to(torch.device(device_name)))
    return array, spacing, reference, out_shape, network, config_inferer(scale, precision, overrides)


def add_case_arguments(parser, scale: str, precision: str) -> None:
    """The options of one warm engine case (``--scale --source --input --device --precision --roi_size --threads``),
    for the scripts that time or profile a single case."""
    parser.add_argument("--scale", default=scale)
    parser.add_argument("--source", default="mni", choices=["subject", "mni", "real", "synthetic"])
    parser.add_argument("--input", default="1mm")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default=precision, choices=["fp32", "bf16"])
    parser.add_argument("--roi_size", help="default: the config's; N: windows of N^3 at most")
    parser.add_argument("--threads", type=int, default=8)


def run_case(scale: str, input_name: str, source: str, fov_scale: float, threads: int, device_name: str,
             precision: str, overrides: dict, methods: list[str], cudnn_benchmark: bool = False,
             repeats: int = 1) -> dict:
    import numpy as np
    import torch

    from scripts.engine.metrics import psnr
    from scripts.engine.synthesis_engine import foreground_mask
    from scripts.prompt import tokenize

    device = torch.device(device_name)
    array, spacing, reference, out_shape, network, inferer = prepare_case(
        scale, input_name, source, fov_scale, threads, device_name, precision, overrides, cudnn_benchmark)
    image = torch.from_numpy(np.ascontiguousarray(array))[None]
    tokens = tokenize(PROMPT)
    foreground = foreground_mask(image, out_shape)
    row = {"scale": scale, "input": input_name, "source": source, "device": device_name, "threads": threads,
           "precision": precision, "cudnn_benchmark": cudnn_benchmark, "repeats": repeats,
           "processor": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
           "input_shape": list(array.shape), "input_spacing": list(spacing), "output_shape": list(out_shape),
           "foreground_fraction": round(float(foreground.float().mean()), 3),
           "rss_start_mb": round(_memory_mb("VmRSS"), 1),
           "engine_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in inferer.settings.items()}}

    def synthesize(method):
        if method == "engine":
            return inferer(image[None], network, prompt=PROMPT, out_shape=out_shape)[0, 0]
        return demo_crop_loop(network, image, tokens, out_shape, inferer.settings["query_chunk"],
                              inferer.settings["amp"])

    outputs = {}
    for method in methods:
        if device.type == "cuda":  # untimed first call: CUDA, cuDNN and cuBLAS set up once per process and shape
            first_call = time.perf_counter()
            synthesize(method)
            torch.cuda.synchronize()
            row[f"{method}_first_call_seconds"] = round(time.perf_counter() - first_call, 2)
        _reset_peak_memory(device)
        walls, cpus = [], []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            output = synthesize(method)
            if device.type == "cuda":
                torch.cuda.synchronize()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        row[f"{method}_seconds"] = round(float(np.median(walls)), 2)
        row[f"{method}_cpu_seconds"] = round(float(np.median(cpus)), 2)
        if repeats > 1:
            row[f"{method}_seconds_all"] = [round(w, 3) for w in walls]
        row[f"{method}_peak_rss_mb"] = round(_memory_mb("VmHWM"), 1)
        if device.type == "cuda":
            row[f"{method}_peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        outputs[method] = (output.clamp(min=0) * foreground).numpy()
        if reference is not None:
            row[f"{method}_psnr_vs_reference"] = round(psnr(outputs[method], reference, reference > 0), 3)
    if len(outputs) == 2:
        mask = foreground.numpy()
        row["psnr_engine_vs_demo"] = round(psnr(outputs["engine"], outputs["demo"], mask), 2)
        row["max_abs_engine_vs_demo"] = round(float(np.abs(outputs["engine"] - outputs["demo"])[mask].max()), 4)
        row["speedup"] = round(row["demo_seconds"] / row["engine_seconds"], 2)
        row["cpu_speedup"] = round(row["demo_cpu_seconds"] / max(row["engine_cpu_seconds"], 1e-9), 2)
    row["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return row


def print_table(rows: list[dict]) -> None:
    columns = ["scale", "input", "precision", "output_shape", "engine_seconds", "demo_seconds", "speedup",
               "cpu_speedup", "engine_peak_rss_mb", "demo_peak_rss_mb", "engine_peak_cuda_mb", "demo_peak_cuda_mb",
               "psnr_engine_vs_demo", "engine_psnr_vs_reference", "demo_psnr_vs_reference"]
    print(" | ".join(columns))
    for row in rows:
        cells = [row.get(c, row.get("error", "") if c == "engine_seconds" else "") for c in columns]
        print(" | ".join("x".join(map(str, c)) if isinstance(c, list) else str(c) for c in cells))


# Engine settings a run may change (config keys).
OVERRIDES = ("query_chunk", "sw_batch_size", "crop_margin", "roi_size")


def parse_override(key: str, value: str):
    """A command-line override as the config's value: ``none`` is None; ``roi_size`` N is a cube (0: whole axes)."""
    if value.lower() == "none":
        return None
    return [int(value)] * 3 if key == "roi_size" else int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", nargs="+", default=[SHIPPED_SCALE, "paper"])
    parser.add_argument("--inputs", nargs="+", default=list(SUBJECT_FILES))
    parser.add_argument("--methods", nargs="+", default=["engine", "demo"])
    parser.add_argument("--source", choices=["subject", "mni", "real", "synthetic"],
                        help="default: subject (the shipped scale), synthetic (others)")
    parser.add_argument("--fov_scale", type=float, default=1.0, help="central fraction of the field of view per axis")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: the engine's autocast (GPU only; the CPU runs fp32 either way)")
    parser.add_argument("--query_chunk", help="default: the config's")
    parser.add_argument("--sw_batch_size", help="default: the config's")
    parser.add_argument("--crop_margin", help="default: the config's; none: whole windows")
    parser.add_argument("--roi_size", help="default: the config's; N: windows of N^3 at most; 0: the head's box")
    parser.add_argument("--cudnn_benchmark", action="store_true", help="cuDNN times algorithms per shape (GPU)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per method (their median)")
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per case")
    parser.add_argument("--output", default=os.path.join(HERE, "results", "inference_speed.json"))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print its JSON
    args = parser.parse_args()
    if args.case:
        scale, input_name, source = args.case.split(",")
        overrides = {key: parse_override(key, value)
                     for key, value in vars(args).items() if key in OVERRIDES and value is not None}
        print(json.dumps(run_case(scale, input_name, source, args.fov_scale, args.threads, args.device,
                                  args.precision, overrides, args.methods, args.cudnn_benchmark,
                                  args.repeats)))
        return

    rows = []
    for scale in args.scales:
        source = args.source or ("subject" if scale == SHIPPED_SCALE else "synthetic")
        for input_name in args.inputs:
            command = [sys.executable, __file__, "--case", f"{scale},{input_name},{source}", "--fov_scale",
                       str(args.fov_scale), "--threads", str(args.threads), "--device", args.device,
                       "--precision", args.precision, "--repeats", str(args.repeats), "--methods", *args.methods]
            for key in OVERRIDES:
                if getattr(args, key) is not None:
                    command += [f"--{key}", str(getattr(args, key))]
            command += ["--cudnn_benchmark"] if args.cudnn_benchmark else []
            rows.append(run_isolated(command, args.timeout, {"scale": scale, "input": input_name}))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "load_average_at_end": os.getloadavg()}
    with open(args.output + ".tmp", "w") as handle:
        json.dump({"fov_scale": args.fov_scale, "machine": machine, "cases": rows}, handle, indent=2)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
