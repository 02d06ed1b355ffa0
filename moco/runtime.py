"""Per-process training set-up shared by both scripts: batch split, seeding, precision, preemption."""
import contextlib
import math
import random
import signal
import sys
import warnings

import torch

from moco.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT, UserError


def per_process_batch(batch_size, procs_per_node):
    """`-b` is the batch of one node (the reference's meaning); each process takes its share."""
    if batch_size < procs_per_node:
        raise UserError(f"--batch-size {batch_size} is smaller than the {procs_per_node} processes per "
                        f"node; each process needs at least one image")
    return batch_size // procs_per_node


def workers_per_process(workers, procs_per_node):
    return math.ceil(workers / procs_per_node)


def seed_everything(seed):
    """The reference's seeding: python and torch, and deterministic cuDNN (slower)."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    warnings.warn("You have chosen to seed training. This will turn on the CUDNN deterministic setting, "
                  "which can slow down your training considerably! You may see unexpected behavior when "
                  "restarting from checkpoints.")



def setup_process(args, ctx):
    """Seed like the reference (when --seed), pick the cuDNN mode, and return this process's share of
    the node's batch and loader workers."""
    if args.seed is not None:
        seed_everything(args.seed)
    torch.backends.cudnn.benchmark = args.seed is None  # deterministic cuDNN needs it off
    return (per_process_batch(args.batch_size, ctx.procs_per_node),
            workers_per_process(args.workers, ctx.procs_per_node))


def check_amp(args):
    if args.amp and not torch.cuda.is_available():
        raise UserError("--amp needs a CUDA GPU and none is available; run without --amp on the CPU")


class Precision:
    """Autocast and loss scaling for `--amp`: bf16 where the GPU supports it (no scaler needed),
    else fp16 with a GradScaler. Without `--amp` everything is fp32 and both are no-ops."""

    def __init__(self, amp, device):
        self.dtype = None
        if amp and device.type == "cuda":
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.device_type = device.type

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def fused_sgd(self):
        """True with a GradScaler: build SGD with `fused=True`, so that the scaler hands it the overflow
        flag on the device instead of reading it on the host every step (which would wait for the GPU)."""
        return self.scaler is not None

    def configure(self, optimizer):
        """Re-apply `fused_sgd` after `optimizer.load_state_dict`, which restores the saved flags."""
        if self.fused_sgd:
            for group in optimizer.param_groups:
                group["fused"], group["foreach"] = True, False
        return optimizer

    def backward_and_step(self, loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state):
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def describe(self):
        return "fp32" if self.dtype is None else f"amp {str(self.dtype).replace('torch.', '')}"


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
