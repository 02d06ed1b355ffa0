"""What only a GPU exercises: mixed precision (bf16, and fp16 with its GradScaler) against fp32,
`--compile`, NCCL (a world of one, and two processes where there are two GPUs), and the scripts end to
end with `--amp --channels-last --fast-aug`.

Every test here is marked `cuda`: conftest skips it, with the reason, where torch sees no CUDA device.
(BatchAugment on CUDA against the CPU is tests/test_fastaug_batch_augment.py::test_cuda_matches_cpu.)
"""
import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import cuda_env
from moco import builder
from moco.distributed import all_reduce_sum, concat_all_gather, plan_launch, process_group
from moco.models import model_constructor
from moco.precision import Precision

import main_moco

pytestmark = pytest.mark.cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, K, BATCH, CROP = 32, 256, 16, 32
# |loss(amp) - loss(fp32)| <= TOLERANCE * loss(fp32), for the first step and for the step after one SGD
# update. bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation), fp16 11 bits (2^-12);
# the loss is ~log(K + 1) = 5.5, and the logits are cosines over T = 0.2, so a few 1e-3 of relative error
# is expected in bf16; a wrong cast, a lost scale or an unscaled step is off by far more (or not finite).
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2}


def first_gpu_env(**extra):
    """The environment of a child that sees one GPU: the first one this process sees."""
    return cuda_env(threads=2, one_gpu=True, **extra)


def make_moco(device="cuda"):
    torch.manual_seed(0)
    model = builder.MoCo(model_constructor("resnet18", cifar_stem=True), dim=DIM, K=K, m=0.99, T=0.2, mlp=True)
    return model.to(device)


def batch(seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 3, CROP, CROP, generator=g).to(device) for _ in range(2)]


def amp_precision(dtype, device):
    """`Precision` for --amp as it is on a GPU whose best autocast type is `dtype`: bf16 where supported,
    else fp16 with a GradScaler (built here for fp16 on a GPU that also has bf16)."""
    precision = Precision(True, device)
    if dtype == torch.float16 and precision.dtype != torch.float16:
        precision.dtype = torch.float16
        precision.scaler = torch.amp.GradScaler("cuda")
    assert precision.dtype == dtype and (precision.scaler is not None) == (dtype == torch.float16)
    return precision


