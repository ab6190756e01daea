"""Engine glue for the two training configs: batch preparation, the LR schedule, validation metrics, durable
checkpoints, reproducible resume, export.

Both stages train with MONAI's stock ``SupervisedTrainer``: stage 1 passes the prompt tokens as an extra network
input (and as the "label", which the CLIP loss ignores but the retrieval metric uses to recognise equal prompts);
stage 2 uses ``PrepareBatchExtraInput`` straight from the config and validates by synthesizing whole held-out
volumes (``WholeVolumeInferer``, ``BrainImageQuality``).

Resume: ``AtomicCheckpointSaver`` keeps a complete checkpoint on disk at every instant, and ``EpochSeeder`` reseeds
every random number generator at the start of each epoch from (seed, epoch), so an epoch redone after a kill draws
the same samples as it did in an uninterrupted run (exactly so with ``num_workers=0``; worker processes take their
seeds from the loader before the epoch starts). MONAI keeps the best validation score in memory only; ``BestKeyMetric``
saves it inside the best checkpoint and ``BestKeyMetricLoader`` reads it back, so a resumed run replaces
``model_best.pt`` only with a better epoch. ``ResumableTraining`` is all of that as the one handler both configs list.
"""

from __future__ import annotations

import glob
import logging
import math
import os

import numpy as np
import torch
from ignite import distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver, ProgressBar
from ignite.metrics import Metric
from ignite.metrics.metric import sync_all_reduce
from monai.data.utils import set_rnd
from monai.engines import PrepareBatch, Trainer
from monai.handlers import CheckpointLoader, CheckpointSaver, StatsHandler, TensorBoardStatsHandler, from_engine
from monai.inferers import Inferer
from monai.utils import evenly_divisible_all_gather, set_determinism

from ..engine import metrics
from ..engine.synthesis_engine import synthesize_volume
from ..engine.volume_io import atomic_path
from ..errors import config_flag
from ..nets.bmlip import save_text_encoder

logger = logging.getLogger(__name__)


