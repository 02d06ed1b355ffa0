"""A faster MoCo v1/v2 augmentation path with the same random draws as moco/loader.py.

The reference recipes (moco/loader.py, SPEC §3) run every step on PIL images inside the DataLoader
workers and ship normalised float32 crops to the main process. This module splits the recipe in two.

Worker side (`RandomResizedCropFlip`, `crop_flip_transform`): decode once and, per crop, draw the
RandomResizedCrop box with torchvision's own `RandomResizedCrop.get_params` (scale (0.2, 1), ratio
(3/4, 4/3), same fallback), resize it with torchvision's `resized_crop` (PIL bilinear, antialiased),
draw the horizontal flip (p = 0.5) and return a uint8 3 x S x S tensor: 4x less inter-process traffic
than float32 crops, and no float work in the workers.

Batch side (`BatchAugment`): takes the collated uint8 batch N x 3 x S x S on any device (the GPU in
training) and applies the colour part of the recipe with per-image random parameters drawn from the
same distributions as torchvision's transforms, then converts to float and normalises:

* v1 (`aug_plus=False`): RandomGrayscale(p=0.2) -> ColorJitter(0.4, 0.4, 0.4, 0.4).
* v2 (`aug_plus=True`): RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8) -> RandomGrayscale(p=0.2)
  -> RandomApply([GaussianBlur(sigma ~ U(0.1, 2.0))], p=0.5).

ColorJitter applies its four operations in a random order per image (a uniform random permutation, as
`ColorJitter.get_params` does with `randperm(4)`), with brightness / contrast / saturation factors
uniform in [0.6, 1.4] and a hue shift uniform in [-h, h]. The operations follow torchvision's tensor
semantics on float images in [0, 1] (`torchvision.transforms.functional` on tensors): brightness scales,
contrast blends with the mean of the image's grayscale, saturation blends with the grayscale, hue shifts
the HSV hue, results stay in [0, 1]; grayscale uses the weights (0.2989, 0.587, 0.114).

The blur reproduces PIL's `GaussianBlur(radius=sigma)` operator (the reference's `loader.GaussianBlur`):
PIL approximates a Gaussian of standard deviation `radius` by three passes of an "extended" box filter
per axis (box radius l + a, integer part l and fractional end weight a chosen so that the three passes
have variance radius^2; Gwosdek et al. 2011), each pass replicating the edge pixels. This module applies
the same three passes in float32; `blur_kind="gaussian"` uses a true Gaussian truncated at 3 sigma instead.

The horizontal flip stays in the worker: every batch-side operation commutes with it (pointwise or
mirror-symmetric). What differs from the reference is numerics only: PIL rounds to uint8 after every
step and uses its own integer formulas (299/587/114 luma; hue shifted on uint8 HSV in steps of 1/255
turn; blur passes rounded, so that for sigma below about 0.5 PIL often leaves pixels unchanged where the
float blur moves them by up to a grey level or two); this path computes in float32 with torchvision's
tensor formulas.

Parameters are always drawn on the CPU (`sample_params`: the global torch RNG or a CPU
`torch.Generator`), so the stream does not depend on the device and the host plans the work without
synchronising with the GPU. On the CPU each image is processed on its own with scalar parameters and
preallocated cache-sized buffers (tiny images excepted); on other devices the whole batch is processed
at once, each operation on the subset of images that draws it.

Parameters can also be drawn in the workers (`crop_flip_transform(crop, aug_plus)`), which keeps every
random draw of a sample in the worker as in the reference, so per-sample seeding stays meaningful.

Typical use::

    dataset = datasets.ImageFolder(traindir, crop_flip_transform(224, aug_plus))  # [(q_u8, q_p), (k_u8, k_p)]
    augment = BatchAugment(aug_plus=aug_plus).cuda(gpu)
    for images, _ in loader:  # images = [[q_u8 batch, q params], [k_u8 batch, k params]]
        im_q, im_k = augment([[x.cuda(gpu, non_blocking=True), p] for x, p in images])
"""
import math
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from moco.loader import IMAGENET_MEAN, IMAGENET_STD

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's tensor rgb_to_grayscale

