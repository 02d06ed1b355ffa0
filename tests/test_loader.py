"""Tests of moco/loader.py: the two-crop transform, the blur, and the v1/v2/linear recipes (He et al. 2019,
Sec. 4; Chen et al. 2020, Sec. 3)."""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from moco import loader

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def pil_image(w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def test_two_crops_transform_applies_base_twice_to_the_same_image():
    calls = []

    def base(image):
        calls.append(image)
        return len(calls)

    image = pil_image()
    assert loader.TwoCropsTransform(base)(image) == [1, 2]  # [query, key], in call order
    assert len(calls) == 2 and calls[0] is image and calls[1] is image

    random.seed(0)
    torch.manual_seed(0)
    q, k = loader.TwoCropsTransform(loader.moco_v2_augmentation(32))(pil_image(80, 60))
    assert q.shape == k.shape == (3, 32, 32)
    assert q.dtype == k.dtype == torch.float32
    assert not torch.equal(q, k)  # two independent random views


@pytest.mark.parametrize("aug_plus", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("crop", [224, 32])
def test_recipes_produce_crops_of_the_requested_size(aug_plus, crop):
    random.seed(1)
    torch.manual_seed(1)
    transform = loader.pretrain_transform(aug_plus=aug_plus, crop_size=crop)
    assert isinstance(transform, loader.TwoCropsTransform)
    views = transform(pil_image(300, 260) if crop == 224 else pil_image(50, 40))
    assert isinstance(views, list) and len(views) == 2
    for view in views:
        assert view.shape == (3, crop, crop) and view.dtype == torch.float32
    source = pil_image(300, 260)
    assert loader.linear_train_transform(crop)(source).shape == (3, crop, crop)
    assert loader.linear_val_transform(crop)(source).shape == (3, crop, crop)


def test_gaussian_blur_draws_sigma_uniformly_and_blurs_with_that_radius():
    blur = loader.GaussianBlur([0.1, 2.0])
    random.seed(0)
    draws = np.array([blur.draw_sigma() for _ in range(4000)])
    assert draws.min() >= 0.1 and draws.max() <= 2.0
    assert draws.min() < 0.12 and draws.max() > 1.98  # covers the whole range
    assert abs(draws.mean() - 1.05) < 0.03  # uniform: mean (0.1 + 2.0) / 2
    assert abs(np.mean(draws < 0.575) - 0.25) < 0.03  # and a quarter below the first quartile

    narrow = loader.GaussianBlur((0.5, 0.6))
    assert all(0.5 <= narrow.draw_sigma() <= 0.6 for _ in range(200))

    image = pil_image(40, 30, seed=3)
    for seed in range(3):
        random.seed(seed)
        out = blur(image)
        random.seed(seed)  # replay the draw with the standard library, not the class
        sigma = random.uniform(0.1, 2.0)
        expected = image.filter(ImageFilter.GaussianBlur(radius=sigma))
        assert out.size == image.size and out.mode == image.mode
        assert out.tobytes() == expected.tobytes()
        assert out.tobytes() != image.tobytes()
    # sigma really varies with the draw: two different draws give two different images
    random.seed(0)
    a = blur(image).tobytes()
    random.seed(1)
    assert blur(image).tobytes() != a


def test_normalisation_constants_and_values():
    assert tuple(loader.IMAGENET_MEAN) == MEAN and tuple(loader.IMAGENET_STD) == STD
    recipes = [loader.moco_v1_augmentation(32), loader.moco_v2_augmentation(32),
               loader.linear_train_transform(32), loader.linear_val_transform(32)]
    for recipe in recipes:
        assert isinstance(recipe.transforms[-2], T.ToTensor)
        norm = recipe.transforms[-1]
        assert isinstance(norm, T.Normalize)
        assert tuple(norm.mean) == MEAN and tuple(norm.std) == STD
    # a flat colour through the validation transform: (value / 255 - mean) / std per channel
    colour = (200, 30, 90)
    out = loader.linear_val_transform(32)(Image.new("RGB", (50, 40), colour))
    for c in range(3):
        expected = (colour[c] / 255.0 - MEAN[c]) / STD[c]
        torch.testing.assert_close(out[c], torch.full((32, 32), expected), rtol=1e-5, atol=1e-5)


def test_linear_val_transform_resizes_to_crop_over_0875():
    assert loader.val_resize_size(224) == 256
    assert loader.val_resize_size(32) == round(32 / 0.875) == 37
    assert loader.val_resize_size(96) == round(96 / 0.875) == 110
    ops = loader.linear_val_transform(224).transforms
    assert [type(t) for t in ops] == [T.Resize, T.CenterCrop, T.ToTensor, T.Normalize]
    assert ops[0].size == 256 and ops[1].size == (224, 224)
    resized = ops[0](pil_image(400, 300))  # the short side becomes 256, the aspect ratio is kept
    assert resized.size == (round(400 * 256 / 300), 256)
    # the centre crop of that resize, computed by hand
    source = pil_image(400, 300, seed=4)
    big = source.resize((341, 256), Image.BILINEAR)
    left, top = (341 - 224) // 2, (256 - 224) // 2
    manual = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])(big.crop((left, top, left + 224, top + 224)))
    out = loader.linear_val_transform(224)(source)
    assert out.shape == (3, 224, 224)
    assert (out - manual).abs().mean() < 0.05  # the same region (resampling filters may differ slightly)
    shifted = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])(big.crop((0, 0, 224, 224)))
    assert (out - shifted).abs().mean() > 0.3


