"""The fast augmentation path (moco/batch_aug.py) against the reference pipeline (moco/loader.py).

1. Distributions: the per-image parameters of the fast path (worker crop/flip + BatchAugment) have the
   distributions of the parameters that the reference torchvision/PIL pipeline actually draws, recorded
   by running the reference transforms: application rates of jitter / grayscale / blur / flip, factor
   and sigma distributions (two-sample Kolmogorov-Smirnov), the jitter order, crop scale and ratio.
   The same comparison must flag a recipe with a wrong probability or range.
2. Operations: each batched operation equals torchvision's functional operation on single float images
   for given parameters; the blur equals an independent float64 model of PIL's GaussianBlur and is close
   to PIL itself; a whole augmentation equals the composition of the reference operations.
3. Shapes, dtypes, determinism, and the per-image (CPU) and batched (GPU) executions agreeing.
"""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision import transforms

from moco import batch_aug, loader
from moco.batch_aug import AugParams, BatchAugment, RandomResizedCropFlip, crop_flip_transform

N_DRAWS = 4000
CROP = 16
IMAGE_SIZE = (40, 30)  # PIL (width, height) of the image the reference pipeline is run on


# --------------------------------------------------------------------------------------------------
# Recording what the reference pipeline draws
# --------------------------------------------------------------------------------------------------


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


def fast_draws(augment, n, seed, params=None):
    """The same quantities from the fast path: BatchAugment.sample_params (or the given `params`) and
    the worker's crop/flip."""
    if params is None:
        params = augment.sample_params(n, generator=torch.Generator().manual_seed(seed))
    worker = RandomResizedCropFlip(CROP)
    image = Image.new("RGB", IMAGE_SIZE)
    torch.manual_seed(seed + 1)
    crops = [worker.get_params(image) for _ in range(n)]
    jitter = params.jitter.numpy()
    return {
        "jitter": jitter,
        "order": params.order.numpy()[jitter],
        "brightness": np.where(jitter, params.brightness.double().numpy(), np.nan),
        "contrast": np.where(jitter, params.contrast.double().numpy(), np.nan),
        "saturation": np.where(jitter, params.saturation.double().numpy(), np.nan),
        "hue": np.where(jitter, params.hue.double().numpy(), np.nan),
        "gray": params.gray.numpy(),
        "blur": params.blur.numpy(),
        "sigma": params.sigma.double().numpy()[params.blur.numpy()],
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
    fast = fast_draws(BatchAugment(aug_plus=aug_plus), N_DRAWS, seed=2)
    assert compare_draws(fast, ref) == []
    # and the reference's own values are the recipe of SPEC §3
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
    # the same when the colour parameters are drawn in the loader workers, one crop at a time
    transform = crop_flip_transform(CROP, aug_plus)
    image = Image.new("RGB", IMAGE_SIZE)
    torch.manual_seed(4)
    rows = torch.stack([transform.one(image)[1] for _ in range(N_DRAWS)])
    in_worker = fast_draws(None, N_DRAWS, seed=5, params=AugParams.from_tensor(rows))
    assert compare_draws(in_worker, ref) == []


@pytest.mark.parametrize("change", ["p_gray", "p_jitter", "p_blur", "brightness", "hue", "sigma", "order", "flip",
                                    "scale"])
def test_distribution_check_catches_a_wrong_recipe(reference_draws, change):
    augment = BatchAugment(aug_plus=True)
    if change == "p_gray":
        augment.p_gray = 0.3
    elif change == "p_jitter":
        augment.p_jitter = 0.7
    elif change == "p_blur":
        augment.p_blur = 0.4
    elif change == "brightness":
        augment.brightness_range = (0.5, 1.5)
    elif change == "hue":
        augment.hue_range = (-0.2, 0.2)
    elif change == "sigma":
        augment.sigma_range = (0.1, 1.8)
    fast = fast_draws(augment, N_DRAWS, seed=2)
    if change == "order":  # a jitter that always runs brightness first
        fast["order"] = np.sort(fast["order"], axis=1)
    elif change == "flip":
        fast["flip"] = np.random.default_rng(0).random(N_DRAWS) < 0.4
    elif change == "scale":
        torch.manual_seed(3)
        image = Image.new("RGB", IMAGE_SIZE)
        worker = RandomResizedCropFlip(CROP, scale=(0.08, 1.0))
        fast["crop"] = np.array([worker.get_params(image)[:4] for _ in range(N_DRAWS)], dtype=np.float64)
    assert compare_draws(fast, reference_draws[True]) != []


def test_programs_follow_the_recipe_order():
    params = AugParams(
        jitter=torch.tensor([True, True, False]), order=torch.tensor([[3, 1, 0, 2], [0, 1, 2, 3], [0, 1, 2, 3]]),
        brightness=torch.tensor([1.1, 1.2, 1.3]), contrast=torch.tensor([0.9, 0.8, 0.7]),
        saturation=torch.tensor([1.0, 1.1, 1.2]), hue=torch.tensor([0.05, -0.05, 0.0]),
        gray=torch.tensor([True, False, True]), blur=torch.tensor([True, False, True]),
        sigma=torch.tensor([0.5, 1.0, 1.5]))
    v2 = BatchAugment(aug_plus=True).programs(params)
    assert [op for op, _ in v2[0]] == ["hue", "contrast", "brightness", "saturation", "gray", "blur"]
    assert [op for op, _ in v2[1]] == ["brightness", "contrast", "saturation", "hue"]
    assert [op for op, _ in v2[2]] == ["gray", "blur"]
    assert v2[0][0][1] == pytest.approx(0.05) and v2[0][-1][1] == pytest.approx(0.5)
    v1 = BatchAugment(aug_plus=False).programs(params)
    assert [op for op, _ in v1[0]] == ["gray", "hue", "contrast", "brightness", "saturation"]  # no blur in v1
    assert [op for op, _ in v1[2]] == ["gray"]


# --------------------------------------------------------------------------------------------------
# Operations against torchvision / PIL
# --------------------------------------------------------------------------------------------------


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
    fn = getattr(batch_aug, f"adjust_{op}_")
    x = make_images()
    expected = torch.stack([tv_op(x[i], values[i]) for i in range(len(values))])
    batched = fn(x.clone(), torch.tensor(values))  # one factor per image (GPU path)
    single = torch.cat([fn(x[i:i + 1].clone(), values[i]) for i in range(len(values))])  # CPU path
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(single, expected, atol=1e-5, rtol=0)
    assert batched.min() >= 0 and batched.max() <= 1


def test_grayscale_matches_torchvision():
    x = make_images()
    torch.testing.assert_close(batch_aug.grayscale_(x.clone()), TF.rgb_to_grayscale(x, num_output_channels=3),
                               atol=1e-6, rtol=0)
    assert batch_aug.GRAY_WEIGHTS == (0.2989, 0.587, 0.114)


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


def gaussian_model(image, sigma):
    r = max(1, math.ceil(3 * sigma))
    t = np.arange(-r, r + 1)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    out = image.astype(np.float64)
    for axis in (-1, -2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        out = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, np.pad(out, pad, mode="edge"))
    return out


@pytest.mark.parametrize("kind,model", [("pil", pil_blur_model), ("gaussian", gaussian_model)])
def test_blur_matches_its_model(kind, model):
    x = make_images(n=4, size=20)
    sigmas = [0.1, 0.7, 1.41, 2.0]
    expected = torch.from_numpy(np.stack([model(x[i].numpy(), s) for i, s in enumerate(sigmas)])).float()
    batched = batch_aug.blur_(x.clone(), torch.tensor(sigmas), kind)
    single = torch.cat([batch_aug.blur_(x[i:i + 1].clone(), s, kind) for i, s in enumerate(sigmas)])
    torch.testing.assert_close(batched, expected, atol=2e-6, rtol=0)
    torch.testing.assert_close(single, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.5, 2.0])
