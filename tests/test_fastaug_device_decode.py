"""Device side of --device-decode (moco/fastaug/device_decode.py): decoding, batched crops against PIL's,
bad files."""
import io
import warnings

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from moco.fastaug.device_decode import DeviceDecoder, bilinear_weights, resized_crops, size_chunks
from moco.fastaug.params import COLOR_FIELDS
from moco.fastaug.worker import EncodedTwoCrops, TwoCropsUint8, collate_encoded, open_lazily, read_encoded
from moco.loader import MOCO_V2

BOXES = [(5, 7, 40, 50, 0), (0, 0, 60, 80, 1), (10, 20, 13, 17, 1), (3, 4, 30, 30, 0), (50, 70, 10, 10, 1)]


def noise_image(height, width, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)


def pil_crop(image, box, size):
    """The reference's crop: torchvision's resized_crop of the PIL image (bilinear, antialiased), flipped."""
    top, left, height, width, flip = box
    out = TF.resized_crop(TF.to_pil_image(image), top, left, height, width, [size, size],
                          interpolation=transforms.InterpolationMode.BILINEAR, antialias=True)
    out = TF.pil_to_tensor(out).float()
    return out.flip(-1) if flip else out


def test_weights_are_normalised_inside_the_box_and_flip_reverses_rows():
    start, length = torch.tensor([3.0, 0.0]), torch.tensor([20.0, 7.0])
    w = bilinear_weights(start, length, 30, 10)
    assert w.shape == (2, 10, 30)
    assert torch.allclose(w.sum(2), torch.ones(2, 10))
    assert w[0, :, :3].abs().max() == 0 and w[0, :, 23:].abs().max() == 0  # nothing outside the box
    assert w[1, :, 7:].abs().max() == 0
    flipped = bilinear_weights(start, length, 30, 10, flip=torch.tensor([1.0, 0.0]))
    assert torch.equal(flipped[0], w[0].flip(0)) and torch.equal(flipped[1], w[1])


@pytest.mark.parametrize("method", ["matmul", "interpolate"])
def test_batched_crops_match_pils_resized_crop(method):
    """Shrinking, enlarging, flipped and whole-image boxes of images of different sizes: within a grey
    level of the reference's PIL crop (PIL rounds to uint8 between its two passes)."""
    images = [noise_image(60, 80, 0), noise_image(75, 90, 1), noise_image(64, 64, 2)]
    boxes = torch.tensor([[BOXES[0], BOXES[1]], [BOXES[2], BOXES[4]], [BOXES[3], (0, 0, 64, 64, 0)]],
                         dtype=torch.float64)
    out = resized_crops(images, boxes, 24, method)
    assert out.shape == (3, 2, 3, 24, 24) and out.dtype == torch.float32
    for n, image in enumerate(images):
        for c in range(2):
            ref = pil_crop(image, [int(v) for v in boxes[n, c].tolist()], 24)
            diff = (out[n, c] - ref).abs()
            assert diff.max() <= 1.0 and diff.mean() < 0.4, (n, c, diff.max())


def test_matmul_and_interpolate_agree():
    images = [noise_image(50 + 7 * i, 40 + 11 * i, i) for i in range(5)]
    g = torch.Generator().manual_seed(0)
    boxes = []
    for image in images:
        h, w = image.shape[1:]
        rows = []
        for _ in range(2):
            bh, bw = int(torch.randint(4, h + 1, (1,), generator=g)), int(torch.randint(4, w + 1, (1,), generator=g))
            top, left = int(torch.randint(0, h - bh + 1, (1,), generator=g)), int(torch.randint(0, w - bw + 1, (1,), generator=g))
            rows.append((top, left, bh, bw, int(torch.randint(0, 2, (1,), generator=g))))
        boxes.append(rows)
    boxes = torch.tensor(boxes, dtype=torch.float64)
    a = resized_crops(images, boxes, 20, "matmul")
    b = resized_crops(images, boxes, 20, "interpolate")
    assert (a - b).abs().max() < 1e-3


def test_size_chunks_cover_every_image_once_with_bounded_padding():
    sizes = [(375, 500), (500, 375), (375, 500), (2000, 3000), (64, 64), (375, 500), (333, 500), (500, 500)]
    chunks = size_chunks(sizes, max_chunk=3, max_padding=1.5)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(sizes)))
    for chunk in chunks:
        assert len(chunk) <= 3
        padded = max(sizes[i][0] for i in chunk) * max(sizes[i][1] for i in chunk) * len(chunk)
        assert len(chunk) == 1 or padded <= 1.5 * sum(sizes[i][0] * sizes[i][1] for i in chunk)
    assert [3] in chunks  # the 2000 x 3000 image is padded with no other


