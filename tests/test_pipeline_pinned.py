"""The training data pipeline's draws and pixels, pinned: every mode (the reference's PIL pipeline,
`--fast-aug`, `--device-decode`), both recipes, the batched and the per-image colour paths, for a
fixed data seed, equal bit for bit to values recorded from the code before the fast path was
reorganised (tests/data/pinned_pipeline.pt).

The recording holds the draws as they are and, for the pixel tensors, their sha256 with their sum (to
say how far a mismatch is); the images are generated here (PNG and JPEG, sizes that make the
JPEG draft decode apply). Library versions other than the recording's may round differently, so the
test skips (saying so) where torch, torchvision, Pillow or numpy differ from the recording. Re-record
only at a commit whose pipeline is known to be right:

    python tests/test_pipeline_pinned.py --record
"""
import argparse
import hashlib
import os
import sys

import numpy as np
import PIL
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import default_collate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import main_moco  # noqa: E402
from moco.fastaug import train_pipeline  # noqa: E402

RECORDING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pinned_pipeline.pt")
DATA_SEED, EPOCH, INDICES = 7, 1, list(range(8))
PIXELS = ("im_q", "im_k", "crops_u8")
PARAM_NAMES = ("jitter", "order", "brightness", "contrast", "saturation", "hue", "gray", "blur", "sigma")
# (mode, aug_plus, crop size): 32 px takes the batched colour path on the CPU, 56 px the per-image one
CASES = [(mode, aug_plus, size) for mode in ("pil", "fast-aug", "device-decode")
         for aug_plus in (False, True) for size in (32, 56)]


def versions():
    return {"torch": torch.__version__.split("+")[0], "torchvision": torchvision.__version__.split("+")[0],
            "Pillow": PIL.__version__, "numpy": np.__version__}


def make_folder(root):
    """2 classes x 4 images: RGB JPEG, grayscale JPEG (large enough for draft decoding), RGB PNG, RGBA PNG."""
    rng = np.random.RandomState(0)
    for c in range(2):
        folder = os.path.join(root, "train", f"class{c}")
        os.makedirs(folder)
        for k, (h, w, kind) in enumerate([(150, 190, "jpeg"), (133, 141, "gray"), (45, 61, "png"),
                                          (70, 52, "rgba")]):
            yy, xx = np.mgrid[0:h, 0:w]
            smooth = (np.sin(xx / (3 + 2 * c + k)) + np.cos(yy / (4 + k))) * 60 + 128
            pixels = np.clip(smooth[..., None] + rng.randint(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            if kind == "jpeg":
                Image.fromarray(pixels).save(os.path.join(folder, f"img{k}.jpg"), quality=90)
            elif kind == "gray":
                Image.fromarray(pixels[..., 0]).save(os.path.join(folder, f"img{k}.jpg"), quality=85)
            elif kind == "png":
                Image.fromarray(pixels).save(os.path.join(folder, f"img{k}.png"))
            else:
                alpha = rng.randint(0, 255, (h, w, 1)).astype(np.uint8)
                Image.fromarray(np.concatenate([pixels, alpha], axis=2)).save(os.path.join(folder, f"img{k}.png"))
    return root


def params_by_name(fields):
    """Colour parameters of N x 2 crops as the recording names them (from the fast path's named fields)."""
    factors = dict(zip(("brightness", "contrast", "saturation", "hue"), fields["factors"].unbind(-1)))
    return {name: factors[name] if name in factors else fields[name] for name in PARAM_NAMES}


def observe(root, mode, aug_plus, size):
    """The pipeline's worker outputs (draws, uint8 crops) and the prepared device batch [im_q, im_k]."""
    args = main_moco.get_args_parser().parse_args(
        ["--crop-size", str(size), "--output-dir", os.path.join(root, "out"), root]
        + (["--aug-plus"] if aug_plus else []) + ({"fast-aug": ["--fast-aug"],
                                                  "device-decode": ["--device-decode"]}.get(mode, [])))
    args.fast_aug = args.fast_aug or args.device_decode
    dataset, collate_fn, prepare = train_pipeline(args, DATA_SEED, torch.device("cpu"))
    samples = [dataset[(EPOCH, i)] for i in INDICES]
    images, targets = (collate_fn or default_collate)(samples)
    out = {"targets": targets}
    if mode == "fast-aug":
        out["crops_u8"] = images["crops"]
        out.update(params_by_name(images))
    elif mode == "device-decode":
        out["size"] = images["size"]
        out["is_jpeg"] = images["is_jpeg"]
        out["boxes"] = torch.cat([images["box"], images["flip"][..., None].long()], dim=2).double()
        out.update(params_by_name(images))
    prepared = prepare(images)
    out["im_q"], out["im_k"] = prepared
    return out


def digest(tensor):
    """What the recording keeps of a pixel tensor: dtype, shape, sha256 of the bytes, and the sum."""
    data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return {"dtype": str(tensor.dtype), "shape": list(tensor.shape), "sha256": hashlib.sha256(data).hexdigest(),
            "sum": float(tensor.double().sum())}


def pinned_form(values):
    return {key: digest(value) if key in PIXELS else value for key, value in values.items()}


def record(path):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(tmp)
        values = {f"{mode}/{aug_plus}/{size}": pinned_form(observe(root, mode, aug_plus, size))
                  for mode, aug_plus, size in CASES}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"versions": versions(), "values": values}, path)
    print(f"recorded {len(values)} cases into {path}")


@pytest.fixture(scope="module")
def recording():
    pinned = torch.load(RECORDING, weights_only=True)
    if pinned["versions"] != versions():
        pytest.skip(f"recorded with {pinned['versions']}, running {versions()}: rounding may differ")
    return pinned["values"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(str(tmp_path_factory.mktemp("pinned")))


@pytest.mark.parametrize("mode,aug_plus,size", CASES)
def test_draws_and_pixels_equal_the_recording(recording, folder, mode, aug_plus, size):
    expected = recording[f"{mode}/{aug_plus}/{size}"]
    got = pinned_form(observe(folder, mode, aug_plus, size))
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if key in PIXELS:  # the sum only says how far a mismatch is: its last bits depend on the threads
            exact = ("dtype", "shape", "sha256")
            assert [got[key][k] for k in exact] == [value[k] for k in exact], f"{key}: {got[key]} != recorded {value}"
        else:
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            assert torch.equal(got[key], value), f"{key}: {got[key]} != recorded {value}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="record the pinned pipeline outputs")
    parser.add_argument("--record", action="store_true")
    if parser.parse_args().record:
        record(RECORDING)
