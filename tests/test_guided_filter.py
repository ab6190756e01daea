"""Input-guided detail transfer (scripts/engine/guided_filter.py) and its place in the inference engine."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import T2W, phantom
from scripts.engine.guided_filter import guided_filter, guides, input_guided, rank_matched
from scripts.engine.synthesis_engine import GUIDED_FILTER_RADIUS, TUMSynInferer, foreground_mask
from scripts.nets.tumsyn_net import build_tumsyn_net


def blurred(volume, foreground):
    """What a network trained elsewhere gives: the right contrast, the fine structure lost."""
    smooth = F.avg_pool3d(volume[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    return smooth * foreground


def correlation(a, b, mask):
    return float(np.corrcoef(a[mask].numpy(), b[mask].numpy())[0, 1])


def test_guided_filter_keeps_an_affine_function_of_its_guide():
    t1w, _, foreground = phantom()
    weight = foreground.float()
    for slope, offset in ((0.5, 0.1), (-1.0, 1.2)):  # kept and inverted contrast
        signal = (slope * t1w + offset) * foreground
        filtered = guided_filter(t1w, signal, weight, radius=1, eps=1e-8)
        torch.testing.assert_close(filtered[foreground], signal[foreground], atol=1e-3, rtol=0)


def test_detail_transfer_restores_the_inputs_edges_in_the_predictions_contrast():
    t1w, t2w, foreground = phantom()
    prediction = blurred(t2w, foreground)[None]
    guided = input_guided(t1w[None], prediction, foreground, radius=1)[0]
    # the inverted contrast survives and the sulci come back: closer to the sharp target than the blurred prediction
    assert correlation(prediction[0], t2w, foreground) < 0.75 < 0.85 < correlation(guided, t2w, foreground)
    # only the spatial order changes: the foreground holds exactly the prediction's intensities, the background its own
    torch.testing.assert_close(torch.sort(guided[foreground]).values, torch.sort(prediction[0][foreground]).values)
    torch.testing.assert_close(guided[~foreground], prediction[0][~foreground])


@pytest.mark.parametrize("shape", [(1, 1, 1), (6, 5, 1), (2, 7, 3)])
def test_thin_and_tiny_grids_are_guided(shape):
    """A single slice or voxel, thinner than the filter's window: filtered all the same, its values kept."""
    generator = torch.Generator().manual_seed(0)
    image, prediction = torch.rand(1, *shape, generator=generator), torch.rand(1, *shape, generator=generator)
    guided = input_guided(image, prediction, torch.ones(shape, dtype=torch.bool), radius=1)
    torch.testing.assert_close(torch.sort(guided.flatten()).values, torch.sort(prediction.flatten()).values)


def test_rank_matching_reorders_values_by_the_given_order():
    mask = torch.tensor([True, True, False, True])
    matched = rank_matched(torch.tensor([3.0, 1.0, 9.0, 2.0]), torch.tensor([10.0, 20.0, 5.0, 30.0]), mask)
    torch.testing.assert_close(matched, torch.tensor([30.0, 10.0, 5.0, 20.0]))


def test_input_guided_resamples_the_input_to_a_finer_output_grid():
    t1w, t2w, foreground = phantom((20, 20, 20))
    out_shape = (40, 40, 40)
    fine_foreground = foreground_mask(t1w[None], out_shape)
    prediction = F.interpolate(blurred(t2w, foreground)[None, None], size=out_shape, mode="trilinear")[0]
    guided = input_guided(t1w[None], prediction, fine_foreground, radius=1)
    assert guided.shape == prediction.shape
    target = F.interpolate(t2w[None, None], size=out_shape, mode="trilinear")[0, 0]
    assert correlation(guided[0], target, fine_foreground) > correlation(prediction[0], target, fine_foreground)


def _unguided(monkeypatch, call):
    """``call()`` with the inferer's guided filter off."""
    import scripts.engine.synthesis_engine as engine

    with monkeypatch.context() as patch:
        patch.setattr(engine, "GUIDED_FILTER_RADIUS", 0)
        return call()


def test_inferer_guides_its_prediction_by_the_input(monkeypatch):
    torch.manual_seed(0)
    network = build_tumsyn_net("small").eval()
    t1w, _, foreground = phantom((16, 16, 16))
    inferer = TUMSynInferer(T2W, roi_size=(12, 12, 12), progress=False)
    plain = _unguided(monkeypatch, lambda: inferer(t1w[None, None], network)[0])
    guided = inferer(t1w[None, None], network)[0]
    torch.testing.assert_close(guided, input_guided(t1w[None], plain, foreground_mask(t1w[None], (16, 16, 16)),
                                                    GUIDED_FILTER_RADIUS))
    assert GUIDED_FILTER_RADIUS == 1 and (guided - plain).abs().max() > 1e-4


def test_thick_slices_are_not_guided_into_a_much_finer_grid(monkeypatch):
    """A 4 mm slice has no 2 mm structure to give: the inferer leaves such a prediction as the network made it."""
    assert guides((16, 16, 8), (16, 16, 12)) and not guides((16, 16, 8), (16, 16, 16))
    torch.manual_seed(0)
    network = build_tumsyn_net("small").eval()
    t1w, _, _ = phantom((16, 16, 8))
    inferer = TUMSynInferer(T2W, roi_size=(12, 12, 12), progress=False)
    for out_shape, guided in (((16, 16, 16), False), ((16, 16, 12), True)):
        plain = _unguided(monkeypatch, lambda: inferer(t1w[None, None], network, out_shape=out_shape))
        result = inferer(t1w[None, None], network, out_shape=out_shape)
        assert torch.equal(result, plain) != guided, out_shape