def smooth_jpeg(path, width, height, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8 + 2, width // 8 + 2, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    pixels = (field[0] * 200 + 25).clamp(0, 255).round().to(torch.uint8)
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path, quality=95)
    return str(path)


def encoded_batch(paths, size, seed, recipe=MOCO_V2):
    transform = EncodedTwoCrops(size, recipe)
    samples = []
    for i, path in enumerate(paths):
        torch.manual_seed(seed + i)
        samples.append((transform(read_encoded(path)), 0))
    return collate_encoded(samples)[0]


def test_decoder_matches_the_worker_path_with_the_same_draws(tmp_path):
    """Same seeds: the device path's crops and parameters equal the uint8 worker path's (same draws),
    its pixels within a few grey levels (the worker resizes the box in one PIL pass)."""
    paths = [smooth_jpeg(tmp_path / f"{i}.jpg", 60 + 10 * i, 50, i) for i in range(3)]
    Image.open(paths[0]).convert("L").save(tmp_path / "gray.jpg", quality=95)
    Image.open(paths[1]).save(tmp_path / "png.png")
    paths += [str(tmp_path / "gray.jpg"), str(tmp_path / "png.png")]
    batch = encoded_batch(paths, 24, seed=10)
    crops, source = DeviceDecoder(24, "cpu")(batch)
    assert crops.shape == (5, 2, 3, 24, 24) and 0 <= crops.min() and crops.max() <= 1
    assert source == [0, 1, 2, 3, 4]
    worker = TwoCropsUint8(24, MOCO_V2)
    for i, path in enumerate(paths):
        torch.manual_seed(10 + i)
        drawn = worker(open_lazily(path))
        for name in ("box", "flip", *COLOR_FIELDS):
            assert torch.equal(drawn[name], batch[name][i]), name
        for ours, theirs in zip(crops[i], drawn["crops"]):
            diff = (ours * 255 - theirs.float()).abs()
            assert diff[:, 1:-1, 1:-1].max() <= 2 and diff.mean() < 1.0, (path, diff.max())


