"""Device side of `--device-decode`: decode a batch of JPEG files on the training device (nvJPEG on
CUDA, through `torchvision.io.decode_jpeg`), then take each image's two crops, resize them (bilinear,
antialiased, as PIL's resize that the reference's RandomResizedCrop uses) and flip them.

The crops of a batch are computed together: resizing the box (top, left, h, w) of an image to S x S is
`out = Wy @ image @ Wx^T`, where Wy (S x H) and Wx (S x W) hold the bilinear filter's weights (a
triangle of half-width max(1, scale) pixels around each output pixel's centre, restricted to the box
and normalised, exactly PIL's `precompute_coeffs`); a flip reverses the rows of Wx. Images of a chunk
are zero-padded to a common size (their weights are zero there), so a whole chunk is two batched
matrix products whatever the crops. On the CPU, where dense products would waste the work, each crop is
`torch.nn.functional.interpolate(antialias=True)` of its box instead (the same filter).

An image the device cannot decode is decoded with PIL on the host; one that PIL cannot decode either is
reported as unreadable (`on_bad(sample_index, error)`) and replaced by another image of the batch.
"""
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from moco.transfer import to_device, upload

MAX_CHUNK = 64           # images per batched product
MAX_PADDING = 1.5        # padded area / true area of a chunk


def bilinear_weights(start, length, in_size, out_size, flip=None):
    """M x out_size x in_size resampling matrices of M boxes [start, start + length) along one axis.

    Row i of a matrix holds the antialiased bilinear filter centred on output pixel i, as PIL computes
    it (support 1 pixel times the reduction factor when shrinking), zero outside the box, normalised
    to sum 1; rows are reversed where `flip`.
    """
    start = start.to(torch.float32)
    length = length.to(torch.float32)
    device = start.device
    scale = length / out_size                                                     # M
    support = scale.clamp(min=1.0)
    centres = start[:, None] + (torch.arange(out_size, device=device) + 0.5) * scale[:, None]  # M x out
    pixels = torch.arange(in_size, device=device, dtype=torch.float32) + 0.5                   # in
    weights = (1.0 - (pixels[None, None, :] - centres[:, :, None]).abs() / support[:, None, None]).clamp_(min=0)
    inside = (pixels[None, :] > start[:, None]) & (pixels[None, :] < (start + length)[:, None])  # M x in
    weights = weights * inside[:, None, :]
    weights = weights / weights.sum(dim=2, keepdim=True).clamp_(min=1e-12)
    if flip is not None:
        weights = torch.where(flip.to(device).bool()[:, None, None], weights.flip(1), weights)
    return weights


def resized_crops_matmul(images, boxes, size):
    """Crops of same-size images (N x 3 x H x W, any dtype) as float N x 2 x 3 x S x S in the input's
    range; `boxes` is N x 2 x 5 (top, left, height, width, flip) on any device."""
    n, _, height, width = images.shape
    boxes = boxes.to(images.device, torch.float32).reshape(n * 2, 5)
    wy = bilinear_weights(boxes[:, 0], boxes[:, 2], height, size).view(n, 2, 1, size, height)
    wx = bilinear_weights(boxes[:, 1], boxes[:, 3], width, size, flip=boxes[:, 4]).view(n, 2, 1, size, width)
    x = images.to(torch.float32)[:, None]                                         # N x 1 x 3 x H x W
    return torch.matmul(torch.matmul(wy, x), wx.transpose(-1, -2))                # N x 2 x 3 x S x S


