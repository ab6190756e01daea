"""The sets of network sizes: ``paper`` (the published architecture), ``small`` (CPU tests; the shipped model of
versions up to 0.8) and ``unet`` (the shipped model: a CPU-sized variant with a U-Net encoder).

Configs pick a set by name (``--scale small|paper|unet``); every network builder reads its numbers from here, so one
network definition serves every size.
"""

import copy

# Text tower hyper-parameters that are not size-dependent: the official stage-1 config (CLIP BPE vocabulary of
# open_clip's bpe_simple_vocab_16e6, context length 90 as in the TUMSyn paper).
TEXT_VOCAB_SIZE = 49408
TEXT_CONTEXT_LENGTH = 90

SCALES = {
    "paper": {
        # Stage 1 (BMLIP). Image tower: the paper's 3D ViT-B/16 on 96^3 crops; text tower: the official config
        # (width 512, 8 heads, 8 layers) with a 768-d joint embedding.
        "crop": 96,
        "vit": {"patch_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_layers": 12, "num_heads": 12},
        "text": {"width": 512, "heads": 8, "layers": 8, "output_dim": 768},
        # Stage 2. Encoder: ResNet-34 block layout [3, 4, 6, 3] at a constant 64 channels (no downsampling, so the
        # channel doubling of the classification ResNet would not fit in memory at full resolution).
        "encoder": {"type": "resnet", "channels": 64, "blocks": (3, 4, 6, 3)},
        # Fusion: the official code's gated depth-wise-conv MLP has ratio 4.
        "fusion": {"heads": 8, "mlp_ratio": 4},
        # LIIF decoder: the MLP of Chen et al. 2021 (4 hidden layers of 256). The official TUMSyn decoder used
        # [3072, 3072, 768, 256], which costs ~40x more per query for no documented gain.
        # No input skip: the published architecture.
        "decoder": {"hidden": (256, 256, 256, 256), "input_skip": False},
    },
    "small": {
        "crop": 64,
        "vit": {"patch_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_layers": 4, "num_heads": 4},
        # The token table alone is vocab x width = 49408 x 32 parameters (6.3 MB): width stays tiny so the
        # shipped stage-2 model (which embeds the frozen text encoder) stays a few MB.
        "text": {"width": 32, "heads": 4, "layers": 2, "output_dim": 64},
        "encoder": {"type": "resnet", "channels": 16, "blocks": (1, 1, 1, 1)},
        "fusion": {"heads": 4, "mlp_ratio": 2},
        # Input skip (scripts/nets/tumsyn_net.py): against the same recipe without it, +1.9 to +5.5 dB PSNR on every row
        # of the simulated benchmark (docs/small_model_measurements.md).
        "decoder": {"hidden": (64, 64), "input_skip": True},
    },
}
# The shipped model: the small scale's stage 1 and text tower with a prompt-free U-Net encoder
# (scripts/nets/unet_encoder.py) that sees 122 voxels instead of 25, and the prompt as a scale and shift of the LIIF
# latent (FiLM), so training decodes every target contrast of a patch from one encoding (bench/README.md, "The U-Net
# scale"). The input skip passes through a grey-level curve of the prompt and the input's contrast: a plain skip
# collapsed to the identity, no skip learned the remapping too slowly ("A grey-level curve in the input skip").
SCALES["unet"] = {
    **SCALES["small"],
    "encoder": {"type": "unet", "channels": (16, 32, 64, 128)},
    "fusion": {"site": "latent"},
    "decoder": {"hidden": (64, 64), "input_skip": True, "transfer_knots": 32},
}


def scale_config(scale: str) -> dict:
    """A deep copy of the numbers of one scale (callers may edit it freely)."""
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {sorted(SCALES)}, got {scale!r}")
    return copy.deepcopy(SCALES[scale])


def text_encoder_config(scale: str) -> dict:
    """Keyword arguments of ``open_clip.transformer.TextTransformer`` for one scale: plain numbers only."""
    return {"context_length": TEXT_CONTEXT_LENGTH, "vocab_size": TEXT_VOCAB_SIZE, **scale_config(scale)["text"]}
