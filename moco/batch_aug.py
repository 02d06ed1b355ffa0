"""A faster MoCo v1/v2 augmentation path with the same random draws as moco/loader.py.

The reference recipes (moco/loader.py, SPEC §3) run every step on PIL images inside the DataLoader
workers and ship normalised float32 crops to the main process. This module splits the recipe in two:

* Worker side (`RandomResizedCropFlip`, `crop_flip_transform`): decode once, and per crop draw the
  RandomResizedCrop box exactly as torchvision does (`RandomResizedCrop.get_params`, scale (0.2, 1),
  ratio (3/4, 4/3), same fallback), resize it with the same PIL bilinear (antialiased) resize, apply the
  horizontal flip (p = 0.5) and return a uint8 CHW tensor. uint8 crops are 4x less inter-process traffic
  than float32 ones.
* Batch side (`BatchAugment`): takes the collated uint8 batch N x 3 x H x W on any device (the GPU in
  training) and applies the colour part of the recipe with per-sample random parameters drawn from the
  same distributions as torchvision's transforms, then converts to float and normalises:

  - v1 (`aug_plus=False`): RandomGrayscale(p=0.2) -> ColorJitter(0.4, 0.4, 0.4, 0.4).
  - v2 (`aug_plus=True`): RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8) -> RandomGrayscale(p=0.2)
    -> RandomApply([GaussianBlur(sigma ~ U(0.1, 2.0))], p=0.5).

  ColorJitter draws a random order of its four operations per image (a uniform random permutation, as
  `ColorJitter.get_params` does with `randperm(4)`) and brightness / contrast / saturation factors
  uniform in [0.6, 1.4] and a hue shift uniform in [-h, h]. The operations follow torchvision's tensor
  semantics on float images in [0, 1] (`torchvision.transforms.functional` on tensors): brightness scales,
  contrast blends with the mean of the image's grayscale, saturation blends with the grayscale, each
  result clamped to [0, 1]; hue rotates the HSV hue. Grayscale uses the weights (0.2989, 0.587, 0.114).
  The blur is a true Gaussian (PIL's `GaussianBlur(radius)` approximates a Gaussian whose standard
  deviation is the radius with three box blurs) truncated at ceil(3 sigma) per image, with replicated
  borders as PIL does.

  The horizontal flip stays in the worker: it commutes with all of these (pointwise or mirror-symmetric)
  operations. What changes against the reference is numerics only: the reference rounds to uint8 after
  every PIL step and uses PIL's integer colour arithmetic and its box-blur approximation; this path
  computes in float32.

Parameters are always drawn on the CPU (`sample_params`, the global torch RNG or a CPU
`torch.Generator`), so the random stream does not depend on the device and the host decides the
execution plan without synchronising with the GPU. On the CPU the batch is processed in small chunks of
images that share the same sequence of operations (so every chunk stays in cache and no work is wasted
on identity operations); on other devices the whole batch is processed at once with masked subsets.

Typical use::

    train_dataset = datasets.ImageFolder(traindir, crop_flip_transform(224))   # yields [q_u8, k_u8]
    augment = BatchAugment(aug_plus=args.aug_plus).cuda(gpu)
    for (images, _) in train_loader:
        im_q = augment(images[0].cuda(gpu, non_blocking=True))
        im_k = augment(images[1].cuda(gpu, non_blocking=True))
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from moco.loader import IMAGENET_MEAN, IMAGENET_STD, TwoCropsTransform

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's tensor rgb_to_grayscale

# Indices of the four ColorJitter operations, in torchvision's numbering (fn_idx of ColorJitter.get_params).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


# ----------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------
class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) followed by RandomHorizontalFlip(p), returning uint8 C x H x W.

    The crop box comes from torchvision's own `RandomResizedCrop.get_params` and the resize is
    torchvision's `resized_crop` with bilinear interpolation (PIL's antialiased bilinear for PIL input),
    so for the same box the pixels equal the reference pipeline's crop before its colour operations.
    """

    def __init__(self, size=224, scale=(0.2, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0), flip_p=0.5):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p

    def get_params(self, img):
        """(top, left, height, width, flip) for `img`, drawn from the global torch RNG like torchvision."""
        i, j, h, w = transforms.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(1) < self.flip_p)
        return i, j, h, w, flip

    def apply(self, img, params):
        i, j, h, w, flip = params
        out = TF.resized_crop(img, i, j, h, w, list(self.size),
                              interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)
        if isinstance(out, Image.Image):
            if flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return TF.pil_to_tensor(out)
        return out.flip(-1) if flip else out

    def __call__(self, img):
        return self.apply(img, self.get_params(img))

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
                f"ratio={tuple(round(r, 4) for r in self.ratio)}, flip_p={self.flip_p})")