# The four ColorJitter operations, numbered as `ColorJitter.get_params` numbers them (fn_idx).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

# ----------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) then RandomHorizontalFlip(flip_p); returns uint8 3 x H x W.

    The box comes from torchvision's `RandomResizedCrop.get_params` and the resize is torchvision's
    `resized_crop` (bilinear, antialiased), so for the same box and flip the pixels equal the
    reference pipeline's crop before its colour operations.
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
                f"ratio=({self.ratio[0]:.4f}, {self.ratio[1]:.4f}), flip_p={self.flip_p})")


class TwoCropsUint8:
    """Worker-side transform of the fast path: two uint8 crops of one image, optionally with the
    parameters of their colour augmentation.

    With `aug_plus=None` it returns `[q, k]` (uint8 3 x S x S tensors) and BatchAugment draws the
    colour parameters in the main process. With `aug_plus` True/False (v2/v1) it returns
    `[(q, q_params), (k, k_params)]`, the parameters drawn here from the worker's torch RNG (one row of
    `AugParams.to_tensor()` each): then everything random about a sample is drawn in the worker, as in
    the reference pipeline, so a dataset that seeds each sample (moco.data.RobustImageFolder) makes the
    whole augmentation reproducible independently of batches, workers and resumption. The default
    collate turns either form into what `BatchAugment.forward` takes.
    """

    def __init__(self, crop_size=224, aug_plus=None):
        self.crop = RandomResizedCropFlip(crop_size, scale=(0.2, 1.0))
        self.aug_plus = aug_plus
        self.sampler = None if aug_plus is None else BatchAugment(aug_plus, reuse_memory=False)

    def one(self, image):
        x = self.crop(image)
        if self.sampler is None:
            return x
        return x, self.sampler.sample_params_tensor(1)[0]

    def __call__(self, image):
        return [self.one(image), self.one(image)]

    def __repr__(self):
        return f"{type(self).__name__}({self.crop!r}, aug_plus={self.aug_plus})"


def crop_flip_transform(crop_size=224, aug_plus=None):
    """The ImageFolder transform of the fast path (`TwoCropsUint8`): `[q, k]` uint8 crops, or with
    `aug_plus` given `[(q, q_params), (k, k_params)]` with the colour parameters drawn in the worker."""
    return TwoCropsUint8(crop_size, aug_plus)


# ----------------------------------------------------------------------------------------------------
# Per-image parameters
# ----------------------------------------------------------------------------------------------------


