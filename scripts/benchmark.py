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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/, where bench_common lives
import bench_common  # noqa: E402  (it puts the repository on sys.path)
import bench_data  # noqa: E402
import bench_step  # noqa: E402

QUICK = {"arch": "resnet18", "batch": 32, "crop": 64, "moco_k": 4096, "steps": 6, "warmup": 2, "images": 256}


def get_args_parser():
    parser = bench_common.new_parser(__doc__)
    bench_common.add_flags(parser, quick=False)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", default=256, type=int, help="images per step on this device")
    parser.add_argument("--crop", default=224, type=int)
    parser.add_argument("--moco-k", default=65536, type=int)
    parser.add_argument("--steps", default=20, type=int, help="timed steps per contender")
    parser.add_argument("--warmup", default=5, type=int)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the fast path")
    bench_common.add_flags(parser, workers=None, images=1024)
    parser.add_argument("--skip-data", action="store_true")
    bench_common.add_flags(parser, json="benchmark.json")
    return parser


def step_benchmark(args, device):
    fast = device.type == "cuda"
    return bench_step.run_moco_v2(args, steps=args.steps, warmup=args.warmup, device=str(device), amp=fast,
                                  channels_last=fast, compile=args.compile, supervised=True)


def data_benchmark(args, device):
    return bench_data.run({"workers": args.workers or bench_common.usable_cores(), "images": args.images,
                           "crop_size": 224, "device": str(device)})


def main(args=None):
    parser = get_args_parser()
    args = bench_common.arguments(parser, args)
    if args.quick:
        bench_common.apply_quick(args, parser, QUICK)
    device = bench_common.resolve_device("auto")
    results = {"device": str(device), "device_name": bench_common.device_name(device), "args": vars(args)}
    results["step"] = step_benchmark(args, device)
    bench_step.report(results["step"])
    if not args.skip_data:
        results["data"] = data_benchmark(args, device)
    print_table(results)
    bench_common.write_json(results, args.json)
    print(f"\nwritten: {os.path.abspath(args.json)}")
    return results


def print_table(results):
    step = results["step"]
    print()
    bench_common.print_markdown_table([f"measure ({results['device']}: {results['device_name']})", "value"], [
        ("MoCo step, fast path", f"{step['ours']['images_per_s']:.1f} img/s"),
        ("MoCo step, reference configuration", f"{step['reference']['images_per_s']:.1f} img/s"),
        ("fast / reference", f"{step['ratio_ours_over_reference']:.2f}x"),
        ("supervised step (same options)", f"{step['supervised']['images_per_s']:.1f} img/s"),
        ("MoCo / (0.75 x supervised)", f"{step['ratio_ours_over_ideal']:.2f}"),
        (f"peak memory ({step['peak_memory_kind']})", f"{step['peak_memory_mib']:.0f} MiB"),
    ] + [(f"data: {name}", value) for name, value in flatten_data(results.get("data", {}))])


def flatten_data(data):
    """The data benchmark's median throughputs and fast/torchvision ratios as table rows."""
    rows = [(f"{name} pipeline", f"{value:.1f} img/s")
            for name, value in (data.get("median_images_per_s") or {}).items()]
    labels = {"median": "wall", "cpu_median": "CPU time", "worker_cpu_median": "worker CPU time"}
    for pipeline, ratio in (data.get("ratio_fast_over_tv") or {}).items():
        measured = [key for key in labels if key in ratio]
        rows.append((f"{pipeline} / torchvision ({'; '.join(labels[key] for key in measured)})",
                     "; ".join(f"{ratio[key]:.2f}x" for key in measured)))
    return rows


if __name__ == "__main__":
    bench_common.run_script(main, get_args_parser)
