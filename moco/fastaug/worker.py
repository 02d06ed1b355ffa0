"""Worker side of the fast augmentation path: what the DataLoader workers do per image.

Both forms draw every random number of a sample in the worker (so per-sample seeding and exact
resumption hold, moco.data.RobustImageFolder), in the same order: per crop (q, then k) the
RandomResizedCrop box with torchvision's own `RandomResizedCrop.get_params` (the recipe's scale and
ratio, same fallback), the horizontal flip, then the colour parameters (moco.fastaug.params). A sample
is a dict of named tensors (`box` 2 x 4, `flip` 2, and the colour fields with a leading 2), collated
by torch's default collate.

* `TwoCropsUint8` (`--fast-aug`): decode once (in JPEG draft mode where both crops allow) and resize
  each box (bilinear, antialiased, with torch's uint8 kernel): `crops`, uint8 2 x 3 x S x S. No float
  work in the workers and 4x less inter-process traffic than float32 crops.
* `EncodedTwoCrops` (`--device-decode`): the loader (`read_encoded`) reads the file and its header
  only; the sample carries the encoded bytes (`payload`), `size` and `is_jpeg`, and the training device
  decodes, crops and resizes (moco.fastaug.device_decode). Files that the device cannot decode (not
  JPEG, CMYK) are decoded in the worker and shipped as pixels.
"""
import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch.utils.data import default_collate
from torchvision import transforms

from moco.data import IMAGE_ERRORS, ImageReadError
from moco.fastaug.params import ColorDraws


class CropDraws:
    """The crop box and flip of the recipe's RandomResizedCrop and RandomHorizontalFlip."""

    def __init__(self, recipe):
        self.scale, self.ratio, self.flip_p = list(recipe.scale), list(recipe.ratio), recipe.flip_p

    def __call__(self, width, height):
        """((top, left, height, width), flip) for an image of this size, drawn from the global torch RNG
        exactly as torchvision's RandomResizedCrop and RandomHorizontalFlip draw them."""
        shape_only = torch.empty((), dtype=torch.uint8).expand(1, height, width)
        box = transforms.RandomResizedCrop.get_params(shape_only, self.scale, self.ratio)
        return box, bool(torch.rand(1) < self.flip_p)


def draw_two_crops(recipe, width, height):
    """Both crops' draws in the order the fast path draws them: {box: 2 x 4, flip: 2, colour fields}."""
    crop, color = CropDraws(recipe), ColorDraws(recipe)
    boxes, flips, params = [], [], []
    for _ in range(2):
        box, flip = crop(width, height)
        boxes.append(box)
        flips.append(flip)
        params.append(color(1))
    fields = {name: torch.cat([p[name] for p in params]) for name in params[0]}
    return {"box": torch.tensor(boxes, dtype=torch.long), "flip": torch.tensor(flips), **fields}


def resized_crop(pixels, box, flip, size, scale=(1.0, 1.0)):
    """The crop `box` (top, left, height, width) of uint8 3 x H x W `pixels` as uint8 3 x S x S,
    flipped where `flip`: the reference's filter (bilinear, antialiased: PIL's) computed by torch's
    uint8 kernel, up to rounding (a grey level or so). `scale` (decoded / original size, from
    `draft_decode`) maps the box onto a reduced decode."""
    i, j, h, w = box
    sx, sy = scale
    top, left = round(i * sy), round(j * sx)
    height = max(1, min(round(h * sy), pixels.shape[1] - top))
    width = max(1, min(round(w * sx), pixels.shape[2] - left))
    region = pixels[None, :, top:top + height, left:left + width]
    out = F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return (out.flip(-1) if flip else out).contiguous()