def test_undecodable_image_is_reported_and_replaced(tmp_path):
    paths = [smooth_jpeg(tmp_path / f"{i}.jpg", 48, 40, i) for i in range(3)]
    data = io.BytesIO()
    Image.open(paths[1]).save(data, format="JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(data.getvalue()[:len(data.getvalue()) // 2])  # header kept, body cut
    paths.insert(1, str(tmp_path / "cut.jpg"))
    batch = encoded_batch(paths, 16, seed=0)
    reported = []
    crops, source = DeviceDecoder(16, "cpu", on_bad=lambda path, err: reported.append(path))(batch)
    assert reported == [str(tmp_path / "cut.jpg")]
    assert crops.shape == (4, 2, 3, 16, 16) and torch.isfinite(crops).all()
    assert source == [0, 0, 2, 3]  # the replacement is the previous image, with its crops
    alone = encoded_batch([paths[0]], 16, seed=0)
    crops0, _ = DeviceDecoder(16, "cpu")(alone)
    assert torch.allclose(crops[1], crops0[0]) and torch.allclose(crops[0], crops0[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoder_matches_the_cpu_decoder(tmp_path):
    paths = [smooth_jpeg(tmp_path / f"{i}.jpg", 300 + 20 * i, 200 + 30 * i, i) for i in range(6)]
    batch = encoded_batch(paths, 64, seed=3)
    cpu, cpu_source = DeviceDecoder(64, "cpu")(batch)
    decoder = DeviceDecoder(64, "cuda")
    gpu, gpu_source = decoder(batch)
    assert decoder.fallbacks == 0, decoder.fallback_error  # nvJPEG decoded every image
    assert gpu.device.type == "cuda" and cpu_source == gpu_source
    diff = (cpu - gpu.cpu()).abs() * 255  # nvJPEG's IDCT differs from libjpeg-turbo's by a level or two
    assert diff.mean() < 1.0 and diff.max() <= 8


def test_batch_without_jpeg_skips_the_jpeg_decoder(tmp_path):
    """A PNG folder (the built-in data set) gives batches with no JPEG: decode_jpeg([]) would raise."""
    paths = []
    for i in range(3):
        Image.open(smooth_jpeg(tmp_path / f"{i}.jpg", 40 + 8 * i, 36, i)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    batch = encoded_batch(paths, 16, seed=4)
    assert not batch["is_jpeg"].any()  # every image was decoded by the worker
    decoder = DeviceDecoder(16, "cpu")
    crops, _ = decoder(batch)
    assert crops.shape == (3, 2, 3, 16, 16) and decoder.fallbacks == 0
    torch.manual_seed(4)
    wq = TwoCropsUint8(16, MOCO_V2)(open_lazily(paths[0]))["crops"][0]
    assert (crops[0, 0] * 255 - wq.float()).abs()[:, 1:-1, 1:-1].max() <= 2


def test_device_decoder_failures_are_counted_and_announced_once(tmp_path):
    """Files the device decoder refuses but PIL reads (here: PNG bytes announced as JPEG) are decoded on
    the host: counted, and the first one's error said once."""
    paths = [smooth_jpeg(tmp_path / f"{i}.jpg", 48, 40, i) for i in range(2)]
    batch = encoded_batch(paths, 16, seed=0)
    decoder = DeviceDecoder(16, "cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decoder(batch)
    assert decoder.fallbacks == 0 and not [w for w in caught if "decoded with PIL" in str(w.message)]
    for i in range(2):
        data = io.BytesIO()
        Image.open(paths[i]).save(data, format="PNG")
        batch["payload"][i] = torch.frombuffer(bytearray(data.getvalue()), dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crops, _ = decoder(batch)
        decoder(batch)
    assert decoder.fallbacks == 4 and decoder.fallback_error
    said = [str(w.message) for w in caught if "decoded with PIL" in str(w.message)]
    assert len(said) == 1 and decoder.fallback_error in said[0] and paths[0] in said[0]
    assert torch.isfinite(crops).all() and crops.shape == (2, 2, 3, 16, 16)


RACE_ROUNDS = 30


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decodes_are_not_overwritten_by_work_queued_before_them(tmp_path):
    """pytorch/vision issue 9606: nvJPEG writes its outputs from its own stream, without waiting for the
    caller's queued work. Each round frees, on the decoding caller's stream, blocks of the decoded
    images' sizes that a queued kernel will still write after a long sleep; then the same batch is
    decoded again. Decoded into those blocks, an image would be overwritten once the sleep ends. Every
    decode must equal the first."""
    paths = [smooth_jpeg(tmp_path / f"{i}.jpg", 160 + 16 * i, 120 + 8 * i, i) for i in range(8)]
    batch = encoded_batch(paths, 32, seed=5)
    sizes = [3 * h * w for h, w in batch["size"].tolist()]
    decoder = DeviceDecoder(32, "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        first = [image.clone() for image in decoder.decode(batch)]
        decodes = []
        for r in range(RACE_ROUNDS):
            scratch = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sizes]
            torch.cuda._sleep(20_000_000)
            for block in scratch:
                block.fill_(r % 250 + 3)
            del scratch  # back to this stream's pool at once: its next allocations may take them
            decodes.append([image.clone() for image in decoder.decode(batch)])
    torch.cuda.synchronize()
    differ = sum(any(not torch.equal(a, b) for a, b in zip(first, images)) for images in decodes)
    print(f"decoder race: {differ} of {RACE_ROUNDS} decodes differ from the first")
    assert differ == 0, f"{differ} of {RACE_ROUNDS} decodes differ from the first"
    assert decoder.fallbacks == 0, decoder.fallback_error


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decoder_does_not_make_the_host_wait(tmp_path):
    """JPEG and PNG images, crops and all: after a warm-up batch, no host synchronisation."""
    paths = [smooth_jpeg(tmp_path / f"{i}.jpg", 120 + 16 * i, 100, i) for i in range(4)]
    Image.open(paths[0]).save(tmp_path / "png.png")
    batch = encoded_batch(paths + [str(tmp_path / "png.png")], 32, seed=6)
    decoder = DeviceDecoder(32, "cuda")
    decoder(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        crops, _ = decoder(batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert crops.shape == (5, 2, 3, 32, 32) and torch.isfinite(crops).all() and decoder.fallbacks == 0
