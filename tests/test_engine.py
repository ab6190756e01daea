"""Fast paths of the inference engine give the reference path's numbers (seams and chunking: test_inference.py)."""

import math

import numpy as np
import pytest
import torch

from scripts.engine.synthesis_engine import (
    FastConvolutions,
    TUMSynInferer,
    _fitted_windows,
    _read_box,
    _window_starts,
    foreground_mask,
    synthesize_volume,
)
from scripts.nets.liif import LIIFDecoder, make_coord
from scripts.nets.tumsyn_net import build_tumsyn_net
from scripts.prompt import MODALITIES, Prompt, tokenize

T2W = "Modality: T2w; Voxel size: (1.0, 1.0, 1.0)"


def head_like(shape, seed=0):
    """Random intensities inside an off-centre ellipsoid, zero outside: some windows see no head at all."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = ((axes[0] + 0.3) ** 2 + axes[1] ** 2 + (axes[2] + 0.4) ** 2) < 0.15
    return (inside * (0.5 + torch.rand(shape, generator=generator)))[None]


class CountingNet(torch.nn.Module):
    """Wraps a network and counts the windows it encodes."""

    def __init__(self, network):
        super().__init__()
        self.network, self.windows = network, 0

    def embed_condition(self, tokens=None, modality=None, source=None):
        return self.network.embed_condition(tokens, modality, source)

    def encode(self, image, tokens=None, modality=None, condition=None):
        self.windows += image.shape[0]
        return self.network.encode(image, tokens, modality, condition)

    def query(self, latent, coords, cell, chunk_size=None):
        return self.network.query(latent, coords, cell, chunk_size)

    @property
    def decoder(self):
        return self.network.decoder


class CoordinatesOnlyNet(CountingNet):
    """A network without a LIIF ``decoder``: the engine can only ``query`` it at coordinates."""

    decoder = None


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_tumsyn_net("small").eval()


@pytest.mark.parametrize("out_shape", [(30, 26, 22), (15, 26, 44)])
def test_background_skipping_changes_no_decoded_voxel(network, out_shape):
    image, tokens = head_like((30, 26, 22)), tokenize(T2W)
    mask = foreground_mask(image, out_shape)
    assert 0.01 < mask.float().mean() < 0.2
    full, skipping = CountingNet(network), CountingNet(network)
    reference = synthesize_volume(full, image, tokens, out_shape, roi_size=(12, 12, 12), query_chunk=999,
                                  progress=False)[0]
    masked = synthesize_volume(skipping, image, tokens, out_shape, roi_size=(12, 12, 12), query_chunk=999,
                               progress=False, decode_mask=mask)[0]
    torch.testing.assert_close(masked[mask], reference[mask], atol=1e-6, rtol=0)
    assert masked[~mask].abs().max() == 0
    assert skipping.windows < full.windows  # windows that only background reads were not encoded


@pytest.mark.parametrize("out_shape", [(24, 20, 18), (24, 20, 36)])
def test_the_decoder_gets_the_engines_chunks_whole(out_shape):
    # The network's own chunk (query_chunk_size) is smaller than the engine's: the engine's setting must win, or a
    # GPU's large chunks would be cut back into many small decoder calls. On the input grid the engine decodes each
    # voxel from its own latent code (query_latent_centres), elsewhere at coordinates (query).
    torch.manual_seed(0)
    network = build_tumsyn_net("small", query_chunk_size=500).eval()
    sizes = {"query": [], "query_latent_centres": []}
    for name, calls in sizes.items():
        method = getattr(network.decoder, name)
        setattr(network.decoder, name, lambda latent, points, *rest, method=method, calls=calls:
                calls.append(points.shape[1]) or method(latent, points, *rest))
    image = head_like((24, 20, 18), seed=2)
    synthesize_volume(network, image, tokenize(T2W), out_shape, roi_size=(12, 12, 12), query_chunk=2000,
                      progress=False)
    used, unused = ("query_latent_centres", "query") if out_shape == (24, 20, 18) else ("query", "query_latent_centres")
    assert max(sizes[used]) == 2000 and sum(sizes[used]) == math.prod(out_shape) and not sizes[unused]


def test_on_the_input_grid_each_voxel_is_decoded_from_its_own_code(network):
    """The engine's decoding on the input grid (``query_latent_centres``) gives the network's own prediction there
    (``query`` at the voxel centres), whole and through windows (against the engine's coordinate path)."""
    image, tokens, shape = head_like((20, 18, 16), seed=4), tokenize(T2W), (20, 18, 16)
    with torch.inference_mode():
        direct = network(image[None], tokens)[0]
    whole = synthesize_volume(network, image, tokens, shape, roi_size=(64, 64, 64), progress=False)
    torch.testing.assert_close(whole, direct, atol=1e-5, rtol=0)
    windowed = synthesize_volume(network, image, tokens, shape, roi_size=(12, 12, 12), progress=False)
    by_coordinates = synthesize_volume(CoordinatesOnlyNet(network), image, tokens, shape, roi_size=(12, 12, 12),
                                       progress=False)
    torch.testing.assert_close(windowed, by_coordinates, atol=1e-5, rtol=0)


def test_inferer_skips_background_by_default_with_the_written_result(network):
    image = head_like((24, 20, 18), seed=1)
    fast = TUMSynInferer(T2W, roi_size=(12, 12, 12), progress=False)
    slow = TUMSynInferer(T2W, roi_size=(12, 12, 12), progress=False, skip_background=False)
    skipped, full = fast(image[None], network)[0, 0], slow(image[None], network)[0, 0]
    torch.testing.assert_close(skipped, full * foreground_mask(image, full.shape), atol=1e-6, rtol=0)


def test_decode_mask_must_match_the_output_grid(network):
    with pytest.raises(ValueError, match="decode_mask"):
        synthesize_volume(network, head_like((8, 8, 8)), None, (8, 8, 8), decode_mask=torch.ones(8, 8, 4, dtype=bool),
                          progress=False)


@pytest.mark.parametrize("input_residual", [False, True])
def test_latent_centres_decode_their_own_code_as_query_does_there(input_residual):
    """On the input grid (sizes whose coordinates round off-centre in float32) ``query`` weighs the centre code alone
    up to that rounding; ``query_latent_centres`` decodes that code alone (offset 0, cell 1 latent voxel)."""
    torch.manual_seed(0)
    decoder = LIIFDecoder(4, [16, 16], input_residual=input_residual).eval()
    shape = [7, 11, 13]
    latent = torch.randn(1, 16 + input_residual, *shape)
    coords = make_coord(shape)[None]
    cell = (2 / torch.tensor(shape, dtype=torch.float32)).expand_as(coords)
    index = torch.randperm(math.prod(shape))[None, :300]
    with torch.inference_mode():
        centres = decoder.query_latent_centres(latent, index)
        queried = decoder.query(latent, coords, cell)[:, index[0]]
        codes = latent.flatten(2).transpose(1, 2)[:, index[0]]
        offset_and_cell = torch.cat([torch.zeros(1, 3), torch.ones(1, 3)], dim=1)  # cell = 1 latent voxel
        by_hand = decoder.mlp(codes[..., :16] + decoder.position_projection(offset_and_cell))
        by_hand = by_hand + codes[..., 16:] if input_residual else by_hand
        # A query 1e-3 voxel off the centres blends in its neighbours continuously.
        nudged = decoder.query(latent, coords + 1e-3 * 2 / torch.tensor(shape), cell)[:, index[0]]
    torch.testing.assert_close(centres, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(queried, centres, atol=1e-5, rtol=0)
    difference = (nudged - centres).abs().max()
    assert 0 < difference < 0.02 * centres.abs().max()


def test_engine_blends_the_input_residual_exactly():
    """With no correction (the decoder's last layer zeroed) an input-skip network returns its input interpolated:
    the engine's blended windows and background skipping must give exactly that, on any output grid."""
    torch.manual_seed(0)
    net = build_tumsyn_net("small", input_skip=True).eval()
    with torch.no_grad():
        net.decoder.mlp[-1].weight.zero_(), net.decoder.mlp[-1].bias.zero_()
    image, tokens = head_like((30, 26, 22)), tokenize(T2W)
    same_grid = synthesize_volume(net, image, tokens, (30, 26, 22), roi_size=(12, 12, 12), query_chunk=999,
                                  progress=False)[0]
    assert torch.allclose(same_grid, image[0], atol=1e-5)
    upsampled = synthesize_volume(net, image, tokens, (60, 26, 22), roi_size=(12, 12, 12), query_chunk=999,
                                  progress=False)[0]
    # output rows 2k+1, 2k+2 sit a quarter of an input voxel either side of input rows k, k+1: linear interpolation
    expected = 0.75 * image[0, :-1] + 0.25 * image[0, 1:]
    assert torch.allclose(upsampled[1:-1:2], expected, atol=1e-5)


def test_channels_last_latent_decodes_identically():
    """The engine's channels-last slab takes the row-gather path of the decoder: the same numbers, bit for bit."""
    torch.manual_seed(0)
    decoder = LIIFDecoder(4, [16, 16]).eval()
    latent = torch.randn(2, 16, 5, 6, 7)
    coords = torch.rand(2, 300, 3) * 2.2 - 1.1  # off the latent centres, some beyond the outermost ones
    cell = torch.full_like(coords, 0.1)
    index = torch.randint(0, 5 * 6 * 7, (2, 100))
    channels_last = latent.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        assert torch.equal(decoder.query(channels_last, coords, cell), decoder.query(latent, coords, cell))
        assert torch.equal(decoder.query_latent_centres(channels_last, index),
                           decoder.query_latent_centres(latent, index))


def test_channels_last_convolutions_keep_the_output(network):
    image, net = head_like((20, 18, 16), seed=3), build_tumsyn_net("small").eval()
    net.load_state_dict(network.state_dict())  # fresh weights in the default layout (other tests convert `network`)
    plain = TUMSynInferer(T2W, roi_size=(12, 12, 12), progress=False, channels_last=False)(image[None], net)
    assert not net.decoder.unfold_projection.weight.is_contiguous(memory_format=torch.channels_last_3d)
    fast = TUMSynInferer(T2W, roi_size=(12, 12, 12), progress=False)(image[None], net)
    assert net.decoder.unfold_projection.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("groups", [1, 16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_fast_convolutions_run_small_cpu_windows_on_onednn_with_nn_conv3d_results(groups, layout):
    # 16 x 20 x 24 = 7680 <= 20480: PyTorch's own choice for this batch-1 window is its slow reference kernel.
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, kernel_size=3, padding=1, groups=groups)
    image = torch.randn(1, 16, 20, 24, 30).contiguous(memory_format=layout).requires_grad_()
    with torch.profiler.profile() as profiler, FastConvolutions():
        output = conv(image)
    kernels = {event.key for event in profiler.key_averages()}
    assert "aten::mkldnn_convolution" in kernels and "aten::slow_conv3d_forward" not in kernels
    expected = conv(image)
    assert torch.allclose(output, expected, atol=1e-5)
    gradients = torch.autograd.grad(output.square().sum(), [image, conv.weight])
    expected_gradients = torch.autograd.grad(expected.square().sum(), [image, conv.weight])
    for gradient, expected_gradient in zip(gradients, expected_gradients):
        assert torch.allclose(gradient, expected_gradient, atol=1e-3, rtol=1e-4)
    with FastConvolutions(), torch.autocast("cpu", dtype=torch.bfloat16):  # nn.Conv3d's autocast dtype stays
        assert conv(image).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the route taken there")
def test_fast_convolutions_run_gpu_depthwise_channels_first_and_return_channels_last():
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(32, 32, kernel_size=3, padding=1, groups=32).cuda()
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    image = torch.randn(1, 32, 20, 24, 30, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    with FastConvolutions():
        output = conv(image)
    assert output.is_contiguous(memory_format=torch.channels_last_3d)
    expected = torch.nn.functional.conv3d(image.contiguous(), conv.weight.contiguous(), conv.bias, padding=1,
                                          groups=32)
    assert torch.allclose(output, expected, atol=1e-5)


def test_the_engine_encodes_its_windows_within_fast_convolutions(network):
    """The engine's small windows (16 channels x 12 x 12 <= 20480) run on oneDNN, not on PyTorch's reference kernel,
    while the network itself stays plain."""
    image = head_like((20, 18, 16), seed=5)
    with torch.profiler.profile() as profiler:
        synthesize_volume(network, image, tokenize(T2W), (20, 18, 16), roi_size=(12, 12, 12), progress=False)
    kernels = {event.key for event in profiler.key_averages()}
    assert "aten::mkldnn_convolution" in kernels and "aten::slow_conv3d_forward" not in kernels
    assert all(type(module) is torch.nn.Conv3d for module in network.modules() if isinstance(module, torch.nn.Conv3d))


def test_window_sizes_up_to_zero_span_the_whole_axis(network):
    image, tokens = head_like((20, 18, 16), seed=2), tokenize(T2W)
    slabs = CountingNet(network)
    rows = synthesize_volume(slabs, image, tokens, (20, 18, 16), roi_size=(8, -1, 0), progress=False)[0]
    assert slabs.windows == len(_window_starts(20, 8, 0.25)) == 3  # one whole-plane window per slab of rows
    whole = synthesize_volume(network, image, tokens, (20, 18, 16), roi_size=(-1, -1, -1), progress=False)[0]
    same = synthesize_volume(network, image, tokens, (20, 18, 16), roi_size=(64, 64, 64), progress=False)[0]
    torch.testing.assert_close(whole, same, atol=0, rtol=0)
    assert 30 < float(10 * torch.log10(1 / ((rows - whole) ** 2).mean())) < 200  # other windows: close, not equal
    with pytest.raises(ValueError, match="roi_size"):
        TUMSynInferer(roi_size=(64, 64))


class ShapeRecordingNet(CountingNet):
    """Also records the voxels of every encoded window."""

    def __init__(self, network):
        super().__init__(network)
        self.voxels = 0

    def encode(self, image, tokens=None, modality=None, condition=None):
        self.voxels += image[0, 0].numel() * image.shape[0]
        return super().encode(image, tokens, modality, condition)


def test_windows_cut_to_the_foreground_encode_less_and_decode_close(network):
    image, tokens, shape = head_like((30, 26, 22)), tokenize(T2W), (30, 26, 22)
    mask = foreground_mask(image, shape)
    whole, cut, wide = ShapeRecordingNet(network), ShapeRecordingNet(network), ShapeRecordingNet(network)
    options = dict(roi_size=(12, 12, 12), progress=False, decode_mask=mask)
    reference = synthesize_volume(whole, image, tokens, shape, **options)[0]
    cropped = synthesize_volume(cut, image, tokens, shape, crop_margin=2, **options)[0]
    widest = synthesize_volume(wide, image, tokens, shape, crop_margin=12, **options)[0]
    torch.testing.assert_close(widest, reference, atol=0, rtol=0)  # a margin of a window keeps whole windows
    batched = synthesize_volume(network, image, tokens, shape, crop_margin=2, sw_batch_size=5, **options)[0]
    torch.testing.assert_close(batched, cropped, atol=1e-6, rtol=0)  # cut windows of several sizes in one batch
    assert cut.windows <= whole.windows and cut.voxels < 0.7 * whole.voxels
    assert cropped[~mask].abs().max() == 0 and torch.isfinite(cropped).all()
    difference = float(((cropped - reference)[mask] ** 2).mean())
    # close, not equal: the U-Net's context (122 voxels) exceeds these 12-voxel windows, so moving their zero padding
    # shows more than it would in the engine's 64-voxel windows
    assert 15 < 10 * math.log10(float((reference[mask] ** 2).mean()) / difference) < 200
    with pytest.raises(ValueError, match="crop_margin"):
        TUMSynInferer(crop_margin=4, skip_background=False)
    # What the command line passes: the words null/None mean whole windows, digits a margin, anything else is refused.
    assert TUMSynInferer(crop_margin="null").settings["crop_margin"] is None
    assert TUMSynInferer(crop_margin="2").settings["crop_margin"] == 2
    with pytest.raises(ValueError, match="^crop_margin: expected null or a number of voxels >= 0"):
        TUMSynInferer(crop_margin="-1")
    no_margin = synthesize_volume(network, image, tokens, shape, crop_margin=0, **options)[0]
    assert torch.isfinite(no_margin).all() and no_margin[~mask].abs().max() == 0


def test_background_around_the_head_costs_no_encoding_and_changes_nothing(network):
    # Cut windows tile only the box the head's voxels read: a head padded into a field of view twice as wide is
    # encoded in the same windows, of the same sizes, with the same result.
    image, tokens, shape = head_like((30, 26, 22)), tokenize(T2W), (30, 26, 22)
    padded = torch.nn.functional.pad(image, (11, 11, 13, 13, 15, 15))
    options = dict(roi_size=(12, 12, 12), progress=False, crop_margin=2)
    tight, wide = ShapeRecordingNet(network), ShapeRecordingNet(network)
    head = synthesize_volume(tight, image, tokens, shape, decode_mask=foreground_mask(image, shape), **options)[0]
    in_frame = synthesize_volume(wide, padded, tokens, padded.shape[1:],
                                 decode_mask=foreground_mask(padded, padded.shape[1:]), **options)[0]
    assert (wide.windows, wide.voxels) == (tight.windows, tight.voxels)
    torch.testing.assert_close(in_frame[15:-15, 13:-13, 11:-11], head, atol=1e-5, rtol=0)
    in_frame[15:-15, 13:-13, 11:-11] = 0
    assert in_frame.abs().max() == 0  # the padding stays background


def test_a_window_only_its_neighbours_latents_serve_is_not_encoded():
    """A masked-in voxel just past a window reads only the next window's latents: with no margin the cut box would
    be empty (a crash in the first convolution), so the window is skipped; a margin keeps a sliver of context."""
    mask = torch.zeros(20, 20, 20, dtype=torch.bool)
    mask[11, 5, 5] = True  # reads latent rows 11 and 12; the window holds rows 0..9
    assert _read_box(mask, (0, 0, 0), (10, 10, 10), (20, 20, 20), (20, 20, 20), 0) is None
    assert _read_box(mask, (0, 0, 0), (10, 10, 10), (20, 20, 20), (20, 20, 20), 4)[0] == (6, 10)


def _read_box_by_definition(mask, corner, roi, in_shape, out_shape, margin):
    """``_read_box`` spelled out voxel by voxel: the masked-in output voxels whose trilinear reads (latents floor(u)
    and floor(u) + 1, one voxel of rounding slack) touch the window, and the latents they read plus the margin."""
    reads = []
    for j in np.argwhere(mask):
        u = [(jj + 0.5) * n_in / n_out - 0.5 for jj, n_in, n_out in zip(j, in_shape, out_shape)]
        if all(c - 2 <= uu <= c + size + 1 for uu, c, size in zip(u, corner, roi)):
            reads.append(u)
    if not reads:
        return None
    if margin is None:
        return [(c, c + size) for c, size in zip(corner, roi)]
    reads = np.floor(np.array(reads))
    box = [(max(c, int(low) - 1 - margin), min(c + size, int(high) + 3 + margin))
           for c, size, low, high in zip(corner, roi, reads.min(0), reads.max(0))]
    return None if any(high <= low for low, high in box) else box


@pytest.mark.parametrize("out_shape", [(20, 18, 16), (40, 18, 32), (10, 9, 16)])
@pytest.mark.parametrize("margin", [None, 0, 3])
def test_window_boxes_follow_their_definition(out_shape, margin):
    """The window planning (host work a GPU waits on, so vectorised) against a voxel-by-voxel reading of its rule,
    for masks of several blobs on grids finer, equal to and coarser than the input's."""
    rng = np.random.default_rng(len(out_shape) + out_shape[0] + (margin or 0))
    mask = np.zeros(out_shape, dtype=bool)
    for _ in range(3):
        low = [int(rng.integers(0, n - 2)) for n in out_shape]
        mask[tuple(slice(a, a + int(rng.integers(1, 5))) for a in low)] = True
    in_shape, roi = (20, 18, 16), (8, 7, 6)
    for corner in [(0, 0, 0), (6, 5, 4), (12, 11, 10), (12, 0, 10)]:
        expected = _read_box_by_definition(mask, corner, roi, in_shape, out_shape, margin)
        assert _read_box(mask, corner, roi, in_shape, out_shape, margin) == expected
        assert _read_box(torch.from_numpy(mask), corner, roi, in_shape, out_shape, margin) == expected


def test_foreground_on_the_input_grid_is_the_nonzero_mask():
    image = torch.zeros(1, 9, 8, 7)
    image[0, 2:7, 1:5, 3:6] = torch.rand(5, 4, 3) + 0.1
    image[0, 4, 2, 4] = 0.0  # a zero voxel inside: resampled on the same grid it stays background
    same = foreground_mask(image, (9, 8, 7))
    assert torch.equal(same, image[0] != 0)
    resampled = torch.nn.functional.interpolate((image[None] != 0).float(), size=(9, 8, 7), mode="trilinear",
                                                align_corners=False)[0, 0] >= 0.5
    assert torch.equal(same, resampled)


@pytest.mark.parametrize("size,largest,overlap", [(157, 64, 0.1), (193, 64, 0.1), (167, 64, 0.25), (13, 12, 0.25),
                                                  (64, 64, 0.25), (65, 64, 0.5)])
def test_fitted_windows_tile_the_axis_with_fewer_voxels(size, largest, overlap):
    window, starts = _fitted_windows(size, largest, overlap)
    clamped = _window_starts(size, largest, overlap)
    assert window <= largest and len(starts) == len(clamped)
    assert starts[0] == 0 and starts[-1] + window == size  # the whole axis, no voxel beyond it
    assert all(0 < b - a <= window - math.ceil(overlap * window) for a, b in zip(starts, starts[1:]))
    assert window * len(starts) <= largest * len(clamped)
    if (size, largest, overlap) == (157, 64, 0.1):  # the demo head's first axis: 171 voxels encoded, not 192
        assert (window, starts) == (57, [0, 50, 100])


def test_the_prompt_is_embedded_once_per_volume_and_shared_by_every_window(network):
    image, tokens = head_like((30, 26, 22)), tokenize(T2W)
    calls = []
    hook = network.conditioner.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        counting = CountingNet(network)
        synthesize_volume(counting, image, tokens, (30, 26, 22), roi_size=(12, 12, 12), progress=False)
    finally:
        hook.remove()
    assert counting.windows > 4 and calls == [1]
    with torch.inference_mode():
        crops = torch.rand(3, 1, 10, 12, 8)
        shared = network.encode(crops, condition=network.embed_condition(tokens))
        torch.testing.assert_close(shared, network.encode(crops, tokens))
        with pytest.raises(ValueError, match="condition: batch 2 != image batch 3"):
            network.encode(crops, condition=network.embed_condition(tokens.expand(2, -1)))


@pytest.mark.parametrize("out_shape", [(24, 20, 18), (12, 30, 18)])
def test_flip_averaging_is_the_mean_of_the_eight_mirror_predictions(network, out_shape):
    image = head_like((24, 20, 18), seed=3)
    single = TUMSynInferer(T2W, roi_size=(12, 12, 12), progress=False)
    averaged = TUMSynInferer(T2W, roi_size=(12, 12, 12), progress=False, flip_averaging="true")
    plain = single(image[None], network, out_shape=out_shape)[0, 0]
    mean = averaged(image[None], network, out_shape=out_shape)[0, 0]
    # The ensemble of every mirror image commutes with mirroring, whatever the network and window tiling: an output
    # voxel flipped to the wrong place (an asymmetric output grid) would break this.
    for axes in ([0], [1, 2], [0, 1, 2]):
        mirrored = averaged(image.flip([1 + a for a in axes])[None], network, out_shape=out_shape)[0, 0]
        torch.testing.assert_close(mirrored.flip(axes), mean, atol=1e-5, rtol=0)
    # It differs from the single prediction (the untrained network is not mirror-symmetric), only inside the head.
    assert (mean - plain).abs().max() > 1e-3
    assert mean[~foreground_mask(image, out_shape)].abs().max() == 0
    assert len(averaged.mirror_axes) == 8 and len(set(averaged.mirror_axes)) == 8 and single.mirror_axes == ((),)


def test_flip_averaging_takes_only_a_yes_or_no():
    with pytest.raises(ValueError, match="flip_averaging: expected true or false"):
        TUMSynInferer(flip_averaging="eight")


def test_the_inferer_returns_the_networks_prediction_told_the_inputs_contrast(network):
    """No post-processing: the inferer's output is the engine's prediction, with the input's contrast passed on as
    the network's ``source`` (None: unknown)."""
    image = head_like((16, 14, 12), seed=3)
    tokens = tokenize(Prompt.parse(T2W).render())
    inferer = TUMSynInferer(T2W, roi_size=(12, 12, 12), progress=False)
    for source_modality in (None, "T1w"):
        source = None if source_modality is None else torch.tensor([MODALITIES.index(source_modality)])
        expected = synthesize_volume(network, image, tokens, image.shape[1:], source=source,
                                     decode_mask=foreground_mask(image, image.shape[1:]), roi_size=(12, 12, 12),
                                     overlap=0.25, progress=False)
        torch.testing.assert_close(inferer(image[None], network, source_modality=source_modality)[0], expected)
