"""The reference's seeding (`--seed`) and the cuDNN mode that goes with it."""
import random
import warnings

import torch


def seed_everything(seed, uses_cudnn=True):
    """Seed python and torch and make cuDNN deterministic (slower), as the reference does; its warning
    about that is given only where cuDNN runs (`uses_cudnn`), since on the CPU it says nothing true."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    if uses_cudnn:
        warnings.warn("You have chosen to seed training. This will turn on the CUDNN deterministic setting, "
                      "which can slow down your training considerably! You may see unexpected behavior when "
                      "restarting from checkpoints.")


def set_cudnn_mode(seed):
    """cuDNN autotuning (benchmark mode) without --seed; off with it, since deterministic cuDNN needs it off."""
    torch.backends.cudnn.benchmark = seed is None
