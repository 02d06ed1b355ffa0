"""Worker side of the fast path (moco/fastaug/worker.py): the same draws as torchvision, the crops,
JPEG draft decoding, unreadable files, and the encoded samples of --device-decode."""
import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from torch.utils.data import default_collate

from moco.data import ImageReadError, RobustImageFolder
from moco.fastaug.params import COLOR_FIELDS
from moco.fastaug.worker import (CropDraws, EncodedTwoCrops, Payloads, TwoCropsUint8, collate_encoded,
                                 draft_decode, draw_two_crops, open_lazily, pixels_of, read_encoded, resized_crop)
from moco.loader import MOCO_V1, MOCO_V2


def smooth_image(width, height, seed=0):
    """A photo-like RGB image (smooth colour field): JPEG and resampling noise stay small on it."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 16 + 2, width // 16 + 2, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    pixels = (field[0] * 200 + 25).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def save(image, path, **kwargs):
    image.save(path, **kwargs)
    return str(path)


@pytest.mark.parametrize("recipe", [MOCO_V1, MOCO_V2], ids=["v1", "v2"])
def test_draws_are_torchvisions_for_the_header_size(recipe):
    """CropDraws draws the RandomResizedCrop box and the flip exactly as torchvision would on an image of
    that size, from the same global RNG stream, with the recipe's scale, ratio and flip probability."""
    image = smooth_image(90, 60)
    torch.manual_seed(3)
    got = [CropDraws(recipe)(90, 60) for _ in range(50)]
    torch.manual_seed(3)
    want = []
    for _ in range(50):
        box = transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])
        want.append((tuple(box), bool(torch.rand(1) < 0.5)))
    assert [(tuple(b), f) for b, f in got] == want


def test_draw_two_crops_draws_box_flip_then_colour_per_crop():
    torch.manual_seed(9)
    draws = draw_two_crops(MOCO_V2, 70, 50)
    assert draws["box"].shape == (2, 4) and draws["box"].dtype == torch.long
    assert draws["flip"].shape == (2,) and draws["flip"].dtype == torch.bool
    assert draws["factors"].shape == (2, 4) and draws["order"].shape == (2, 4)
    assert set(draws) == {"box", "flip", *COLOR_FIELDS}
    torch.manual_seed(9)
    box, flip = CropDraws(MOCO_V2)(70, 50)
    u = torch.rand(1, 12)  # the first crop's colour uniforms come right after its box and flip
    assert draws["box"][0].tolist() == list(box) and bool(draws["flip"][0]) == flip
    assert bool(draws["gray"][0]) == bool(u[0, 9] < 0.2)


def test_lazily_opened_image_equals_decoded_image_when_no_draft_applies(tmp_path):
    path = save(smooth_image(80, 64), tmp_path / "a.jpg", quality=95)
    transform = TwoCropsUint8(32, MOCO_V2)
    torch.manual_seed(0)
    lazy = transform(open_lazily(path))
    torch.manual_seed(0)
    with Image.open(path) as img:
        decoded = transform(img.convert("RGB"))
    assert lazy.keys() == decoded.keys()
    assert all(torch.equal(lazy[k], decoded[k]) for k in lazy)
    assert lazy["crops"].shape == (2, 3, 32, 32) and lazy["crops"].dtype == torch.uint8


def test_draft_decode_shrinks_only_when_every_crop_allows_it(tmp_path):
    path = save(smooth_image(800, 640), tmp_path / "big.jpg", quality=95)
    with Image.open(path) as img:
        small, scale = draft_decode(img, [(0, 0, 400, 500), (100, 100, 300, 350)], 64)
    assert small.size[0] < 800 and scale[0] < 1  # 300 / 64 > 4: at least a halving
    with Image.open(path) as img:
        full, scale = draft_decode(img, [(0, 0, 400, 500), (0, 0, 100, 100)], 64)
    assert full.size == (800, 640) and scale == (1.0, 1.0)  # 100 / 64 < 2: no reduction


def test_draft_decoded_crop_is_within_resampling_noise_of_the_full_decode(tmp_path):
    path = save(smooth_image(800, 640), tmp_path / "big.jpg", quality=95)
    box = (40, 60, 500, 560)
    with Image.open(path) as img:
        reduced, scale = draft_decode(img, [box], 64)
        drafted = resized_crop(pixels_of(reduced), box, True, 64, scale)
    with Image.open(path) as img:
        exact = resized_crop(pixels_of(img), box, True, 64)
    diff = (drafted.int() - exact.int()).abs()
    assert diff.float().mean() < 1.5 and diff.max() <= 12


def test_read_encoded_keeps_jpeg_bytes_and_decodes_other_formats(tmp_path):
    image = smooth_image(40, 30)
    jpeg = read_encoded(save(image, tmp_path / "a.jpg", quality=90))
    assert jpeg.is_jpeg and jpeg.pixels is None and (jpeg.width, jpeg.height) == (40, 30)
    assert jpeg.data == open(tmp_path / "a.jpg", "rb").read()
    gray = read_encoded(save(image.convert("L"), tmp_path / "g.jpg", quality=90))
    assert gray.is_jpeg  # the device decoder converts grayscale JPEGs to RGB itself
    png = read_encoded(save(image, tmp_path / "a.png"))
    assert not png.is_jpeg and png.pixels.shape == (30, 40, 3)
    assert np.array_equal(png.pixels, np.asarray(image))
    cmyk = read_encoded(save(image.convert("CMYK"), tmp_path / "c.jpg", quality=90))
    assert not cmyk.is_jpeg and cmyk.pixels.shape == (30, 40, 3)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(OSError):
        read_encoded(str(tmp_path / "text.jpg"))


