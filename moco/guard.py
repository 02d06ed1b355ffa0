"""Non-finite losses and preemption, agreed by all processes without stopping the host every step.

Reading a loss on the host (`.item()`) or all-reducing a flag makes the CPU wait until the GPU has
finished the step, so the next step is not queued in time. `StepGuard` counts non-finite losses on the
device and reads the count (with the SIGTERM flags of all processes, in one all-reduce) only when asked:
the training loop asks every `--print-freq` steps, at the end of each epoch and before any checkpoint is
written. A non-finite loss is therefore always found before a checkpoint could hold its consequences,
and every process stops at the same step.

`PreemptionSignal` is what the guard reads for SIGTERM (and a first Ctrl-C): the signal handler only
remembers it, and the loop saves and stops at the next check.
"""
import signal
import sys

import torch

from moco.distributed import all_reduce_sum, get_world_size
from moco.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT


class StepGuard:
    """Watches each step's loss on its device; `check()` is the one place that waits for it."""

    def __init__(self, device, preemption):
        self.preemption = preemption
        self.nonfinite = torch.zeros((), dtype=torch.int32, device=device)
        self.checked_step = None  # (epoch, step) of the last clean check

    @torch.no_grad()
    def observe(self, loss):
        """Count a non-finite loss, on the device (no host synchronisation)."""
        self.nonfinite.add_((~torch.isfinite(loss.detach())).to(torch.int32))

    def due(self, step, print_freq, last_step):
        """Whether the loop should call `check()` after `step`: every print-freq steps, at the epoch's
        last step, and, when this process is alone, as soon as it has been sent SIGTERM."""
        alone_and_stopped = self.preemption.received and get_world_size() == 1
        return step % print_freq == 0 or step == last_step or alone_and_stopped

    def check(self, epoch, step):
        """True when any process received SIGTERM; a non-finite loss met by any process since the last
        check is returned as its (epoch, step) range instead, as `NonFiniteLoss`."""
        flags = torch.stack([self.nonfinite.to(torch.int64),
                             torch.tensor(int(self.preemption.received), device=self.nonfinite.device)])
        nonfinite, preempted = all_reduce_sum(flags).tolist()
        if nonfinite:
            raise NonFiniteLoss(self.checked_step, (epoch, step))
        self.checked_step = (epoch, step)
        return preempted > 0


class NonFiniteLoss(Exception):
    """A loss was NaN or infinite somewhere after `after` (epoch, step; None: from the start of this
    run) and at or before `until`."""

    def __init__(self, after, until):
        super().__init__(after, until)
        self.after, self.until = after, until

    def describe(self):
        since = "the start of this run" if self.after is None else f"epoch {self.after[0]}, step {self.after[1]}"
        return f"the loss became NaN or infinite after {since} and by epoch {self.until[0]}, step {self.until[1]}"


class PreemptionSignal:
    """Remembers a SIGTERM (cluster preemption) or a first Ctrl-C (SIGINT), so that the loop saves at the
    next step and stops, exiting with `exit_code` (143 or 130). A second Ctrl-C stops at once
    (KeyboardInterrupt, without saving): the way out when the save itself is not wanted."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None  # the first signal received
        self._previous = {}

    @property
    def received(self):
        return self.signum is not None

    @property
    def name(self):
        """'SIGTERM' or 'SIGINT' (the first signal received), None before any."""
        return signal.Signals(self.signum).name if self.signum else None

    @property
    def exit_code(self):
        return INTERRUPTED_EXIT if self.signum == signal.SIGINT else PREEMPTED_EXIT

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt  # Ctrl-C after the stop was asked for: stop now
        if not self.received:
            self.signum = signum
            if signum == signal.SIGINT:
                print("=> Ctrl-C: saving after this step, then stopping (Ctrl-C again stops without saving)",
                      file=sys.stderr, flush=True)

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False
