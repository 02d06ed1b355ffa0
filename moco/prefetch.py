"""The loader's batches as ready device tensors, prepared one batch ahead.

Preparing a batch (the `prepare` of moco.fastaug.train_pipeline) means copying it to the device, with
`--device-decode` decoding and cropping it there, with `--fast-aug` its colour augmentation, and the
memory format of `--channels-last`. On CUDA this runs on a side stream one batch ahead of the training
step, so that it overlaps the step instead of preceding it; the training stream waits for it only when
it uses the batch. On the CPU (no streams) it runs inline, in order, with the same results.
"""
import os
import sys

import torch


class SyncDebug:
    """Proof that the training loop never waits for the GPU between its declared check points.

    With the environment variable MOCO_SYNC_DEBUG set to "error" (or "warn"), `steps(batches)` turns on
    `torch.cuda.set_sync_debug_mode` while each step runs (the batch's preparation included), from the
    step after the first (a warm-up: cuDNN autotuning, DDP's bucket set-up, nvJPEG's start), and
    `check_point()` turns it off until the next step: the loop calls it where it is meant to wait (the
    --print-freq check with its meters, the epoch's end, saves). Unset: nothing changes."""

    ENV = "MOCO_SYNC_DEBUG"

    def __init__(self, mode=None, warmup_steps=1):
        self.mode = mode if mode is not None else os.environ.get(self.ENV, "")
        self.warmup_steps = warmup_steps
        self.active = self.mode not in ("", "0", "default") and torch.cuda.is_available()
        if self.active:  # said, so that a test can tell the check ran
            print(f"{self.ENV}: torch.cuda.set_sync_debug_mode({self.mode!r}) on from step "
                  f"{warmup_steps + 1} of the epoch, off at the loop's check points", file=sys.stderr, flush=True)

    def _set(self, mode):
        if self.active:
            torch.cuda.set_sync_debug_mode(mode)

    def steps(self, batches):
        """Iterate `batches` with the check on from the end of the warm-up until `check_point()`."""
        iterator = iter(batches)
        count = 0
        try:
            while True:
                if count >= self.warmup_steps:
                    self._set(self.mode)
                try:
                    item = next(iterator)
                except StopIteration:
                    return
                count += 1
                yield item
        finally:
            self._set(0)  # the epoch's end and whatever follows it may wait

    def check_point(self):
        self._set(0)


class DeviceBatches:
    """Iterate `prepare(images)` for the batches `(images, targets)` of `loader`: the list of device
    tensors the model takes (moco.fastaug.train_pipeline gives `prepare` for each pipeline mode)."""

    def __init__(self, loader, device, prepare):
        self.loader = loader
        self.device = torch.device(device)
        self.prepare = prepare

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            for images, _ in self.loader:
                yield self.prepare(images)
            return
        side = torch.cuda.Stream(self.device)
        pending = None
        for images, _ in self.loader:
            with torch.cuda.stream(side):
                ready = self.prepare(images)
            event = torch.cuda.Event()
            event.record(side)
            if pending is not None:
                yield self._hand_over(*pending)
            pending = (ready, event)
        if pending is not None:
            yield self._hand_over(*pending)

    def _hand_over(self, tensors, event):
        """Make the training stream wait for the batch, and keep its memory until that stream is done."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for tensor in tensors:
            tensor.record_stream(current)
        return tensors
