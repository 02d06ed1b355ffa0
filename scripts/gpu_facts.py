"""The machine's facts for scripts/gpu_checks*.sh, in one interpreter start: Python, usable cores, torch,
torchvision, CUDA and cuDNN versions, the GPUs, pytest. Exit status 0 where torch sees a CUDA GPU, 3
where torch or torchvision cannot be imported, 4 where no GPU is visible."""
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/, where bench_common lives


def main():
    print(f"python {platform.python_version()} ({sys.executable})")
    try:
        import bench_common  # imports torch and torchvision
    except ImportError as err:
        print(f"cannot import torch and torchvision: {err}")
        return 3
    facts = bench_common.machine_facts()
    print(f"cores usable {facts['usable_cores']} of {facts['cores']}, load average (1 / 5 / 15 min) "
          + " / ".join(f"{v:.2f}" for v in facts["load_before"]))
    print(f"torch {facts['torch']} (CUDA {facts['cuda']}, cuDNN {facts['cudnn']}), torchvision {facts['torchvision']}")
    try:
        import pytest
        print(f"pytest {pytest.__version__}")
    except ImportError:
        print("pytest: not installed")
    for index, gpu in enumerate(facts["gpus"]):
        print(f"GPU {index}: {gpu['name']}, {gpu['memory_gib']} GiB, capability {gpu['capability']}, bf16 {gpu['bf16']}")
    return 0 if facts["gpus"] else 4


if __name__ == "__main__":
    sys.exit(main())
