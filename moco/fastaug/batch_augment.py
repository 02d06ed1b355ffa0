"""Device side of the fast augmentation path: the colour part of the MoCo recipes on whole batches.

The reference recipes (moco/loader.py, SPEC §3) run every step on PIL images inside the DataLoader
workers and ship normalised float32 crops. The fast path (`--fast-aug`) splits the recipe: the workers
only decode, crop and flip (moco/crops.py; or, with `--device-decode`, only read the files and draw the
crops, moco/device_crops.py decoding and cropping on the device) and `BatchAugment` applies colour
jitter, grayscale, blur and normalisation to the batch on the training device, with each image's own
parameters drawn from the reference's distributions (moco/aug_params.py) by the operations of
moco/color_ops.py.

The horizontal flip stays with the crop: every batch-side operation commutes with it (pointwise or
mirror-symmetric). What differs from the reference is numerics only: PIL rounds to uint8 after every
step and uses its own integer formulas (299/587/114 luma; hue shifted on uint8 HSV in steps of 1/255
turn; blur passes rounded, so that for sigma below about 0.5 PIL often leaves pixels unchanged where the
float blur moves them by up to a grey level or two); this path computes in float32 with torchvision's
tensor formulas.

Typical use::

    dataset = datasets.ImageFolder(traindir, crop_flip_transform(224, aug_plus))  # [(q_u8, q_p), (k_u8, k_p)]
    augment = BatchAugment(aug_plus=aug_plus).to(device)
    for images, _ in loader:  # images = [[q_u8 batch, q params], [k_u8 batch, k params]]
        im_q, im_k = augment([[x.to(device, non_blocking=True), p] for x, p in images])
"""
import math
import sys

import torch

from moco.aug_params import (BRIGHTNESS, CONTRAST, HUE, SATURATION, AugParams, ColorRecipe,  # noqa: F401
                             looks_like_params)
from moco.color_ops import (GRAY_WEIGHTS, adjust_brightness_, adjust_contrast_, adjust_hue_,  # noqa: F401
                            adjust_saturation_, blur_, blur_batched_, blur_kernels, blur_passes, box_kernel,
                            gaussian_kernel, grayscale_, normalize, pil_box_radius, rgb_to_grayscale, _buffer)
from moco.transfer import upload
from moco.crops import RandomResizedCropFlip, TwoCropsUint8, crop_flip_transform  # noqa: F401
from moco.loader import IMAGENET_MEAN, IMAGENET_STD


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




class BatchAugment(ColorRecipe, torch.nn.Module):
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
        torch.nn.Module.__init__(self)
        ColorRecipe.__init__(self, aug_plus)
        if blur_kind not in ("pil", "gaussian"):
            raise ValueError(f"blur_kind must be 'pil' or 'gaussian', got {blur_kind!r}")
        self.per_image = per_image
        self.blur_kind = blur_kind
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._workspace = {}
        self._pool = OutputPool() if reuse_memory else None

    def extra_repr(self):
        return f"{self.describe()}, blur_kind={self.blur_kind!r}, per_image={self.per_image}"

    # ------------------------------------------------------------------------------ forward
    def forward(self, images, params=None, generator=None):
        """Augment a batch, or each batch of a list (the loader's `[q, k]`).

        `images` is a tensor or a list whose items are tensors or `(tensor, params)` pairs (from
        `crop_flip_transform(..., aug_plus=...)`, params as collated `AugParams.to_tensor()` rows).
        Parameters not given are drawn with `sample_params(n, generator)`.
        """
        if isinstance(images, (list, tuple)) and len(images) == 2 and torch.is_tensor(images[0]) \
                and looks_like_params(images[1]):
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
        """The recipe's operations in order, each on the images that draw it. What the device needs
        besides the images (the factors, which images each operation takes, the blur kernels) is
        gathered on the host first and copied in one transfer that does not make the host wait."""
        x = images.to(torch.float32)
        x = x.div_(255.0) if images.dtype == torch.uint8 else x.clone()
        x = x.contiguous()
        steps = self._steps(params)
        factors = torch.stack([params.brightness, params.contrast, params.saturation, params.hue], dim=1)
        indices = [index for _, index in steps if index is not None]
        blur = [(op, index) for op, index in steps if op == BLUR]
        kernels = []
        if blur:
            sigma = params.sigma if blur[0][1] is None else params.sigma[blur[0][1]]
            kernels = blur_kernels(sigma.tolist(), self.blur_kind)
        uploaded = upload([factors.to(torch.float32), *indices, *kernels], x.device)
        factors, indices, kernels = uploaded[0], iter(uploaded[1:1 + len(indices)]), uploaded[1 + len(indices):]
        for op, index in steps:
            dev_index = None if index is None else next(indices)
            y = x if dev_index is None else x.index_select(0, dev_index)
            if op == GRAY:
                grayscale_(y)
            elif op == BLUR:
                blur_batched_(y, kernels)
            else:  # the factors of the images this operation takes
                f = factors if dev_index is None else factors.index_select(0, dev_index)
                _FACTOR_OPS[op](y, f[:, _FACTOR_COLUMN[op]])
            if dev_index is not None:
                x.index_copy_(0, dev_index, y)
        mean, std = self._stats(x.device)
        return x.sub_(mean).div_(std)

    def _steps(self, params):
        """[(operation, CPU index of the images it applies to, None for all)] in the recipe's order,
        operations that no image draws left out."""
        masks = []
        jitter = [(op, params.jitter & (params.order[:, stage] == op))
                  for stage in range(4) for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE)]
        if self.aug_plus:
            masks = jitter + [(GRAY, params.gray), (BLUR, params.blur)]
        else:
            masks = [(GRAY, params.gray)] + jitter
        steps = []
        for op, mask in masks:
            count = int(mask.sum())
            if count:
                steps.append((op, None if count == mask.numel() else mask.nonzero().squeeze(1)))
        return steps


GRAY, BLUR = "gray", "blur"
_FACTOR_COLUMN = {BRIGHTNESS: 0, CONTRAST: 1, SATURATION: 2, HUE: 3}
_FACTOR_OPS = {BRIGHTNESS: adjust_brightness_, CONTRAST: adjust_contrast_, SATURATION: adjust_saturation_,
               HUE: adjust_hue_}


__all__ = [
    "AugParams", "BatchAugment", "OutputPool", "RandomResizedCropFlip", "TwoCropsUint8", "crop_flip_transform",
    "adjust_brightness_", "adjust_contrast_", "adjust_saturation_", "adjust_hue_", "grayscale_",
    "rgb_to_grayscale", "blur_", "blur_passes", "pil_box_radius", "box_kernel", "gaussian_kernel", "normalize",
    "GRAY_WEIGHTS",
]