def test_pil_blur_kernel_has_variance_sigma_squared(sigma):
    kernel = np.array([1.0])
    for k in batch_aug.blur_passes(sigma, "pil"):
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
    ours = batch_aug.blur_(u8.float()[None], sigma)[0]
    diff = (ours - reference).abs()
    # PIL rounds to integers after each of its six passes (for small sigma it then often leaves pixels
    # unchanged); the float operator stays within a few grey levels of it
    assert diff.mean() < 1.0 and diff.max() <= 3.0
    if sigma >= 1.0:  # and much closer to PIL's result than the unblurred image is
        assert diff.mean() < 0.2 * (u8.float() - reference).abs().mean()


def reference_composition(x_u8, params, aug_plus):
    """One image through torchvision's functional ops in the recipe's order, the float64 PIL-blur model
    and torchvision's normalisation."""
    jitter_ops = {0: lambda y, p: TF.adjust_brightness(y, float(p.brightness)),
                  1: lambda y, p: TF.adjust_contrast(y, float(p.contrast)),
                  2: lambda y, p: TF.adjust_saturation(y, float(p.saturation)),
                  3: lambda y, p: TF.adjust_hue(y, float(p.hue))}
    y = x_u8.float() / 255

    def jitter(y):
        if bool(params.jitter):
            for op in params.order.tolist():
                y = jitter_ops[op](y, params)
        return y

    def gray(y):
        return TF.rgb_to_grayscale(y, num_output_channels=3) if bool(params.gray) else y

    if aug_plus:
        y = gray(jitter(y))
        if bool(params.blur):
            y = torch.from_numpy(pil_blur_model(y.numpy(), float(params.sigma))).float()
    else:
        y = jitter(gray(y))
    return TF.normalize(y, loader.IMAGENET_MEAN, loader.IMAGENET_STD)


