#!/usr/bin/env python
"""The performance suite, measured side by side in one run on the current device.

a. MoCo training-step throughput with the fast options (bf16 autocast on CUDA, channels-last, the
   foreach momentum update, device-side queue pointer) against the reference configuration (fp32, NCHW,
   per-parameter Python momentum loop: tests/reference_moco.py) -> the ratio;
b. the compute ceiling: a plain supervised step of the same backbone with the same options; an
   asymmetric MoCo step ideally costs 4/3 of it -> MoCo / (0.75 x supervised);
c. data-pipeline throughput of the v1 and v2 two-crop pipelines from JPEG files (scripts/bench_data.py):
   torchvision's reference pipeline against the fast path (uint8 crops from the workers, colour
   augmentation on the batch) -> the ratios;
d. peak memory (GPU max allocated, or the process's peak RSS on the CPU).

    python scripts/benchmark.py            # ResNet-50, 224 px, batch 256, K 65536, v2 recipe
    python scripts/benchmark.py --quick    # a small CPU configuration, under 2 minutes

Output: a table on stdout and a JSON file (--json, default benchmark.json in the current folder).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import bench_data  # noqa: E402
import bench_step  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description="MoCo performance suite",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU configuration, under 2 minutes")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", default=256, type=int, help="images per step on this device")
    parser.add_argument("--crop", default=224, type=int)
    parser.add_argument("--moco-k", default=65536, type=int)
    parser.add_argument("--steps", default=20, type=int, help="timed steps per contender")
    parser.add_argument("--warmup", default=5, type=int)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    parser.add_argument("--workers", default=None, type=int, help="data-pipeline workers (default: cores)")
    parser.add_argument("--images", default=1024, type=int, help="JPEG files for the data benchmark")
    parser.add_argument("--skip-data", action="store_true")
    parser.add_argument("--json", default="benchmark.json")
    return parser


def apply_quick(args):
    args.arch, args.batch, args.crop, args.moco_k = "resnet18", 32, 64, 4096
    args.steps, args.warmup, args.images = 6, 2, 256


def step_benchmark(args, device):
    fast = device.type == "cuda"
    return bench_step.run({
        "arch": args.arch, "batch": args.batch, "crop": args.crop, "moco_k": args.moco_k, "mlp": True,
        "moco_t": 0.2, "steps": args.steps, "warmup": args.warmup, "device": str(device),
        "amp": fast, "channels_last": fast, "compile": args.compile, "supervised": True,
    })


def data_benchmark(args, device):
    argv = ["--workers", str(args.workers or os.cpu_count()), "--images", str(args.images),
            "--crop-size", "224", "--device", str(device)]
    return bench_data.run(bench_data.parse_args(argv))


def main(args):
    if args.quick:
        apply_quick(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
    results = {"device": str(device), "device_name": name, "args": vars(args)}
    results["step"] = step_benchmark(args, device)
    bench_step.report(results["step"])
    if not args.skip_data:
        results["data"] = data_benchmark(args, device)
    print_table(results)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nwritten: {os.path.abspath(args.json)}")
    return results


def print_table(results):
    step = results["step"]
    print(f"\n| measure ({results['device']}: {results['device_name']}) | value |\n|---|---|")
    print(f"| MoCo step, fast path | {step['ours']['images_per_s']:.1f} img/s |")
    print(f"| MoCo step, reference configuration | {step['reference']['images_per_s']:.1f} img/s |")
    print(f"| fast / reference | {step['ratio_ours_over_reference']:.2f}x |")
    print(f"| supervised step (same options) | {step['supervised']['images_per_s']:.1f} img/s |")
    print(f"| MoCo / (0.75 x supervised) | {step['ratio_ours_over_ideal']:.2f} |")
    print(f"| peak memory ({step['peak_memory_kind']}) | {step['peak_memory_mib']:.0f} MiB |")
    for name, value in flatten_data(results.get("data", {})):
        print(f"| data: {name} | {value} |")


def flatten_data(data):
    """The data benchmark's median throughputs and fast/torchvision ratios as table rows."""
    rows = [(f"{name} pipeline", f"{value:.1f} img/s")
            for name, value in (data.get("median_images_per_s") or {}).items()]
    for pipeline, ratio in (data.get("ratio_fast_over_tv") or {}).items():
        workers = f"; {ratio['worker_cpu_median']:.2f}x" if "worker_cpu_median" in ratio else ""
        rows.append((f"{pipeline} / torchvision (wall; CPU time{'; worker CPU time' if workers else ''})",
                     f"{ratio['median']:.2f}x; {ratio['cpu_median']:.2f}x{workers}"))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
