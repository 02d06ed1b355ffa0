"""moco/precision.py: fp32, or --amp (bf16 autocast, or fp16 with a GradScaler) on CUDA."""
import argparse

import pytest
import torch

from moco.errors import UserError
from moco.precision import Precision, check_amp


def test_precision_without_amp_is_plain_fp32_backward_and_step():
    precision = Precision(False, torch.device("cpu"))
    assert precision.scaler is None and precision.dtype is None
    assert precision.describe() == "fp32"
    assert precision.state_dict() is None
    precision.load_state_dict(None)  # accepted, nothing to restore

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    initial = a.weight.detach().clone()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(5, 4)
    with precision.autocast():
        out = a(x)
        assert out.dtype == torch.float32
        loss_a = out.square().mean()
    precision.backward_and_step(loss_a, opt_a)
    b(x).square().mean().backward()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.weight, initial)  # it did step


def test_precision_with_amp_on_the_cpu_stays_fp32():
    precision = Precision(True, torch.device("cpu"))
    assert precision.dtype is None and precision.scaler is None
    with precision.autocast():
        assert (torch.randn(2, 3) @ torch.randn(3, 2)).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; --amp is allowed")
def test_check_amp_refuses_amp_without_cuda():
    with pytest.raises(UserError, match="--amp"):
        check_amp(argparse.Namespace(amp=True))
    check_amp(argparse.Namespace(amp=False))  # without --amp nothing to check


def test_sgd_is_fused_only_with_a_grad_scaler():
    assert Precision(False, torch.device("cpu")).fused_sgd is False
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9)
    Precision(False, torch.device("cpu")).configure(optimizer)
    assert not optimizer.param_groups[0].get("fused")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_scaler_skips_an_overflowing_step_on_the_device_after_a_resume():
    """fp16 + GradScaler: SGD is fused, so the scaler hands it the overflow flag on the device; after
    loading a non-fused optimizer state (a bf16 or reference checkpoint) configure() restores that."""
    precision = Precision(True, torch.device("cuda"))
    precision.dtype, precision.scaler = torch.float16, torch.amp.GradScaler("cuda")
    model = torch.nn.Linear(4, 2).cuda()
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, fused=precision.fused_sgd or None)
    plain = torch.optim.SGD(torch.nn.Linear(4, 2).cuda().parameters(), 0.1, momentum=0.9)
    optimizer.load_state_dict(plain.state_dict())
    assert not optimizer.param_groups[0]["fused"]
    precision.configure(optimizer)
    assert optimizer.param_groups[0]["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    with precision.autocast():
        loss = model(torch.full((3, 4), float("inf"), device="cuda")).float().sum()
    precision.backward_and_step(loss, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the step was skipped
    with precision.autocast():
        loss = model(torch.ones(3, 4, device="cuda")).float().sum()
    precision.backward_and_step(loss, optimizer)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
