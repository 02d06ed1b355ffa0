"""Colour parameter draws of the fast path (moco/fastaug/params.py) against the reference pipeline
(moco/loader.py): the per-image parameters of the fast path (worker crop/flip and colour draws) have the
distributions of the parameters that the reference torchvision/PIL pipeline actually draws, recorded by
running the reference transforms: application rates of jitter / grayscale / blur / flip, factor and
sigma distributions (two-sample Kolmogorov-Smirnov), the jitter order, crop scale and ratio. The same
comparison must flag a recipe with a wrong probability or range. And the per-image operation sequence
follows the recipe's order.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from moco import loader
from moco.fastaug.params import ColorDraws, programs
from moco.fastaug.worker import CropDraws, draw_two_crops
from moco.loader import MOCO_V1, MOCO_V2, BlurStep, ColorJitterStep, GrayscaleStep

N_DRAWS = 4000
CROP = 16
IMAGE_SIZE = (40, 30)  # PIL (width, height) of the image the reference pipeline is run on


def record_reference_draws(monkeypatch, aug_plus, n, seed):
    """Run moco/loader.py's v1/v2 augmentation `n` times on a small image and record every random draw."""
    records = []
    current = {}

    rrc_get_params = transforms.RandomResizedCrop.get_params
    cj_get_params = transforms.ColorJitter.get_params
    draw_sigma = loader.GaussianBlur.draw_sigma
    functional = transforms.transforms.F
    rgb_to_grayscale, hflip = functional.rgb_to_grayscale, functional.hflip

    def rec_rrc(img, scale, ratio):
        current["crop"] = rrc_get_params(img, scale, ratio)
        return current["crop"]

    def rec_cj(brightness, contrast, saturation, hue):
        out = cj_get_params(brightness, contrast, saturation, hue)
        current["jitter"] = (out[0].tolist(),) + tuple(float(v) for v in out[1:])
        return out

    def rec_sigma(self):
        current["sigma"] = draw_sigma(self)
        return current["sigma"]

    def rec_gray(img, num_output_channels=1):
        current["gray"] = True
        return rgb_to_grayscale(img, num_output_channels=num_output_channels)

    def rec_flip(img):
        current["flip"] = True
        return hflip(img)

    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(rec_rrc))
    monkeypatch.setattr(transforms.ColorJitter, "get_params", staticmethod(rec_cj))
    monkeypatch.setattr(loader.GaussianBlur, "draw_sigma", rec_sigma)
    monkeypatch.setattr(functional, "rgb_to_grayscale", rec_gray)
    monkeypatch.setattr(functional, "hflip", rec_flip)

    recipe = loader.moco_v2_augmentation(CROP) if aug_plus else loader.moco_v1_augmentation(CROP)
    image = Image.new("RGB", IMAGE_SIZE, (120, 60, 200))
    torch.manual_seed(seed)
    loader.random.seed(seed)
    for _ in range(n):
        current.clear()
        recipe(image)
        records.append(dict(current))
    monkeypatch.undo()
    return records_to_arrays(records)


def records_to_arrays(records):
    jit = [r.get("jitter") for r in records]
    nan4 = [float("nan")] * 4
    factors = np.array([j[1:] if j else nan4 for j in jit], dtype=np.float64)
    return {
        "jitter": np.array([j is not None for j in jit]),
        "order": np.array([j[0] for j in jit if j is not None], dtype=np.int64),
        "brightness": factors[:, 0], "contrast": factors[:, 1], "saturation": factors[:, 2], "hue": factors[:, 3],
        "gray": np.array([bool(r.get("gray")) for r in records]),
        "blur": np.array(["sigma" in r for r in records]),
        "sigma": np.array([r["sigma"] for r in records if "sigma" in r], dtype=np.float64),
        "flip": np.array([bool(r.get("flip")) for r in records]),
        "crop": np.array([r["crop"] for r in records], dtype=np.float64),
    }


def fast_draws(recipe, n, seed, params=None, crops=None):
    """The same quantities from the fast path: ColorDraws of `recipe` (or the given `params`) and the
    worker's crop/flip (or the given `crops`: box + flip rows)."""
    if params is None:
        params = ColorDraws(recipe)(n, generator=torch.Generator().manual_seed(seed))
    if crops is None:
        image_w, image_h = IMAGE_SIZE
        torch.manual_seed(seed + 1)
        crop = CropDraws(recipe)
        crops = [(*box, flip) for box, flip in (crop(image_w, image_h) for _ in range(n))]
    jitter = params["jitter"].numpy()
    factors = params["factors"].double().numpy()
    return {
        "jitter": jitter,
        "order": params["order"].numpy()[jitter],
        "brightness": np.where(jitter, factors[:, 0], np.nan),
        "contrast": np.where(jitter, factors[:, 1], np.nan),
        "saturation": np.where(jitter, factors[:, 2], np.nan),
        "hue": np.where(jitter, factors[:, 3], np.nan),
        "gray": params["gray"].numpy(),
        "blur": params["blur"].numpy(),
        "sigma": params["sigma"].double().numpy()[params["blur"].numpy()],
        "flip": np.array([c[4] for c in crops]),
        "crop": np.array([c[:4] for c in crops], dtype=np.float64),
    }


def ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                                - np.searchsorted(b, grid, side="right") / len(b))))


def ks_threshold(n, m, alpha=1e-4):
    return math.sqrt(-0.5 * math.log(alpha / 2)) * math.sqrt((n + m) / (n * m))


def compare_draws(fast, ref):
    """Differences between two sets of draws that are beyond chance; an empty list when they match."""
    problems = []
    n, m = len(fast["gray"]), len(ref["gray"])
    for name in ("jitter", "gray", "blur", "flip"):
        p, q = fast[name].mean(), ref[name].mean()
        pooled = (p * n + q * m) / (n + m)
        tol = 5 * math.sqrt(max(pooled * (1 - pooled), 1e-4) * (1 / n + 1 / m))
        if abs(p - q) > tol:
            problems.append(f"{name} rate {p:.4f} vs reference {q:.4f}")
    for name in ("brightness", "contrast", "saturation", "hue"):
        a, b = fast[name][~np.isnan(fast[name])], ref[name][~np.isnan(ref[name])]
        if len(a) == 0 or len(b) == 0:
            problems.append(f"{name}: no draws")
            continue
        ks = ks_statistic(a, b)
        if ks > ks_threshold(len(a), len(b)):
            problems.append(f"{name} distribution differs: KS {ks:.3f}")
        lo, hi = b.min(), b.max()
        spread = hi - lo
        if a.min() < lo - 0.01 * spread or a.max() > hi + 0.01 * spread:
            problems.append(f"{name} range [{a.min():.3f}, {a.max():.3f}] vs reference [{lo:.3f}, {hi:.3f}]")
    if (len(fast["sigma"]) > 0) != (len(ref["sigma"]) > 0):
        problems.append("blur drawn in one pipeline only")
    elif len(ref["sigma"]) > 0:
        ks = ks_statistic(fast["sigma"], ref["sigma"])
        if ks > ks_threshold(len(fast["sigma"]), len(ref["sigma"])):
            problems.append(f"sigma distribution differs: KS {ks:.3f}")
    # jitter order: how often each operation comes at each position (1/4 each for a uniform permutation)
    table_fast = np.stack([(fast["order"] == op).mean(axis=0) for op in range(4)])
    table_ref = np.stack([(ref["order"] == op).mean(axis=0) for op in range(4)])
    if np.abs(table_fast - table_ref).max() > 5 * math.sqrt(0.1875 * (1 / len(fast["order"]) + 1 / len(ref["order"]))):
        problems.append(f"jitter order differs:\n{table_fast}\nvs\n{table_ref}")
    width, height = IMAGE_SIZE
    for name, fn in (("crop scale", lambda c: c[:, 2] * c[:, 3] / (width * height)),
                     ("crop log-ratio", lambda c: np.log(c[:, 3] / c[:, 2])),
                     ("crop top", lambda c: c[:, 0]), ("crop left", lambda c: c[:, 1])):
        ks = ks_statistic(fn(fast["crop"]), fn(ref["crop"]))
        if ks > ks_threshold(n, m):
            problems.append(f"{name} distribution differs: KS {ks:.3f}")
    return problems


@pytest.fixture(scope="module")
def reference_draws():
    mp = pytest.MonkeyPatch()
    try:
        return {plus: record_reference_draws(mp, plus, N_DRAWS, seed=1) for plus in (False, True)}
    finally:
        mp.undo()