def resized_crop_interpolate(image, box, size):
    """One crop of a 3 x H x W image as float 3 x S x S: `interpolate(antialias=True)` of the box."""
    top, left, height, width, flip = (int(v) for v in box.tolist())
    region = image[None, :, top:top + height, left:left + width].to(torch.float32)
    out = F.interpolate(region, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return out.flip(-1) if flip else out


def size_chunks(sizes, max_chunk=MAX_CHUNK, max_padding=MAX_PADDING):
    """Group image indices by size (sorted by area) so that padding each group to its largest height and
    width costs at most `max_padding` times the group's true area."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], sizes[i]))
    chunks, current, area, max_h, max_w = [], [], 0, 0, 0
    for i in order:
        h, w = sizes[i]
        new_h, new_w = max(max_h, h), max(max_w, w)
        if current and (len(current) == max_chunk or
                        new_h * new_w * (len(current) + 1) > max_padding * (area + h * w)):
            chunks.append(current)
            current, area, new_h, new_w = [], 0, h, w
        current.append(i)
        area += h * w
        max_h, max_w = new_h, new_w
    if current:
        chunks.append(current)
    return chunks


def resized_crops(images, boxes, size, method=None):
    """Both crops of each image of the list `images` (3 x H_i x W_i uint8 on one device) as float
    N x 2 x 3 x S x S in [0, 255]. `boxes`: N x 2 x 5 (top, left, height, width, flip). `method`:
    "matmul" (batched products over size chunks), "interpolate" (crop by crop), None: by device."""
    device = images[0].device
    method = method or ("interpolate" if device.type == "cpu" else "matmul")
    out = torch.empty((len(images), 2, 3, size, size), dtype=torch.float32, device=device)
    if method == "interpolate":
        for i, image in enumerate(images):
            for c in range(2):
                out[i, c] = resized_crop_interpolate(image, boxes[i, c].cpu(), size)
        return out
    chunks = size_chunks([tuple(image.shape[1:]) for image in images])
    order = torch.tensor([i for chunk in chunks for i in chunk], dtype=torch.long)
    boxes = boxes.to(torch.float32)
    if boxes.device == device:
        (order,) = upload([order], device)
    else:  # the boxes and the chunks' indices in one copy that does not make the host wait
        boxes, order = upload([boxes, order], device)
    start = 0
    for chunk in chunks:
        height = max(images[i].shape[1] for i in chunk)
        width = max(images[i].shape[2] for i in chunk)
        padded = torch.zeros((len(chunk), 3, height, width), dtype=images[0].dtype, device=device)
        for slot, i in enumerate(chunk):
            padded[slot, :, :images[i].shape[1], :images[i].shape[2]] = images[i]
        index = order[start:start + len(chunk)]
        start += len(chunk)
        out.index_copy_(0, index, resized_crops_matmul(padded, boxes.index_select(0, index), size))
    return out


def pil_decode(payload):
    """Decode JPEG bytes (a uint8 tensor) with PIL as uint8 3 x H x W, or raise PIL's error."""
    with Image.open(io.BytesIO(payload.numpy().tobytes())) as img:
        return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


class DeviceDecoder:
    """Turns a collated `--device-decode` batch (moco.fastaug.worker.EncodedTwoCrops, collate_encoded)
    into float N x 2 x 3 x S x S crops (q, k) in [0, 1] on `device`, and the index of the sample each
    row comes from (`source`: its own, or a stand-in for an unreadable one).

    `on_bad(path, error)` is called for an image that neither the device nor PIL can decode; it is
    replaced by the previous good image of the batch (the next one for the first). An image that the
    device decoder refuses but PIL reads is decoded on the host: `fallbacks` counts them, and the first
    one is announced with its error (a GPU decoder that cannot start would otherwise make every image a
    slow host decode without a word).

    On CUDA, torchvision's decoder allocates its outputs on the current stream but writes them from
    nvJPEG's own stream, which does not wait for the work already queued on the current stream
    (pytorch/vision issue 9606): memory freed by that work could be written before that work has
    finished reading or writing it. So the decoding runs on a stream of its own that holds nothing
    else: its outputs come from memory only ever used by earlier decodes, whose last readers the
    caching allocator waits for (`record_stream`), and explicit events order it after the caller's
    queued work and the caller after it.
    """

    def __init__(self, crop_size, device, on_bad=None, method=None):
        self.size = crop_size
        self.device = torch.device(device)
        self.on_bad = on_bad
        self.method = method
        self.fallbacks = 0
        self.fallback_error = None  # the first device decoder error that sent an image to PIL
        self._stream = None

    def decode(self, batch):
        """The list of uint8 3 x H x W images of the batch on the device (None for unreadable ones)."""
        payload, paths = batch["payload"], batch["path"]
        images = [None] * len(payload)
        jpeg = [i for i, is_jpeg in enumerate(batch["is_jpeg"].tolist()) if is_jpeg]
        pixels = sorted(set(range(len(payload))) - set(jpeg))  # decoded by the worker (PNG, ...)
        sizes = batch["size"].tolist()
        shapes = [tuple(sizes[i]) for i in pixels]
        uploaded = upload([payload[i] for i in pixels], self.device)
        for i, (h, w), image in zip(pixels, shapes, uploaded):
            images[i] = image.view(h, w, 3).permute(2, 0, 1)
        if jpeg:  # decode_jpeg([]) raises: a batch of PNG files has nothing for it
            for i, image in zip(jpeg, self._decode_jpegs([payload[i] for i in jpeg], [paths[i] for i in jpeg])):
                images[i] = image
        return images

    def _decode_jpegs(self, payloads, paths):
        if self.device.type != "cuda":
            return self._decode_all(payloads, paths)
        caller = torch.cuda.current_stream(self.device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            decoded = self._decode_all(payloads, paths)
        caller.wait_stream(self._stream)
        for image in decoded:
            if image is not None:
                image.record_stream(caller)  # freed only once the caller's work on it is done
        return decoded

    def _decode_all(self, payloads, paths):
        try:
            return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:  # one bad file fails the whole batched call: decode one by one
            return [self._decode_one(payload, path) for payload, path in zip(payloads, paths)]

    def _decode_one(self, payload, path):
        try:
            return decode_jpeg(payload, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as err:
            device_error = err
        try:  # formats or corner cases that the device decoder refuses
            image = pil_decode(payload)
        except Exception as err:  # noqa: BLE001 - whatever PIL raises, the image is unreadable
            if self.on_bad is not None:
                self.on_bad(path, err)
            return None
        self._count_fallback(path, device_error)
        return to_device(image, self.device)

    def _count_fallback(self, path, error):
        self.fallbacks += 1
        if self.fallback_error is None:
            self.fallback_error = f"{type(error).__name__}: {str(error).strip()}"
            warnings.warn(f"--device-decode: the {self.device.type} JPEG decoder failed on {path} "
                          f"({self.fallback_error}); such images are decoded with PIL on the host instead "
                          f"(slower), counted in DeviceDecoder.fallbacks; this is said once", RuntimeWarning)

    def __call__(self, batch):
        """(crops, source) of the batch: see the class."""
        images = self.decode(batch)
        keep = [i for i, image in enumerate(images) if image is not None]
        if not keep:
            raise RuntimeError("no image of the batch could be decoded")
        source = [max([k for k in keep if k <= i], default=keep[0]) for i in range(len(images))]
        boxes = torch.cat([batch["box"], batch["flip"][..., None].long()], dim=2).to(torch.float64)[source]
        crops = resized_crops([images[s] for s in source], boxes, self.size, self.method).div_(255.0)
        return crops, source
