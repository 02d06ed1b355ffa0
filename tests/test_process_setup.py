"""Per-process set-up: batch split, workers, seeding (moco.distributed, moco.seeding), precision
(moco.precision), SIGTERM handling (moco.guard.PreemptionSignal)."""
import argparse
import os
import signal

import pytest
import torch

from moco.errors import UserError
from moco.distributed import per_process_batch, setup_process, workers_per_process
from moco.guard import PreemptionSignal
from moco.precision import Precision, check_amp
from moco.seeding import seed_everything


def test_per_process_batch_is_the_node_batch_split():
    assert per_process_batch(256, 1) == 256
    assert per_process_batch(256, 8) == 32
    assert per_process_batch(16, 2) == 8
    assert per_process_batch(3, 3) == 1


@pytest.mark.parametrize("batch, procs", [(0, 1), (1, 2), (7, 8)])
def test_per_process_batch_smaller_than_processes_is_a_user_error(batch, procs):
    with pytest.raises(UserError) as err:
        per_process_batch(batch, procs)
    assert str(batch) in str(err.value) and str(procs) in str(err.value)


@pytest.mark.parametrize("workers, procs, expected", [(32, 1, 32), (32, 8, 4), (32, 3, 11), (5, 2, 3),
                                                      (1, 4, 1), (0, 2, 0)])
def test_workers_per_process_is_the_ceiling(workers, procs, expected):
    assert workers_per_process(workers, procs) == expected


def test_seed_everything_reproduces_python_and_torch_draws():
    import random
    with pytest.warns(UserWarning, match="deterministic"):
        seed_everything(3)
    first = (random.random(), torch.rand(3))
    with pytest.warns(UserWarning):
        seed_everything(3)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])


def test_a_seeded_cpu_process_gives_no_cudnn_warning_and_a_cuda_one_does():
    import warnings
    args = argparse.Namespace(seed=5, batch_size=8, workers=3)
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert setup_process(args, argparse.Namespace(device=torch.device("cpu"), procs_per_node=2)) == (4, 2)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    with pytest.warns(UserWarning, match="CUDNN deterministic"):
        setup_process(args, argparse.Namespace(device=torch.device("cuda", 0), procs_per_node=1))
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


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


def test_preemption_signal_catches_a_real_sigterm_and_restores_the_handler():
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        with PreemptionSignal() as preemption:
            assert preemption.received is False
            assert signal.getsignal(signal.SIGTERM) is not previous
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the python-level handler runs between bytecodes
                if preemption.received:
                    break
            assert preemption.received is True
        assert seen == []  # the run's handler took it, not the previous one
        assert signal.getsignal(signal.SIGTERM) is previous
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            if seen:
                break
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, original)


def _deliver(signum, until):
    os.kill(os.getpid(), signum)
    for _ in range(1000):  # the python-level handler runs between bytecodes
        if until():
            return


def test_first_ctrl_c_asks_for_a_save_and_a_second_stops_at_once(capsys):
    with PreemptionSignal() as preemption:
        _deliver(signal.SIGINT, lambda: preemption.received)
        assert (preemption.received, preemption.name, preemption.exit_code) == (True, "SIGINT", 130)
        assert "Ctrl-C again stops without saving" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT, lambda: False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_then_ctrl_c_stops_at_once_and_sigterm_keeps_its_exit_code():
    with PreemptionSignal() as preemption:
        _deliver(signal.SIGTERM, lambda: preemption.received)
        assert (preemption.name, preemption.exit_code) == ("SIGTERM", 143)
        _deliver(signal.SIGTERM, lambda: False)  # a repeated SIGTERM changes nothing
        assert preemption.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT, lambda: False)


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
