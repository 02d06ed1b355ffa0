"""Shared fixtures: small generated ImageNet-layout folders (DIR/train/<class>/*.png, DIR/val/...)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_image_folder(root, classes=3, train_per_class=16, val_per_class=5, size=(40, 48), seed=0):
    """Write random RGB PNGs in the ImageNet layout under `root`; return `root` as a string."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = (rng.random((size[0], size[1], 3)) * 255).astype(np.uint8)
                pixels[..., c % 3] //= 2  # a faint class signal
                Image.fromarray(pixels).save(os.path.join(folder, f"img{i:03d}.png"))
    return str(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A read-only shared folder: 3 classes x 16 train and 5 val images of 40 x 48 px."""
    return make_image_folder(tmp_path_factory.mktemp("images"))