@pytest.mark.parametrize("aug_plus", [False, True], ids=["v1", "v2"])
def test_parameter_distributions_match_reference(reference_draws, aug_plus):
    ref = reference_draws[aug_plus]
    fast = fast_draws(loader.recipe(aug_plus), N_DRAWS, seed=2)
    assert compare_draws(fast, ref) == []
    # and the reference's own values are the recipes of He et al. 2019 (v1) and Chen et al. 2020 (v2)
    assert ref["jitter"].mean() == pytest.approx(0.8 if aug_plus else 1.0, abs=0.03)
    assert ref["gray"].mean() == pytest.approx(0.2, abs=0.03)
    assert ref["blur"].mean() == pytest.approx(0.5 if aug_plus else 0.0, abs=0.03)
    assert ref["flip"].mean() == pytest.approx(0.5, abs=0.03)
    hue = 0.1 if aug_plus else 0.4
    assert np.nanmax(fast["hue"]) <= hue and np.nanmin(fast["hue"]) >= -hue
    assert np.nanmax(fast["hue"]) > 0.95 * hue and np.nanmin(fast["hue"]) < -0.95 * hue
    for name in ("brightness", "contrast", "saturation"):
        assert 0.6 <= np.nanmin(fast[name]) < 0.61 and 1.39 < np.nanmax(fast[name]) <= 1.4
        assert np.nanmean(fast[name]) == pytest.approx(1.0, abs=0.02)
    if aug_plus:
        assert 0.1 <= fast["sigma"].min() < 0.12 and 1.98 < fast["sigma"].max() <= 2.0
    # the same when everything is drawn in the loader workers, two crops per image
    torch.manual_seed(4)
    draws = [draw_two_crops(loader.recipe(aug_plus), *IMAGE_SIZE) for _ in range(N_DRAWS // 2)]
    params = {name: torch.cat([d[name] for d in draws]) for name in draws[0] if name not in ("box", "flip")}
    crops = [(*box, flip) for d in draws for box, flip in zip(d["box"].tolist(), d["flip"].tolist())]
    assert compare_draws(fast_draws(None, N_DRAWS, seed=5, params=params, crops=crops), ref) == []


def wrong_recipe(change):
    """MoCo v2's declaration with one thing changed."""
    jitter, gray, blur = MOCO_V2.color
    if change == "p_gray":
        return dataclasses.replace(MOCO_V2, color=(jitter, GrayscaleStep(p=0.3), blur))
    if change == "p_jitter":
        return dataclasses.replace(MOCO_V2, color=(dataclasses.replace(jitter, p=0.7), gray, blur))
    if change == "p_blur":
        return dataclasses.replace(MOCO_V2, color=(jitter, gray, dataclasses.replace(blur, p=0.4)))
    if change == "brightness":
        return dataclasses.replace(MOCO_V2, color=(dataclasses.replace(jitter, brightness=0.5), gray, blur))
    if change == "hue":
        return dataclasses.replace(MOCO_V2, color=(dataclasses.replace(jitter, hue=0.2), gray, blur))
    if change == "sigma":
        return dataclasses.replace(MOCO_V2, color=(jitter, gray, BlurStep(sigma=(0.1, 1.8), p=0.5)))
    if change == "flip":
        return dataclasses.replace(MOCO_V2, flip_p=0.4)
    if change == "scale":
        return dataclasses.replace(MOCO_V2, scale=(0.08, 1.0))
    return MOCO_V2


@pytest.mark.parametrize("change", ["p_gray", "p_jitter", "p_blur", "brightness", "hue", "sigma", "order", "flip",
                                    "scale"])
def test_distribution_check_catches_a_wrong_recipe(reference_draws, change):
    fast = fast_draws(wrong_recipe(change), N_DRAWS, seed=2)
    if change == "order":  # a jitter that always runs brightness first
        fast["order"] = np.sort(fast["order"], axis=1)
    assert compare_draws(fast, reference_draws[True]) != []


def test_programs_follow_the_recipe_order():
    params = {
        "jitter": torch.tensor([True, True, False]), "order": torch.tensor([[3, 1, 0, 2], [0, 1, 2, 3], [0, 1, 2, 3]]),
        "factors": torch.tensor([[1.1, 0.9, 1.0, 0.05], [1.2, 0.8, 1.1, -0.05], [1.3, 0.7, 1.2, 0.0]]),
        "gray": torch.tensor([True, False, True]), "blur": torch.tensor([True, False, True]),
        "sigma": torch.tensor([0.5, 1.0, 1.5])}
    v2 = programs(MOCO_V2, params)
    assert [op for op, _ in v2[0]] == ["hue", "contrast", "brightness", "saturation", "gray", "blur"]
    assert [op for op, _ in v2[1]] == ["brightness", "contrast", "saturation", "hue"]
    assert [op for op, _ in v2[2]] == ["gray", "blur"]
    assert v2[0][0][1] == pytest.approx(0.05) and v2[0][-1][1] == pytest.approx(0.5)
    v1 = programs(MOCO_V1, params)
    assert [op for op, _ in v1[0]] == ["gray", "hue", "contrast", "brightness", "saturation"]  # no blur in v1
    assert [op for op, _ in v1[2]] == ["gray"]


def test_a_recipe_without_a_step_still_draws_twelve_uniforms_per_image():
    """v1 has no blur: its blur is never drawn, and the draws that follow are those of v2's stream."""
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    v1, v2 = ColorDraws(MOCO_V1)(5, generator=g1), ColorDraws(MOCO_V2)(5, generator=g2)
    assert not v1["blur"].any() and v1["jitter"].all()
    assert torch.equal(v1["order"], v2["order"]) and torch.equal(v1["sigma"], v2["sigma"])
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    assert ColorDraws(dataclasses.replace(MOCO_V1, color=(ColorJitterStep(0.4, 0.4, 0.4, 0.4),))).gray.p == 0.0
