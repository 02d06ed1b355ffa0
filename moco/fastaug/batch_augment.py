"""Device side of the fast augmentation path: the colour steps of a MoCo recipe on whole batches.

The reference pipelines (moco/loader.py; He et al. 2019, Sec. 4; Chen et al. 2020, Sec. 3) run every
step on PIL images inside the DataLoader workers and ship normalised float32 crops. The fast path
splits the recipe: the workers only decode, crop and flip (moco.fastaug.worker; or, with
`--device-decode`, only read the files, moco.fastaug.device_decode decoding and cropping on the device)
and `BatchAugment` applies the recipe's colour steps (jitter, grayscale, blur) and the normalisation to
the batch on the training device, with each image's own parameters drawn in the worker from the
recipe's distributions (moco.fastaug.params), by the operations of moco.fastaug.color_ops.

The horizontal flip stays with the crop: every batch-side operation commutes with it (pointwise or
mirror-symmetric). What differs from the reference is numerics only: PIL rounds to uint8 after every
step and uses its own integer formulas (299/587/114 luma; hue shifted on uint8 HSV in steps of 1/255
turn; blur passes rounded, so that for sigma below about 0.5 PIL often leaves pixels unchanged where the
float blur moves them by up to a grey level or two); this path computes in float32 with torchvision's
tensor formulas.
"""
import math
import sys

import torch

from moco.fastaug.color_ops import (adjust_brightness_, adjust_contrast_, adjust_hue_, adjust_saturation_,
                                    blur_, blur_batched_, blur_kernels, buffer, constant, grayscale_)
from moco.fastaug.params import BRIGHTNESS, CONTRAST, HUE, SATURATION, programs
from moco.loader import IMAGENET_MEAN, IMAGENET_STD, BlurStep, ColorJitterStep, GrayscaleStep
from moco.transfer import upload

GRAY, BLUR = "gray", "blur"
_FACTOR_OPS = {BRIGHTNESS: adjust_brightness_, CONTRAST: adjust_contrast_, SATURATION: adjust_saturation_,
               HUE: adjust_hue_}
_SCALAR_OPS = {"brightness": adjust_brightness_, "contrast": adjust_contrast_}
_SCALAR_OPS_WS = {"saturation": adjust_saturation_, "hue": adjust_hue_, "blur": blur_}


