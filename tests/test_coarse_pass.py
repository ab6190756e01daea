"""The coarse pass (scripts/engine/coarse_pass.py): low frequencies from the input block-averaged 2x, and its place in
the inference engine."""

import pytest
import torch

from helpers import T2W, phantom
from scripts.engine.coarse_pass import block_averaged, coarse_pass_applies, with_coarse_low_frequencies
from scripts.engine.synthesis_engine import TUMSynInferer, foreground_mask
from scripts.errors import UserInputError
from scripts.nets.tumsyn_net import build_tumsyn_net


def test_the_coarse_copy_must_stay_within_the_trained_voxel_sizes():
    assert coarse_pass_applies((1.0, 1.0, 1.0)) and coarse_pass_applies((0.8, 0.8, 2.0))
    # 4 mm voxels would become 8 mm, 5 mm slices 10 mm; an unknown voxel size gets no coarse pass
    assert not coarse_pass_applies((4.0, 4.0, 4.0)) and not coarse_pass_applies((1.0, 1.0, 5.0))
    assert not coarse_pass_applies(None)


def test_block_averaging_halves_every_axis_over_the_same_field_of_view():
    image = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(1, 4, 6, 5)
    coarse = block_averaged(image)
    assert coarse.shape == (1, 2, 3, 3)  # an odd axis rounds up
    torch.testing.assert_close(coarse[0, 0, 0, 0], image[0, :2, :2, :2].mean())
    torch.testing.assert_close(block_averaged(torch.full((1, 7, 7, 7), 0.4)), torch.full((1, 4, 4, 4), 0.4))


def test_low_frequencies_come_from_the_coarse_pass_and_detail_from_the_fine_one():
    _, _, foreground = phantom((24, 24, 24))
    index = torch.arange(24)
    detail = 0.1 * ((index[:, None, None] + index[None, :, None] + index[None, None, :]) % 2 * 2 - 1)  # 2-voxel period
    ramp = torch.linspace(0.0, 0.3, 24)[:, None, None].expand(24, 24, 24)
    fine = ((0.5 + detail) * foreground)[None]  # the right detail on the wrong smooth level
    coarse = ((0.7 + ramp) * foreground)[None]  # the right smooth level without the detail
    fused = with_coarse_low_frequencies(fine, coarse, foreground, (24, 24, 24))[0]
    wanted = 0.7 + ramp + detail
    inner = foreground & (torch.linspace(-1, 1, 24)[:, None, None] ** 2 < 0.3)  # away from the mask's edge
    assert (fused - wanted)[inner].abs().max() < 0.02 < 0.2 < (fine[0] - wanted)[inner].abs().max()
    # the same prediction twice changes nothing, and the background is left as it was
    torch.testing.assert_close(with_coarse_low_frequencies(fine, fine, foreground, (24, 24, 24)), fine)
    torch.testing.assert_close(fused[~foreground], fine[0][~foreground])


def test_inferer_fuses_the_coarse_pass_where_the_input_spacing_allows():
    torch.manual_seed(0)
    network = build_tumsyn_net("small").eval()
    t1w, _, _ = phantom((16, 16, 16))
    settings = dict(roi_size=(12, 12, 12), progress=False)
    inputs = t1w[None, None]
    plain = TUMSynInferer(T2W, **settings)(inputs, network)
    coarse = TUMSynInferer(T2W, **settings)(block_averaged(t1w[None])[None], network, out_shape=(16, 16, 16))
    inferer = TUMSynInferer(T2W, **settings, coarse_pass=True)
    fused = inferer(inputs, network, input_spacing=(1.0, 1.0, 1.0))
    expected = with_coarse_low_frequencies(plain[0], coarse[0], foreground_mask(t1w[None], (16, 16, 16)), (16, 16, 16))
    torch.testing.assert_close(fused[0], expected)
    assert (fused - plain).abs().max() > 1e-4
    # 3 mm voxels (6 mm when coarse) or an unknown spacing: the prediction as the network made it
    torch.testing.assert_close(inferer(inputs, network, input_spacing=(3.0, 3.0, 3.0)), plain)
    torch.testing.assert_close(inferer(inputs, network), plain)
    assert not inferer.with_options(coarse_pass="false").coarse_pass


def test_coarse_pass_takes_a_flag():
    with pytest.raises(UserInputError, match=r"^coarse_pass"):
        TUMSynInferer(coarse_pass="sometimes")
