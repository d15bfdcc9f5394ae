"""The pretraining views' colour operations mean torchvision's tensor functions."""
import pytest
import torch
import torchvision.transforms.functional as TF

from scott.data import colour_ops


def _images(chans, h=28, w=28, n=6):
    g = torch.Generator().manual_seed(chans * 100 + h + w)
    imgs = [torch.rand(chans, h, w, generator=g) for _ in range(n)]
    imgs.append(torch.zeros(chans, h, w))  # flat images: contrast's mean, blur's edges
    imgs.append(torch.ones(chans, h, w))
    return imgs


@pytest.mark.parametrize("factor", [0.0, 0.6, 1.0, 1.4])
def test_brightness_and_contrast_are_torchvisions_floats_on_grey(factor):
    for x in _images(1):
        assert torch.equal(colour_ops.adjust_brightness(x, factor), TF.adjust_brightness(x, factor))
        assert torch.equal(colour_ops.adjust_contrast(x, factor), TF.adjust_contrast(x, factor))


@pytest.mark.parametrize("chans", [1, 3])
def test_every_colour_op_matches_torchvision(chans):
    for x in _images(chans, 20, 31):
        torch.testing.assert_close(colour_ops.adjust_brightness(x, 1.3), TF.adjust_brightness(x, 1.3), rtol=0, atol=0)
        torch.testing.assert_close(colour_ops.adjust_contrast(x, 0.7), TF.adjust_contrast(x, 0.7), rtol=0, atol=0)
        torch.testing.assert_close(colour_ops.adjust_saturation(x, 1.2), TF.adjust_saturation(x, 1.2), rtol=0, atol=0)
        torch.testing.assert_close(colour_ops.adjust_hue(x, -0.08), TF.adjust_hue(x, -0.08), rtol=0, atol=0)
    grey = _images(1)[0]
    assert colour_ops.adjust_saturation(grey, 1.5) is grey and colour_ops.adjust_hue(grey, 0.1) is grey


@pytest.mark.parametrize("chans, h, w", [(1, 28, 28), (3, 32, 32), (1, 9, 17), (3, 64, 40)])
@pytest.mark.parametrize("kernel, sigma", [(9, 0.1), (9, 1.0), (9, 2.0), (5, 0.7), (3, 1.5)])
def test_gaussian_blur_is_torchvisions_filter(chans, h, w, kernel, sigma):
    cache = {}
    for x in _images(chans, h, w, n=3):
        expected = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
        got = colour_ops.gaussian_blur(x, kernel, sigma, cache)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    assert set(cache) == {(h, kernel), (w, kernel)}


def test_blur_preserves_a_flat_image_and_rejects_bad_kernels():
    flat = torch.full((1, 12, 12), 0.25)
    torch.testing.assert_close(colour_ops.gaussian_blur(flat, 9, 1.3), flat, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="odd"):
        colour_ops.gaussian_blur(flat, 4, 1.0)
    with pytest.raises(ValueError, match="too large"):
        colour_ops.gaussian_blur(flat, 25, 1.0)
