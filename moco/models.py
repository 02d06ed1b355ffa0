"""Backbones by torchvision name, with the small-image stem of the upstream CIFAR-10 demo as an option."""
import functools

import torch
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


def require_usable_arch(arch, cifar_stem, crop_size, fc_needed_by=None):
    """Refuse at start, with one line, an --arch that cannot serve this run: one that does not build,
    has no final Linear layer named `fc` although `fc_needed_by` (MoCo v2's --mlp head, the linear
    protocol) replaces or trains it, or cannot take crops of --crop-size pixels (a ViT's fixed image
    size, Inception's 75 px minimum). The model is built on the meta device, which allocates no memory
    and computes nothing but shapes, so the check costs well under a second even for large models."""
    constructor = model_constructor(arch, cifar_stem)
    on_meta = True
    try:
        try:
            with torch.device("meta"):
                model = constructor(num_classes=2)
        except NotImplementedError:  # its initialisation reads values (RegNet): build it for real
            model, on_meta = constructor(num_classes=2), False
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001  (any failure to build is the choice of --arch)
        raise UserError(f"--arch {arch} cannot be built here ({describe_failure(err)})") from None
    if fc_needed_by and not isinstance(getattr(model, "fc", None), nn.Linear):
        raise UserError(f"--arch {arch} has no final Linear layer named 'fc', which {fc_needed_by} needs; "
                        f"use a ResNet-style model (resnet*, resnext*, wide_resnet*, regnet_*)")
    if not on_meta:
        return  # a real forward pass would cost real time; the crop size is left to the first step
    try:
        with torch.no_grad():
            model.eval()(torch.empty(2, 3, crop_size, crop_size, device="meta"))
    except NotImplementedError:
        pass  # an operation without a meta implementation: the shapes cannot be checked this way
    except Exception as err:  # noqa: BLE001  (a shape error: the model cannot take such images)
        raise UserError(f"--arch {arch} cannot take {crop_size} x {crop_size} px crops (--crop-size "
                        f"{crop_size}): {describe_failure(err)}") from None


def describe_failure(err):
    """The first line of an exception, short enough for a one-line message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__