def crop_flip_transform(crop_size=224):
    """The worker-side transform of the fast path: `[q, k]`, two uint8 3 x crop x crop crops of one image.

    Use it as the ImageFolder transform; the default collate then yields `[q_batch, k_batch]` of uint8
    N x 3 x crop x crop tensors for `BatchAugment`.
    """
    return TwoCropsTransform(RandomResizedCropFlip(crop_size, scale=(0.2, 1.0)))


# ----------------------------------------------------------------------------------------------------
# Batch side: per-sample parameters
# ----------------------------------------------------------------------------------------------------
@dataclass
class AugParams:
    """Per-sample parameters of one batch (CPU tensors, first dimension N).

    jitter: bool, whether ColorJitter is applied (always True for v1).
    order: long N x 4, the order of the jitter operations (a permutation of BRIGHTNESS..HUE).
    brightness, contrast, saturation: float factors; hue: float shift in [-0.5, 0.5].
    gray: bool, grayscale applied.  blur: bool, Gaussian blur applied; sigma: its standard deviation.
    """
    jitter: torch.Tensor
    order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    def __len__(self):
        return self.jitter.shape[0]

    def select(self, index):
        return AugParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})


def _factor_range(value, center=1.0):
    return (max(0.0, center - value), center + value)


class BatchAugment(torch.nn.Module):
    """The colour/blur part of the MoCo v1 (`aug_plus=False`) or v2 (`aug_plus=True`) recipe on a batch.

    `forward(images)` takes uint8 N x 3 x H x W (already cropped and flipped, e.g. by
    `crop_flip_transform`) or float images in [0, 1], and returns the augmented, normalised float32 batch
    on the same device. Each image gets its own parameters (`sample_params`), drawn like torchvision's
    transforms in moco/loader.py. `chunk_size` is how many images are processed together (images with
    the same sequence of operations are grouped first); None means 4 on the CPU (cache-sized) and the
    whole batch on other devices.
    """

    def __init__(self, aug_plus=False, mean=IMAGENET_MEAN, std=IMAGENET_STD, chunk_size=None,
                 blur_truncate=3.0):
        super().__init__()
        self.aug_plus = bool(aug_plus)
        if self.aug_plus:  # moco_v2_augmentation
            self.jitter_strength = (0.4, 0.4, 0.4, 0.1)
            self.p_jitter, self.p_gray, self.p_blur = 0.8, 0.2, 0.5
            self.sigma_range = (0.1, 2.0)
        else:  # moco_v1_augmentation
            self.jitter_strength = (0.4, 0.4, 0.4, 0.4)
            self.p_jitter, self.p_gray, self.p_blur = 1.0, 0.2, 0.0
            self.sigma_range = (0.1, 2.0)  # unused
        b, c, s, h = self.jitter_strength
        self.brightness_range = _factor_range(b)
        self.contrast_range = _factor_range(c)
        self.saturation_range = _factor_range(s)
        self.hue_range = (-h, h)
        self.chunk_size = chunk_size
        self.blur_truncate = float(blur_truncate)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self):
        return (f"aug_plus={self.aug_plus}, jitter={self.jitter_strength}, p_jitter={self.p_jitter}, "
                f"p_gray={self.p_gray}, p_blur={self.p_blur}, sigma={self.sigma_range}, "
                f"chunk_size={self.chunk_size}")

    # ---------------------------------------------------------------------------------- parameters
    def sample_params(self, n, generator=None):
        """Draw the parameters of `n` images on the CPU (global torch RNG, or a CPU `generator`)."""
        g = generator

        def uniform(lo, hi):
            return torch.empty(n).uniform_(lo, hi, generator=g)

        jitter = torch.rand(n, generator=g) < self.p_jitter
        order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)  # a uniform random permutation per row
        brightness = uniform(*self.brightness_range)
        contrast = uniform(*self.contrast_range)
        saturation = uniform(*self.saturation_range)
        hue = uniform(*self.hue_range)
        gray = torch.rand(n, generator=g) < self.p_gray
        blur = torch.rand(n, generator=g) < self.p_blur
        sigma = uniform(*self.sigma_range)
        return AugParams(jitter, order, brightness, contrast, saturation, hue, gray, blur, sigma)

    # ---------------------------------------------------------------------------------- forward
    def forward(self, images, params=None, generator=None):
        if params is None:
            params = self.sample_params(images.shape[0], generator)
        return self.apply(images, params)

    def program(self, params, k):
        """The sequence of operations of image `k`: tuples ('jitter', op) / ('gray',) / ('blur',)."""
        jitter = [("jitter", int(o)) for o in params.order[k]] if bool(params.jitter[k]) else []
        gray = [("gray",)] if bool(params.gray[k]) else []
        if self.aug_plus:
            return tuple(jitter + gray + ([("blur",)] if bool(params.blur[k]) else []))
        return tuple(gray + jitter)

    def _plan(self, params, device):
        """Chunks of sample indices: a list of (index list, is_identity_range)."""
        n = len(params)
        chunk = self.chunk_size
        if chunk is None:
            chunk = 4 if device.type == "cpu" else n
        chunk = max(1, min(int(chunk), n))
        if chunk >= n:
            return [list(range(n))]
        groups = {}
        for k in range(n):
            groups.setdefault(self.program(params, k), []).append(k)
        plan = []
        for members in groups.values():
            for start in range(0, len(members), chunk):
                plan.append(members[start:start + chunk])
        return plan

    def apply(self, images, params):
        """Apply the augmentation with the given per-sample `params` to `images` (N x 3 x H x W)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W images, got shape {tuple(images.shape)}")
        if len(params) != images.shape[0]:
            raise ValueError(f"{len(params)} parameter sets for {images.shape[0]} images")
        device = images.device
        n = images.shape[0]
        out = torch.empty(images.shape, dtype=torch.float32, device=device)
        if n == 0:
            return out
        for members in self._plan(params, device):
            whole = len(members) == n
            if whole:
                x = self._to_float(images)
                sub = params
            else:
                index = torch.tensor(members, dtype=torch.long)
                x = self._to_float(images.index_select(0, index.to(device)))
                sub = params.select(index)
            self._augment(x, sub)
            x.sub_(self.mean).div_(self.std)
            if whole:
                out.copy_(x)
            else:
                out.index_copy_(0, index.to(device), x)
        return out

    @staticmethod
    def _to_float(x):
        if x.dtype == torch.uint8:
            return x.to(torch.float32).div_(255.0)
        return x.to(torch.float32, copy=True).contiguous()

    def _augment(self, x, p):
        """In place on float x (m x 3 x H x W, values in [0, 1]) with the parameters `p` of these m images."""
        if not self.aug_plus:
            self._masked(x, p.gray, lambda y, q: _grayscale_(y), p)
            self._jitter(x, p, p.jitter)
            return
        self._jitter(x, p, p.jitter)
        self._masked(x, p.gray, lambda y, q: _grayscale_(y), p)
        self._masked(x, p.blur, lambda y, q: _gaussian_blur_(y, q.sigma, self.blur_truncate), p)

    def _jitter(self, x, p, active):
        for stage in range(4):
            for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
                mask = active & (p.order[:, stage] == op)
                self._masked(x, mask, self._jitter_op(op), p)

    @staticmethod
    def _jitter_op(op):
        dev = lambda t, y: t.to(y.device, non_blocking=True)  # noqa: E731
        if op == BRIGHTNESS:
            return lambda y, q: adjust_brightness_(y, dev(q.brightness, y))
        if op == CONTRAST:
            return lambda y, q: adjust_contrast_(y, dev(q.contrast, y))
        if op == SATURATION:
            return lambda y, q: adjust_saturation_(y, dev(q.saturation, y))
        return lambda y, q: adjust_hue_(y, dev(q.hue, y))

    @staticmethod
    def _masked(x, mask, fn, p):
        """fn(y, params) in place on the images of x selected by the CPU bool `mask`."""
        count = int(mask.sum())
        if count == 0:
            return
        if count == mask.numel():
            fn(x, p)
            return
        index = mask.nonzero().squeeze(1)
        dev_index = index.to(x.device, non_blocking=True)
        y = x.index_select(0, dev_index)
        fn(y, p.select(index))
        x.index_copy_(0, dev_index, y)


# ----------------------------------------------------------------------------------------------------
# Batched functional operations (in place on float N x 3 x H x W in [0, 1], one factor per image)
# ----------------------------------------------------------------------------------------------------
def _per_image(factor, x):
    return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def rgb_to_grayscale(x):
    """N x 1 x H x W luma with torchvision's weights."""
    wr, wg, wb = GRAY_WEIGHTS
    gray = x[:, 0:1] * wr
    gray.add_(x[:, 1:2], alpha=wg).add_(x[:, 2:3], alpha=wb)
    return gray


