"""multi_gpu_train.yaml on both stages: 2 CPU processes (gloo) through torchrun, as a multi-GPU run is launched."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import BUNDLE_ROOT, REPO_ROOT
from helpers import python_environment, write_bids_image

CONFIGS = os.path.join(BUNDLE_ROOT, "configs")
OVERLAY = os.path.join(CONFIGS, "multi_gpu_train.yaml")
SIDECARS = {  # two contrasts with their real ordering of tissue brightness
    "T1w": ((1.0, 0.6, 0.2), {"RepetitionTime": 2.3, "EchoTime": 0.003, "InversionTime": 0.9, "FlipAngle": 9}),
    "T2w": ((0.4, 0.6, 1.0), {"RepetitionTime": 3.2, "EchoTime": 0.1, "FlipAngle": 90}),
}
# Test-only addition to the overlay: every rank dumps its network and the batches it saw per epoch, outside output_dir.
RANK_DUMP = """
rank_dump_dir: null
finalize:
- "$torch.save({'state': {k: v.detach().cpu() for k, v in @network.module.state_dict().items()},
    'batches': len(@train#dataloader)}, @rank_dump_dir + '/rank' + str(torch.distributed.get_rank()) + '.pt')"
- "$torch.distributed.destroy_process_group()"
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 subjects x 2 contrasts, 32^3 at 1 mm: shells of WM/GM/CSF around a shifted centre."""
    root = str(tmp_path_factory.mktemp("bids"))
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1)
    participants = [{"participant_id": f"sub-{i:02d}", "age": 20 + 10 * i, "sex": "MF"[i % 2]} for i in range(1, 7)]
    for row in participants:
        radius = np.linalg.norm(grid - 16 - rng.uniform(-2, 2, 3), axis=-1) / 12
        tissues = [(radius < 0.5), (radius >= 0.5) & (radius < 0.85), (radius >= 0.85) & (radius < 1)]
        for suffix, (values, sidecar) in SIDECARS.items():
            volume = sum(v * t for v, t in zip(values, tissues)) * 1000
            write_bids_image(root, row["participant_id"][4:], suffix, volume,
                             {**sidecar, "MagneticFieldStrength": 3, "Manufacturer": "Siemens"},
                             participants=participants)
    return root


def _torchrun(stage_config, tmp_path, name, *overrides):
    """Run ``stage_config`` + the overlay (+ the rank dump) with 2 processes; per-rank logs under tmp/name-logs."""
    extra = tmp_path / "rank_dump.yaml"
    extra.write_text(RANK_DUMP)
    (tmp_path / f"{name}-dumps").mkdir()
    environment = python_environment(OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--log-dir", str(tmp_path / f"{name}-logs"), "--redirects", "3",
               "-m", "monai.bundle", "run", "training",
               "--config_file", f"['{stage_config}','{OVERLAY}','{extra}']",
               "--output_dir", str(tmp_path / name), "--rank_dump_dir", str(tmp_path / f"{name}-dumps"),
               "--max_epochs", "1", "--val_fraction", "0.34", *overrides]
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    logs = {rank: "".join(open(p).read() for p in glob.glob(str(tmp_path / f"{name}-logs" / "**" / str(rank) / "*.log"),
                                                            recursive=True))
            for rank in (0, 1)}
    assert result.returncode == 0, (result.stderr[-2000:], logs[0][-2000:], logs[1][-2000:])
    dumps = [torch.load(tmp_path / f"{name}-dumps" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return dumps, logs


def _assert_in_sync(dumps, checkpoint_network):
    """Both ranks end with identical weights, equal to what rank 0 saved."""
    for key, value in dumps[0]["state"].items():
        torch.testing.assert_close(dumps[1]["state"][key], value, rtol=0, atol=0, msg=key)
        torch.testing.assert_close(checkpoint_network[key.removeprefix("module.")] if key in checkpoint_network
                                   else checkpoint_network["module." + key], value, rtol=0, atol=0, msg=key)


def _assert_rank0_alone_logged(logs, output_dir):
    for stats_line in ("-- train_loss:", "Metrics --"):  # what the trainer's and evaluator's StatsHandlers print
        assert stats_line in logs[0] and stats_line not in logs[1]
    # TensorBoard: the trainer's and the evaluator's writers, both in one process (file names end <pid>.<n>)
    events = glob.glob(os.path.join(output_dir, "events.out.tfevents.*"))
    assert len(events) == 2 and len({name.rsplit(".", 2)[1] for name in events}) == 1, events


def test_stage1_trains_in_sync_on_two_cpu_processes(dataset, tmp_path):
    # 4 training subjects x 2 images split over 2 ranks, 2 per batch; the CLIP loss gathers the features of both ranks
    dumps, logs = _torchrun(os.path.join(CONFIGS, "stage1_train.yaml"), tmp_path, "stage1",
                            "--dataset_dir", dataset, "--batch_size", "2", "--device", "cpu")
    checkpoint = torch.load(tmp_path / "stage1" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    _assert_in_sync(dumps, checkpoint["network"])
    assert dumps[0]["batches"] == dumps[1]["batches"] == 2  # 8 images / 2 ranks / batch 2: each rank half the data
    assert checkpoint["trainer"]["iteration"] == 2
    _assert_rank0_alone_logged(logs, str(tmp_path / "stage1"))
    assert (tmp_path / "stage1" / "text_encoder.pt").is_file()


def test_stage2_trains_in_sync_on_two_cpu_processes(dataset, tmp_path):
    from scripts.nets.bmlip import build_text_encoder, save_text_encoder
    from scripts.nets.network_scales import text_encoder_config

    text_encoder = str(tmp_path / "text_encoder.pt")  # an untrained stage-1 export: stage 2 only needs it frozen
    save_text_encoder(build_text_encoder(text_encoder_config("small")), text_encoder, text_encoder_config("small"))
    # 4 training subjects over 2 ranks, 1 subject (2 patches) per batch
    dumps, logs = _torchrun(os.path.join(CONFIGS, "stage2_train.yaml"), tmp_path, "stage2",
                            "--dataset_dir", dataset, "--text_encoder_path", text_encoder, "--batch_size", "1",
                            "--lr_size", "[8,8,8]", "--num_queries", "256", "--patches_per_volume", "2",
                            "--val_pairs", "2", "--val_spacing_mm", "4.0", "--val_scale", "[2.0,2.0,4.0]",
                            "--val_interval", "1",
                            "--device", "cpu")
    checkpoint = torch.load(tmp_path / "stage2" / "checkpoints" / "checkpoint_final.pt", weights_only=True)
    _assert_in_sync(dumps, checkpoint["network"])
    assert dumps[0]["batches"] == dumps[1]["batches"] == 2
    assert checkpoint["trainer"]["iteration"] == 2 and checkpoint["optimizer"]["state"]  # weights were updated
    _assert_rank0_alone_logged(logs, str(tmp_path / "stage2"))
    assert sorted(os.listdir(tmp_path / "stage2" / "checkpoints")) == ["checkpoint_epoch=1.pt", "checkpoint_final.pt",
                                                                       "model_best.pt"]
    assert (tmp_path / "stage2" / "model.pt").is_file()