class OutputPool:
    """Reuses the memory of CPU output batches that nothing references any more.

    A fresh 64 x 3 x 224 x 224 float32 batch is 38 MB that the kernel must map and zero page by page on
    first touch, which costs a large share of the CPU work per image; the reference pipeline pays
    the same in its workers' shared memory. Each batch handed out is a tensor over a bytearray owned by
    the pool (`torch.frombuffer`): its storage holds a reference to the bytearray for as long as any
    tensor or view of it lives, so a bytearray whose reference count is back to the pool's own is free
    and is handed out again. Off (plain `torch.empty`) where reference counts cannot tell.
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

    def _is_free(self, i):
        return sys.getrefcount(self.buffers[i]) == self._free_count

    def empty(self, shape):
        """A CPU float32 tensor of `shape`, over free pooled memory where there is some."""
        nbytes = math.prod(shape) * 4
        if not self.enabled or nbytes == 0:
            return torch.empty(shape, dtype=torch.float32)
        for i in range(len(self.buffers)):  # by index: a name bound to a buffer would count as a user
            if len(self.buffers[i]) == nbytes and self._is_free(i):
                return torch.frombuffer(self.buffers[i], dtype=torch.float32).view(shape)
        if len(self.buffers) >= self.max_buffers:
            self.buffers = [self.buffers[i] for i in range(len(self.buffers)) if not self._is_free(i)]
            if len(self.buffers) >= self.max_buffers:
                return torch.empty(shape, dtype=torch.float32)
        self.buffers.append(bytearray(nbytes))
        return torch.frombuffer(self.buffers[-1], dtype=torch.float32).view(shape)


class BatchAugment:
    """The colour steps of `recipe` (moco.loader.Recipe) and the ImageNet normalisation on a batch.

    `augment(images, params)`: `images` N x 3 x H x W, uint8 or float in [0, 1], already cropped and
    flipped; `params` their colour parameters (moco.fastaug.params, on the CPU). Returns the augmented,
    normalised float32 batch on the images' device. On the CPU the images are processed one by one with
    scalar parameters (fastest there), unless they are tiny (CIFAR-sized); on other devices the whole
    batch at once.
    """

    def __init__(self, recipe, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.recipe = recipe
        self.mean, self.std = tuple(mean), tuple(std)
        self._workspace = {}
        self._pool = OutputPool()

    def __repr__(self):
        return f"{type(self).__name__}({self.recipe})"

    def __call__(self, images, params):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected N x 3 x H x W images, got shape {tuple(images.shape)}")
        if params["jitter"].shape[0] != images.shape[0]:
            raise ValueError(f"{params['jitter'].shape[0]} parameter sets for {images.shape[0]} images")
        if images.device.type == "cpu" and images.shape[2] * images.shape[3] > 48 * 48:
            return self._per_image(images, params)
        return self._batched(images, params)

    def _normalize_into(self, x, out):
        mean, std = constant(self.mean, x, (1, 3, 1, 1)), constant(self.std, x, (1, 3, 1, 1))
        return torch.sub(x, mean, out=out).div_(std)

    def _per_image(self, images, params):
        n, _, h, w = images.shape
        out = self._pool.empty((n, 3, h, w))
        ws = self._workspace.setdefault((h, w), {})
        x = buffer(ws, "x", (1, 3, h, w), out)
        for k, program in enumerate(programs(self.recipe, params)):
            x.copy_(images[k:k + 1])
            if images.dtype == torch.uint8:
                x.div_(255.0)
            for name, value in program:
                if name == GRAY:
                    grayscale_(x, ws)
                elif name in _SCALAR_OPS:
                    _SCALAR_OPS[name](x, value)
                else:
                    _SCALAR_OPS_WS[name](x, value, ws=ws)
            self._normalize_into(x, out[k:k + 1])
        return out

    def _batched(self, images, params):
        """The recipe's operations in order, each on the images that draw it. What the device needs
        besides the images (the factors, which images each operation takes, the blur kernels) is
        gathered on the host first and copied in one transfer that does not make the host wait."""
        x = images.to(torch.float32)
        x = x.div_(255.0) if images.dtype == torch.uint8 else x.clone()
        x = x.contiguous()
        steps = self._steps(params)
        indices = [index for _, index in steps if index is not None]
        blur = [index for op, index in steps if op == BLUR]
        kernels = []
        if blur:
            sigma = params["sigma"] if blur[0] is None else params["sigma"][blur[0]]
            kernels = blur_kernels(sigma.tolist())
        uploaded = upload([params["factors"].to(torch.float32), *indices, *kernels], x.device)
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
                _FACTOR_OPS[op](y, f[:, op])
            if dev_index is not None:
                x.index_copy_(0, dev_index, y)
        return self._normalize_into(x, x)

    def _steps(self, params):
        """[(operation, CPU index of the images it applies to, None for all)] in the recipe's order,
        operations that no image draws left out."""
        masks = []
        for step in self.recipe.color:
            if isinstance(step, ColorJitterStep):
                masks += [(op, params["jitter"] & (params["order"][:, stage] == op))
                          for stage in range(4) for op in (BRIGHTNESS, CONTRAST, SATURATION, HUE)]
            elif isinstance(step, GrayscaleStep):
                masks.append((GRAY, params["gray"]))
            elif isinstance(step, BlurStep):
                masks.append((BLUR, params["blur"]))
        steps = []
        for op, mask in masks:
            count = int(mask.sum())
            if count:
                steps.append((op, None if count == mask.numel() else mask.nonzero().squeeze(1)))
        return steps