@dataclass
class AugParams:
    """Parameters of a batch of N images (CPU tensors, first dimension N).

    jitter: bool, ColorJitter applied (always True for v1). order: long N x 4, the order of the jitter
    operations (a permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE). brightness, contrast,
    saturation: factors. hue: shift in turns. gray: bool, grayscale applied. blur: bool, blur applied.
    sigma: the blur's standard deviation (PIL radius).
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

    def to_tensor(self):
        """N x 12 float64: jitter, order (4 columns), brightness, contrast, saturation, hue, gray, blur,
        sigma (collates like any tensor; `from_tensor` reads it back exactly)."""
        cols = [self.jitter[:, None], self.order] + [getattr(self, name)[:, None] for name in
                                                     ("brightness", "contrast", "saturation", "hue", "gray",
                                                      "blur", "sigma")]
        return torch.cat([c.to(torch.float64) for c in cols], dim=1)

    @staticmethod
    def from_tensor(t):
        t = torch.as_tensor(t).cpu().reshape(-1, 12)
        return AugParams(jitter=t[:, 0] != 0, order=t[:, 1:5].round().long(),
                         brightness=t[:, 5].float(), contrast=t[:, 6].float(), saturation=t[:, 7].float(),
                         hue=t[:, 8].float(), gray=t[:, 9] != 0, blur=t[:, 10] != 0, sigma=t[:, 11].float())


def _factor_range(value, center=1.0):
    return (max(0.0, center - value), center + value)


# ----------------------------------------------------------------------------------------------------
# Batch side
# ----------------------------------------------------------------------------------------------------


class OutputPool:
    """Reuses the memory of CPU output batches that nothing references any more.

    A fresh 64 x 3 x 224 x 224 float32 batch is 38 MB that the kernel must map and zero page by page on
    first touch, which costs a large share of the CPU work per image; the reference pipeline pays
    the same in its workers' shared memory. Each batch handed out is a tensor over a bytearray owned by
    the pool (`torch.frombuffer`): its storage holds a reference to the bytearray for as long as any
    tensor or view of it lives, so a bytearray whose reference count is back to the pool's own is free
    and is handed out again. Off (plain `torch.empty`) where reference counts cannot tell, or for
    anything but CPU float tensors.
    """

    def __init__(self, max_buffers=8):
        self.max_buffers = max_buffers
        self.buffers = []
        probe = [bytearray(8)]
        self._free_count = sys.getrefcount(probe[0])  # pool list + getrefcount's argument
        tensor = torch.frombuffer(probe[0], dtype=torch.uint8)
        self.enabled = sys.getrefcount(probe[0]) > self._free_count  # the tensor holds the buffer
        del tensor
        self.enabled = self.enabled and sys.getrefcount(probe[0]) == self._free_count

    def empty(self, shape, dtype=torch.float32, device="cpu"):
        if not self.enabled or torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        for i in range(len(self.buffers)):
            if len(self.buffers[i]) == nbytes and sys.getrefcount(self.buffers[i]) == self._free_count:
                return torch.frombuffer(self.buffers[i], dtype=dtype).view(shape)
        if len(self.buffers) >= self.max_buffers:
            self.buffers = [b for b in self.buffers if sys.getrefcount(b) > self._free_count]
            if len(self.buffers) >= self.max_buffers:
                return torch.empty(shape, dtype=dtype)
        self.buffers.append(bytearray(nbytes))
        return torch.frombuffer(self.buffers[-1], dtype=dtype).view(shape)


class BatchAugment(torch.nn.Module):
    """The colour and blur part of the MoCo v1 (`aug_plus=False`) or v2 (`aug_plus=True`) recipe.

    `forward(images)` takes a uint8 N x 3 x H x W batch (already cropped and flipped, e.g. by
    `crop_flip_transform`) or float images in [0, 1], or a list of such batches (each gets its own
    parameters), and returns the augmented, ImageNet-normalised float32 batch(es) on the same device.
    Each image gets its own parameters (`sample_params`). `per_image` selects the execution: True
    processes image by image with scalar parameters (fastest on the CPU), False the whole batch at once
    (for GPUs, and on the CPU for tiny images); None picks by the device and image size. On the CPU
    `reuse_memory` recycles the memory of output batches that are no longer referenced (`OutputPool`).
    `blur_kind` is "pil" (PIL's three extended box passes) or "gaussian" (a true Gaussian truncated at
    3 sigma).
    """

    def __init__(self, aug_plus=False, mean=IMAGENET_MEAN, std=IMAGENET_STD, per_image=None, blur_kind="pil",
                 reuse_memory=True):
        super().__init__()
        if blur_kind not in ("pil", "gaussian"):
            raise ValueError(f"blur_kind must be 'pil' or 'gaussian', got {blur_kind!r}")
        self.aug_plus = bool(aug_plus)
        if self.aug_plus:  # loader.moco_v2_augmentation
            self.jitter_strength = (0.4, 0.4, 0.4, 0.1)
            self.p_jitter, self.p_gray, self.p_blur = 0.8, 0.2, 0.5
        else:  # loader.moco_v1_augmentation
            self.jitter_strength = (0.4, 0.4, 0.4, 0.4)
            self.p_jitter, self.p_gray, self.p_blur = 1.0, 0.2, 0.0
        self.sigma_range = (0.1, 2.0)
        b, c, s, h = self.jitter_strength
        self.brightness_range = _factor_range(b)
        self.contrast_range = _factor_range(c)
        self.saturation_range = _factor_range(s)
        self.hue_range = (-h, h)
        self.per_image = per_image
        self.blur_kind = blur_kind
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._workspace = {}
        self._pool = OutputPool() if reuse_memory else None

    def extra_repr(self):
        return (f"aug_plus={self.aug_plus}, jitter={self.jitter_strength}, p_jitter={self.p_jitter}, "
                f"p_gray={self.p_gray}, p_blur={self.p_blur}, sigma={self.sigma_range}, "
                f"blur_kind={self.blur_kind!r}, per_image={self.per_image}")

    # ------------------------------------------------------------------------------ parameters
    def sample_params(self, n, generator=None):
        """Draw the parameters of `n` images on the CPU (the global torch RNG, or a CPU `generator`)."""
        return AugParams.from_tensor(self.sample_params_tensor(n, generator))

    def sample_params_tensor(self, n, generator=None):
        """`sample_params` as its N x 12 tensor (`AugParams.to_tensor` layout), from one draw of 12
        uniforms per image: u < p for the coin flips, the argsort of 4 uniforms for the jitter order (a
        uniform random permutation, like randperm(4)), lo + (hi - lo) u for the factors and sigma."""
        u = torch.rand(n, 12, generator=generator)
        ranges = [(0.0, 0.0)] * 5 + [self.brightness_range, self.contrast_range, self.saturation_range,
                                     self.hue_range, (0.0, 0.0), (0.0, 0.0), self.sigma_range]
        lo = torch.tensor([r[0] for r in ranges])
        span = torch.tensor([r[1] - r[0] for r in ranges])
        t = torch.addcmul(lo, u, span).double()
        t[:, 0] = (u[:, 0] < self.p_jitter).double()
        t[:, 1:5] = torch.argsort(u[:, 1:5], dim=1).double()
        t[:, 9] = (u[:, 9] < self.p_gray).double()
        t[:, 10] = (u[:, 10] < self.p_blur).double()
        return t

    # ------------------------------------------------------------------------------ forward
    def forward(self, images, params=None, generator=None):
        """Augment a batch, or each batch of a list (the loader's `[q, k]`).

        `images` is a tensor or a list whose items are tensors or `(tensor, params)` pairs (from
        `crop_flip_transform(..., aug_plus=...)`, params as collated `AugParams.to_tensor()` rows).
        Parameters not given are drawn with `sample_params(n, generator)`.
        """
        if isinstance(images, (list, tuple)) and len(images) == 2 and torch.is_tensor(images[0]) \
                and _looks_like_params(images[1]):
            images, params = images
        if isinstance(images, (list, tuple)):
            if params is not None:
                return [self.forward(x, p, generator) for x, p in zip(images, params)]
            return [self.forward(x, generator=generator) for x in images]
        if params is None:
            params = self.sample_params(images.shape[0], generator)
        elif not isinstance(params, AugParams):
            params = AugParams.from_tensor(params)
        return self.apply(images, params)

    def apply(self, images, params):
        """Augment `images` (N x 3 x H x W, uint8 or float in [0, 1]) with the given per-image `params`."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W images, got shape {tuple(images.shape)}")
        if len(params) != images.shape[0]:
            raise ValueError(f"{len(params)} parameter sets for {images.shape[0]} images")
        per_image = self.per_image
        if per_image is None:  # on the CPU, image by image unless the images are tiny (CIFAR-sized)
            per_image = images.device.type == "cpu" and images.shape[2] * images.shape[3] > 48 * 48
        if per_image:
            return self._apply_per_image(images, params)
        return self._apply_batched(images, params)

    def programs(self, params):
        """Per image, the sequence of operations it undergoes: a list of (name, value) tuples."""
        names = {BRIGHTNESS: "brightness", CONTRAST: "contrast", SATURATION: "saturation", HUE: "hue"}
        values = {name: getattr(params, name).tolist() for name in names.values()}
        jitter, order = params.jitter.tolist(), params.order.tolist()
        gray, blur, sigma = params.gray.tolist(), params.blur.tolist(), params.sigma.tolist()
        result = []
        for k in range(len(params)):
            ops_jitter = [(names[o], values[names[o]][k]) for o in order[k]] if jitter[k] else []
            ops_gray = [("gray", None)] if gray[k] else []
            if self.aug_plus:
                ops_blur = [("blur", sigma[k])] if blur[k] else []
                result.append(ops_jitter + ops_gray + ops_blur)
            else:
                result.append(ops_gray + ops_jitter)
        return result

    def _stats(self, device):
        """mean and std on `device` (the module need not have been moved there)."""
        if self.mean.device != device:
            return self.mean.to(device), self.std.to(device)
        return self.mean, self.std

    # ------------------------------------------------------------------------------ CPU execution
    def _apply_per_image(self, images, params):
        n, _, h, w = images.shape
        if self._pool is not None:
            out = self._pool.empty((n, 3, h, w), torch.float32, images.device)
        else:
            out = torch.empty((n, 3, h, w), dtype=torch.float32, device=images.device)
        ws = self._workspace.setdefault((images.device, h, w), {})
        mean, std = self._stats(images.device)
        x = _buffer(ws, "x", (1, 3, h, w), out)
        for k, program in enumerate(self.programs(params)):
            src = images[k:k + 1]
            x.copy_(src)
            if src.dtype == torch.uint8:
                x.div_(255.0)
            for name, value in program:
                if name == "brightness":
                    adjust_brightness_(x, value)
                elif name == "contrast":
                    adjust_contrast_(x, value)
                elif name == "saturation":
                    adjust_saturation_(x, value, ws)
                elif name == "hue":
                    adjust_hue_(x, value, ws)
                elif name == "gray":
                    grayscale_(x, ws)
                elif name == "blur":
                    blur_(x, value, self.blur_kind, ws)
            torch.sub(x, mean, out=out[k:k + 1]).div_(std)
        return out

    # ------------------------------------------------------------------------------ batched execution
    def _apply_batched(self, images, params):
        x = images.to(torch.float32)
        x = x.div_(255.0) if images.dtype == torch.uint8 else x.clone()
        x = x.contiguous()
        ops = {BRIGHTNESS: lambda y, q: adjust_brightness_(y, q.brightness),
               CONTRAST: lambda y, q: adjust_contrast_(y, q.contrast),
               SATURATION: lambda y, q: adjust_saturation_(y, q.saturation),
               HUE: lambda y, q: adjust_hue_(y, q.hue)}

        def jitter():
            for stage in range(4):
                for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE):
                    _masked_(x, params.jitter & (params.order[:, stage] == op), ops[op], params)

        def gray():
            _masked_(x, params.gray, lambda y, q: grayscale_(y), params)

        if self.aug_plus:
            jitter()
            gray()
            _masked_(x, params.blur, lambda y, q: blur_(y, q.sigma, self.blur_kind), params)
        else:
            gray()
            jitter()
        mean, std = self._stats(x.device)
        return x.sub_(mean).div_(std)


