"""Networks of both stages: shapes, gradient flow, LIIF behaviour, conditioning, checkpoints, paper-scale cost."""

import copy
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from scripts.engine.synthesis_engine import TUMSynInferer, synthesize_volume
from scripts.nets.bmlip import BMLIP, BMLIPLoss, build_text_encoder, load_text_encoder, save_text_encoder
from scripts.nets.liif import LIIFDecoder, make_coord
from scripts.nets.network_scales import scale_config, text_encoder_config
from scripts.nets.resnet_encoder import ResNetEncoder3d
from scripts.nets.text_guidance import (
    IntensityTransfer,
    ModalityEmbedding,
    TextAdapter,
    TextGuidedFusion,
    TextToVoxelAttention,
)
from scripts.nets.tumsyn_net import UNKNOWN_SOURCE, build_tumsyn_net
from scripts.prompt import MODALITIES, Prompt, tokenize

SIZE = 12  # side of the test volumes: small enough that the whole file runs in seconds


def tokens_for(*modalities):
    return tokenize([Prompt(modality=m).render() for m in modalities])


def tiny_net(conditioning="text", **overrides):
    torch.manual_seed(0)
    return build_tumsyn_net("small", conditioning=conditioning, **overrides)


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


def assert_all_trainable_have_gradients(module):
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient reached {name}"


# ---- stage 1 -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_bmlip():
    torch.manual_seed(0)
    return BMLIP("small")