class PrepareImageText(PrepareBatch):
    """Stage-1 batches: ``(image, tokens, (), {"tokens": tokens})`` from the keys ``image`` and ``tokens``."""

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
        tokens = batchdata["tokens"].to(device=device, non_blocking=non_blocking)
        return image, tokens, (), {"tokens": tokens}


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR factor per optimiser step: linear from 0 over ``warmup_steps``, then a half cosine down to 0 at
    ``total_steps`` (the TUMSyn stage-1 schedule), for ``torch.optim.lr_scheduler.LambdaLR``."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"LR schedule: expected 0 <= warmup_steps < total_steps, got {warmup_steps}, {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine_scheduler(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``warmup_cosine`` schedule stepped once per iteration (``LrScheduleHandler(epoch_level=False)``)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(int(warmup_steps), int(total_steps)))


class RetrievalAccuracy(Metric):
    """Top-k retrieval accuracy between the image and text features of a whole validation set.

    ``direction="image_to_text"``: for each image, is a text with its own prompt among the k texts most similar to it
    (and the reverse for ``"text_to_image"``)? Items whose prompts are identical (same tokens) count as correct
    matches of each other. Chance level is about k / (number of distinct prompts). Under DDP the features of every
    process are gathered before ranking.
    """

    DIRECTIONS = ("image_to_text", "text_to_image")
    required_output_keys = ("pred", "label")  # of the evaluator's output: the BMLIP features dict, the tokens

    def __init__(self, k: int = 1, direction: str = "image_to_text", output_transform=lambda output: output):
        if direction not in self.DIRECTIONS:
            raise ValueError(f"RetrievalAccuracy direction: expected one of {self.DIRECTIONS}, got {direction!r}")
        self.k, self.direction = int(k), direction
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._image, self._text, self._tokens = [], [], []

    def update(self, output) -> None:
        features, tokens = output
        self._image.append(features["image_features"].detach().float().cpu())
        self._text.append(features["text_features"].detach().float().cpu())
        self._tokens.append(tokens.detach().cpu())

    def compute(self) -> float:
        if not self._image:
            raise ValueError("RetrievalAccuracy: no validation batches were seen")
        image, text, tokens = (torch.cat(parts) for parts in (self._image, self._text, self._tokens))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            image, text, tokens = (evenly_divisible_all_gather(x.to(idist.device()), concat=True).cpu()
                                   for x in (image, text, tokens))
        similarity = image @ text.T if self.direction == "image_to_text" else text @ image.T
        same_prompt = (tokens[:, None, :] == tokens[None, :, :]).all(dim=-1)
        top = similarity.topk(min(self.k, similarity.shape[1]), dim=1).indices
        hits = same_prompt.gather(1, top).any(dim=1)
        return hits.float().mean().item()


class WholeVolumeInferer(Inferer):
    """Stage-2 validation: the network's prediction on each item's whole high-res grid (``out_shape [B, 3]``) from its
    low-res input ``[B, 1, *n]``, through the inference engine (``synthesize_volume``: overlapping windows, every
    output voxel queried once): ``[B, 1, *out_shape]``, all items of one shape (validation batches hold one)."""

    def __init__(self, roi_size=(64, 64, 64), overlap: float = 0.25, query_chunk: int = 65536, amp: bool = True):
        self.settings = dict(roi_size=tuple(int(r) for r in roi_size), overlap=float(overlap),
                             query_chunk=int(query_chunk), amp=bool(amp), progress=False)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, tokens: torch.Tensor | None = None,
                 modality: torch.Tensor | None = None, out_shape: torch.Tensor | None = None,
                 source: torch.Tensor | None = None) -> torch.Tensor:
        if out_shape is None:
            raise ValueError("WholeVolumeInferer: expected out_shape [B, 3] (the high-res grid) in the batch")
        model = getattr(network, "module", network)  # a DDP-wrapped network
        predictions = [
            synthesize_volume(model, image, None if tokens is None else tokens[i : i + 1], out_shape[i].tolist(),
                              modality=None if modality is None else modality[i : i + 1],
                              source=None if source is None else source[i : i + 1], **self.settings)
            for i, image in enumerate(inputs)
        ]
        return torch.stack(predictions).to(inputs.device)


class BrainImageQuality(Metric):
    """Mean over validation volumes of PSNR, SSIM (``scripts.engine.metrics``: data range 1) or L1 inside the brain (the
    target's non-zero voxels), on the normalised intensities the network predicts. Sums across DDP processes."""

    MEASURES = {"psnr": metrics.psnr, "ssim": metrics.ssim,
                "l1": lambda pred, target, mask: float(np.abs(pred[mask] - target[mask]).mean())}

    def __init__(self, measure: str = "psnr", output_transform=from_engine(["pred", "label"])):
        if measure not in self.MEASURES:
            raise ValueError(f"BrainImageQuality measure: expected one of {sorted(self.MEASURES)}, got {measure!r}")
        self.measure = measure
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._sum, self._count = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)

    def update(self, output) -> None:
        for pred, label in zip(*output):
            target = label.detach().float().cpu().numpy().reshape(label.shape[-3:])
            mask = target != 0
            if not mask.any():
                raise ValueError("BrainImageQuality: a validation target has no brain (non-zero) voxels")
            prediction = pred.detach().float().cpu().numpy().reshape(target.shape)
            self._sum += self.MEASURES[self.measure](prediction, target, mask)
            self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if self._count == 0:
            raise ValueError("BrainImageQuality: no validation volumes were seen")
        return float(self._sum / self._count)


class EpochSeeder:
    """Trainer handler: at the start of epoch e, seed torch, numpy, Python and the random transforms of ``dataset``
    from ``seed + e``, so what an epoch draws depends on the epoch alone, not on what ran before it in this process."""

    def __init__(self, seed: int, dataset):
        self.seed, self.dataset = int(seed), dataset

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        seed = self.seed + engine.state.epoch
        set_determinism(seed=seed)
        set_rnd(self.dataset, seed)


class AtomicDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver`` made durable: each file is written to a temporary name in the same folder, fsynced and
    renamed over its final name, and a superseded checkpoint is deleted only after its successor is complete
    (ignite removes it first). ``filename`` fixes the file name, as MONAI's savers of final/best checkpoints do."""

    def __init__(self, dirname: str, filename: str | None = None):
        super().__init__(dirname=dirname, require_empty=False, atomic=False)
        self.filename = filename
        self._superseded: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint, path, func) -> None:
        with atomic_path(str(path)) as temporary:
            func(checkpoint, temporary, **self.kwargs)
        for old in self._superseded:
            if os.path.abspath(old) != os.path.abspath(path) and os.path.exists(old):
                os.remove(old)
        self._superseded.clear()

    def remove(self, filename: str) -> None:
        if idist.get_rank() == self.save_on_rank:
            self._superseded.append(str(self.dirname / (self.filename or filename)))


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) writing through ``AtomicDiskSaver``: MONAI writes in place, so a
    kill while saving would leave a truncated file and, with ``n_saved=1``, no valid checkpoint at all."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(self.save_dir, checkpoint.save_handler.filename)


class BestKeyMetric:
    """Validation handler: the evaluator's best key metric and its epoch as a checkpointable object (saved in the best
    checkpoint beside the network, read back by ``BestKeyMetricLoader``)."""

    def __init__(self):
        self.evaluator: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self.evaluator = engine

    def state_dict(self) -> dict:
        return {"best_metric": float(self.evaluator.state.best_metric),
                "best_metric_epoch": int(self.evaluator.state.best_metric_epoch)}

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


class BestKeyMetricLoader:
    """Trainer handler for a resumed run: at its start, the objects of ``load_dict`` (a ``BestKeyMetric`` and the
    best-checkpoint saver's ranking, saved with ``key_metric_save_state``) from the best checkpoint ``best_path``.

    Without them MONAI starts from no best score, and the first validation after a resume overwrites the best
    checkpoint whatever its score. A best checkpoint written without them (before they were saved) is kept as it is.
    """

    def __init__(self, best_path: str, load_dict: dict):
        self.best_path, self.load_dict = best_path, dict(load_dict)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not os.path.isfile(self.best_path):
            return
        state = torch.load(self.best_path, map_location="cpu", weights_only=True)
        missing = sorted(set(self.load_dict) - set(state))
        if missing:
            logger.warning("%s holds no %s: the first validation after this resume replaces it whatever its score",
                           self.best_path, ", ".join(missing))
            return
        for key, target in self.load_dict.items():
            target.load_state_dict(state[key])


class EngineLogs:
    """Engine handler: rank 0 alone logs to the console (``StatsHandler``) and to TensorBoard in ``log_dir``, a trainer
    its loss every iteration (and a progress bar unless ``progress_bar`` is false), an evaluator its metrics."""

    def __init__(self, log_dir: str, progress_bar: bool | str = True):
        self.log_dir, self.progress_bar = log_dir, config_flag(progress_bar, "progress_bar")

    def attach(self, engine: Engine) -> None:
        if not is_rank0():
            return
        if isinstance(engine, Trainer):
            loss = from_engine(["loss"], first=True)
            handlers = [ProgressBar()] if self.progress_bar else []
            handlers += [StatsHandler(tag_name="train_loss", output_transform=loss),
                         TensorBoardStatsHandler(log_dir=self.log_dir, tag_name="train_loss", output_transform=loss)]
        else:
            handlers = [StatsHandler(iteration_log=False),
                        TensorBoardStatsHandler(log_dir=self.log_dir, iteration_log=False)]
        for handler in handlers:
            handler.attach(engine)