def _looks_like_params(value):
    return isinstance(value, AugParams) or (torch.is_tensor(value) and value.dim() == 2 and value.shape[1] == 12
                                            and value.is_floating_point())


def _masked_(x, mask, fn, params):
    """fn(y, params_of_y) in place on the images of x selected by the CPU bool `mask`."""
    count = int(mask.sum())
    if count == 0:
        return
    if count == mask.numel():
        fn(x, params)
        return
    index = mask.nonzero().squeeze(1)
    dev_index = index.to(x.device, non_blocking=True)
    y = x.index_select(0, dev_index)
    fn(y, params.select(index))
    x.index_copy_(0, dev_index, y)


# ----------------------------------------------------------------------------------------------------
# Functional operations, in place on float N x 3 x H x W images in [0, 1]. The factor is a Python number
# (the same for every image; the CPU path, one image at a time) or a tensor of N per-image factors.
# ----------------------------------------------------------------------------------------------------


def _buffer(ws, name, shape, like):
    if ws is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    key = (name, tuple(shape), like.dtype, like.device)
    buf = ws.get(key)
    if buf is None:
        buf = ws[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def _is_scalar(value):
    return isinstance(value, (int, float))


def _per_image(factor, x, dims=4):
    return torch.as_tensor(factor).to(device=x.device, dtype=x.dtype).view((-1,) + (1,) * (dims - 1))


def rgb_to_grayscale(x, out=None):
    """N x 1 x H x W luma with torchvision's weights (0.2989, 0.587, 0.114)."""
    wr, wg, wb = GRAY_WEIGHTS
    if out is None:
        out = torch.empty_like(x[:, :1])
    torch.mul(x[:, 0:1], wr, out=out)
    return out.add_(x[:, 1:2], alpha=wg).add_(x[:, 2:3], alpha=wb)


def grayscale_(x, ws=None):
    """torchvision rgb_to_grayscale(x, num_output_channels=3), in place."""
    n, _, h, w = x.shape
    gray = rgb_to_grayscale(x, _buffer(ws, "gray", (n, 1, h, w), x))
    x.copy_(gray.expand_as(x))
    return x


def adjust_brightness_(x, factor):
    """torchvision adjust_brightness: clamp(factor * x, 0, 1)."""
    if _is_scalar(factor):
        x.mul_(factor)
        return x.clamp_(max=1.0) if factor > 1.0 else x  # factor <= 1 keeps [0, 1]
    return x.mul_(_per_image(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast_(x, factor):
    """torchvision adjust_contrast: blend with the mean of the grayscale image, clamp to [0, 1]."""
    weights = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)
    mean = (x.mean(dim=(2, 3)) * weights).sum(dim=1).view(-1, 1, 1, 1)  # the mean of the grayscale image
    if _is_scalar(factor):
        x.mul_(factor).add_(mean.mul_(1.0 - factor))
        return x.clamp_(0.0, 1.0) if factor > 1.0 else x  # a convex blend keeps [0, 1]
    f = _per_image(factor, x)
    return x.mul_(f).add_(mean.mul_(1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation_(x, factor, ws=None):
    """torchvision adjust_saturation: blend with the grayscale image, clamp to [0, 1]."""
    n, _, h, w = x.shape
    gray = rgb_to_grayscale(x, _buffer(ws, "gray", (n, 1, h, w), x))
    if _is_scalar(factor):
        x.mul_(factor).add_(gray, alpha=1.0 - factor)
        return x.clamp_(0.0, 1.0) if factor > 1.0 else x
    f = _per_image(factor, x)
    return x.mul_(f).add_(gray.mul_(1.0 - f)).clamp_(0.0, 1.0)


_HUE_CONSTANTS = {}


def _hue_constants(x):
    key = (x.device, x.dtype)
    if key not in _HUE_CONSTANTS:
        def col(values):
            return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        _HUE_CONSTANTS[key] = (col([3.0, 2.0, 4.0]), col([1.0, -1.0, -1.0]), col([-1.0, 2.0, 2.0]))
    return _HUE_CONSTANTS[key]


def adjust_hue_(x, hue, ws=None):
    """torchvision adjust_hue: shift the HSV hue by `hue` turns (in [-0.5, 0.5]), keeping S and V.

    With max V, min m, chroma C = V - m and the hue H in sixths of a turn (torchvision's RGB -> HSV:
    (g - b) / C if r is maximal, else 2 + (b - r) / C if g is, else 4 + (r - g) / C), the shifted image
    is m + C * T_c(H + 6 hue mod 6) with the triangle waves T_r = clamp(|H - 3| - 1, 0, 1),
    T_g = clamp(2 - |H - 2|, 0, 1), T_b = clamp(2 - |H - 4|, 0, 1): the piecewise HSV -> RGB of
    torchvision in closed form. Sextant selection uses sign(V - channel), which is exactly 0 or 1.
    """
    n, _, h, w = x.shape
    shape = (n, h, w)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    vmax = torch.maximum(r, g, out=_buffer(ws, "hue_max", shape, x))
    vmax = torch.maximum(vmax, b, out=vmax)
    vmin = torch.minimum(r, g, out=_buffer(ws, "hue_min", shape, x))
    vmin = torch.minimum(vmin, b, out=vmin)
    not_r = torch.sub(vmax, r, out=_buffer(ws, "hue_a", shape, x)).sign_()  # 0 where r is maximal, else 1
    not_g = torch.sub(vmax, g, out=_buffer(ws, "hue_b", shape, x)).sign_()  # 0 where g is maximal, else 1
    u = torch.sub(b, r, out=_buffer(ws, "hue_u", shape, x))
    v = torch.sub(r, g, out=_buffer(ws, "hue_v", shape, x))
    u.lerp_(v, not_g)  # g maximal: b - r; otherwise (b maximal): r - g
    num = torch.sub(g, b, out=v).lerp_(u, not_r)  # r maximal: g - b
    base = torch.addcmul(not_r, not_r, not_g, out=not_g)  # sextant: 0 (r maximal), 1 (g), 2 (b)
    if _is_scalar(hue):
        base.mul_(2.0).add_(6.0 * hue)
    else:
        base.mul_(2.0).add_(_per_image(hue, x, dims=3), alpha=6.0)
    chroma = torch.sub(vmax, vmin, out=u)
    # H' = 2 sextant + 6 hue + num / C; num is exactly 0 where C is 0
    hue6 = torch.addcdiv(base, num, torch.clamp(chroma, min=1e-12, out=not_r), out=v)
    wrap = torch.div(hue6, 6.0, out=not_r).floor_()
    hue6.sub_(wrap, alpha=6.0)  # now in [0, 6)
    centre, sign, offset = _hue_constants(x)
    torch.sub(hue6.unsqueeze(1), centre, out=x).abs_().mul_(sign).add_(offset).clamp_(0.0, 1.0)
    return torch.addcmul(vmin.unsqueeze(1), chroma.unsqueeze(1), x, out=x)


def pil_box_radius(sigma, passes=3):
    """Radius l + a of the extended box whose `passes` passes have variance sigma^2 (PIL's GaussianBlur).

    Gwosdek, Grewenig, Bruhn, Weickert (2011): box length L = sqrt(12 sigma^2 / passes + 1), integer
    radius l = floor((L - 1) / 2), fractional end weight
    a = (2l + 1) (l (l + 1) - 3 sigma^2 / passes) / (6 (sigma^2 / passes - (l + 1)^2)).
    """
    s2 = sigma * sigma / passes
    big_l = math.sqrt(12.0 * s2 + 1.0)
    l = math.floor((big_l - 1.0) / 2.0)
    a = (2 * l + 1) * (l * (l + 1) - 3.0 * s2) / (6.0 * (s2 - (l + 1) ** 2))
    return l + a


def box_kernel(radius):
    """The extended box of `radius` = l + a: 2l + 3 taps (a, 1, ..., 1, a) / (2 radius + 1)."""
    l = math.floor(radius)
    a = radius - l
    return [a / (2 * radius + 1)] + [1.0 / (2 * radius + 1)] * (2 * l + 1) + [a / (2 * radius + 1)]


def gaussian_kernel(sigma, truncate=3.0):
    """A normalised 1-D Gaussian of standard deviation `sigma` with ceil(truncate * sigma) taps each side."""
    r = max(1, math.ceil(truncate * sigma))
    k = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-r, r + 1)]
    s = sum(k)
    return [v / s for v in k]


def blur_passes(sigma, kind="pil"):
    """The 1-D kernels applied one after the other along each axis for a blur of `sigma`."""
    if kind == "pil":
        return [box_kernel(pil_box_radius(sigma))] * 3
    return [gaussian_kernel(sigma)]


class _PaddedPair:
    """Two buffers shaped like x with `pad` extra elements on both sides of `dim`, and cached views.

    A blur pass reads a padded buffer and writes the interior of the other one, whose edges are then
    filled by replication: no allocation and no view creation per pass (both cost as much as the
    arithmetic on one 224 x 224 crop).
    """

    def __init__(self, like, dim, pad):
        shape = list(like.shape)
        size = shape[dim]
        shape[dim] += 2 * pad
        self.views = []
        for _ in range(2):
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            shifted = {t: buf.narrow(dim, pad + t, size) for t in range(-pad, pad + 1)}
            left, right = buf.narrow(dim, 0, pad), buf.narrow(dim, pad + size, pad)
            edges = ((left, buf.narrow(dim, pad, 1).expand_as(left)),
                     (right, buf.narrow(dim, pad + size - 1, 1).expand_as(right)))
            self.views.append((shifted, edges))

    @staticmethod
    def fill_edges(views):
        for edge, source in views[1]:
            edge.copy_(source)


def _blur_axis_scalar_(x, kernels, dim, ws):
    """x <- the `kernels` (symmetric, odd lengths) applied one after the other along `dim`, each pass
    replicating the edge pixels of its own input (as PIL's box blur does)."""
    pad = max(len(k) for k in kernels) // 2
    key = ("blur", tuple(x.shape), dim, pad, x.dtype, x.device)
    pair = ws.get(key) if ws is not None else None
    if pair is None:
        pair = _PaddedPair(x, dim, pad)
        if ws is not None:
            ws[key] = pair
    src = pair.views[0]
    src[0][0].copy_(x)
    for p, kernel in enumerate(kernels):
        _PaddedPair.fill_edges(src)
        dst_view = x if p == len(kernels) - 1 else pair.views[(p + 1) % 2][0][0]
        r = len(kernel) // 2
        shifted = src[0]
        torch.mul(shifted[0], kernel[r], out=dst_view)
        for t in range(1, r + 1):
            if kernel[r + t] != 0.0:
                dst_view.add_(shifted[t], alpha=kernel[r + t])
                dst_view.add_(shifted[-t], alpha=kernel[r - t])
        src = pair.views[(p + 1) % 2]
    return x


def _pass_batched_(x, kernels, dim):
    """x <- per-image `kernels` (N x K, K odd) along `dim` (2 or 3), edges replicated, as a grouped conv."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    r = k // 2
    weight = kernels.to(device=x.device, dtype=x.dtype).repeat_interleave(c, dim=0)
    if dim == 3:
        y = F.pad(x, (r, r, 0, 0), mode="replicate").view(1, n * c, h, w + 2 * r)
        y = F.conv2d(y, weight.view(n * c, 1, 1, k), groups=n * c)
    else:
        y = F.pad(x, (0, 0, r, r), mode="replicate").view(1, n * c, h + 2 * r, w)
        y = F.conv2d(y, weight.view(n * c, 1, k, 1), groups=n * c)
    x.copy_(y.view(n, c, h, w))
    return x


def blur_(x, sigma, kind="pil", ws=None):
    """In place blur of PIL's GaussianBlur(radius=sigma) (kind "pil") or a true Gaussian ("gaussian").

    `sigma` is a number (every image) or a tensor of N per-image values.
    """
    if _is_scalar(sigma):
        kernels = blur_passes(sigma, kind)
        _blur_axis_scalar_(x, kernels, 3, ws)
        return _blur_axis_scalar_(x, kernels, 2, ws)
    per_image = [blur_passes(s, kind) for s in torch.as_tensor(sigma).tolist()]
    for p in range(len(per_image[0])):
        k = max(len(passes[p]) for passes in per_image)
        rows = []
        for passes in per_image:  # centre every kernel in the common length k with zeros
            pad = (k - len(passes[p])) // 2
            rows.append([0.0] * pad + passes[p] + [0.0] * pad)
        kernels = torch.tensor(rows, dtype=torch.float32)
        _pass_batched_(x, kernels, 3)
        _pass_batched_(x, kernels, 2)
    return x


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


__all__ = [
    "AugParams", "BatchAugment", "OutputPool", "RandomResizedCropFlip", "TwoCropsUint8", "crop_flip_transform",
    "adjust_brightness_",
    "adjust_contrast_", "adjust_saturation_", "adjust_hue_", "grayscale_", "rgb_to_grayscale", "blur_",
    "blur_passes", "pil_box_radius", "box_kernel", "gaussian_kernel", "normalize", "GRAY_WEIGHTS",
]
