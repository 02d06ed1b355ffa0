"""Augmentations of MoCo v1 and v2 (He et al. 2019, Sec. 4; Chen et al. 2020, Sec. 3).

Each pre-training recipe is declared once (`MOCO_V1`, `MOCO_V2`: numbers and order of the steps); the
PIL pipeline here and the fast path (moco.fastaug) are both built from that declaration. Every
pipeline is a function of the crop size; 224 reproduces the papers.
"""
import random
from dataclasses import dataclass

from PIL import ImageFilter
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TwoCropsTransform:
    """Apply `base_transform` twice to one decoded image: the query and the key view, `[q, k]`."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, image):
        return [self.base_transform(image), self.base_transform(image)]

    def __repr__(self):
        return f"{type(self).__name__}({self.base_transform!r})"


class GaussianBlur:
    """Gaussian blur of a PIL image with sigma drawn uniformly from `sigma` (SimCLR's blur, MoCo v2).

    PIL's `GaussianBlur(radius)` uses the radius as the standard deviation of the kernel.
    """

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = tuple(sigma)

    def draw_sigma(self):
        return random.uniform(self.sigma[0], self.sigma[1])

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=self.draw_sigma()))

    def __repr__(self):
        return f"{type(self).__name__}(sigma={self.sigma})"


def normalize():
    return transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


@dataclass(frozen=True)
class ColorJitterStep:
    """ColorJitter(brightness, contrast, saturation, hue), applied with probability `p`."""
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    p: float = 1.0


@dataclass(frozen=True)
class GrayscaleStep:
    """RandomGrayscale(p)."""
    p: float = 0.0


@dataclass(frozen=True)
class BlurStep:
    """GaussianBlur with sigma drawn uniformly from `sigma`, applied with probability `p`."""
    sigma: tuple = (0.1, 2.0)
    p: float = 0.0


@dataclass(frozen=True)
class Recipe:
    """One augmentation recipe of pre-training: RandomResizedCrop(scale, ratio), the colour steps in
    their order, RandomHorizontalFlip(flip_p). Every pipeline mode is built from it: the PIL pipeline
    (`augmentation`), and the fast path's worker draws and device operations (moco.fastaug)."""
    color: tuple
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5

    def step(self, kind):
        """The recipe's colour step of type `kind`, or None."""
        return next((s for s in self.color if isinstance(s, kind)), None)


# MoCo v1 (He et al. 2019, Sec. 4): grayscale, then strong colour jitter on every image.
MOCO_V1 = Recipe(color=(GrayscaleStep(p=0.2), ColorJitterStep(0.4, 0.4, 0.4, 0.4, p=1.0)))
# MoCo v2 (Chen et al. 2020, Sec. 3; SimCLR's colour distortion and blur): jitter with p=0.8, grayscale,
# blur with p=0.5.
MOCO_V2 = Recipe(color=(ColorJitterStep(0.4, 0.4, 0.4, 0.1, p=0.8), GrayscaleStep(p=0.2),
                        BlurStep(sigma=(0.1, 2.0), p=0.5)))


def recipe(aug_plus=False):
    """The declared recipe of `--aug-plus` (v2) or not (v1), looked up when called."""
    return MOCO_V2 if aug_plus else MOCO_V1


def _maybe(transform, p):
    # RandomApply draws a number even for p=1: a step that always applies stays a plain transform
    return transform if p >= 1.0 else transforms.RandomApply([transform], p=p)


def _pil_step(step):
    if isinstance(step, ColorJitterStep):
        return _maybe(transforms.ColorJitter(step.brightness, step.contrast, step.saturation, step.hue), step.p)
    if isinstance(step, GrayscaleStep):
        return transforms.RandomGrayscale(p=step.p)
    if isinstance(step, BlurStep):
        return _maybe(GaussianBlur(step.sigma), step.p)
    raise TypeError(f"unknown colour step {step!r}")


def augmentation(declared, crop_size=224):
    """The PIL pipeline of a declared `Recipe`: crop, colour steps, flip, to tensor, normalise."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=declared.scale, ratio=declared.ratio),
        *[_pil_step(step) for step in declared.color],
        transforms.RandomHorizontalFlip(p=declared.flip_p),
        transforms.ToTensor(),
        normalize(),
    ])


def moco_v1_augmentation(crop_size=224):
    """MoCo v1 (the default): crop, grayscale, strong colour jitter, flip."""
    return augmentation(recipe(False), crop_size)


def moco_v2_augmentation(crop_size=224):
    """MoCo v2 (`--aug-plus`): SimCLR-style jitter applied with p=0.8, grayscale, blur with p=0.5, flip."""
    return augmentation(recipe(True), crop_size)


def pretrain_transform(aug_plus=False, crop_size=224):
    """The two-crop transform of pre-training: v2 augmentation when `aug_plus`, else v1."""
    base = moco_v2_augmentation(crop_size) if aug_plus else moco_v1_augmentation(crop_size)
    return TwoCropsTransform(base)


def linear_train_transform(crop_size=224):
    """Training transform of the linear-classification protocol."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize(),
    ])


def val_resize_size(crop_size=224):
    """Resize side before the centre crop: 256 for 224, the same 0.875 ratio for other crops."""
    return round(crop_size / 0.875)


def linear_val_transform(crop_size=224):
    """Validation transform: resize the short side to crop/0.875, then centre-crop."""
    return transforms.Compose([
        transforms.Resize(val_resize_size(crop_size)),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        normalize(),
    ])
