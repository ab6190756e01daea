"""Stage 2: TUMSyn's text-guided synthesis and arbitrary-scale super-resolution network.

image -> ResNet encoder (full resolution) -> fusion with the target-prompt embedding -> LIIF latent, queried at any
continuous coordinate. With ``input_skip`` the decoder also sees the input image and corrects it (see ``TUMSynNet``).
With ``condition_site="latent"`` the prompt instead scales and shifts the LIIF latent codes, and the encoder is
prompt-free: ``forward`` then decodes K targets of one encoding (``tokens [B, K, L]``) in one pass.
With ``transfer_knots`` the input skip adds a grey-level curve of the input instead of the input itself, one curve
per condition, which then also holds the input's own contrast (``source``; unknown when not given).
Conditioning is either the frozen stage-1 text encoder ("text", the paper's model) or a
learned vector per target modality ("onehot", the paper's ablation).

The frozen text encoder is a submodule, so one ``model.pt`` holds everything. ``forward(image)`` alone works (the
default prompt asks for a T1w image on the input grid), which MONAI's ``verify_net_in_out`` and ``ckpt_export`` need.
"""

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import config_flag
from ..prompt import MODALITIES, Prompt, tokenize
from .bmlip import build_text_encoder, load_text_encoder
from .layout import cat_channels
from .liif import LIIFDecoder, make_coord
from .network_scales import scale_config, text_encoder_config
from .resnet_encoder import ResNetEncoder3d
from .text_guidance import IntensityTransfer, LatentModulation, ModalityEmbedding, TextConditioner, TextGuidedFusion
from .unet_encoder import UNetEncoder3d

CONDITIONINGS = ("text", "onehot")
ENCODERS = ("resnet", "unet")
CONDITION_SITES = ("features", "latent")
DEFAULT_MODALITY = "T1w"  # what forward(image) synthesises when no prompt is given
UNKNOWN_SOURCE = len(MODALITIES)  # the ``source`` index of an input whose contrast is not known
# Points decoded at once: each decoder layer then holds 16384 x 8 corners x 256 x 4 bytes = 0.13 GB at paper scale.
QUERY_CHUNK_SIZE = 16384


