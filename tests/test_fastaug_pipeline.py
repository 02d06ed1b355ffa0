"""moco.fastaug.train_pipeline, the one door of the training data path: every mode is built from the
recipe declared in moco/loader.py. Changing one number and one step's order in that declaration
changes the PIL pipeline, the workers' draws and the device's operations alike."""
import dataclasses
import os

import pytest
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import default_collate
from torchvision import transforms as T

import main_moco
from moco import loader
from moco.fastaug import train_pipeline
from moco.loader import BlurStep, ColorJitterStep, GrayscaleStep
from tests.test_fastaug_color_ops import pil_blur_model
from tests.test_pipeline_pinned import make_folder

MODES = {"pil": [], "fast-aug": ["--fast-aug"], "device-decode": ["--device-decode"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(str(tmp_path_factory.mktemp("door")))


def build(folder, mode, size=32):
    """What main_moco.py builds for `mode` with --aug-plus, and one collated batch of all 8 images."""
    args = main_moco.get_args_parser().parse_args(
        ["--aug-plus", "--crop-size", str(size), "--output-dir", os.path.join(folder, "out"), folder] + MODES[mode])
    dataset, collate_fn, prepare = train_pipeline(args, 3, torch.device("cpu"))
    images, _ = (collate_fn or default_collate)([dataset[(0, i)] for i in range(len(dataset))])
    return dataset, images, prepare


DECLARED_V2 = loader.MOCO_V2
JITTER, GRAY, BLUR = DECLARED_V2.color
# MoCo v2 with grayscale always applied (one number: p 0.2 -> 1) and moved before the jitter (one order)
CHANGED_V2 = dataclasses.replace(DECLARED_V2, color=(GrayscaleStep(p=1.0), JITTER, BLUR))
# the same number in the declared order: what a mode that ignored the new order would compute
NUMBER_ONLY_V2 = dataclasses.replace(DECLARED_V2, color=(JITTER, GrayscaleStep(p=1.0), BLUR))


def test_the_declared_v2_is_jitter_gray_blur():
    assert isinstance(JITTER, ColorJitterStep) and isinstance(GRAY, GrayscaleStep) and isinstance(BLUR, BlurStep)
    assert GRAY.p == 0.2


def composed(y, params, recipe):
    """Float images in [0, 1] through torchvision's ops in the order of `recipe`, then normalised."""
    out = []
    for i in range(y.shape[0]):
        x = y[i]
        b, c, s, h = params["factors"][i].tolist()
        ops = {0: lambda v: TF.adjust_brightness(v, b), 1: lambda v: TF.adjust_contrast(v, c),
               2: lambda v: TF.adjust_saturation(v, s), 3: lambda v: TF.adjust_hue(v, h)}
        for step in recipe.color:
            if isinstance(step, ColorJitterStep) and params["jitter"][i]:
                for op in params["order"][i].tolist():
                    x = ops[op](x)
            elif isinstance(step, GrayscaleStep) and params["gray"][i]:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            elif isinstance(step, BlurStep) and params["blur"][i]:
                x = torch.from_numpy(pil_blur_model(x.numpy(), float(params["sigma"][i]))).float()
        out.append(TF.normalize(x, loader.IMAGENET_MEAN, loader.IMAGENET_STD))
    return torch.stack(out)


def test_the_pil_pipeline_follows_the_declaration(folder, monkeypatch):
    dataset, _, _ = build(folder, "pil")
    steps = dataset.transform.base_transform.transforms
    assert [type(t) for t in steps[1:4]] == [T.RandomApply, T.RandomGrayscale, T.RandomApply]
    monkeypatch.setattr(loader, "MOCO_V2", CHANGED_V2)
    dataset, (q, k), _ = build(folder, "pil")
    steps = dataset.transform.base_transform.transforms
    assert [type(t) for t in steps[1:4]] == [T.RandomGrayscale, T.RandomApply, T.RandomApply]
    assert steps[1].p == 1.0
    mean, std = torch.tensor(loader.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(loader.IMAGENET_STD).view(3, 1, 1)
    for view in (q, k):  # gray first, then a jitter that keeps gray images gray: every view is gray
        pixels = view * std + mean
        assert (pixels[:, 0] - pixels[:, 1]).abs().max() < 1e-5 and (pixels[:, 1] - pixels[:, 2]).abs().max() < 1e-5


@pytest.mark.parametrize("mode,size", [("fast-aug", 32), ("fast-aug", 56), ("device-decode", 32)])
def test_the_draws_and_the_device_ops_follow_the_declaration(folder, monkeypatch, mode, size):
    _, images, _ = build(folder, mode, size)
    assert not images["gray"].all()  # the declared v2: grayscale with p = 0.2
    monkeypatch.setattr(loader, "MOCO_V2", CHANGED_V2)
    _, images, prepare = build(folder, mode, size)
    assert images["gray"].all()  # the workers draw the new number
    q, k = prepare(images)
    if mode == "fast-aug":
        crops = images["crops"].float() / 255
    else:
        crops, _ = prepare.decoder(images)  # every image of the folder is readable: its own crops
    for c, view in enumerate((q, k)):
        params = {name: images[name][:, c] for name in ("jitter", "order", "factors", "gray", "blur", "sigma")}
        torch.testing.assert_close(view, composed(crops[:, c], params, CHANGED_V2), atol=5e-5, rtol=0)
        # the declared order (jitter, then gray) gives other pixels
        assert (view - composed(crops[:, c], params, NUMBER_ONLY_V2)).abs().max() > 1e-3
