"""moco/prefetch.py: batches prepared on the device, in order, with the same values as inline; and the
prepare callables of moco/fastaug/prepare.py that it runs."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from moco.fastaug.batch_augment import BatchAugment
from moco.fastaug.params import ColorDraws, select
from moco.fastaug.prepare import AugmentOnDevice, CopyToDevice, crop_params
from moco.loader import MOCO_V2
from moco.prefetch import DeviceBatches
from moco.transfer import upload


class PairsWithParams(torch.utils.data.Dataset):
    """uint8 crop pairs with colour parameters, as the --fast-aug workers return them."""

    def __init__(self, n, size=12):
        g = torch.Generator().manual_seed(0)
        self.crops = torch.randint(0, 256, (n, 2, 3, size, size), generator=g, dtype=torch.uint8)
        params = ColorDraws(MOCO_V2)(2 * n, generator=g)
        self.params = {name: value.view(n, 2, *value.shape[1:]) for name, value in params.items()}

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, i):
        return {"crops": self.crops[i], **select(self.params, i)}, i


def expected(dataset, batch, augment):
    out = []
    for start in range(0, len(dataset), batch):
        index = slice(start, min(len(dataset), start + batch))
        params = select(dataset.params, index)
        out.append([augment(dataset.crops[index, c], crop_params(params, c)) for c in range(2)])
    return out


def test_fast_aug_batches_equal_the_inline_computation():
    dataset = PairsWithParams(10)
    augment = BatchAugment(MOCO_V2)
    prepare = AugmentOnDevice(augment, "cpu")
    batches = DeviceBatches(DataLoader(dataset, batch_size=4), torch.device("cpu"), prepare)
    got = list(batches)
    want = expected(dataset, 4, augment)
    assert len(batches) == 3 and len(got) == 3
    for (q, k), (wq, wk) in zip(got, want):
        assert q.dtype == torch.float32 and torch.equal(q, wq) and torch.equal(k, wk)


def test_plain_batches_are_only_moved_and_laid_out():
    images = torch.randn(6, 2, 3, 8, 8)
    loader = DataLoader(TensorDataset(images, torch.arange(6)), batch_size=3,
                        collate_fn=lambda items: ([torch.stack([x[c] for x, _ in items]) for c in range(2)], None))
    got = list(DeviceBatches(loader, torch.device("cpu"), CopyToDevice("cpu", channels_last=True)))
    assert len(got) == 2
    for b, (q, k) in enumerate(got):
        assert torch.equal(q, images[3 * b:3 * b + 3, 0]) and torch.equal(k, images[3 * b:3 * b + 3, 1])
        assert q.is_contiguous(memory_format=torch.channels_last)


class SlowOnTheSideStream:
    """BatchAugment behind a long kernel queued on the stream that prepares the batch (the side stream):
    a training stream that did not wait for the batch's event would read it before it is written."""

    def __init__(self, augment, cycles=50_000_000):
        self.augment, self.cycles = augment, cycles

    def __call__(self, images, params):
        torch.cuda._sleep(self.cycles)
        return self.augment(images, params)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_side_stream_batches_equal_the_inline_ones_on_cuda():
    dataset = PairsWithParams(24, size=32)
    augment = BatchAugment(MOCO_V2)
    loader = DataLoader(dataset, batch_size=8, pin_memory=True)
    got = []
    prepare = AugmentOnDevice(SlowOnTheSideStream(augment), "cuda")
    for q, k in DeviceBatches(loader, torch.device("cuda"), prepare):
        got.append((q.clone(), k.clone()))  # on the training stream, at once
    want = expected(dataset, 8, augment)
    assert len(got) == len(want) == 3
    for (q, k), (wq, wk) in zip(got, want):
        assert torch.allclose(q, wq.cuda(), atol=1e-5) and torch.allclose(k, wk.cuda(), atol=1e-5)


def test_upload_packs_tensors_of_any_dtype_and_shape_into_one_copy():
    tensors = [torch.arange(6, dtype=torch.float32).view(2, 3), torch.tensor([True, False, True]),
               torch.zeros(0, dtype=torch.long), torch.arange(5, dtype=torch.int64) - 2,
               torch.rand(3, 1, 5, dtype=torch.float64)[:, :, ::2]]  # a non-contiguous one
    out = upload(tensors, "cpu")
    base = out[0].untyped_storage().data_ptr()
    for a, b in zip(tensors, out):
        assert b.dtype == a.dtype and b.shape == a.shape and torch.equal(a, b)
        assert b.numel() == 0 or b.untyped_storage().data_ptr() == base  # one buffer for all


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_upload_to_cuda_does_not_make_the_host_wait():
    tensors = [torch.rand(4, 3), torch.arange(7), torch.tensor([True, False])]
    upload(tensors, "cuda")  # warm-up: the pinned host allocator's first block
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = upload(tensors, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(tensors, out):
        assert b.is_cuda and torch.equal(a, b.cpu())