def test_encoded_sample_holds_the_same_draws_as_the_uint8_path(tmp_path):
    path = save(smooth_image(70, 50), tmp_path / "a.jpg", quality=90)
    torch.manual_seed(5)
    sample = EncodedTwoCrops(24, MOCO_V2)(read_encoded(path))
    torch.manual_seed(5)
    uint8 = TwoCropsUint8(24, MOCO_V2)(open_lazily(path))
    assert sample["path"] == path and sample["size"].tolist() == [50, 70] and bool(sample["is_jpeg"])
    for name in ("box", "flip", *COLOR_FIELDS):
        assert torch.equal(sample[name], uint8[name]), name
    assert bytes(sample["payload"].numpy()) == open(path, "rb").read()


def test_collate_keeps_payloads_apart(tmp_path):
    paths = [save(smooth_image(30 + 10 * i, 40), tmp_path / f"{i}.jpg", quality=90) for i in range(3)]
    transform = EncodedTwoCrops(16, MOCO_V1)
    samples = [(transform(read_encoded(p)), i) for i, p in enumerate(paths)]
    batch, targets = collate_encoded(samples)
    assert batch["box"].shape == (3, 2, 4) and batch["factors"].shape == (3, 2, 4)
    assert [len(p) for p in batch["payload"]] == [len(open(p, "rb").read()) for p in paths]
    assert batch["path"] == paths and targets.tolist() == [0, 1, 2]
    assert isinstance(batch["payload"], Payloads) and batch["payload"].pin_memory() is batch["payload"]
    assert all("payload" in fields for fields, _ in samples)  # the samples are left as they were


def test_uint8_samples_collate_by_default(tmp_path):
    paths = [save(smooth_image(40, 40, seed=i), tmp_path / f"{i}.png") for i in range(3)]
    transform = TwoCropsUint8(16, MOCO_V2)
    batch, _ = default_collate([(transform(open_lazily(p)), 0) for p in paths])
    assert batch["crops"].shape == (3, 2, 3, 16, 16) and batch["crops"].dtype == torch.uint8
    assert batch["sigma"].shape == (3, 2) and batch["order"].shape == (3, 2, 4)


def test_worker_crop_matches_torchvision_on_a_photo_like_image():
    """On natural-looking content torch's uint8 resize is within a grey level or two of PIL's."""
    image = smooth_image(120, 90)
    for box in [(5, 7, 60, 80), (0, 0, 90, 120), (30, 40, 20, 25)]:
        ours = resized_crop(pixels_of(image), box, False, 32)
        ref = TF.pil_to_tensor(TF.resized_crop(image, *box, [32, 32], transforms.InterpolationMode.BILINEAR,
                                               antialias=True))
        diff = (ours.int() - ref.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.1


def test_worker_crop_equals_torchvision_crop_and_flip_on_noise():
    """The same box, filter and flip as torchvision's crop-then-resize on PIL; torch's uint8 kernel rounds
    differently from PIL's, by a grey level or so even on noise."""
    g = torch.Generator().manual_seed(0)
    image = TF.to_pil_image(torch.randint(0, 256, (3, 50, 70), generator=g, dtype=torch.uint8))
    for box, flip in [((3, 5, 30, 40), False), ((0, 0, 50, 70), True), ((10, 20, 20, 15), True)]:
        out = resized_crop(pixels_of(image), box, flip, 24)
        crop = TF.resized_crop(image, *box, [24, 24], interpolation=transforms.InterpolationMode.BILINEAR,
                               antialias=True)
        if flip:
            crop = TF.hflip(crop)
        assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
        diff = (out.int() - TF.pil_to_tensor(crop).int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.3, (box, diff.max())


def cut_jpeg(path):
    """A JPEG whose header is whole and whose body is cut: it opens, and fails only when decoded."""
    data = io.BytesIO()
    smooth_image(160, 120).save(data, format="JPEG", quality=90)
    path.write_bytes(data.getvalue()[:len(data.getvalue()) // 2])
    return str(path)


def test_unreadable_jpeg_body_is_an_image_read_error_of_the_transform(tmp_path):
    image = open_lazily(cut_jpeg(tmp_path / "cut.jpg"))  # the header reads
    with pytest.raises(ImageReadError) as caught:
        TwoCropsUint8(16, MOCO_V2)(image)
    assert isinstance(caught.value.error, OSError)


def test_fast_aug_folder_reports_a_body_only_corrupt_jpeg_once_and_reads_around_it(tmp_path, capsys):
    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for i in range(3):
            save(smooth_image(48, 40, seed=3 * c + i), tmp_path / f"c{c}" / f"{i}.jpg", quality=90)
    bad = cut_jpeg(tmp_path / "c0" / "0.jpg")
    dataset = RobustImageFolder(str(tmp_path), TwoCropsUint8(16, MOCO_V1), data_seed=0, loader=open_lazily)
    for epoch in range(2):
        for index in range(len(dataset)):
            fields, _ = dataset[(epoch, index)]
            assert fields["crops"].shape == (2, 3, 16, 16)
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 1 and bad in err and "OSError" in err
    assert dataset.bad_images == 1
