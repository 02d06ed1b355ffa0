"""The machine's facts for scripts/gpu_checks*.sh, in one interpreter start: Python, usable cores, torch,
torchvision, CUDA and cuDNN versions, the GPUs, pytest. Exit status 0 where torch sees a CUDA GPU, 3
where torch or torchvision cannot be imported, 4 where no GPU is visible."""
import os
import platform
import sys


def main():
    print(f"python {platform.python_version()} ({sys.executable}), cores usable "
          f"{len(os.sched_getaffinity(0))} of {os.cpu_count()}")
    try:
        import torch
        import torchvision
    except ImportError as err:
        print(f"cannot import torch and torchvision: {err}")
        return 3
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
          f"torchvision {torchvision.__version__}")
    try:
        import pytest
        print(f"pytest {pytest.__version__}")
    except ImportError:
        print("pytest: not installed")
    if not torch.cuda.is_available():
        return 4
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