def _grayscale_(x):
    x.copy_(rgb_to_grayscale(x).expand_as(x))
    return x


def adjust_brightness_(x, factor):
    """torchvision adjust_brightness per image: clamp(factor * x, 0, 1)."""
    return x.mul_(_per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast_(x, factor):
    """torchvision adjust_contrast per image: blend with the mean of the grayscale image, clamp."""
    f = _per_image(factor, x)
    weights = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)
    mean = (x.mean(dim=(2, 3)) * weights).sum(dim=1).view(-1, 1, 1, 1)  # = mean of the grayscale image
    return x.mul_(f).add_((1.0 - f) * mean).clamp_(0.0, 1.0)


def adjust_saturation_(x, factor):
    """torchvision adjust_saturation per image: blend with the grayscale image, clamp."""
    f = _per_image(factor, x)
    gray = rgb_to_grayscale(x)
    return x.mul_(f).addcmul_(gray, 1.0 - f).clamp_(0.0, 1.0)


_HUE_OFFSETS = {}


def adjust_hue_(x, hue):
    """torchvision adjust_hue per image: shift the HSV hue by `hue` (fractions of a turn), keep S and V.

    With V = max, C = max - min and the hue H in sixths of a turn, the shifted image is
    channel_n = V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + H') mod 6 and n = 5, 3, 1 for R, G, B:
    the closed form of the piecewise HSV -> RGB conversion. The hue of the input follows torchvision's
    RGB -> HSV (ties between maximal channels give the same hue either way).
    """
    maxc, argmax = x.max(dim=1)
    minc = x.amin(dim=1)
    chroma = maxc - minc
    # numerator of the hue inside the sextant of the maximal channel: g - b, b - r or r - g
    diff = torch.empty_like(x)
    torch.sub(x[:, 1], x[:, 2], out=diff[:, 0])
    torch.sub(x[:, 2], x[:, 0], out=diff[:, 1])
    torch.sub(x[:, 0], x[:, 1], out=diff[:, 2])
    num = diff.gather(1, argmax.unsqueeze(1)).squeeze(1)
    # H' = 2 * argmax + num / C + 6 * hue (mod 6 below); num is exactly 0 where C is 0
    base = torch.add(_per_image(hue, x).squeeze(1) * 6.0, argmax, alpha=2)
    h6 = torch.addcdiv(base, num, chroma.clamp_min(1e-12))
    key = (x.device, x.dtype)
    if key not in _HUE_OFFSETS:
        _HUE_OFFSETS[key] = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.add(h6.unsqueeze(1), _HUE_OFFSETS[key]).remainder_(6.0)
    t = torch.minimum(k, torch.rsub(k, 4.0)).clamp_(0.0, 1.0)
    torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), t, value=-1.0, out=x)
    return x


