"""Stage 1: BMLIP, a CLIP model for brain MR images and their metadata prompts (TUMSyn paper, Eq. 1).

Image tower: MONAI's 3D ViT (the paper's ViT-B/16); text tower: open_clip's text transformer. Only the text tower
is kept after training: ``save_text_encoder`` writes it alone, ``load_text_encoder`` rebuilds it for stage 2.
"""

import math
import os
import pickle

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from open_clip.loss import ClipLoss
from open_clip.transformer import TextTransformer
from torch import nn

from .network_scales import scale_config, text_encoder_config

# The constructor arguments a saved text encoder carries: enough to rebuild it, nothing else.
TEXT_ENCODER_CONFIG_KEYS = ("context_length", "vocab_size", "width", "heads", "layers", "output_dim")

# CLIP's initial temperature (Radford et al. 2021): logit scale = 1 / 0.07, learnable, capped at 100.
INITIAL_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


def build_text_encoder(config: dict) -> TextTransformer:
    """The text tower from a config of plain numbers (the keys of ``TEXT_ENCODER_CONFIG_KEYS``)."""
    if not isinstance(config, dict) or sorted(config) != sorted(TEXT_ENCODER_CONFIG_KEYS):
        got = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"text encoder config: expected keys {sorted(TEXT_ENCODER_CONFIG_KEYS)}, got {got}")
    bad = {key: value for key, value in config.items() if not isinstance(value, int) or isinstance(value, bool)}
    if bad:
        raise ValueError(f"text encoder config: expected integer values, got {bad}")
    return TextTransformer(**config)


def build_image_encoder(scale: str) -> ViT:
    """The image tower: a 3D ViT whose class token is projected to the joint embedding (no activation)."""
    numbers = scale_config(scale)
    return ViT(
        in_channels=1,
        img_size=numbers["crop"],
        spatial_dims=3,
        classification=True,
        num_classes=numbers["text"]["output_dim"],
        post_activation=None,
        **numbers["vit"],
    )


class BMLIP(nn.Module):
    """CLIP for brain MR: ``forward(image [B,1,S,S,S], tokens [B,L])`` -> dict of unit-norm features and the scale.

    ``text_config`` holds the text tower's constructor numbers so the trainer can export it with
    ``save_text_encoder(model.text_encoder, path, model.text_config)``.
    """

    def __init__(self, scale: str = "small"):
        super().__init__()
        self.crop = scale_config(scale)["crop"]
        self.text_config = text_encoder_config(scale)
        self.image_encoder = build_image_encoder(scale)
        self.text_encoder = build_text_encoder(self.text_config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / INITIAL_TEMPERATURE)))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        class_token_output, _ = self.image_encoder(image)
        return F.normalize(class_token_output, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_encoder(tokens), dim=-1)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> dict:
        return {
            "image_features": self.encode_image(image),
            "text_features": self.encode_text(tokens),
            "logit_scale": self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE),
        }


class BMLIPLoss(nn.Module):
    """Symmetric InfoNCE (paper Eq. 1) on a ``BMLIP`` output dict, with in-batch negatives.

    Under DDP pass ``rank``/``world_size``: features are gathered from every process (with gradients) so each
    image sees the negatives of the global batch.
    """

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.clip_loss = ClipLoss(gather_with_grad=world_size > 1, rank=rank, world_size=world_size)

    def forward(self, outputs: dict) -> torch.Tensor:
        return self.clip_loss(outputs["image_features"], outputs["text_features"], outputs["logit_scale"])


def save_text_encoder(text_encoder: nn.Module, path: str, config: dict) -> None:
    """Write ``{"config": config, "state_dict": ...}`` atomically (temporary file in the same folder, then rename)."""
    build_text_encoder(config)  # validates the config before anything is written
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    state_dict = {key: value.detach().cpu() for key, value in text_encoder.state_dict().items()}
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    torch.save({"config": dict(config), "state_dict": state_dict}, temporary)
    os.replace(temporary, path)


def load_text_encoder(path: str) -> TextTransformer:
    """Rebuild a text tower written by ``save_text_encoder``; loads tensors only (``weights_only=True``)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable text encoder checkpoint ({error})") from None
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= set(checkpoint):
        raise ValueError(f"{path}: expected a dict with 'config' and 'state_dict' (written by save_text_encoder)")
    try:
        text_encoder = build_text_encoder(checkpoint["config"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    expected = text_encoder.state_dict()
    stored = checkpoint["state_dict"]
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(stored) if expected[k].shape != stored[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path}: weights do not match the stored config {checkpoint['config']}: "
            f"missing {missing}, unexpected {unexpected}, wrong shape {reshaped}"
        )
    text_encoder.load_state_dict(stored)
    return text_encoder
