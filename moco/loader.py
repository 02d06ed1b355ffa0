"""Augmentations of MoCo v1 and v2 (He et al. 2019, Sec. 4; Chen et al. 2020, Sec. 3).

Every recipe is a function of the crop size so that the scripts, the tests and the benchmarks share one
definition; 224 reproduces the papers.
"""
import random

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


def moco_v1_augmentation(crop_size=224):
    """MoCo v1 (the default): crop, grayscale, strong colour jitter, flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.0)),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize(),
    ])


def moco_v2_augmentation(crop_size=224):
    """MoCo v2 (`--aug-plus`): SimCLR-style jitter applied with p=0.8, grayscale, blur with p=0.5, flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize(),
    ])


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