def pixels_of(image):
    """A decoded PIL image as a uint8 3 x H x W tensor (a view of H x W x 3 memory: channels last, the
    layout torch's fast uint8 resize kernel takes)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)


def draft_decode(img, boxes, size):
    """Decode a lazily opened JPEG `img` at the smallest DCT scale (1, 1/2, 1/4, 1/8) at which every crop
    box (top, left, height, width) still has at least `size` pixels each way: (RGB image, scale as
    decoded / original size). Other images are decoded at full size."""
    width, height = img.size
    if img.format == "JPEG":
        reduce = min(min(w for _, _, _, w in boxes), min(h for _, _, h, _ in boxes)) / size
        if reduce >= 2:  # draft picks the largest reduction that keeps at least the requested size
            img.draft("RGB", (int(width / reduce) + 1, int(height / reduce) + 1))
    rgb = img.convert("RGB")
    return rgb, (rgb.size[0] / width, rgb.size[1] / height)


def open_lazily(path):
    """The loader of `--fast-aug`: the image opened (its header read, PIL's errors for files that are not
    images) but not decoded, so that `TwoCropsUint8` can pick the JPEG draft scale from its crops."""
    return Image.open(path)


class TwoCropsUint8:
    """Worker-side transform of `--fast-aug`: the draws of both crops and the uint8 crops themselves, of
    a PIL image (lazily opened by `open_lazily`, or decoded). Decoding errors of a lazily opened image
    are the image's (moco.data.ImageReadError)."""

    def __init__(self, crop_size, recipe):
        self.size, self.recipe = crop_size, recipe

    def __call__(self, image):
        draws = draw_two_crops(self.recipe, *image.size)
        try:
            rgb, scale = draft_decode(image, draws["box"].tolist(), self.size)
            pixels = pixels_of(rgb)  # once for both crops
        except IMAGE_ERRORS as err:
            raise ImageReadError(err) from err
        finally:
            if isinstance(image, ImageFile.ImageFile):  # opened from a file: release it
                image.close()
        crops = [resized_crop(pixels, box, flip, self.size, scale)
                 for box, flip in zip(draws["box"].tolist(), draws["flip"].tolist())]
        return {"crops": torch.stack(crops), **draws}

    def __repr__(self):
        return f"{type(self).__name__}(crop_size={self.size}, recipe={self.recipe})"


class EncodedImage:
    """What the worker reads of an image: its file bytes and the header's size; `pixels` (uint8
    H x W x 3) instead when the device decoder cannot read the format, so the worker decoded it."""

    def __init__(self, path, data, width, height, is_jpeg, pixels=None):
        self.path, self.data, self.width, self.height = path, data, width, height
        self.is_jpeg, self.pixels = is_jpeg, pixels


def read_encoded(path):
    """The loader of `--device-decode`: the file's bytes and size, decoding only what nvJPEG cannot
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
    """Worker-side transform of `--device-decode`: the draws of `TwoCropsUint8` (the same numbers in the
    same order), the image's `payload` (its bytes, or its pixels), `size` (height, width), `is_jpeg`
    and `path`."""

    def __init__(self, crop_size, recipe):
        self.size, self.recipe = crop_size, recipe

    def __call__(self, image):
        draws = draw_two_crops(self.recipe, image.width, image.height)
        payload = image.pixels.reshape(-1) if image.pixels is not None else np.frombuffer(image.data, np.uint8)
        return {"payload": torch.from_numpy(payload.copy()), "path": image.path,
                "size": torch.tensor([image.height, image.width]), "is_jpeg": torch.tensor(image.is_jpeg),
                **draws}

    def __repr__(self):
        return f"{type(self).__name__}(crop_size={self.size}, recipe={self.recipe})"


class Payloads(list):
    """The encoded payloads of a batch (their sizes differ, so they stay a list), left in pageable memory
    by the DataLoader's pin_memory thread: the decoder reads them from there."""

    def pin_memory(self):
        return self


def collate_encoded(batch):
    """DataLoader collate of `--device-decode` samples `(fields, target)`: the default collate, the
    payloads kept a list."""
    payloads = Payloads(fields["payload"] for fields, _ in batch)
    images, targets = default_collate([({k: v for k, v in fields.items() if k != "payload"}, target)
                                       for fields, target in batch])
    images["payload"] = payloads
    return images, targets