def train_steps(model, precision, steps=2, channels_last=False):
    """`steps` training steps as main_moco does them; returns each step's loss (taken before its update)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, weight_decay=1e-4,
                                fused=precision.fused_sgd or None)  # fused with fp16's GradScaler
    if channels_last:
        model.to(memory_format=torch.channels_last)
    losses = []
    for step in range(steps):
        im_q, im_k = batch(step)
        if channels_last:
            im_q, im_k = (x.contiguous(memory_format=torch.channels_last) for x in (im_q, im_k))
        torch.manual_seed(100 + step)  # the key shuffle's permutation
        with precision.autocast():
            logits, labels = model(im_q, im_k)
            loss = builder.contrastive_loss(logits.float(), labels)
        precision.backward_and_step(loss, optimizer)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_amp_training_steps_match_fp32(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    device = torch.device("cuda")
    reference = make_moco()
    model = copy.deepcopy(reference)
    expected = train_steps(reference, Precision(False, device))
    precision = amp_precision(dtype, device)
    got = train_steps(model, precision, channels_last=True)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= TOLERANCE[dtype] * b, f"step {step}: {dtype} loss {a}, fp32 {b}"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = [not torch.equal(p, q) for p, q in zip(model.encoder_q.parameters(), make_moco().encoder_q.parameters())]
    assert all(moved)  # every query-encoder parameter was updated (an fp16 step skipped for inf would not)
    if precision.scaler is not None:
        assert precision.scaler.get_scale() > 1.0 and precision.state_dict()["_growth_tracker"] >= 1


def test_compile_keeps_state_dict_keys_and_loss():
    device = torch.device("cuda")
    reference = make_moco()
    compiled = copy.deepcopy(reference)
    compiled.encoder_q.compile()  # as main_moco.py does for --compile
    compiled.encoder_k.compile()
    assert list(compiled.state_dict()) == list(reference.state_dict())
    expected = train_steps(reference, Precision(False, device))
    got = train_steps(compiled, Precision(False, device))
    for step, (a, b) in enumerate(zip(got, expected)):
        assert abs(a - b) <= 1e-3 * b, f"step {step}: compiled loss {a}, eager {b}"
    # a checkpoint of the compiled model loads into a plain one, strictly
    plain = make_moco()
    plain.load_state_dict(compiled.state_dict(), strict=True)
    for key, value in compiled.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key


def test_nccl_world_of_one():
    args = main_moco.get_args_parser().parse_args(["--gpu", "0"])
    assert args.dist_backend == "nccl"
    plan = plan_launch(args)
    assert plan.mode == "single"
    with process_group(plan, 0, args) as ctx:
        assert ctx.backend == "nccl" and ctx.device == torch.device("cuda", 0)
        assert torch.distributed.get_backend() == "nccl"
        x = torch.arange(6.0, device=ctx.device).view(3, 2)
        assert torch.equal(concat_all_gather(x), x)
        assert torch.equal(all_reduce_sum(x.clone()), x)
        # the helpers above skip the collective in a world of one: run NCCL's own, and wait for them
        y = x.clone()
        torch.distributed.all_reduce(y)
        gathered = torch.empty(1, 3, 2, device=ctx.device)
        torch.distributed.all_gather_into_tensor(gathered, x)
        torch.distributed.barrier()
        torch.cuda.synchronize(ctx.device)
        assert torch.equal(y, x) and torch.equal(gathered[0], x)
    assert not torch.distributed.is_initialized()


def run(argv, env, cwd, launcher=(), timeout=600):
    result = subprocess.run([sys.executable, *launcher, *map(str, argv)], cwd=str(cwd), env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


PRETRAIN = ["-a", "resnet18", "--cifar-stem", "--crop-size", "32", "--moco-dim", "16", "--moco-k", "64",
            "-b", "16", "--epochs", "1", "-j", "1", "-p", "1", "--aug-plus", "--mlp"]


def test_pretrain_amp_channels_last_fast_aug_then_linear_classification(image_folder, tmp_path):
    out, lin = tmp_path / "pretrain", tmp_path / "lincls"
    result = run([os.path.join(ROOT, "main_moco.py"), *PRETRAIN, "--amp", "--channels-last", "--fast-aug",
                  "--output-dir", out, image_folder], first_gpu_env(), tmp_path)
    start = [line for line in result.stdout.splitlines() if "world size" in line]
    assert len(start) == 1 and "device cuda:0" in start[0] and "backend nccl" in start[0]
    assert "amp bfloat16" in start[0] or "amp float16" in start[0]
    assert sorted(os.listdir(out)) == ["checkpoint_0000.pth.tar", "log.txt"]
    checkpoint = torch.load(out / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert checkpoint["state_dict"]["module.queue_ptr"].item() == 48 % 64  # 3 steps of 16 keys
    run([os.path.join(ROOT, "main_lincls.py"), "-a", "resnet18", "--cifar-stem", "--crop-size", "32",
         "-b", "16", "--epochs", "1", "-j", "1", "--amp", "--channels-last",
         "--pretrained", out / "checkpoint_0000.pth.tar", "--output-dir", lin, image_folder],
        first_gpu_env(), tmp_path)
    linear = torch.load(lin / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert linear["epoch"] == 1 and 0.0 <= linear["best_acc1"] <= 100.0


def jpeg_copy(image_folder, data):
    """The PNG image folder re-encoded as JPEG files under `data`."""
    from PIL import Image
    for folder, _, files in os.walk(image_folder):
        for name in files:
            target = data / os.path.relpath(folder, image_folder) / name.replace(".png", ".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(os.path.join(folder, name)).save(target, quality=95)
    return data


def test_pretrain_device_decode_on_the_gpu(image_folder, tmp_path):
    """--device-decode: JPEG bytes from the workers, nvJPEG decoding, batched crops and the colour
    augmentation on the side stream; a finite epoch with the queue advanced, no image left to PIL."""
    data = jpeg_copy(image_folder, tmp_path / "jpeg")
    out = tmp_path / "pretrain"
    result = run([os.path.join(ROOT, "main_moco.py"), *PRETRAIN, "--amp", "--channels-last", "--device-decode",
                  "--output-dir", out, data], first_gpu_env(), tmp_path)
    assert "decoded with PIL" not in result.stderr  # DeviceDecoder's fallback notice
    checkpoint = torch.load(out / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True)
    assert checkpoint["args"]["device_decode"] is True
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert checkpoint["state_dict"]["module.queue_ptr"].item() == 48 % 64


SYNC_SETS = {"plain": [], "fast-aug": ["--amp", "--channels-last", "--fast-aug"],
             "device-decode": ["--amp", "--channels-last", "--device-decode"]}


@pytest.mark.parametrize("name", list(SYNC_SETS))
def test_training_steps_never_wait_for_the_gpu_between_check_points(image_folder, tmp_path, name):
    """main_moco's loop under torch.cuda.set_sync_debug_mode("error") (MOCO_SYNC_DEBUG, see
    moco.prefetch.SyncDebug): 6 steps of 8 images, --print-freq 100, so that only step 0 and the
    last step reach the declared check point; any other host synchronisation in steps 1 to 5, the
    batches' preparation included, raises and fails the run."""
    data = jpeg_copy(image_folder, tmp_path / "jpeg") if name == "device-decode" else image_folder
    argv = [*PRETRAIN, "-b", "8", "-p", "100", *SYNC_SETS[name], "--output-dir", tmp_path / "out", data]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "main_moco.py"), *map(str, argv)],
                            cwd=str(tmp_path), env=first_gpu_env(MOCO_SYNC_DEBUG="error"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"a host synchronisation inside a step ({name}):\n" + result.stderr[-4000:]
    assert "MOCO_SYNC_DEBUG: torch.cuda.set_sync_debug_mode('error') on" in result.stderr
    checkpoint = torch.load(tmp_path / "out" / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"]["module.queue_ptr"].item() == 48 % 64  # all 6 steps ran


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_process_nccl_run(image_folder, tmp_path):
    env = cuda_env(threads=1)
    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  os.path.join(ROOT, "main_moco.py"), *PRETRAIN, "--amp", image_folder], env, tmp_path)
    start = [line for line in result.stdout.splitlines() if "world size" in line]
    assert len(start) == 1 and "world size 2" in start[0] and "backend nccl" in start[0]
    assert "per-process batch 8 (global 16)" in start[0]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0000.pth.tar", "log.txt"]
    checkpoint = torch.load(tmp_path / "checkpoint_0000.pth.tar", map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"]["module.queue_ptr"].item() == 48 % 64
    assert len(checkpoint["rng_states"]) == 2