def test_bmlip_towers_give_unit_features_and_train_end_to_end(small_bmlip):
    crop = small_bmlip.crop
    images = torch.rand(3, 1, crop, crop, crop)
    outputs = small_bmlip(images, tokens_for("T1w", "T2w", "FLAIR"))
    embed_dim = scale_config("small")["text"]["output_dim"]
    assert outputs["image_features"].shape == outputs["text_features"].shape == (3, embed_dim)
    assert torch.allclose(outputs["image_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(outputs["text_features"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert outputs["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)

    small_bmlip.zero_grad()
    BMLIPLoss()(outputs).backward()
    assert_all_trainable_have_gradients(small_bmlip.text_encoder)
    assert small_bmlip.image_encoder.patch_embedding.patch_embeddings.weight.grad.abs().sum() > 0
    assert small_bmlip.logit_scale.grad is not None


def test_bmlip_loss_is_the_symmetric_infonce_of_eq1():
    torch.manual_seed(1)
    image = F.normalize(torch.randn(5, 8), dim=-1)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    labels = torch.arange(5)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss = BMLIPLoss()({"image_features": image, "text_features": text, "logit_scale": scale})
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_text_encoder_round_trip_and_mismatch(tmp_path, small_bmlip):
    path = str(tmp_path / "text_encoder.pt")
    save_text_encoder(small_bmlip.text_encoder, path, small_bmlip.text_config)
    assert [p.name for p in tmp_path.iterdir()] == ["text_encoder.pt"]  # no temporary file left behind
    loaded = load_text_encoder(path).eval()
    tokens = tokens_for("T1w", "PD")
    assert torch.equal(loaded(tokens), small_bmlip.text_encoder.eval()(tokens))

    deeper = dict(small_bmlip.text_config, layers=small_bmlip.text_config["layers"] + 1)
    torch.save({"config": deeper, "state_dict": small_bmlip.text_encoder.state_dict()}, path)
    with pytest.raises(ValueError, match=r"text_encoder\.pt.*missing \['transformer\.resblocks\.2\."):
        load_text_encoder(path)

    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_text_encoder(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="expected keys"):
        save_text_encoder(small_bmlip.text_encoder, path, {"width": 32})


def test_unknown_scale_is_rejected():
    with pytest.raises(ValueError, match="scale: expected one of"):
        scale_config("huge")


# ---- stage 2 blocks ----------------------------------------------------------------------------------------------


def test_encoder_keeps_spatial_size_and_every_block_learns():
    torch.manual_seed(0)
    encoder = ResNetEncoder3d(1, channels=8, blocks=(1, 2))
    image = torch.rand(2, 1, 10, 11, 12)
    features = encoder(image)
    assert features.shape == (2, 8, 10, 11, 12)
    features.square().mean().backward()
    assert_all_trainable_have_gradients(encoder)


def test_text_adapter_is_residual_and_learns():
    torch.manual_seed(0)
    adapter = TextAdapter(16)
    embedding = torch.randn(3, 16)
    torch.nn.init.zeros_(adapter.mlp[-1].weight)
    torch.nn.init.zeros_(adapter.mlp[-1].bias)
    assert torch.equal(adapter(embedding), embedding)
    adapter(embedding).sum().backward()
    assert adapter.mlp[-1].weight.grad.abs().sum() > 0


def test_fusion_shapes_gradients_and_dependence_on_condition():
    torch.manual_seed(0)
    fusion = TextGuidedFusion(channels=8, cond_dim=6, heads=2, mlp_ratio=2)
    features = torch.randn(2, 8, 5, 6, 7)
    cond = torch.randn(2, 6)
    fused = fusion(features, cond)
    assert fused.shape == features.shape
    assert not torch.allclose(fusion(features, cond + 1), fused)
    fused.square().mean().backward()
    assert_all_trainable_have_gradients(fusion)


def test_cross_attention_pools_over_voxels_independently_of_their_order():
    # The text query attends to all voxels (linear cost): permuting voxels must only permute the gated output.
    torch.manual_seed(0)
    attention = TextToVoxelAttention(channels=8, cond_dim=4, heads=4)
    features = torch.randn(1, 8, 3, 4, 5)
    cond = torch.randn(1, 4)
    permutation = torch.randperm(60)
    shuffled = features.flatten(2)[:, :, permutation].reshape(features.shape)
    expected = attention(features, cond).flatten(2)[:, :, permutation].reshape(features.shape)
    assert torch.allclose(attention(shuffled, cond), expected, atol=1e-6)


def test_modality_embedding_covers_every_modality():
    embedding = ModalityEmbedding(5)
    assert embedding(torch.arange(len(MODALITIES))).shape == (len(MODALITIES), 5)


# ---- LIIF --------------------------------------------------------------------------------------------------------


def test_make_coord_gives_align_corners_false_voxel_centres():
    coords = make_coord((2, 4, 5))
    assert coords.shape == (40, 3)
    assert torch.allclose(coords[0], torch.tensor([-0.5, -0.75, -0.8]))
    assert torch.allclose(coords[-1], torch.tensor([0.5, 0.75, 0.8]))
    grid = make_coord((2, 2, 2), ranges=((0, 1), (0, 2), (0, 4)), flatten=False)
    assert grid.shape == (2, 2, 2, 3) and torch.allclose(grid[1, 1, 1], torch.tensor([0.75, 1.5, 3.0]))


def test_unfold_projection_equals_explicit_feature_unfolding():
    torch.manual_seed(0)
    decoder = LIIFDecoder(in_channels=3, hidden=(5,))
    features = torch.randn(1, 3, 4, 5, 6)
    padded = F.pad(features, (1, 1, 1, 1, 1, 1))
    neighbours = [padded[:, :, i : i + 4, j : j + 5, k : k + 6] for i in range(3) for j in range(3) for k in range(3)]
    unfolded = torch.stack(neighbours, dim=2)  # [B, C, 27, D, H, W], channel-major like the convolution weight
    weight = decoder.unfold_projection.weight.reshape(5, 3 * 27)
    explicit = torch.einsum("oc,bcdhw->bodhw", weight, unfolded.flatten(1, 2)) + decoder.unfold_projection.bias.view(
        1, 5, 1, 1, 1
    )
    assert torch.allclose(decoder.project(features), explicit, atol=1e-5)


def identity_decoder():
    """A decoder whose MLP returns the centre voxel's intensity and ignores offset and cell."""
    decoder = LIIFDecoder(in_channels=1, hidden=(4, 4))
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.zero_()
        decoder.unfold_projection.weight[0, 0, 1, 1, 1] = 1.0
        for layer in decoder.mlp:
            if isinstance(layer, torch.nn.Linear):
                layer.weight[0, 0] = 1.0
    return decoder


def test_liif_identity_case_reproduces_input_at_voxel_centres_and_interpolates_between():
    torch.manual_seed(0)
    decoder = identity_decoder()
    volume = torch.rand(1, 1, 6, 7, 8) + 0.1  # positive, so the ReLUs pass it unchanged
    latent = decoder.project(volume)
    centres = make_coord(volume.shape[2:]).unsqueeze(0)
    cell = torch.full_like(centres, 0.1)
    assert torch.allclose(decoder.query(latent, centres, cell).flatten(), volume.flatten(), atol=1e-6)

    # Between centres the local ensemble weights are the opposite-corner volumes, i.e. trilinear interpolation
    # (border-clamped, like grid_sample's border padding).
    points = torch.rand(1, 500, 3) * 2.2 - 1.1
    expected = F.grid_sample(
        volume, points.flip(-1).view(1, 500, 1, 1, 3), mode="bilinear", padding_mode="border", align_corners=False
    ).flatten()
    assert torch.allclose(decoder.query(latent, points, torch.full_like(points, 0.1)).flatten(), expected, atol=1e-5)


def test_liif_chunked_query_equals_single_query_and_uses_offset_and_cell():
    torch.manual_seed(0)
    decoder = LIIFDecoder(in_channels=4, hidden=(8, 8))
    latent = decoder.project(torch.randn(2, 4, 5, 5, 5))
    coords = torch.rand(2, 101, 3) * 2 - 1
    cell = torch.full_like(coords, 0.2)
    at_once = decoder.query(latent, coords, cell)
    assert at_once.shape == (2, 101, 1)
    assert torch.allclose(decoder.query_in_chunks(latent, coords, cell, chunk_size=17), at_once, atol=1e-6)
    assert not torch.allclose(decoder.query(latent, coords, cell * 2), at_once)
    at_once.sum().backward()
    assert_all_trainable_have_gradients(decoder)


def test_decoder_in_place_relus_and_uncopied_codes_keep_values_and_gradients():
    # The decoder's ReLUs run in place and its first layer reads the gathered codes without copying them out
    # (scripts.nets.liif): the same outputs and gradients as out-of-place ReLUs, with the input-skip channel beside
    # them.
    torch.manual_seed(0)
    fast = LIIFDecoder(in_channels=4, hidden=(8, 8), input_residual=True)
    plain = copy.deepcopy(fast)
    for layer in plain.mlp:
        if isinstance(layer, torch.nn.ReLU):
            layer.inplace = False
    assert any(isinstance(layer, torch.nn.ReLU) and layer.inplace for layer in fast.mlp)
    features, image = torch.randn(1, 4, 5, 6, 7), torch.rand(1, 1, 5, 6, 7)
    coords = torch.rand(1, 64, 3) * 2 - 1
    cell = torch.full_like(coords, 0.2)
    outputs = [decoder.query(decoder.project(features, image), coords, cell) for decoder in (fast, plain)]
    assert torch.equal(outputs[0], outputs[1])
    for output in outputs:
        output.square().sum().backward()
    for (name, fast_parameter), plain_parameter in zip(fast.named_parameters(), plain.parameters()):
        assert torch.allclose(fast_parameter.grad, plain_parameter.grad, atol=1e-6), name

# ---- full network ------------------------------------------------------------------------------------------------


def test_full_net_shapes_gradients_and_frozen_text_encoder():
    net = tiny_net().train()
    assert not net.conditioner.text_encoder.training  # frozen encoder stays in eval mode
    image = torch.rand(2, 1, SIZE, SIZE, SIZE)
    coords = torch.rand(2, 50, 3) * 2 - 1
    prediction = net(image, tokens_for("T2w", "FLAIR"), coords=coords, cell=torch.full_like(coords, 0.1))
    assert prediction.shape == (2, 50, 1)
    prediction.square().mean().backward()
    assert_all_trainable_have_gradients(net)
    text_parameters = list(net.conditioner.text_encoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in text_parameters)
    state = net.state_dict()
    assert "conditioner.text_encoder.token_embedding.weight" in state  # one checkpoint holds the whole model
    assert "default_tokens" not in state


def test_forward_with_image_alone_predicts_on_the_input_grid():
    net = tiny_net(query_chunk_size=500).eval()
    image = torch.rand(1, 1, SIZE, SIZE + 1, SIZE + 2)
    with torch.no_grad():
        default = net(image)
        explicit = net(image, tokens_for("T1w"))
        grid = make_coord(image.shape[2:]).unsqueeze(0)
        cell = (2 / torch.tensor(image.shape[2:], dtype=torch.float32)).expand_as(grid)
        queried = net(image, tokens_for("T1w"), coords=grid, cell=cell)
    assert default.shape == image.shape
    assert torch.equal(default, explicit)  # the default prompt asks for T1w
    assert torch.allclose(default.flatten(), queried.flatten(), atol=1e-6)


def test_changing_only_the_prompt_changes_the_output():
    # An untrained text tower embeds these prompts at cosine ~0.85, and at the small scale the prompt enters at the
    # U-Net's coarsest level, through untrained layers on the way back: the effect is small but far above float
    # noise (~1e-7 here; a network that ignored the text would give exactly equal outputs).
    net = tiny_net().eval()
    image = torch.rand(1, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        t1 = net(image, tokens_for("T1w"))
        assert torch.equal(net(image, tokens_for("T1w")), t1)
        flair = net(image, tokens_for("FLAIR"))
        older = net(image, tokenize(Prompt(modality="T1w", age=80.0).render()))
    assert (t1 - flair).abs().mean() > 1e-6
    assert (t1 - older).abs().mean() > 1e-6


def test_onehot_variant_trains_and_depends_on_modality():
    net = tiny_net("onehot").train()
    assert not any("text_encoder" in key for key in net.state_dict())
    image = torch.rand(2, 1, SIZE, SIZE, SIZE)
    flair = torch.tensor([MODALITIES.index("FLAIR")] * 2)
    prediction = net(image, modality=flair)
    assert prediction.shape == image.shape
    prediction.mean().backward()
    assert_all_trainable_have_gradients(net)
    with torch.no_grad():
        assert not torch.allclose(net(image, modality=flair), net(image))  # default modality is T1w


def test_input_skip_feeds_the_image_to_the_decoder_and_corrects_it():
    channels = tiny_net().encoder.out_channels
    assert tiny_net(input_skip="false").decoder.unfold_projection.in_channels == channels  # fire passes strings
    with pytest.raises(ValueError, match="input_skip: expected true or false"):
        tiny_net(input_skip="maybe")
    net = tiny_net(input_skip="true").eval()
    projection = net.decoder.unfold_projection
    assert projection.in_channels == channels + 1
    image = torch.rand(1, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        projection.weight[:, :channels] = 0  # silence the fused features: only the skip is left
        latent = net.encode(image, tokens_for("T2w"))
        expected = F.conv3d(image, projection.weight[:, channels:], projection.bias, padding=1)
        assert torch.allclose(latent[:, :-1], expected, atol=1e-6)  # the first layer reads the raw input
        assert torch.equal(latent[:, -1:], image)  # ... and the residual base is the input itself
        bright = image.clone()
        bright[0, 0, 5, 5, 5] += 1
        changed = (net.encode(bright, tokens_for("T2w"))[:, :-1] - latent[:, :-1]).abs().sum(dim=(0, 1)) > 0
        assert changed[4:7, 4:7, 4:7].all() and changed.sum() == 27  # through the skip a voxel reaches its 3^3 codes

        last = net.decoder.mlp[-1]
        last.weight.zero_(), last.bias.zero_()  # no correction: the output is the input, interpolated
        assert torch.allclose(net(image, tokens_for("FLAIR")), image, atol=1e-6)
        halfway = torch.full((1, 1, 3), -1 + 4 / SIZE)  # halfway between voxel centres 1 and 2 on each axis
        between = net(image, tokens_for("FLAIR"), coords=halfway, cell=torch.full_like(halfway, 2 / SIZE))
        assert between.item() == pytest.approx(image[0, 0, 1:3, 1:3, 1:3].mean().item(), abs=1e-6)


def test_bad_inputs_stop_with_clear_messages():
    net = tiny_net()
    with pytest.raises(ValueError, match=r"image: expected shape \[B, 1, D, H, W\]"):
        net(torch.rand(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="cell: required"):
        net(torch.rand(1, 1, 8, 8, 8), coords=torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="batch 3 != image batch 2"):
        net(torch.rand(2, 1, 8, 8, 8), tokens_for("T1w", "T2w", "PD"))
    with pytest.raises(ValueError, match="conditioning: expected one of"):
        build_tumsyn_net("small", conditioning="clip")


def test_build_from_text_encoder_checkpoint_and_torchscript_export(tmp_path):
    torch.manual_seed(3)
    text_encoder = build_text_encoder(text_encoder_config("small"))
    path = str(tmp_path / "text_encoder.pt")
    save_text_encoder(text_encoder, path, text_encoder_config("small"))
    net = build_tumsyn_net("small", text_encoder_path=path).eval()
    loaded = net.conditioner.text_encoder.state_dict()
    assert all(torch.equal(value, loaded[key]) for key, value in text_encoder.state_dict().items())
    image = torch.rand(1, 1, 8, 8, 8)

    # A full checkpoint restores into a network built from the scale name alone (as inference configs do).
    restored = build_tumsyn_net("small").eval()
    restored.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(restored(image), net(image))

    # MONAI's ckpt_export scripts the network: the scripted model must match the eager one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(net)
    with torch.no_grad():
        assert torch.allclose(scripted(image), net(image), atol=1e-6)


def test_unet_scale_sees_far_and_every_prompt_steers_it():
    """The experimental ``unet`` scale: features on the input grid for any size (padded to its 8-voxel multiple
    inside), a prompt-free encoder whose latent the prompt modulates, gradients everywhere, TorchScript."""
    torch.manual_seed(0)
    net = build_tumsyn_net("unet").train()
    assert net.encoder.out_channels == 16 and net.input_skip and net.transfer is not None and net.fusion is None
    assert net.encoder.bottleneck_fusion is None and net.encoder.condition_projection is None
    image = torch.rand(2, 1, 13, 10, 17)
    with torch.no_grad():
        t2w, flair = (net(image[:1], tokens_for(m)) for m in ("T2w", "FLAIR"))
        assert (t2w - flair).abs().mean() == 0  # the modulation starts as the identity for every prompt
        net.modulation.mlp[-1].weight.normal_(0, 0.1)
        net.transfer.mlp[-1].weight.normal_(0, 0.1)
    prediction = net(image, tokens_for("T2w", "FLAIR"))
    assert prediction.shape == image.shape
    prediction.mean().backward()
    assert_all_trainable_have_gradients(net)
    net.eval()
    with torch.no_grad():
        t2w, flair = (net(image[:1], tokens_for(m)) for m in ("T2w", "FLAIR"))
        assert (t2w - flair).abs().mean() > 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.script(net)
        assert torch.allclose(scripted(image[:1]), net(image[:1]), atol=1e-6)


@pytest.mark.parametrize("scale", ["small", "unet"])
def test_the_network_exports_with_torch_export_as_it_is(scale):
    """Plain PyTorch modules and a decoder without data-dependent shapes: ``torch.export`` takes the network as
    built, and the exported program gives the eager outputs."""
    torch.manual_seed(0)
    net = build_tumsyn_net(scale).eval()
    image = torch.rand(1, 1, 8, 8, 8)
    exported = torch.export.export(net, (image,))
    other = torch.rand(1, 1, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(other), net(other), rtol=1e-5, atol=1e-6)


def test_unet_encoder_keeps_the_signal_scale_at_initialisation():
    """No normalisation layer: the initialisation alone must carry the input's scale to the bottleneck and back
    (PyTorch's default left 1/30 of it at the bottleneck)."""
    torch.manual_seed(0)
    encoder = build_tumsyn_net("unet").encoder
    scales = []
    for block in (*encoder.down, *encoder.up):
        block.register_forward_hook(lambda module, inputs, output: scales.append(float(output.std())))
    image = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        encoder(image)
    assert min(scales) > float(image.std()) / 3, scales


@pytest.mark.parametrize("conditioning", ["text", "onehot"])
def test_several_targets_of_one_encoding_match_the_single_target_path(conditioning):
    """``forward_targets``: K target contrasts decoded from one encoding equal K single-target calls (what
    inference runs), and a network whose prompt enters its encoder refuses them in one line."""
    torch.manual_seed(0)
    net = build_tumsyn_net("unet", conditioning=conditioning).eval()
    net.modulation.mlp[-1].weight.data.normal_(0, 0.1)
    net.transfer.mlp[-1].weight.data.normal_(0, 0.1)
    image = torch.rand(2, 1, 16, 12, 8)
    source = torch.tensor([0, MODALITIES.index("FLAIR")])
    coords = torch.rand(2, 50, 3) * 2 - 1
    cell = torch.full_like(coords, 0.1)
    names = ("T2w", "FLAIR", "T1w")
    if conditioning == "text":
        targets = torch.stack([tokens_for(*names)] * 2)
        single = [dict(tokens=tokens_for(name).expand(2, -1)) for name in names]
        several = dict(tokens=targets)
    else:
        targets = torch.tensor([[MODALITIES.index(name) for name in names]] * 2)
        single = [dict(modality=targets[:, k]) for k in range(len(names))]
        several = dict(modality=targets)
    with torch.no_grad():
        together = net(image, coords=coords, cell=cell, source=source, **several)
        assert together.shape == (2, 50, 3)
        for k, inputs in enumerate(single):
            torch.testing.assert_close(together[..., k : k + 1],
                                       net(image, coords=coords, cell=cell, source=source, **inputs),
                                       rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="several per image need condition_site='latent'"):
        tiny_net()(image, torch.stack([tokens_for(*names)] * 2), coords, cell)


def test_intensity_transfer_starts_as_the_identity_and_maps_through_its_knots():
    """The curve is piecewise linear through its knots, clamped at both ends, and starts as the identity (the plain
    input skip), so training begins from the input."""
    torch.manual_seed(0)
    transfer = IntensityTransfer(cond_dim=8, num_knots=4, max_intensity=1.5)
    intensity = torch.tensor([[[-0.2, 0.0, 0.25, 0.5, 1.2, 1.5, 2.0]]])
    knots = transfer(torch.randn(1, 2, 8))  # two conditions
    assert knots.shape == (1, 2, 4)
    torch.testing.assert_close(transfer.apply(knots, intensity), intensity.clamp(0, 1.5).expand(1, 2, -1))
    inverted = torch.tensor([[[1.0, 0.5, 0.0, -0.5]]])  # knots at 0, 0.5, 1, 1.5
    expected = torch.tensor([[[1.0, 1.0, 0.75, 0.5, -0.2, -0.5, -0.5]]])
    torch.testing.assert_close(transfer.apply(inverted, intensity), expected)
    with pytest.raises(ValueError, match="num_knots: expected >= 2"):
        IntensityTransfer(cond_dim=8, num_knots=1)


def test_the_input_contrast_steers_the_unet_skip_and_unknown_is_the_default():
    """With ``transfer_knots`` the input's contrast (``source``) changes the curve, so the output; None is the
    learned 'unknown' vector; the inference engine passes the input modality it knows; networks without a curve
    ignore it."""
    torch.manual_seed(0)
    net = build_tumsyn_net("unet").eval()
    image = torch.rand(1, 1, 12, 12, 12)
    tokens = tokens_for("T2w")
    with torch.no_grad():
        known, also_known = (net(image, tokens, source=torch.tensor([MODALITIES.index(m)])) for m in ("T1w", "PD"))
        assert torch.equal(known, also_known)  # the curve starts as the identity for every condition
        net.transfer.mlp[-1].weight.normal_(0, 0.1)
        t1w = net(image, tokens, source=torch.tensor([MODALITIES.index("T1w")]))
        pd = net(image, tokens, source=torch.tensor([MODALITIES.index("PD")]))
        unknown = net(image, tokens)
        assert (t1w - pd).abs().mean() > 1e-4
        torch.testing.assert_close(unknown, net(image, tokens, source=torch.tensor([UNKNOWN_SOURCE])))
        engine = synthesize_volume(net, image[0], tokens, image.shape[2:], source=torch.tensor([0]), progress=False)
        torch.testing.assert_close(engine, t1w[0], rtol=1e-4, atol=1e-5)
        seen = []
        embed = net.embed_condition
        net.embed_condition = lambda *args: seen.append(args[2]) or embed(*args)
        inferer = TUMSynInferer(roi_size=(0, 0, 0), progress=False)
        inferer(image, net, prompt=Prompt(modality="T2w"), source_modality="PD")
        assert [int(source) for source in seen[0]] == [MODALITIES.index("PD")]
        small = tiny_net().eval()
        torch.testing.assert_close(small(image, tokens, source=torch.tensor([0])), small(image, tokens))


def test_small_model_size_and_parameter_counts():
    net = tiny_net()
    megabytes = sum(t.numel() * t.element_size() for t in net.state_dict().values()) / 2**20
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    print(
        f"\nsmall TUMSynNet: {parameter_count(net):,} parameters ({trainable:,} trainable), "
        f"state dict {megabytes:.1f} MB; small BMLIP: {parameter_count(BMLIP('small')):,} parameters"
    )
    assert megabytes < 20  # the shipped model (frozen text tower included) stays well under the 50 MB allowed


# ---- paper scale -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_paper_scale_stage2_runs_one_training_step_on_a_60_cube():
    torch.manual_seed(0)
    net = build_tumsyn_net("paper").train()
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-4)
    image = torch.rand(1, 1, 60, 60, 60)
    coords = torch.rand(1, 4000, 3) * 2 - 1
    start = time.perf_counter()
    loss = (net(image, coords=coords, cell=torch.full_like(coords, 1 / 60)) - 0.5).abs().mean()
    loss.backward()
    optimizer.step()
    elapsed = time.perf_counter() - start
    print(
        f"\npaper TUMSynNet: {parameter_count(net):,} parameters "
        f"({sum(p.numel() for p in trainable):,} trainable); one step on 60^3 + 4000 queries: {elapsed:.1f} s"
    )
    assert torch.isfinite(loss)


def test_paper_scale_bmlip_runs_forward_backward_with_batch_2():
    torch.manual_seed(0)
    model = BMLIP("paper")
    assert model.crop == 96
    start = time.perf_counter()
    loss = BMLIPLoss()(model(torch.rand(2, 1, 96, 96, 96), tokens_for("T1w", "T2w")))
    loss.backward()
    elapsed = time.perf_counter() - start
    print(f"\npaper BMLIP: {parameter_count(model):,} parameters; forward/backward, batch 2: {elapsed:.1f} s")
    assert torch.isfinite(loss) and model.logit_scale.grad is not None
