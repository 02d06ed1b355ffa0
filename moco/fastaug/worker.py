"""Worker side of the fast augmentation path: what the DataLoader workers do per image.

Two forms, both drawing every random number of a sample in the worker (so per-sample seeding and
exact resumption hold, moco.data.RobustImageFolder) and in the same order:

* `TwoCropsUint8` (`--fast-aug`): decode once and, per crop, draw the RandomResizedCrop box with
  torchvision's own `RandomResizedCrop.get_params` (scale (0.2, 1), ratio (3/4, 4/3), same fallback), the
  horizontal flip (p = 0.5) and the colour parameters (moco.aug_params), then resize each box (bilinear,
  antialiased, with torch's uint8 kernel) and return a uint8 3 x S x S tensor: no float work in the
  workers and 4x less inter-process traffic than float32 crops.
* `EncodedTwoCrops` (`--device-decode`): the worker reads the file and its header only, draws the same
  parameters from the header's size, and ships the encoded bytes; the training device decodes, crops
  and resizes (moco.device_crops). Files that the device cannot decode (not JPEG, CMYK) are decoded here
  and shipped as pixels.
"""
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from moco.aug_params import PARAM_COLUMNS, ColorRecipe

SCALE = (0.2, 1.0)  # RandomResizedCrop of both MoCo recipes
RATIO = (3.0 / 4.0, 4.0 / 3.0)


