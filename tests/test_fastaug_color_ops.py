"""Colour and blur operations of the fast path (moco/fastaug/color_ops.py) against torchvision and PIL:
each batched operation equals torchvision's functional operation on single float images for given
parameters (per-image factors, and one scalar factor: the CPU path); the blur equals an independent
float64 model of PIL's GaussianBlur and is close to PIL itself.
"""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from moco.fastaug import color_ops

def make_images(n=6, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8).float() / 255
    x[0, :, :6] = x[0, 0, :6]  # gray pixels (chroma 0)
    x[1, 0] = x[1, 1]  # ties between maximal channels
    x[2, 2] = x[2, 0]
    x[3, :, 0, 0] = 0.0  # black
    x[3, :, 0, 1] = 1.0  # white
    return x


@pytest.mark.parametrize("op,tv_op,values", [
    ("brightness", TF.adjust_brightness, [0.6, 0.8, 1.0, 1.1, 1.3, 1.4]),
    ("contrast", TF.adjust_contrast, [0.6, 0.8, 1.0, 1.1, 1.3, 1.4]),
    ("saturation", TF.adjust_saturation, [0.6, 0.8, 1.0, 1.1, 1.3, 1.4]),
    ("hue", TF.adjust_hue, [-0.5, -0.4, -0.1, 0.03, 0.25, 0.5]),
])
def test_jitter_ops_match_torchvision(op, tv_op, values):
    fn = getattr(color_ops, f"adjust_{op}_")
    x = make_images()
    expected = torch.stack([tv_op(x[i], values[i]) for i in range(len(values))])
    batched = fn(x.clone(), torch.tensor(values))  # one factor per image (GPU path)
    single = torch.cat([fn(x[i:i + 1].clone(), values[i]) for i in range(len(values))])  # CPU path
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(single, expected, atol=1e-5, rtol=0)
    assert batched.min() >= 0 and batched.max() <= 1


def test_grayscale_matches_torchvision():
    x = make_images()
    torch.testing.assert_close(color_ops.grayscale_(x.clone()), TF.rgb_to_grayscale(x, num_output_channels=3),
                               atol=1e-6, rtol=0)
    assert color_ops.GRAY_WEIGHTS == (0.2989, 0.587, 0.114)


def pil_blur_model(image, sigma):
    """PIL's GaussianBlur in float64, written independently: three extended-box passes per axis, edges
    replicated before each pass, with PIL's box radius for `sigma`."""
    s2 = sigma ** 2 / 3
    length = math.sqrt(12 * s2 + 1)
    l = math.floor((length - 1) / 2)
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    radius = l + a
    kernel = np.array([a] + [1.0] * (2 * l + 1) + [a]) / (2 * radius + 1)
    out = image.astype(np.float64)
    for axis in (-1, -2):
        for _ in range(3):
            pad = [(0, 0)] * out.ndim
            pad[axis] = (l + 1, l + 1)
            padded = np.pad(out, pad, mode="edge")
            out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return out


def test_blur_matches_its_model():
    x = make_images(n=4, size=20)
    sigmas = [0.1, 0.7, 1.41, 2.0]
    expected = torch.from_numpy(np.stack([pil_blur_model(x[i].numpy(), s) for i, s in enumerate(sigmas)])).float()
    batched = color_ops.blur_(x.clone(), torch.tensor(sigmas))
    single = torch.cat([color_ops.blur_(x[i:i + 1].clone(), s) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(batched, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(single, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.5, 2.0])
def test_pil_blur_kernel_has_variance_sigma_squared(sigma):
    kernel = np.array([1.0])
    for k in color_ops.blur_passes(sigma):
        kernel = np.convolve(kernel, k)
    taps = np.arange(len(kernel)) - len(kernel) // 2
    assert kernel.sum() == pytest.approx(1.0, abs=1e-12)
    assert (kernel * taps ** 2).sum() == pytest.approx(sigma ** 2, rel=1e-9)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.7, 2.0])
def test_blur_is_close_to_pil(sigma):
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 3, 8, 10, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(48, 60), mode="bilinear", align_corners=False)
    noisy = (smooth + 0.1 * torch.rand(1, 3, 48, 60, generator=g)).clamp(0, 1)
    u8 = (noisy * 255).round().to(torch.uint8)[0]
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(radius=sigma))
    reference = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
    ours = color_ops.blur_(u8.float()[None], sigma)[0]
    diff = (ours - reference).abs()
    # PIL rounds to integers after each of its six passes (for small sigma it then often leaves pixels
    # unchanged); the float operator stays within a few grey levels of it
    assert diff.mean() < 1.0 and diff.max() <= 3.0
    if sigma >= 1.0:  # and much closer to PIL's result than the unblurred image is
        assert diff.mean() < 0.2 * (u8.float() - reference).abs().mean()


def test_jitter_on_pil_images_is_close_to_the_reference():
    """The float path against PIL's uint8 operations (the reference's numerics) for brightness,
    contrast, saturation, grayscale and blur: within a few grey levels."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(1, 3, 6, 6, generator=g)
    u8 = (torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear") * 255).round().to(torch.uint8)
    pil = TF.to_pil_image(u8[0])
    steps = [(lambda im: TF.adjust_brightness(im, 1.3), lambda x: color_ops.adjust_brightness_(x, 1.3)),
             (lambda im: TF.adjust_contrast(im, 0.7), lambda x: color_ops.adjust_contrast_(x, 0.7)),
             (lambda im: TF.adjust_saturation(im, 1.4), lambda x: color_ops.adjust_saturation_(x, 1.4)),
             (lambda im: TF.rgb_to_grayscale(im, 3), lambda x: color_ops.grayscale_(x)),
             (lambda im: im.filter(ImageFilter.GaussianBlur(1.2)), lambda x: color_ops.blur_(x, 1.2))]
    x = u8.float() / 255
    for pil_op, op in steps:
        pil = pil_op(pil)
        x = op(x)
    reference = TF.pil_to_tensor(pil).float() / 255
    diff = (x[0] - reference).abs()
    assert diff.mean() < 1.5 / 255 and diff.max() < 5 / 255
