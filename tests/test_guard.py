"""moco/guard.py: non-finite losses and SIGTERM, found without a host wait per step and agreed by all;
PreemptionSignal, which remembers SIGTERM and Ctrl-C."""
import os
import signal

import pytest
import torch

from conftest import fork_gloo_pair
from moco.guard import NonFiniteLoss, PreemptionSignal, StepGuard


class Flag:
    """What moco.guard.PreemptionSignal exposes: whether SIGTERM arrived."""

    def __init__(self, received=False):
        self.received = received


def test_finite_losses_pass_and_nothing_is_read_between_checks():
    guard = StepGuard(torch.device("cpu"), Flag())
    for value in (1.0, 2.5, 0.0):
        guard.observe(torch.tensor(value))
    assert guard.check(epoch=0, step=2) is False
    assert guard.checked_step == (0, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_loss_is_reported_at_the_next_check_with_its_range(bad):
    guard = StepGuard(torch.device("cpu"), Flag())
    guard.observe(torch.tensor(1.0))
    assert guard.check(0, 9) is False
    guard.observe(torch.tensor(bad))
    guard.observe(torch.tensor(1.0))  # a finite loss later does not hide it
    with pytest.raises(NonFiniteLoss) as info:
        guard.check(0, 19)
    assert (info.value.after, info.value.until) == ((0, 9), (0, 19))
    assert "after epoch 0, step 9 and by epoch 0, step 19" in info.value.describe()


def test_sigterm_is_returned_by_check_and_due_at_once_when_alone():
    flag = Flag()
    guard = StepGuard(torch.device("cpu"), flag)
    assert not guard.due(3, print_freq=10, last_step=99)
    assert guard.due(10, print_freq=10, last_step=99) and guard.due(99, print_freq=10, last_step=99)
    flag.received = True
    assert guard.due(3, print_freq=10, last_step=99)  # a world of one needs no agreement: stop now
    assert guard.check(0, 3) is True


def _agreement(rank, world):
    flag = Flag()
    guard = StepGuard(torch.device("cpu"), flag)
    # only rank 1 is sent SIGTERM: both learn it at the same check; a world of two waits for it
    flag.received = rank == 1
    assert guard.due(3, print_freq=10, last_step=99) is False
    assert guard.check(0, 10) is True
    flag.received = False
    # only rank 0 meets a NaN: both stop at the same check
    guard.observe(torch.tensor(float("nan") if rank == 0 else 1.0))
    with pytest.raises(NonFiniteLoss) as info:
        guard.check(0, 20)
    assert info.value.until == (0, 20)


def test_all_processes_agree_in_a_two_process_group(tmp_path):
    fork_gloo_pair(_agreement, tmp_path, "2-process guard")


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
