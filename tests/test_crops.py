"""Worker side of the fast path (moco/crops.py): the same draws as torchvision, JPEG draft decoding,
and the encoded samples of --device-decode."""
import io

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from moco.aug_params import PARAM_COLUMNS
from moco.crops import (META_BOXES, META_COLUMNS, META_HEIGHT, META_IS_JPEG, META_PARAMS, META_WIDTH,
                        EncodedTwoCrops, RandomResizedCropFlip, TwoCropsUint8, collate_encoded, draft_decode,
                        read_encoded)


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


def test_draws_are_torchvisions_for_the_header_size():
    """get_params_for_size draws the RandomResizedCrop box and the flip exactly as torchvision would on
    an image of that size, from the same global RNG stream."""
    image = smooth_image(90, 60)
    ours = RandomResizedCropFlip(24)
    torch.manual_seed(3)
    got = [ours.get_params_for_size(90, 60) for _ in range(50)]
    torch.manual_seed(3)
    want = []
    for _ in range(50):
        box = transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3])
        want.append((*box, bool(torch.rand(1) < 0.5)))
    assert got == want


def test_path_input_equals_image_input_when_no_draft_applies(tmp_path):
    path = save(smooth_image(80, 64), tmp_path / "a.jpg", quality=95)
    transform = TwoCropsUint8(32, aug_plus=True)
    torch.manual_seed(0)
    from_path = transform(path)
    torch.manual_seed(0)
    with Image.open(path) as img:
        from_image = transform(img.convert("RGB"))
    for (a, pa), (b, pb) in zip(from_path, from_image):
        assert torch.equal(a, b) and torch.equal(pa, pb)


def test_draft_decode_shrinks_only_when_every_crop_allows_it(tmp_path):
    path = save(smooth_image(800, 640), tmp_path / "big.jpg", quality=95)
    with Image.open(path) as img:
        small = draft_decode(img, [(0, 0, 400, 500), (100, 100, 300, 350)], (64, 64))
    assert small.size[0] < 800 and small.draft_scale[0] < 1  # 300 / 64 > 4: at least a halving
    with Image.open(path) as img:
        full = draft_decode(img, [(0, 0, 400, 500), (0, 0, 100, 100)], (64, 64))
    assert full.size == (800, 640) and full.draft_scale == (1.0, 1.0)  # 100 / 64 < 2: no reduction


def test_draft_decoded_crop_is_within_resampling_noise_of_the_full_decode(tmp_path):
    path = save(smooth_image(800, 640), tmp_path / "big.jpg", quality=95)
    crop = RandomResizedCropFlip(64)
    box = (40, 60, 500, 560, True)
    with Image.open(path) as img:
        reduced = draft_decode(img, [box[:4]], crop.size)
        drafted = crop.apply(reduced, box, reduced.draft_scale)
    with Image.open(path) as img:
        exact = crop.apply(img.convert("RGB"), box)
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
    sample = EncodedTwoCrops(24, aug_plus=True)(read_encoded(path))
    torch.manual_seed(5)
    draws = TwoCropsUint8(24, aug_plus=True).draw(70, 50)
    meta = sample.meta
    assert meta.shape == (META_COLUMNS,) and sample.path == path
    assert (meta[META_HEIGHT], meta[META_WIDTH], meta[META_IS_JPEG]) == (50, 70, 1)
    for c, (box, params) in enumerate(draws):
        assert meta[META_BOXES + 5 * c:META_BOXES + 5 * c + 5].tolist() == [float(v) for v in box]
        assert torch.equal(meta[META_PARAMS + PARAM_COLUMNS * c:META_PARAMS + PARAM_COLUMNS * (c + 1)], params)
    assert bytes(sample.payload.numpy()) == open(path, "rb").read()


def test_collate_keeps_payloads_apart(tmp_path):
    paths = [save(smooth_image(30 + 10 * i, 40), tmp_path / f"{i}.jpg", quality=90) for i in range(3)]
    transform = EncodedTwoCrops(16, aug_plus=False)
    batch, targets = collate_encoded([(transform(read_encoded(p)), i) for i, p in enumerate(paths)])
    assert len(batch) == 3 and batch.meta.shape == (3, META_COLUMNS)
    assert [len(p) for p in batch.payload] == [len(open(p, "rb").read()) for p in paths]
    assert batch.path == paths and targets.tolist() == [0, 1, 2]
    assert batch.pin_memory() is batch


def test_worker_crop_matches_torchvision_on_a_photo_like_image():
    """On natural-looking content torch's uint8 resize is within a grey level or two of PIL's."""
    image = smooth_image(120, 90)
    for box in [(5, 7, 60, 80), (0, 0, 90, 120), (30, 40, 20, 25)]:
        ours = RandomResizedCropFlip(32).apply(image, (*box, False))
        ref = TF.pil_to_tensor(TF.resized_crop(image, *box, [32, 32], transforms.InterpolationMode.BILINEAR,
                                               antialias=True))
        diff = (ours.int() - ref.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.1


def test_unreadable_jpeg_body_fails_in_the_path_transform(tmp_path):
    data = io.BytesIO()
    smooth_image(64, 64).save(data, format="JPEG", quality=90)
    (tmp_path / "cut.jpg").write_bytes(data.getvalue()[:300])
    with pytest.raises(OSError):
        TwoCropsUint8(16, aug_plus=True)(str(tmp_path / "cut.jpg"))