class TUMSynNet(nn.Module):
    """``encode``/``query``/``forward`` as specified in the shared interface (``scripts.nets.liif``: coordinates).

    Sizes come from ``scripts.nets.network_scales`` through ``build_tumsyn_net``.

    Args:
        text_encoder: stage-1 text tower (frozen here); required for ``conditioning="text"``, ignored otherwise.
        conditioning: "text" (prompt tokens) or "onehot" (target modality index).
        cond_dim: size of the conditioning vector; for "text" it is (and may be left None for) the encoder's
            ``output_dim``.
        channels, blocks: the ``resnet`` encoder's width and BasicBlocks per stage; for the ``unet`` encoder,
            ``channels`` are its widths per level (finest first) and ``blocks`` is unused.
        encoder: "resnet" (the paper's: full resolution throughout, ``scripts.nets.resnet_encoder``) or "unet"
            (``scripts.nets.unet_encoder``).
        condition_site: "features" (the paper's: cross-attention fusion of the encoder's features; with the unet
            encoder, at its coarsest level and as ``condition_channels`` constant input channels) or "latent" (FiLM of
            the LIIF latent codes, ``LatentModulation``; the encoder never sees the prompt).
        condition_channels: the ``unet`` encoder's constant input channels projected from the condition.
        fusion_heads, fusion_mlp_ratio: cross-attention heads and feed-forward expansion ("features" only).
        decoder_hidden: LIIF MLP hidden sizes.
        input_skip: the decoder sees the input image beside the fused features and predicts a correction that is
            added to the input interpolated at the query (``LIIFDecoder``'s input residual; super-resolution
            networks add the interpolated input likewise: Kim et al., VDSR, CVPR 2016). Copying the source (T1w ->
            T1CE, super-resolution) is then the network's starting point and remapping its grey levels a linear
            function of a decoder input, so the features only have to add what context changes.
        query_chunk_size: points decoded at once; bounds memory when predicting whole volumes.
        transfer_knots: > 0 (with ``input_skip``): the skip adds the input through a grey-level curve of that many
            knots (``IntensityTransfer``) computed from the condition, to which a learned vector of the input's
            contrast (``source``, a modality index; ``UNKNOWN_SOURCE`` or None: not known) is added.
    """

    def __init__(
        self,
        text_encoder: Optional[nn.Module],
        conditioning: str,
        cond_dim: Optional[int],
        channels: Union[int, Sequence[int]],
        blocks: Optional[Sequence[int]],
        fusion_heads: Optional[int],
        fusion_mlp_ratio: Optional[int],
        decoder_hidden: Sequence[int],
        input_skip: bool = False,
        query_chunk_size: int = QUERY_CHUNK_SIZE,
        encoder: str = "resnet",
        condition_channels: int = 0,
        condition_site: str = "features",
        transfer_knots: int = 0,
    ):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder: expected one of {ENCODERS}, got {encoder!r}")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning: expected one of {CONDITIONINGS}, got {conditioning!r}")
        if condition_site not in CONDITION_SITES:
            raise ValueError(f"condition_site: expected one of {CONDITION_SITES}, got {condition_site!r}")
        if conditioning == "text":
            if text_encoder is None:
                raise ValueError("text_encoder: required for conditioning='text' (build_tumsyn_net builds one)")
            if cond_dim not in (None, text_encoder.output_dim):
                raise ValueError(f"cond_dim: {cond_dim} differs from the text encoder's {text_encoder.output_dim}")
            cond_dim = int(text_encoder.output_dim)
        elif cond_dim is None:
            raise ValueError("cond_dim: required for conditioning='onehot'")
        self.conditioning = conditioning
        self.query_chunk_size = query_chunk_size
        if conditioning == "text":
            self.conditioner = TextConditioner(text_encoder, cond_dim)
        else:
            self.conditioner = ModalityEmbedding(cond_dim)
        # The prompt's fusion block: after the full-resolution ResNet (the paper), or at the U-Net's coarsest level,
        # where it costs 1/512 of the voxels and its effect still reaches every output voxel on the way back up.
        on_features = condition_site == "features"
        if encoder == "unet":
            fusion = TextGuidedFusion(channels[-1], cond_dim, fusion_heads, fusion_mlp_ratio) if on_features else None
            self.encoder = UNetEncoder3d(1, channels, bottleneck_fusion=fusion, condition_dim=cond_dim,
                                         condition_channels=condition_channels if on_features else 0)
            self.fusion = None
        else:
            self.encoder = ResNetEncoder3d(1, channels, blocks)
            self.fusion = TextGuidedFusion(channels, cond_dim, fusion_heads, fusion_mlp_ratio) if on_features else None
        width = self.encoder.out_channels
        self.input_skip = bool(input_skip)
        self.decoder = LIIFDecoder(width + int(self.input_skip), decoder_hidden, input_residual=self.input_skip)
        self.modulation = None if on_features else LatentModulation(cond_dim, decoder_hidden[0])
        if transfer_knots and not self.input_skip:
            raise ValueError("transfer_knots: needs input_skip (the curve maps the skip's input)")
        self.transfer = IntensityTransfer(cond_dim, transfer_knots) if transfer_knots else None
        self.source_embedding = nn.Embedding(UNKNOWN_SOURCE + 1, cond_dim) if transfer_knots else None
        # Defaults for forward(image): not persistent, so a changed default never invalidates a checkpoint.
        self.register_buffer("default_tokens", tokenize(Prompt(modality=DEFAULT_MODALITY).render()), persistent=False)
        self.register_buffer(
            "default_modality", torch.tensor([MODALITIES.index(DEFAULT_MODALITY)]), persistent=False
        )

    def embed_condition(self, tokens: Optional[torch.Tensor] = None, modality: Optional[torch.Tensor] = None,
                        source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The conditioning vectors ``[N, cond_dim]`` of prompts ``tokens [N, L]`` (or modalities ``[N]``); None: the
        default prompt. ``source [N]`` (or ``[1]``): the inputs' contrasts, used with ``transfer_knots`` only (None:
        unknown). ``encode`` computes them itself; the inference engine computes one per volume and passes it to
        every window (on a GPU the text tower's launches per window cost more than its arithmetic)."""
        if self.conditioning == "text":
            condition = self.conditioner(self.default_tokens if tokens is None else tokens)
        else:
            condition = self.conditioner(self.default_modality if modality is None else modality)
        if self.source_embedding is None:
            return condition
        if source is None:
            source = torch.full((1,), self.source_embedding.num_embeddings - 1, dtype=torch.long,
                                device=condition.device)
        return condition + self.source_embedding(source.to(condition.device).long()).to(condition.dtype)

    def encode(
        self,
        image: torch.Tensor,
        tokens: Optional[torch.Tensor] = None,
        modality: Optional[torch.Tensor] = None,
        condition: Optional[torch.Tensor] = None,
        source: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``image [B, 1, D, H, W]`` -> latent features ``[B, decoder_hidden[0] (+ 1 with input_skip), D, H, W]``
        for ``query``.

        One prompt (``tokens [1, L]``), modality (``[1]``) or ``condition`` (``embed_condition``'s ``[1, cond_dim]``)
        may be shared by the whole batch; ``condition`` replaces ``tokens``, ``modality`` and ``source``.
        """
        if image.dim() != 5 or image.shape[1] != 1:
            raise ValueError(f"image: expected shape [B, 1, D, H, W], got {list(image.shape)}")
        batch = image.shape[0]
        if condition is None:
            condition = self.embed_condition(tokens, modality, source)
        if condition.shape[0] == 1:
            condition = condition.expand(batch, condition.shape[1])
        elif condition.shape[0] != batch:
            raise ValueError(f"{self.conditioning} condition: batch {condition.shape[0]} != image batch {batch}")
        if self.modulation is not None:
            scale, shift = self.modulation(condition)
            latent = self.encode_shared(image)
            width = scale.shape[1]
            codes = latent[:, :width] * scale.to(latent.dtype)[:, :, None, None, None] \
                + shift.to(latent.dtype)[:, :, None, None, None]
            return cat_channels(codes, self._transferred(latent[:, width:], condition)) if self.input_skip else codes
        features = self.encoder(image, condition)
        if self.fusion is not None:
            features = self.fusion(features, condition)
        latent = self._project(features, image)
        if self.transfer is None:
            return latent
        return cat_channels(latent[:, :-1], self._transferred(latent[:, -1:], condition))

    def _transferred(self, skip: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The input skip's channel ``[B, 1, D, H, W]`` through each condition's grey-level curve (as it is without
        ``transfer_knots``)."""
        if self.transfer is None:
            return skip
        knots = self.transfer(condition.float()).unsqueeze(1)  # [B, 1, num_knots]
        return self.transfer.apply(knots, skip.flatten(2)).view_as(skip).to(skip.dtype)

    def encode_shared(self, image: torch.Tensor) -> torch.Tensor:
        """The prompt-free latent of ``condition_site="latent"``, before any target's modulation."""
        return self._project(self.encoder(image), image)

    def _project(self, features: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if not self.input_skip:
            return self.decoder.project(features)
        return self.decoder.project(cat_channels(features, image.to(features.dtype)), image.to(features.dtype))

    def query(self, features: torch.Tensor, coords: torch.Tensor, cell: torch.Tensor,
              chunk_size: Optional[int] = None) -> torch.Tensor:
        """Intensities ``[B, N, 1]`` at ``coords [B, N, 3]`` for output voxels of size ``cell [B, N, 3]``, decoded
        ``chunk_size`` points at a time (default ``query_chunk_size``)."""
        return self.decoder.query_in_chunks(features, coords, cell,
                                            self.query_chunk_size if chunk_size is None else chunk_size)

    def forward(
        self,
        image: torch.Tensor,
        tokens: Optional[torch.Tensor] = None,
        coords: Optional[torch.Tensor] = None,
        cell: Optional[torch.Tensor] = None,
        modality: Optional[torch.Tensor] = None,
        source: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``[B, 1, D, H, W]`` on the input grid when ``coords`` is None, else ``[B, N, 1]`` at ``coords``; with K
        targets per image (``tokens [B, K, L]`` or ``modality [B, K]``, ``condition_site="latent"``), ``[B, N, K]``.
        ``source [B]``: the inputs' contrasts (``embed_condition``)."""
        targets = tokens if self.conditioning == "text" else modality
        if targets is not None and targets.dim() == (3 if self.conditioning == "text" else 2):
            return self.forward_targets(image, targets, coords, cell, source)
        features = self.encode(image, tokens, modality, source=source)
        if coords is not None:
            if cell is None:
                raise ValueError("cell: required with coords (the output voxel size in normalised units)")
            return self.query(features, coords, cell)
        batch, size = image.shape[0], image.shape[2:]
        grid = make_coord(size).to(image.device, image.dtype).unsqueeze(0).expand(batch, -1, -1)
        input_voxel = 2.0 / torch.tensor(size, dtype=image.dtype, device=image.device)
        prediction = self.query(features, grid, input_voxel.expand_as(grid))
        return prediction.transpose(1, 2).reshape(image.shape)

    def forward_targets(self, image: torch.Tensor, targets: torch.Tensor, coords: Optional[torch.Tensor],
                        cell: Optional[torch.Tensor], source: Optional[torch.Tensor] = None) -> torch.Tensor:
        """K targets decoded from one encoding of each image: ``[B, N, K]`` at ``coords [B, N, 3]``, for prompts
        (``[B, K, L]`` tokens) or modalities (``[B, K]``); training sees every target contrast of a patch at the
        cost of one encoder pass."""
        if self.modulation is None:
            raise ValueError("targets: several per image need condition_site='latent' (a prompt-free encoder)")
        if coords is None or cell is None:
            raise ValueError("coords, cell: required with several targets per image")
        batch, count = targets.shape[:2]
        text = self.conditioning == "text"
        condition = self.embed_condition(targets.flatten(0, 1) if text else None, None if text else targets.flatten(),
                                         None if source is None else source.repeat_interleave(count)
                                         ).view(batch, count, -1)
        curve = None if self.transfer is None else (self.transfer(condition), self.transfer.max_intensity)
        return self.decoder.query(self.encode_shared(image), coords, cell, self.modulation(condition), curve)


def build_tumsyn_net(
    scale: str = "small",
    text_encoder_path: Optional[str] = None,
    conditioning: str = "text",
    input_skip: Optional[bool] = None,
    query_chunk_size: int = QUERY_CHUNK_SIZE,
) -> TUMSynNet:
    """TUMSynNet at a named scale (``scripts.nets.network_scales``), for configs.

    With ``conditioning="text"`` the text encoder is loaded from ``text_encoder_path`` (a stage-1 export), or built
    untrained at the scale's size when no path is given (its weights then come from a full checkpoint such as
    ``models/model.pt``). With ``conditioning="onehot"`` the path is ignored. ``input_skip`` None takes the scale's
    choice (``decoder.input_skip``).
    """
    numbers = scale_config(scale)
    text_encoder = None
    if conditioning == "text":
        if text_encoder_path:
            text_encoder = load_text_encoder(text_encoder_path)
        else:
            text_encoder = build_text_encoder(text_encoder_config(scale))
    return TUMSynNet(
        text_encoder=text_encoder,
        conditioning=conditioning,
        cond_dim=text_encoder.output_dim if text_encoder is not None else numbers["text"]["output_dim"],
        channels=numbers["encoder"]["channels"],
        blocks=numbers["encoder"].get("blocks"),
        encoder=numbers["encoder"]["type"],
        condition_channels=numbers["encoder"].get("condition_channels", 0),
        condition_site=numbers["fusion"].get("site", "features"),
        fusion_heads=numbers["fusion"].get("heads"),
        fusion_mlp_ratio=numbers["fusion"].get("mlp_ratio"),
        decoder_hidden=numbers["decoder"]["hidden"],
        input_skip=numbers["decoder"]["input_skip"] if input_skip is None else config_flag(input_skip, "input_skip"),
        query_chunk_size=query_chunk_size,
        transfer_knots=numbers["decoder"].get("transfer_knots", 0),
    )