def _crop_ok(t, crop):
    assert isinstance(t, T.RandomResizedCrop)
    assert t.size == (crop, crop)
    assert tuple(t.scale) == (0.2, 1.0)
    assert tuple(t.ratio) == pytest.approx((3 / 4, 4 / 3))
    assert t.interpolation == T.InterpolationMode.BILINEAR


def _jitter_ok(t, b, c, s, h):
    assert isinstance(t, T.ColorJitter)
    assert t.brightness == pytest.approx((1 - b, 1 + b))
    assert t.contrast == pytest.approx((1 - c, 1 + c))
    assert t.saturation == pytest.approx((1 - s, 1 + s))
    assert t.hue == pytest.approx((-h, h))


@pytest.mark.parametrize("crop", [224, 32])
def test_recipe_composition_follows_the_papers(crop):
    v1 = loader.moco_v1_augmentation(crop).transforms
    assert [type(t) for t in v1] == [T.RandomResizedCrop, T.RandomGrayscale, T.ColorJitter,
                                     T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    _crop_ok(v1[0], crop)
    assert v1[1].p == 0.2
    _jitter_ok(v1[2], 0.4, 0.4, 0.4, 0.4)
    assert v1[3].p == 0.5

    v2 = loader.moco_v2_augmentation(crop).transforms
    assert [type(t) for t in v2] == [T.RandomResizedCrop, T.RandomApply, T.RandomGrayscale, T.RandomApply,
                                     T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    _crop_ok(v2[0], crop)
    assert v2[1].p == 0.8 and len(v2[1].transforms) == 1
    _jitter_ok(v2[1].transforms[0], 0.4, 0.4, 0.4, 0.1)
    assert v2[2].p == 0.2
    assert v2[3].p == 0.5 and len(v2[3].transforms) == 1
    blur = v2[3].transforms[0]
    assert isinstance(blur, loader.GaussianBlur) and tuple(blur.sigma) == (0.1, 2.0)
    assert v2[4].p == 0.5

    lin = loader.linear_train_transform(crop).transforms
    assert [type(t) for t in lin] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    assert lin[0].size == (crop, crop) and tuple(lin[0].scale) == (0.08, 1.0)

    # pretrain_transform picks the recipe by --aug-plus
    assert [type(t) for t in loader.pretrain_transform(False, crop).base_transform.transforms] == [type(t) for t in v1]
    assert [type(t) for t in loader.pretrain_transform(True, crop).base_transform.transforms] == [type(t) for t in v2]