@pytest.mark.parametrize("aug_plus", [False, True], ids=["v1", "v2"])
def test_whole_augmentation_matches_reference_composition(aug_plus):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (12, 3, 20, 20), generator=g, dtype=torch.uint8)
    augment = BatchAugment(aug_plus=aug_plus)
    params = augment.sample_params(12, generator=g)
    params.gray[:2] = torch.tensor([True, False])  # make sure both branches occur
    params.blur[:2] = torch.tensor([True, True])
    expected = torch.stack([reference_composition(images[i], params.select(i), aug_plus) for i in range(12)])
    per_image = BatchAugment(aug_plus=aug_plus, per_image=True).apply(images, params)
    batched = BatchAugment(aug_plus=aug_plus, per_image=False).apply(images, params)
    torch.testing.assert_close(per_image, expected, atol=5e-5, rtol=0)
    torch.testing.assert_close(batched, expected, atol=5e-5, rtol=0)


def test_no_op_parameters_give_plain_normalisation():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    augment = BatchAugment(aug_plus=True)
    params = augment.sample_params(3, generator=torch.Generator().manual_seed(0))
    params.jitter[:] = False
    params.gray[:] = False
    params.blur[:] = False
    expected = TF.normalize(images.float() / 255, loader.IMAGENET_MEAN, loader.IMAGENET_STD)
    torch.testing.assert_close(augment.apply(images, params), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(augment.apply(images.float() / 255, params), expected, atol=1e-6, rtol=0)


def test_jitter_on_pil_images_is_close_to_the_reference():
    """The float path against PIL's uint8 operations (the reference's numerics) for brightness,
    contrast, saturation, grayscale and blur: within a few grey levels."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(1, 3, 6, 6, generator=g)
    u8 = (torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear") * 255).round().to(torch.uint8)
    pil = TF.to_pil_image(u8[0])
    steps = [(lambda im: TF.adjust_brightness(im, 1.3), lambda x: batch_aug.adjust_brightness_(x, 1.3)),
             (lambda im: TF.adjust_contrast(im, 0.7), lambda x: batch_aug.adjust_contrast_(x, 0.7)),
             (lambda im: TF.adjust_saturation(im, 1.4), lambda x: batch_aug.adjust_saturation_(x, 1.4)),
             (lambda im: TF.rgb_to_grayscale(im, 3), lambda x: batch_aug.grayscale_(x)),
             (lambda im: im.filter(ImageFilter.GaussianBlur(1.2)), lambda x: batch_aug.blur_(x, 1.2))]
    x = u8.float() / 255
    for pil_op, op in steps:
        pil = pil_op(pil)
        x = op(x)
    reference = TF.pil_to_tensor(pil).float() / 255
    diff = (x[0] - reference).abs()
    assert diff.mean() < 1.5 / 255 and diff.max() < 5 / 255


# --------------------------------------------------------------------------------------------------
# Worker side, shapes, determinism, devices
# --------------------------------------------------------------------------------------------------


def test_worker_crop_equals_torchvision_crop_and_flip():
    """The same box, filter and flip as torchvision's crop-then-resize on PIL; torch's uint8 kernel rounds
    differently from PIL's, by a grey level or so even on noise."""
    g = torch.Generator().manual_seed(0)
    image = TF.to_pil_image(torch.randint(0, 256, (3, 50, 70), generator=g, dtype=torch.uint8))
    worker = RandomResizedCropFlip(24)
    for params in [(3, 5, 30, 40, False), (0, 0, 50, 70, True), (10, 20, 20, 15, True)]:
        out = worker.apply(image, params)
        crop = TF.resized_crop(image, *params[:4], [24, 24], interpolation=transforms.InterpolationMode.BILINEAR,
                               antialias=True)
        if params[4]:
            crop = TF.hflip(crop)
        assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
        diff = (out.int() - TF.pil_to_tensor(crop).int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.3, (params, diff.max())
    torch.manual_seed(0)
    q, k = crop_flip_transform(24)(image)
    assert q.shape == k.shape == (3, 24, 24) and q.dtype == k.dtype == torch.uint8
    assert not torch.equal(q, k)


def test_worker_crop_uses_torchvision_draws():
    """Same global-RNG stream as torchvision's RandomResizedCrop then RandomHorizontalFlip."""
    image = Image.new("RGB", (64, 48))
    torch.manual_seed(7)
    ours = [RandomResizedCropFlip(16).get_params(image) for _ in range(20)]
    torch.manual_seed(7)
    theirs = []
    for _ in range(20):
        box = transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])
        theirs.append(tuple(box) + (bool(torch.rand(1) < 0.5),))
    assert ours == theirs


