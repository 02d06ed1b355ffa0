"""Numeric precision of a training step: fp32, or `--amp` mixed precision on CUDA."""
import contextlib

import torch

from moco.errors import UserError


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
