"""BatchAugment (moco/fastaug/batch_augment.py): a whole augmentation equals the composition of the
reference operations in the recipe's order, on both CPU paths (per image for larger crops, batched for
tiny ones, which the GPU takes too) with the same pixels; shapes, dtypes, the output memory pool, and
CUDA against the CPU.
"""
import pytest
import torch
import torchvision.transforms.functional as TF

from moco import loader
from moco.fastaug.batch_augment import BatchAugment, OutputPool
from moco.fastaug.params import ColorDraws, select
from moco.loader import MOCO_V1, MOCO_V2
from tests.test_fastaug_color_ops import pil_blur_model


def draws(recipe, n, seed):
    return ColorDraws(recipe)(n, generator=torch.Generator().manual_seed(seed))


def reference_composition(x_u8, params, recipe):
    """One image through torchvision's functional ops in the recipe's order, the float64 PIL-blur model
    and torchvision's normalisation."""
    b, c, s, h = params["factors"].tolist()
    jitter_ops = {0: lambda y: TF.adjust_brightness(y, b), 1: lambda y: TF.adjust_contrast(y, c),
                  2: lambda y: TF.adjust_saturation(y, s), 3: lambda y: TF.adjust_hue(y, h)}
    y = x_u8.float() / 255
    for step in recipe.color:
        if isinstance(step, loader.ColorJitterStep) and bool(params["jitter"]):
            for op in params["order"].tolist():
                y = jitter_ops[op](y)
        elif isinstance(step, loader.GrayscaleStep) and bool(params["gray"]):
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        elif isinstance(step, loader.BlurStep) and bool(params["blur"]):
            y = torch.from_numpy(pil_blur_model(y.numpy(), float(params["sigma"]))).float()
    return TF.normalize(y, loader.IMAGENET_MEAN, loader.IMAGENET_STD)


@pytest.mark.parametrize("size", [20, 52], ids=["batched", "per-image"])
@pytest.mark.parametrize("recipe", [MOCO_V1, MOCO_V2], ids=["v1", "v2"])
def test_whole_augmentation_matches_reference_composition(recipe, size):
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (12, 3, size, size), generator=g, dtype=torch.uint8)
    params = draws(recipe, 12, seed=6)
    params["gray"][:2] = torch.tensor([True, False])  # make sure both branches occur
    params["blur"][:2] = torch.tensor([True, True])
    expected = torch.stack([reference_composition(images[i], select(params, i), recipe) for i in range(12)])
    torch.testing.assert_close(BatchAugment(recipe)(images, params), expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("recipe", [MOCO_V1, MOCO_V2], ids=["v1", "v2"])
def test_per_image_and_batched_paths_agree(recipe):
    """The CPU's per-image path (chosen for crops over 48 x 48) and the batched path (tiny crops, GPUs)."""
    images = torch.randint(0, 256, (8, 3, 52, 52), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    params = draws(recipe, 8, seed=2)
    augment = BatchAugment(recipe)
    per_image = augment(images, params)
    batched = augment._batched(images, params)
    torch.testing.assert_close(per_image, batched, atol=5e-5, rtol=0)
    assert torch.equal(per_image, augment._per_image(images, params))


def test_no_op_parameters_give_plain_normalisation():
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    augment = BatchAugment(MOCO_V2)
    params = draws(MOCO_V2, 3, seed=0)
    params["jitter"][:] = False
    params["gray"][:] = False
    params["blur"][:] = False
    expected = TF.normalize(images.float() / 255, loader.IMAGENET_MEAN, loader.IMAGENET_STD)
    torch.testing.assert_close(augment(images, params), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(augment(images.float() / 255, params), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("recipe", [MOCO_V1, MOCO_V2], ids=["v1", "v2"])
def test_shapes_dtypes_and_determinism(recipe):
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    augment = BatchAugment(recipe)
    out = augment(images, draws(recipe, 5, seed=3))
    assert out.dtype == torch.float32 and out.shape == (5, 3, 16, 16) and out.is_contiguous()
    assert torch.equal(out, augment(images, draws(recipe, 5, seed=3)))
    assert not torch.equal(out, augment(images, draws(recipe, 5, seed=4)))
    lo = (0 - torch.tensor(loader.IMAGENET_MEAN)) / torch.tensor(loader.IMAGENET_STD)
    hi = (1 - torch.tensor(loader.IMAGENET_MEAN)) / torch.tensor(loader.IMAGENET_STD)
    assert (out >= lo.view(1, 3, 1, 1) - 1e-5).all() and (out <= hi.view(1, 3, 1, 1) + 1e-5).all()
    assert augment(images[:0], draws(recipe, 0, seed=3)).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError):
        augment(images[:, :1], draws(recipe, 5, seed=3))
    with pytest.raises(ValueError):
        augment(images, draws(recipe, 4, seed=3))


def test_output_memory_is_never_reused_while_in_use():
    augment = BatchAugment(MOCO_V2)
    images = torch.randint(0, 256, (4, 3, 52, 52), dtype=torch.uint8)
    params = draws(MOCO_V2, 4, seed=0)
    first = augment(images, params)
    kept = first.clone()
    view = first[1:3]
    ptr = first.data_ptr()
    del first
    second = augment(images, params)
    assert second.data_ptr() != ptr  # a view of the first batch is still alive
    assert torch.equal(view, kept[1:3])
    third = augment(images, params)
    assert third.data_ptr() not in (second.data_ptr(), ptr)  # the view keeps the first batch alive
    assert torch.equal(view, kept[1:3])
    del view, second, third
    assert augment(images, params).data_ptr() in [b.data_ptr() for b in
                                                  (torch.frombuffer(buf, dtype=torch.uint8) for buf in
                                                   augment._pool.buffers)] or not augment._pool.enabled


def test_output_pool_drops_buffers_nothing_uses_once_full():
    pool = OutputPool(max_buffers=2)
    held = [pool.empty((4,)), pool.empty((4,))]
    assert len(pool.buffers) == 2 or not pool.enabled
    del held
    pool.empty((8,))  # another size: the two free buffers of the full pool make room for it
    assert len(pool.buffers) == 1 or not pool.enabled


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    for recipe in (MOCO_V1, MOCO_V2):
        augment = BatchAugment(recipe)
        params = draws(recipe, 16, seed=0)
        cpu = augment(images, params)
        gpu = augment(images.cuda(), params)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_does_not_make_the_host_wait():
    """After a warm-up batch, augmenting a batch (v1 and v2, partial masks, blur) queues work without one
    host synchronisation: its parameters travel in one copy from pinned memory."""
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, device="cuda")
    for recipe in (MOCO_V2, MOCO_V1):
        augment = BatchAugment(recipe)
        params = draws(recipe, 32, seed=1)
        augment(images, params)  # warm-up: constants, allocator
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = augment(images, params)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.isfinite(out).all()