class RandomResizedCropFlip:
    """RandomResizedCrop(size, scale, ratio) then RandomHorizontalFlip(flip_p); returns uint8 3 x H x W.

    The box comes from torchvision's `RandomResizedCrop.get_params`. The resize is the same filter as
    the reference's (bilinear, antialiased: PIL's) computed by torch's uint8 kernel on a view of the
    decoded pixels (about 3x faster than PIL's resize, no float tensors), after JPEG draft decoding where
    `draft_decode` allows it: the reference's crop up to rounding (a grey level or so).
    """

    def __init__(self, size=224, scale=SCALE, ratio=RATIO, flip_p=0.5):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p

    def get_params_for_size(self, width, height):
        """(top, left, height, width, flip) for an image of this size, drawn from the global torch RNG
        exactly as torchvision's RandomResizedCrop and RandomHorizontalFlip draw them."""
        shape_only = torch.empty((), dtype=torch.uint8).expand(1, height, width)
        i, j, h, w = transforms.RandomResizedCrop.get_params(shape_only, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(1) < self.flip_p)
        return i, j, h, w, flip

    def get_params(self, img):
        width, height = img.size if isinstance(img, Image.Image) else (img.shape[-1], img.shape[-2])
        return self.get_params_for_size(width, height)

    def apply(self, img, params, scale=(1.0, 1.0)):
        """The crop `params` of `img` (PIL image, or a uint8 3 x H x W tensor) as uint8 3 x S x S.
        `scale` (decoded / original size, from draft_decode) maps the box onto a reduced decode."""
        i, j, h, w, flip = params
        pixels = pixels_of(img) if isinstance(img, Image.Image) else img
        sx, sy = scale
        top, left = round(i * sy), round(j * sx)
        height = max(1, min(round(h * sy), pixels.shape[1] - top))
        width = max(1, min(round(w * sx), pixels.shape[2] - left))
        region = pixels[None, :, top:top + height, left:left + width]
        out = F.interpolate(region, size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        return (out.flip(-1) if flip else out).contiguous()

    def __call__(self, img):
        return self.apply(img, self.get_params(img))

    def __repr__(self):
        return (f"{type(self).__name__}(size={self.size}, scale={self.scale}, "
                f"ratio=({self.ratio[0]:.4f}, {self.ratio[1]:.4f}), flip_p={self.flip_p})")


def pixels_of(image):
    """A decoded PIL image as a uint8 3 x H x W tensor (a view of H x W x 3 memory: channels last, the
    layout torch's fast uint8 resize kernel takes)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def draft_decode(img, boxes, size):
    """Decode a lazily opened JPEG `img` at the smallest DCT scale (1, 1/2, 1/4, 1/8) at which every crop
    box (top, left, height, width) still has at least `size` pixels each way, and return it as RGB with
    `draft_scale` (decoded / original size) set. Other images are decoded at full size."""
    width, height = img.size
    if img.format == "JPEG":
        need_w = min(w for _, _, _, w in boxes) / size[1]
        need_h = min(h for _, _, h, _ in boxes) / size[0]
        reduce = min(need_w, need_h)
        if reduce >= 2:  # draft picks the largest reduction that keeps at least the requested size
            img.draft("RGB", (int(width / reduce) + 1, int(height / reduce) + 1))
    rgb = img.convert("RGB")
    rgb.draft_scale = (rgb.size[0] / width, rgb.size[1] / height)
    return rgb


class TwoCropsUint8:
    """Worker-side transform of `--fast-aug`: two uint8 crops of one image, optionally with the
    parameters of their colour augmentation.

    With `aug_plus=None` it returns `[q, k]` (uint8 3 x S x S tensors) and BatchAugment draws the colour
    parameters in the main process. With `aug_plus` True/False (v2/v1) it returns `[(q, q_params),
    (k, k_params)]`, the parameters drawn here (one `AugParams.to_tensor()` row each). It takes a PIL
    image, or a path (then it opens the file itself and decodes it once, in JPEG draft mode where both
    crops allow).
    """

    def __init__(self, crop_size=224, aug_plus=None):
        self.crop = RandomResizedCropFlip(crop_size, scale=SCALE)
        self.aug_plus = aug_plus
        self.recipe = None if aug_plus is None else ColorRecipe(aug_plus)

    def draw(self, width, height):
        """Both crops' (box + flip, colour parameters or None), in the order the reference draws them."""
        draws = []
        for _ in range(2):
            box = self.crop.get_params_for_size(width, height)
            params = None if self.recipe is None else self.recipe.sample_params_tensor(1)[0]
            draws.append((box, params))
        return draws

    def one(self, image):
        """One crop of a PIL image (with its colour parameters when they are drawn here)."""
        box = self.crop.get_params(image)
        params = None if self.recipe is None else self.recipe.sample_params_tensor(1)[0]
        crop = self.crop.apply(image, box)
        return crop if params is None else (crop, params)

    def __call__(self, image):
        if isinstance(image, str):
            with Image.open(image) as lazy:
                draws = self.draw(*lazy.size)
                image = draft_decode(lazy, [box[:4] for box, _ in draws], self.crop.size)
        else:
            draws = self.draw(*image.size)
        scale = getattr(image, "draft_scale", (1.0, 1.0))
        pixels = pixels_of(image)  # once for both crops
        out = [self.crop.apply(pixels, box, scale) for box, _ in draws]
        if self.recipe is None:
            return out
        return [(crop, params) for crop, (_, params) in zip(out, draws)]

    def __repr__(self):
        return f"{type(self).__name__}({self.crop!r}, aug_plus={self.aug_plus})"


def crop_flip_transform(crop_size=224, aug_plus=None):
    """The ImageFolder transform of the fast path (`TwoCropsUint8`): `[q, k]` uint8 crops, or with
    `aug_plus` given `[(q, q_params), (k, k_params)]` with the colour parameters drawn in the worker."""
    return TwoCropsUint8(crop_size, aug_plus)


def open_path(path):
    """The 'loader' of the fast path's image folder: the path itself (TwoCropsUint8 opens the file, so
    that it can choose the JPEG draft scale from the crops before decoding). Unreadable files are found
    by the transform, which raises the same errors as PIL's loader."""
    return path


# ----------------------------------------------------------------------------------------------------
# --device-decode: the worker ships encoded bytes and the crops to take
# ----------------------------------------------------------------------------------------------------

# One row of `EncodedCrops.meta` (float64): the image's size and kind, then per crop (q, k) the box and
# flip, then per crop the colour parameters (AugParams.to_tensor layout).
META_HEIGHT, META_WIDTH, META_IS_JPEG = 0, 1, 2
META_BOXES = 3            # q: top, left, height, width, flip; k: the same (10 columns)
META_PARAMS = 13          # q params (12), k params (12)
META_COLUMNS = META_PARAMS + 2 * PARAM_COLUMNS


class EncodedImage:
    """What the worker reads of an image: its file bytes and the header's size; `pixels` (uint8
    H x W x 3) instead when the device decoder cannot read the format, so the worker decoded it."""

    def __init__(self, path, data, width, height, is_jpeg, pixels=None):
        self.path, self.data, self.width, self.height = path, data, width, height
        self.is_jpeg, self.pixels = is_jpeg, pixels


def read_encoded(path):
    """The 'loader' of `--device-decode`: the file's bytes and size, decoding only what nvJPEG cannot
    (formats other than baseline/progressive RGB or grayscale JPEG). Raises PIL's errors for files
    that are not images, like the default loader."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            return EncodedImage(path, data, width, height, True)
        pixels = np.array(img.convert("RGB"), dtype=np.uint8)
    return EncodedImage(path, None, width, height, False, pixels)


class EncodedTwoCrops:
    """Worker-side transform of `--device-decode`: `EncodedCrops` of one image, with the same random
    draws (boxes, flips, colour parameters, in the same order) as `TwoCropsUint8(crop_size, aug_plus)`."""

    def __init__(self, crop_size=224, aug_plus=False):
        self.two_crops = TwoCropsUint8(crop_size, aug_plus)

    def __call__(self, image):
        draws = self.two_crops.draw(image.width, image.height)
        meta = torch.zeros(META_COLUMNS, dtype=torch.float64)
        meta[META_HEIGHT], meta[META_WIDTH], meta[META_IS_JPEG] = image.height, image.width, image.is_jpeg
        for c, (box, params) in enumerate(draws):
            meta[META_BOXES + 5 * c:META_BOXES + 5 * c + 5] = torch.tensor(box, dtype=torch.float64)
            meta[META_PARAMS + PARAM_COLUMNS * c:META_PARAMS + PARAM_COLUMNS * (c + 1)] = params
        payload = image.pixels.reshape(-1) if image.pixels is not None else np.frombuffer(image.data, np.uint8)
        return EncodedCrops(torch.from_numpy(payload.copy()), meta, image.path)

    def __repr__(self):
        return f"{type(self).__name__}(crop_size={self.two_crops.crop.size}, aug_plus={self.two_crops.aug_plus})"


class EncodedCrops:
    """One sample of `--device-decode` (`payload`: uint8 bytes or pixels, `meta`: META_COLUMNS values,
    `path`: the file), or, collated by `collate_encoded`, a batch (`payload` and `path` lists, `meta`
    N x META_COLUMNS)."""

    def __init__(self, payload, meta, path):
        self.payload, self.meta, self.path = payload, meta, path

    def __len__(self):
        return self.meta.shape[0]

    def pin_memory(self):  # the DataLoader's pin_memory thread calls this; nvJPEG reads pageable bytes
        return self


def collate_encoded(batch):
    """DataLoader collate of `(EncodedCrops, target)` samples: the payloads stay a list (their sizes
    differ), the metadata and targets are stacked."""
    samples, targets = zip(*batch)
    return (EncodedCrops([s.payload for s in samples], torch.stack([s.meta for s in samples]),
                         [s.path for s in samples]),
            torch.as_tensor(targets))
