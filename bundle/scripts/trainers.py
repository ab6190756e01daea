"""Engine glue for the two training configs: batch preparation, the LR schedule, retrieval metrics, resume, export.

Both stages train with MONAI's stock ``SupervisedTrainer``: stage 1 passes the prompt tokens as an extra network
input (and as the "label", which the CLIP loss ignores but the retrieval metric uses to recognise equal prompts);
stage 2 uses ``PrepareBatchExtraInput`` straight from the config.
"""

from __future__ import annotations

import glob
import math
import os

import torch
from ignite import distributed as idist
from ignite.metrics import Metric
from monai.engines import PrepareBatch
from monai.utils import evenly_divisible_all_gather

from .bmlip import save_text_encoder


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


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """The most recently written training checkpoint (``checkpoint_*.pt``) in ``ckpt_dir``, or None: resuming from
    it continues after the last completed epoch."""
    paths = glob.glob(os.path.join(ckpt_dir, "checkpoint_*.pt"))
    return max(paths, key=os.path.getmtime) if paths else None


def export_text_encoder(network: torch.nn.Module, path: str) -> str:
    """Write the text tower of a (possibly DDP-wrapped) BMLIP alone for stage 2 (rank 0 only under DDP)."""
    model = getattr(network, "module", network)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0:
        save_text_encoder(model.text_encoder, path, model.text_config)
    return path


def export_network_weights(checkpoint_path: str, path: str) -> str:
    """Write the stage-2 network's state dict alone (what ``configs/inference.yaml`` loads as ``models/model.pt``)
    from a checkpoint that holds it directly (``model_best.pt``) or under ``network`` (``checkpoint_*.pt``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return path
    state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = state.get("network", state)
    state = {key.removeprefix("module."): value for key, value in state.items()}  # a DDP-wrapped network's keys
    temporary = f"{path}.tmp{os.getpid()}"
    torch.save(state, temporary)
    os.replace(temporary, path)
    return path
