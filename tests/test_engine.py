"""Fast paths of the inference engine give the reference path's numbers (seams and chunking: test_inference.py)."""

import pytest
import torch

from scripts.inference_engine import TUMSynInferer, foreground_mask, synthesize_volume
from scripts.liif import LIIFDecoder, make_coord
from scripts.prompt import tokenize
from scripts.tumsyn_net import build_tumsyn_net

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

    def encode(self, image, tokens=None, modality=None):
        self.windows += image.shape[0]
        return self.network.encode(image, tokens, modality)

    def query(self, latent, coords, cell):
        return self.network.query(latent, coords, cell)


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


def test_queries_on_latent_centres_decode_only_that_code():
    """On the input grid (sizes whose coordinates round off-centre in float32) the prediction is the centre code's."""
    torch.manual_seed(0)
    decoder = LIIFDecoder(4, [16, 16]).eval()
    shape = [7, 11, 13]
    latent = torch.randn(1, 16, *shape)
    coords = make_coord(shape)[None]
    cell = (2 / torch.tensor(shape, dtype=torch.float32)).expand_as(coords)
    with torch.inference_mode():
        decoded = decoder.query(latent, coords, cell)
        offset_and_cell = torch.cat([torch.zeros(1, 3), torch.ones(1, 3)], dim=1)  # cell = 1 latent voxel
        by_hand = decoder.mlp(latent.flatten(2).transpose(1, 2) + decoder.position_projection(offset_and_cell))
        # A query 1e-3 voxel off the centres (not snapped) blends in its neighbours continuously.
        nudged = decoder.query(latent, coords + 1e-3 * 2 / torch.tensor(shape), cell)
    torch.testing.assert_close(decoded, by_hand, atol=1e-5, rtol=0)
    difference = (nudged - decoded).abs().max()
    assert 0 < difference < 0.02 * decoded.abs().max()