def gaussian_kernels(sigma, truncate=3.0, dtype=torch.float32):
    """Normalised 1-D Gaussian kernels, one row per sigma, zero beyond ceil(truncate * sigma) taps.

    All rows share the length 2 R + 1 with R the largest radius, so the result of an image does not
    depend on which other images are blurred with it.
    """
    sigma = sigma.to(torch.float64)
    radii = torch.ceil(truncate * sigma).clamp_min(1)
    r = int(radii.max())
    taps = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2)
    k = torch.where(taps.abs()[None, :] <= radii[:, None], k, torch.zeros_like(k))
    return (k / k.sum(dim=1, keepdim=True)).to(dtype), r


def _gaussian_blur_(x, sigma, truncate=3.0):
    """Separable Gaussian blur of each image with its own sigma, borders replicated; in place."""
    m, c, h, w = x.shape
    kernels, r = gaussian_kernels(sigma, truncate, x.dtype)
    kernels = kernels.to(x.device, non_blocking=True)
    weight = kernels.repeat_interleave(c, dim=0)  # (m * c) x K
    y = F.pad(x, (r, r, r, r), mode="replicate").view(1, m * c, h + 2 * r, w + 2 * r)
    y = F.conv2d(y, weight.view(m * c, 1, 1, 2 * r + 1), groups=m * c)  # along W
    y = F.conv2d(y, weight.view(m * c, 1, 2 * r + 1, 1), groups=m * c)  # along H
    x.copy_(y.view(m, c, h, w))
    return x


def gaussian_blur(x, sigma, truncate=3.0):
    """Out-of-place `_gaussian_blur_` on a float N x C x H x W batch with per-image `sigma` (N,)."""
    return _gaussian_blur_(x.clone(), sigma, truncate)


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


__all__ = [
    "AugParams", "BatchAugment", "RandomResizedCropFlip", "crop_flip_transform", "adjust_brightness_",
    "adjust_contrast_", "adjust_saturation_", "adjust_hue_", "rgb_to_grayscale", "gaussian_kernels",
    "gaussian_blur", "normalize", "GRAY_WEIGHTS",
]