class ResumableTraining:
    """Trainer handler: a run started again on the same ``ckpt_dir`` resumes, and ends as an uninterrupted run would.

    - every epoch's random draws come from (``seed``, epoch) (``EpochSeeder`` on the trainer's dataset);
    - every epoch ``checkpoint_epoch=N.pt`` (only the latest kept) and at the end ``checkpoint_final.pt``: the trainer,
      ``network``, ``optimizer`` and ``lr_scheduler``; a new run resumes from the latest one (``latest_checkpoint``),
      loaded onto the trainer's device;
    - on each new best key metric of ``evaluator``, ``model_best.pt``: the network's state dict, that score
      (``BestKeyMetric``) and the saver's ranking, both restored on resume (``BestKeyMetricLoader``).

    Under DDP rank 0 alone writes. Attach it after the trainer's ``ValidationHandler``: an epoch is saved validated.
    """

    def __init__(self, ckpt_dir: str, evaluator: Engine, network: torch.nn.Module, optimizer, lr_scheduler,
                 seed: int = 0):
        self.ckpt_dir, self.evaluator, self.seed = ckpt_dir, evaluator, seed
        self.objects = {"network": network, "optimizer": optimizer, "lr_scheduler": lr_scheduler}

    def attach(self, trainer: Engine) -> None:
        EpochSeeder(self.seed, trainer.data_loader.dataset).attach(trainer)
        objects = {"trainer": trainer, **self.objects}  # the trainer's state: epoch, iteration
        resume = latest_checkpoint(self.ckpt_dir)
        if resume is not None:
            CheckpointLoader(load_path=resume, load_dict=objects, map_location=trainer.state.device).attach(trainer)
        if not is_rank0():
            return
        best = BestKeyMetric()
        best.attach(self.evaluator)
        best_saver = AtomicCheckpointSaver(
            save_dir=self.ckpt_dir, save_dict={"network": self.objects["network"], "best_key_metric": best},
            save_key_metric=True, key_metric_filename="model_best.pt", key_metric_save_state=True)
        best_saver.attach(self.evaluator)
        if resume is not None:
            BestKeyMetricLoader(os.path.join(self.ckpt_dir, "model_best.pt"),
                                {"best_key_metric": best, "checkpointer": best_saver}).attach(trainer)
        # every epoch, so an interruption loses at most the current one
        AtomicCheckpointSaver(save_dir=self.ckpt_dir, save_dict=objects, save_interval=1, n_saved=1, save_final=True,
                              final_filename="checkpoint_final.pt").attach(trainer)


def training_amp(amp: bool | str, device) -> bool:
    """Whether training steps run under bf16 autocast: when ``amp`` (a yes/no word) asks for it, on a GPU only."""
    return config_flag(amp, "amp") and torch.device(device).type == "cuda"


def is_rank0() -> bool:
    """Whether this process writes files and logs: always, unless it is a rank > 0 of a process group."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def start_process_group(device) -> None:
    """Join the process group ``torchrun`` describes (``multi_gpu_train.yaml``): NCCL between GPUs, each process on
    its own ``device``, or gloo between CPU processes."""
    device = torch.device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    idist.sync()  # ignite's one-time collective set-up, on every rank before rank-0-only handlers need it


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The most recently written training checkpoint (``checkpoint_*.pt``) in ``ckpt_dir``, or None: resuming from
    it continues after the last completed epoch."""
    paths = glob.glob(os.path.join(ckpt_dir, "checkpoint_*.pt"))
    return max(paths, key=os.path.getmtime) if paths else None


def export_text_encoder(network: torch.nn.Module, path: str) -> str:
    """Write the text tower of a (possibly DDP-wrapped) BMLIP alone for stage 2 (rank 0 only under DDP)."""
    model = getattr(network, "module", network)
    if is_rank0():
        save_text_encoder(model.text_encoder, path, model.text_config)
    return path


def export_network_weights(checkpoint_path: str, path: str) -> str:
    """Write the stage-2 network's state dict alone (what ``configs/inference.yaml`` loads as ``models/model.pt``)
    from a checkpoint that holds it directly (``model_best.pt``) or under ``network`` (``checkpoint_*.pt``)."""
    if not is_rank0():
        return path
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = state.get("network", state)
    state = {key.removeprefix("module."): value for key, value in state.items()}  # a DDP-wrapped network's keys
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    return path
