"""Stage 2: TUMSyn's text-guided synthesis and arbitrary-scale super-resolution network.

image -> ResNet encoder (full resolution) -> fusion with the target-prompt embedding -> LIIF latent, queried at any
continuous coordinate. Conditioning is either the frozen stage-1 text encoder ("text", the paper's model) or a
learned vector per target modality ("onehot", the paper's ablation).

The frozen text encoder is a submodule, so one ``model.pt`` holds everything. ``forward(image)`` alone works (the
default prompt asks for a T1w image on the input grid), which MONAI's ``verify_net_in_out`` and ``ckpt_export`` need.
"""

from typing import Optional, Sequence

import torch
from torch import nn

from .bmlip import build_text_encoder, load_text_encoder
from .liif import LIIFDecoder, make_coord
from .network_scales import scale_config, text_encoder_config
from .prompt import MODALITIES, Prompt, tokenize
from .resnet_encoder import ResNetEncoder3d
from .text_guidance import ModalityEmbedding, TextConditioner, TextGuidedFusion

CONDITIONINGS = ("text", "onehot")
DEFAULT_MODALITY = "T1w"  # what forward(image) synthesises when no prompt is given


class TUMSynNet(nn.Module):
    """``encode``/``query``/``forward`` as specified in the shared interface (see ``scripts.liif`` for coordinates).

    Args:
        text_encoder: stage-1 text tower (frozen here); required for ``conditioning="text"``, ignored otherwise.
        conditioning: "text" (prompt tokens) or "onehot" (target modality index).
        cond_dim: size of the conditioning vector; defaults to the text encoder's ``output_dim``.
        channels, blocks: encoder width and BasicBlocks per stage.
        fusion_heads, fusion_mlp_ratio: cross-attention heads and feed-forward expansion.
        decoder_hidden: LIIF MLP hidden sizes.
        query_chunk_size: points decoded at once; bounds memory when predicting whole volumes.
    """

    def __init__(
        self,
        text_encoder: Optional[nn.Module] = None,
        conditioning: str = "text",
        cond_dim: Optional[int] = None,
        channels: int = 64,
        blocks: Sequence[int] = (3, 4, 6, 3),
        fusion_heads: int = 8,
        fusion_mlp_ratio: int = 4,
        decoder_hidden: Sequence[int] = (256, 256, 256, 256),
        query_chunk_size: int = 16384,
    ):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning: expected one of {CONDITIONINGS}, got {conditioning!r}")
        if conditioning == "text" and text_encoder is None:
            raise ValueError("text_encoder: required for conditioning='text' (build_tumsyn_net builds one)")
        if cond_dim is None:
            if text_encoder is None:
                raise ValueError("cond_dim: required when there is no text encoder to take it from")
            cond_dim = int(text_encoder.output_dim)
        self.conditioning = conditioning
        self.query_chunk_size = query_chunk_size
        if conditioning == "text":
            self.conditioner = TextConditioner(text_encoder, cond_dim)
        else:
            self.conditioner = ModalityEmbedding(cond_dim)
        self.encoder = ResNetEncoder3d(1, channels, blocks)
        self.fusion = TextGuidedFusion(channels, cond_dim, fusion_heads, fusion_mlp_ratio)
        self.decoder = LIIFDecoder(channels, decoder_hidden)
        # Defaults for forward(image): not persistent, so a changed default never invalidates a checkpoint.
        self.register_buffer("default_tokens", tokenize(Prompt(modality=DEFAULT_MODALITY).render()), persistent=False)
        self.register_buffer(
            "default_modality", torch.tensor([MODALITIES.index(DEFAULT_MODALITY)]), persistent=False
        )

    def encode(
        self, image: torch.Tensor, tokens: Optional[torch.Tensor] = None, modality: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``image [B, 1, D, H, W]`` -> latent features ``[B, decoder_hidden[0], D, H, W]`` for ``query``.

        One prompt (``tokens [1, L]``) or modality (``[1]``) is shared by the whole batch.
        """
        if image.dim() != 5 or image.shape[1] != 1:
            raise ValueError(f"image: expected shape [B, 1, D, H, W], got {list(image.shape)}")
        batch = image.shape[0]
        if self.conditioning == "text":
            condition = self.default_tokens if tokens is None else tokens
        else:
            condition = self.default_modality if modality is None else modality
        if condition.shape[0] == 1:
            condition = condition.expand([batch] + list(condition.shape[1:]))
        elif condition.shape[0] != batch:
            raise ValueError(f"{self.conditioning} condition: batch {condition.shape[0]} != image batch {batch}")
        features = self.fusion(self.encoder(image), self.conditioner(condition))
        return self.decoder.project(features)

    def query(self, features: torch.Tensor, coords: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        """Intensities ``[B, N, 1]`` at ``coords [B, N, 3]`` for output voxels of size ``cell [B, N, 3]``."""
        return self.decoder.query_in_chunks(features, coords, cell, self.query_chunk_size)

    def forward(
        self,
        image: torch.Tensor,
        tokens: Optional[torch.Tensor] = None,
        coords: Optional[torch.Tensor] = None,
        cell: Optional[torch.Tensor] = None,
        modality: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[B, 1, D, H, W]`` on the input grid when ``coords`` is None, else ``[B, N, 1]`` at ``coords``."""
        features = self.encode(image, tokens, modality)
        if coords is not None:
            if cell is None:
                raise ValueError("cell: required with coords (the output voxel size in normalised units)")
            return self.query(features, coords, cell)
        batch, size = image.shape[0], image.shape[2:]
        grid = make_coord(size).to(image.device, image.dtype).unsqueeze(0).expand(batch, -1, -1)
        input_voxel = 2.0 / torch.tensor(size, dtype=image.dtype, device=image.device)
        prediction = self.query(features, grid, input_voxel.expand_as(grid))
        return prediction.transpose(1, 2).reshape(image.shape)


def build_tumsyn_net(
    scale: str = "small", text_encoder_path: Optional[str] = None, conditioning: str = "text", **overrides
) -> TUMSynNet:
    """TUMSynNet at a named scale (``scripts.network_scales``), for configs.

    With ``conditioning="text"`` the text encoder is loaded from ``text_encoder_path`` (a stage-1 export), or built
    untrained at the scale's size when no path is given (its weights then come from a full checkpoint such as
    ``models/model.pt``). ``overrides`` replace individual TUMSynNet arguments (e.g. ``query_chunk_size``).
    """
    numbers = scale_config(scale)
    text_encoder = None
    if conditioning == "text":
        if text_encoder_path:
            text_encoder = load_text_encoder(text_encoder_path)
        else:
            text_encoder = build_text_encoder(text_encoder_config(scale))
    arguments = dict(
        text_encoder=text_encoder,
        conditioning=conditioning,
        cond_dim=text_encoder.output_dim if text_encoder is not None else numbers["text"]["output_dim"],
        channels=numbers["encoder"]["channels"],
        blocks=numbers["encoder"]["blocks"],
        fusion_heads=numbers["fusion"]["heads"],
        fusion_mlp_ratio=numbers["fusion"]["mlp_ratio"],
        decoder_hidden=numbers["decoder"]["hidden"],
    )
    unknown = sorted(set(overrides) - set(arguments) - {"query_chunk_size"})
    if unknown:
        raise ValueError(f"build_tumsyn_net: unknown arguments {unknown}")
    return TUMSynNet(**{**arguments, **overrides})
