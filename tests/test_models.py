"""Backbone construction by torchvision name, with the optional small-image stem."""
import pytest
import torch
import torch.nn as nn
import torchvision

from moco.errors import UserError
from moco.models import apply_cifar_stem, model_constructor, model_names


def test_model_names_are_torchvision_constructors():
    names = model_names()
    assert {"resnet18", "resnet50", "resnet101", "resnext50_32x4d"} <= set(names)
    assert names == sorted(names)
    assert all(callable(getattr(torchvision.models, name)) for name in names)


def test_plain_constructor_is_torchvision_s():
    assert model_constructor("resnet18") is torchvision.models.resnet18
    model = model_constructor("resnet18")(num_classes=7)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model.fc.out_features == 7


def test_cifar_stem_is_a_3x3_stride_1_conv_and_no_maxpool():
    model = model_constructor("resnet18", cifar_stem=True)(num_classes=10)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert model.conv1.in_channels == 3 and model.conv1.out_channels == 64
    assert model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 10
    features = {}
    model.layer1.register_forward_hook(lambda module, inputs, output: features.update(layer1=output))
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert features["layer1"].shape[-2:] == (32, 32)  # no down-sampling in the stem


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="no_such_net"):
        model_constructor("no_such_net")
    with pytest.raises(UserError):
        model_constructor("no_such_net", cifar_stem=True)


def test_cifar_stem_needs_a_resnet_style_model():
    with pytest.raises(UserError, match="--cifar-stem"):
        apply_cifar_stem(nn.Sequential(nn.Conv2d(3, 4, 3)))


def test_architectures_that_cannot_serve_the_run_are_refused():
    from moco.models import require_usable_arch
    require_usable_arch("resnet18", True, 8, fc_needed_by="--mlp")
    require_usable_arch("mobilenet_v2", False, 32)  # MoCo without --mlp replaces its classifier: fine
    with pytest.raises(UserError, match="mobilenet_v2 has no final Linear layer named 'fc', which --mlp needs"):
        require_usable_arch("mobilenet_v2", False, 32, fc_needed_by="--mlp")
    with pytest.raises(UserError, match=r"vit_b_16 cannot take 8 x 8 px crops \(--crop-size 8\)"):
        require_usable_arch("vit_b_16", False, 8)
    with pytest.raises(UserError, match="--cifar-stem needs a ResNet-style model"):
        require_usable_arch("mobilenet_v2", True, 8)
