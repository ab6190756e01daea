"""Stage-2 conditioning: how the target prompt (or, for the ablation, the target modality) steers the image features.

- ``TextConditioner``: frozen stage-1 text encoder -> unit-norm pooled embedding -> trainable ``TextAdapter``.
- ``ModalityEmbedding``: the paper's one-hot baseline, a learned vector per target modality.
- ``LatentModulation``: the condition as a per-channel scale and shift of the LIIF latent codes (FiLM), so one
  prompt-free encoding serves every target contrast.
- ``IntensityTransfer``: the condition (target prompt plus the input's contrast) as a grey-level transfer curve of
  the input, which the decoder's input skip adds instead of the input itself.
- ``TextGuidedFusion``: multi-head cross-attention in which the conditioning vector is the query over all voxel
  features; its output is a per-channel gate on the features. The cost is linear in the number of voxels (one
  query per head), unlike voxel-as-query attention, so whole volumes fit in memory. Then channel LayerNorm and a
  gated depth-wise-convolution MLP with residual (the "GDFN" of Restormer, Zamir et al., CVPR 2022), as in the
  official TUMSyn code.
"""

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.intensity import CLIP_MAX
from ..prompt import MODALITIES
from .layout import pointwise


class TextAdapter(nn.Module):
    """Residual MLP (dim -> dim -> dim) that adapts the frozen text embedding to the synthesis task."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return embedding + self.mlp(embedding)


class TextConditioner(nn.Module):
    """``tokens [B, L] -> [B, dim]`` through the frozen text encoder and a trainable adapter.

    The encoder's weights stay in the state dict (one checkpoint holds the whole model) but never train: no
    gradients, and it stays in eval mode even when the surrounding model is put in training mode.
    """

    def __init__(self, text_encoder: nn.Module, dim: int):
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.embedding_scale = math.sqrt(dim)
        self.adapter = TextAdapter(dim)

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_encoder.eval()
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            # Stage 1 compared unit-norm text features: only their direction carries meaning. Scaling the unit
            # vector by sqrt(dim) gives components of unit variance, the input scale the adapter's default
            # initialisation assumes; without it prompt differences are ~sqrt(dim) times too small to learn from.
            embedding = F.normalize(self.text_encoder(tokens), dim=-1) * self.embedding_scale
        return self.adapter(embedding)


class ModalityEmbedding(nn.Module):
    """``modality [B] (index into scripts.prompt.MODALITIES) -> [B, dim]``: the one-hot conditioning ablation."""

    def __init__(self, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(len(MODALITIES), dim)

    def forward(self, modality: torch.Tensor) -> torch.Tensor:
        return self.embedding(modality)


class LatentModulation(nn.Module):
    """``condition [..., cond_dim] -> (scale, shift) [..., channels]``: feature-wise linear modulation (FiLM; Perez et
    al., AAAI 2018) of the decoder's latent codes by the target prompt.

    The image encoder then never sees the prompt, so one encoding of a training patch is decoded into every target
    contrast of its subject in the same step. The last layer starts at zero: every target begins as the identity
    modulation and the prompt's effect grows from there.
    """

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.GELU(), nn.Linear(cond_dim, 2 * channels))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, condition: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.mlp(condition).chunk(2, dim=-1)
        return 1 + scale, shift


class IntensityTransfer(nn.Module):
    """``condition [..., cond_dim] -> knots [..., num_knots]``: a piecewise-linear grey-level curve per condition,
    its values at ``num_knots`` equally spaced intensities over [0, ``max_intensity``]; ``apply`` maps intensities.

    Most of a contrast change is a remapping of grey levels (a lookup table of the input is the baseline every
    synthesis must beat). Convolutions learn that remapping for 7 x 7 contrast pairs in thousands of steps; a curve
    of a few dozen numbers per condition learns it in tens, and the network's features then only add what the
    context changes (bench/README.md, "A grey-level curve in the input skip"). Starts as the identity (the last
    layer at zero): the plain input skip.

    ``gain`` multiplies the learned part: Adam moves each parameter by about the learning rate per step whatever the
    gradient's scale, so the gain is the curves' learning-rate multiplier. At the stage-2 rate alone (gain 1) the
    T1w -> T2w curve was still far from inverted after 320 steps; the A/B's table of curves learned at 20x that rate.
    """

    def __init__(self, cond_dim: int, num_knots: int = 32, max_intensity: float = CLIP_MAX, gain: float = 10.0):
        super().__init__()
        if num_knots < 2:
            raise ValueError(f"num_knots: expected >= 2, got {num_knots}")
        self.mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.GELU(), nn.Linear(cond_dim, num_knots))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.max_intensity, self.gain = float(max_intensity), float(gain)
        self.register_buffer("identity", torch.linspace(0.0, self.max_intensity, num_knots), persistent=False)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.identity + self.gain * self.mlp(condition)

    def apply(self, knots: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
        """``intensity [B, 1, M]`` through the curves ``knots [B, K, num_knots]``: ``[B, K, M]``."""
        return piecewise_linear(knots, intensity, self.max_intensity)


def piecewise_linear(knots: torch.Tensor, intensity: torch.Tensor, max_intensity: float) -> torch.Tensor:
    """``intensity [B, 1, M]`` through the curves ``knots [B, K, n]`` (values at n equally spaced intensities over
    [0, ``max_intensity``]): ``[B, K, M]``; intensities beyond that range take the end values."""
    num_knots = knots.shape[-1]
    position = intensity.to(knots.dtype).clamp(0.0, max_intensity) * ((num_knots - 1) / max_intensity)
    lower = position.floor().clamp(max=num_knots - 2)
    fraction = position - lower
    index = lower.long().expand(-1, knots.shape[1], -1)
    low_value, high_value = knots.gather(2, index), knots.gather(2, index + 1)
    return low_value + (high_value - low_value) * fraction


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of ``[B, C, *spatial]`` (each voxel's feature vector is normalised)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.dim() - 1  # a positive axis: the ONNX exporter writes a negative one into Transpose, which is invalid
        return self.norm(x.movedim(1, last)).movedim(last, 1)


class TextToVoxelAttention(nn.Module):
    """Multi-head attention with the conditioning vector as the only query and every voxel as key/value.

    Queries and keys are L2-normalised (cosine similarity, as in the official code), so a learnable per-head
    temperature sets how peaked the attention over voxels is. As in any transformer attention block the query is
    added back to the attended values (residual, Vaswani et al. 2017): this is what lets the prompt itself, not only
    its choice of voxels, reach the features. The result becomes a sigmoid gate per channel (squeeze-and-excitation
    style, Hu et al., CVPR 2018).
    """

    def __init__(self, channels: int, cond_dim: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"fusion: channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.query = nn.Linear(cond_dim, channels)
        self.key_value = nn.Conv3d(channels, 2 * channels, kernel_size=1)
        self.temperature = nn.Parameter(torch.ones(heads))
        self.gate = nn.Linear(channels, channels)

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        batch, channels = features.shape[0], features.shape[1]
        head_dim = channels // self.heads
        # Voxels as rows [B, N, C]: each head's normalisation then runs over contiguous memory.
        key_value = pointwise(features, self.key_value.weight, self.key_value.bias)
        key, value = key_value.movedim(1, key_value.dim() - 1).reshape(batch, -1, 2 * channels).chunk(2, dim=-1)
        key = F.normalize(key.reshape(batch, -1, self.heads, head_dim), dim=-1)
        value = value.reshape(batch, -1, self.heads, head_dim)
        query = self.query(cond)
        unit_query = F.normalize(query.reshape(batch, self.heads, head_dim), dim=-1)
        logits = torch.einsum("bhc,bnhc->bhn", unit_query, key) * self.temperature.view(1, -1, 1)
        attended = torch.einsum("bhn,bnhc->bhc", logits.softmax(dim=-1), value).reshape(batch, channels)
        gate = torch.sigmoid(self.gate(query + attended))
        return features * gate.reshape(batch, channels, 1, 1, 1)


class GatedDepthwiseFeedForward(nn.Module):
    """Restormer's GDFN in 3D: 1x1x1 expand, 3x3x3 depth-wise convolution, GELU gate, 1x1x1 project back."""

    def __init__(self, channels: int, ratio: int):
        super().__init__()
        hidden = channels * ratio
        self.expand = nn.Conv3d(channels, 2 * hidden, kernel_size=1)
        self.depthwise = nn.Conv3d(2 * hidden, 2 * hidden, kernel_size=3, padding=1, groups=2 * hidden)
        self.project = nn.Conv3d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, content = self.depthwise(pointwise(x, self.expand.weight, self.expand.bias)).chunk(2, dim=1)
        return pointwise(F.gelu(gate) * content, self.project.weight, self.project.bias)


class TextGuidedFusion(nn.Module):
    """``features [B, C, D, H, W], cond [B, cond_dim] -> text-conditioned features [B, C, D, H, W]``."""

    def __init__(self, channels: int, cond_dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.attention = TextToVoxelAttention(channels, cond_dim, heads)
        self.attention_norm = ChannelLayerNorm(channels)
        self.feed_forward = GatedDepthwiseFeedForward(channels, mlp_ratio)
        self.output_norm = ChannelLayerNorm(channels)

    def forward(self, features: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(self.attention(features, cond))
        return self.output_norm(x + self.feed_forward(x))
