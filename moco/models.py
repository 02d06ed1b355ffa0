"""Backbones by torchvision name, with the small-image stem of the upstream CIFAR-10 demo as an option."""
import functools

import torch.nn as nn
import torchvision.models as models

from moco.errors import UserError


def model_names():
    """torchvision's classification model constructors (the reference's `--arch` choices)."""
    return sorted(models.list_models(module=models))


def apply_cifar_stem(model):
    """For 32-64 px images: a 3x3 stride-1 first convolution and no max-pool (ResNets only)."""
    if not isinstance(getattr(model, "conv1", None), nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UserError("--cifar-stem needs a ResNet-style model (with conv1 and maxpool)")
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _build(arch, cifar_stem, **kwargs):
    model = models.__dict__[arch](**kwargs)
    return apply_cifar_stem(model) if cifar_stem else model


def model_constructor(arch, cifar_stem=False):
    """A constructor like `torchvision.models.<arch>`, taking `num_classes`."""
    if arch not in model_names():
        raise UserError(f"unknown --arch '{arch}'")
    if not cifar_stem:
        return models.__dict__[arch]
    return functools.partial(_build, arch, True)