@pytest.mark.parametrize("aug_plus", [False, True], ids=["v1", "v2"])
def test_parameters_drawn_in_the_worker(aug_plus):
    """crop_flip_transform(..., aug_plus) draws the colour parameters in the worker from its (per-sample
    seeded) torch RNG; after the default collate BatchAugment applies exactly those."""
    g = torch.Generator().manual_seed(0)
    images = [TF.to_pil_image(torch.randint(0, 256, (3, 30, 40), generator=g, dtype=torch.uint8)) for _ in range(5)]
    transform = crop_flip_transform(16, aug_plus)
    samples = []
    for i, image in enumerate(images):
        torch.manual_seed(100 + i)
        samples.append((transform(image), 0))
    torch.manual_seed(100)
    assert all(torch.equal(a, b) for a, b in zip(transform(images[0])[1], samples[0][0][1]))  # reproducible
    batch, _ = torch.utils.data.default_collate(samples)
    (q, q_params), (k, k_params) = batch
    assert q.dtype == torch.uint8 and q.shape == (5, 3, 16, 16) and q_params.shape == (5, 12)
    augment = BatchAugment(aug_plus=aug_plus)
    out_q, out_k = augment(batch)
    torch.testing.assert_close(out_q, augment.apply(q, AugParams.from_tensor(q_params)), atol=0, rtol=0)
    torch.testing.assert_close(out_k, augment.apply(k, AugParams.from_tensor(k_params)), atol=0, rtol=0)
    params = AugParams.from_tensor(q_params)
    assert params.order.sort(dim=1).values.tolist() == [[0, 1, 2, 3]] * 5
    assert bool(params.jitter.all()) or aug_plus
    # the round trip through to_tensor is exact
    drawn = augment.sample_params(7, generator=torch.Generator().manual_seed(1))
    back = AugParams.from_tensor(drawn.to_tensor())
    for name in ("jitter", "order", "brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma"):
        assert torch.equal(getattr(back, name), getattr(drawn, name)), name


@pytest.mark.parametrize("aug_plus", [False, True], ids=["v1", "v2"])
def test_forward_shapes_dtypes_and_determinism(aug_plus):
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    augment = BatchAugment(aug_plus=aug_plus)
    out = augment(images, generator=torch.Generator().manual_seed(3))
    assert out.dtype == torch.float32 and out.shape == (5, 3, 16, 16) and out.is_contiguous()
    again = augment(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    pair = augment([images, images], generator=torch.Generator().manual_seed(3))
    assert isinstance(pair, list) and len(pair) == 2
    assert torch.equal(pair[0], out) and not torch.equal(pair[0], pair[1])
    lo = (0 - torch.tensor(loader.IMAGENET_MEAN)) / torch.tensor(loader.IMAGENET_STD)
    hi = (1 - torch.tensor(loader.IMAGENET_MEAN)) / torch.tensor(loader.IMAGENET_STD)
    assert (out >= lo.view(1, 3, 1, 1) - 1e-5).all() and (out <= hi.view(1, 3, 1, 1) + 1e-5).all()
    assert augment(images[:0]).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError):
        augment(images[:, :1])


def test_output_memory_is_never_reused_while_in_use():
    augment = BatchAugment(aug_plus=True)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    first = augment(images)
    kept = first.clone()
    view = first[1:3]
    ptr = first.data_ptr()
    del first
    second = augment(images)
    assert second.data_ptr() != ptr  # a view of the first batch is still alive
    assert torch.equal(view, kept[1:3])
    # a later batch must never write into memory that a live batch still uses (reuse itself is a
    # speed matter, measured by scripts/bench_data.py, and depends on when Python frees objects)
    third = augment(images)
    assert third.data_ptr() not in (second.data_ptr(), ptr)  # the view keeps the first batch alive
    assert torch.equal(view, kept[1:3])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    for aug_plus in (False, True):
        augment = BatchAugment(aug_plus=aug_plus)
        params = augment.sample_params(16, generator=torch.Generator().manual_seed(0))
        cpu = augment.apply(images, params)
        gpu = augment.to("cuda").apply(images.cuda(), params)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_does_not_make_the_host_wait():
    """After a warm-up batch, augmenting a batch (v1 and v2, partial masks, blur) queues work without one
    host synchronisation: its parameters travel in one copy from pinned memory."""
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device="cuda")
    for aug_plus in (True, False):
        augment = BatchAugment(aug_plus=aug_plus).to("cuda")
        params = augment.sample_params(32, generator=torch.Generator().manual_seed(1))
        augment.apply(images, params)  # warm-up: constants, allocator
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = augment.apply(images, params)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(out).all()
