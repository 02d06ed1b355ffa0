"""moco/device_batches.py: batches prepared on the device, in order, with the same values as inline."""
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from moco.aug_params import ColorRecipe
from moco.batch_aug import BatchAugment
from moco.device_batches import DeviceBatches
from moco.transfer import upload


class PairsWithParams(torch.utils.data.Dataset):
    """uint8 crop pairs with colour parameters, as the --fast-aug workers return them."""

    def __init__(self, n, size=12):
        g = torch.Generator().manual_seed(0)
        self.crops = torch.randint(0, 256, (n, 2, 3, size, size), generator=g, dtype=torch.uint8)
        self.params = ColorRecipe(True).sample_params_tensor(2 * n, generator=g).view(n, 2, -1)

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, i):
        return [(self.crops[i, 0], self.params[i, 0]), (self.crops[i, 1], self.params[i, 1])], i


def expected(dataset, batch, augment):
    out = []
    for start in range(0, len(dataset), batch):
        items = [dataset[i][0] for i in range(start, min(len(dataset), start + batch))]
        pairs = [(torch.stack([it[c][0] for it in items]), torch.stack([it[c][1] for it in items])) for c in range(2)]
        out.append(augment(pairs))
    return out


def test_fast_aug_batches_equal_the_inline_computation():
    dataset = PairsWithParams(10)
    augment = BatchAugment(aug_plus=True)
    batches = DeviceBatches(DataLoader(dataset, batch_size=4), torch.device("cpu"), augment=augment)
    got = list(batches)
    want = expected(dataset, 4, augment)
    assert len(batches) == 3 and len(got) == 3
    for (q, k), (wq, wk) in zip(got, want):
        assert q.dtype == torch.float32 and torch.equal(q, wq) and torch.equal(k, wk)


def test_plain_batches_are_only_moved_and_laid_out():
    images = torch.randn(6, 2, 3, 8, 8)
    loader = DataLoader(TensorDataset(images, torch.arange(6)), batch_size=3,
                        collate_fn=lambda items: ([torch.stack([x[c] for x, _ in items]) for c in range(2)], None))
    got = list(DeviceBatches(loader, torch.device("cpu"), channels_last=True))
    assert len(got) == 2
    for b, (q, k) in enumerate(got):
        assert torch.equal(q, images[3 * b:3 * b + 3, 0]) and torch.equal(k, images[3 * b:3 * b + 3, 1])
        assert q.is_contiguous(memory_format=torch.channels_last)


class SlowOnTheSideStream:
    """BatchAugment behind a long kernel queued on the stream that prepares the batch (the side stream):
    a training stream that did not wait for the batch's event would read it before it is written."""

    def __init__(self, augment, cycles=50_000_000):
        self.augment, self.cycles = augment, cycles

    def __call__(self, images):
        torch.cuda._sleep(self.cycles)
        return self.augment(images)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_side_stream_batches_equal_the_inline_ones_on_cuda():
    dataset = PairsWithParams(24, size=32)
    augment = BatchAugment(aug_plus=True).cuda()
    loader = DataLoader(dataset, batch_size=8, pin_memory=True)
    got = []
    for q, k in DeviceBatches(loader, torch.device("cuda"), augment=SlowOnTheSideStream(augment)):
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
