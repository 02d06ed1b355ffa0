#!/usr/bin/env python
"""End-to-end pre-training throughput of main_moco.py itself, for several flag sets side by side.

For each flag set it runs `main_moco.py` (a subprocess of this interpreter: the real script, loop,
loader, workers and checkpoints) for two epochs on a generated ImageNet-like JPEG folder (500 x 375 or
375 x 500 px, about 110 kB per file, scripts/bench_data.py) with the MoCo v2 recipe, and reads the
second epoch's steady-state figures from its log.txt: images/s between the synchronised points of the
loop (every --print-freq steps, where the host has waited for the device), from 10 % into the epoch to
its end, and the fraction of that time spent waiting for data. The second epoch starts with an empty
prefetch queue, so batches that the workers made while the first steps compiled or warmed up do not
inflate it. Right before and right after that run it measures the step-only capacity of the same
flags (scripts/bench_step.py: the same model on random tensors already on the device, steps queued
between two synchronisations with main_moco.py's settings), so that both figures of a set are taken
under the same load; the ratio end-to-end / step-only divides by the better of the two step figures,
and their spread is reported. End to end cannot be faster than the step alone: a ratio above 1 is
flagged as a measurement error (the load changed, or the two do not measure the same work).

    python scripts/bench_e2e.py                 # GPU: ResNet-50, 224 px, batch 256, K 65536, -j 16
    python scripts/bench_e2e.py --quick         # CPU: ResNet-18, 48 px, batch 16, within 4 minutes

Flag sets (--sets): default (the reference configuration: fp32, torchvision PIL pipeline), amp
(--amp --channels-last), fast (+ --fast-aug), fast-compile (+ --compile), decode (--amp --channels-last
--device-decode), decode-compile (+ --compile). Without CUDA, --amp and --compile are left out.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import bench_data  # noqa: E402
import bench_step  # noqa: E402

FLAG_SETS = {
    "default": [],
    "amp": ["--amp", "--channels-last"],
    "fast": ["--amp", "--channels-last", "--fast-aug"],
    "fast-compile": ["--amp", "--channels-last", "--fast-aug", "--compile"],
    "decode": ["--amp", "--channels-last", "--device-decode"],
    "decode-compile": ["--amp", "--channels-last", "--device-decode", "--compile"],
}
CUDA_ONLY = ("--amp", "--compile")


def cpu_count():
    """The cores this process may use (a container or `taskset` may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def get_args_parser():
    parser = argparse.ArgumentParser(description="end-to-end main_moco.py throughput",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU configuration, a few minutes")
    parser.add_argument("--sets", nargs="+", default=list(FLAG_SETS), choices=list(FLAG_SETS))
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", default=256, type=int, help="-b of main_moco.py")
    parser.add_argument("--crop", default=224, type=int)
    parser.add_argument("--moco-k", default=65536, type=int)
    parser.add_argument("--workers", default=None, type=int, help="-j (default: the CPU count)")
    parser.add_argument("--images", default=22528, type=int, help="generated training images")
    parser.add_argument("--print-freq", default=10, type=int, help="-p: the synchronised points")
    parser.add_argument("--data", default=None, help="existing folder with train/ (else generated)")
    parser.add_argument("--step-steps", default=20, type=int, help="timed steps of each step-only run")
    parser.add_argument("--step-warmup", default=3, type=int, help="untimed steps before them")
    parser.add_argument("--set-timeout", default=None, type=float,
                        help="seconds allowed to one end-to-end run (default: no limit)")
    parser.add_argument("--skip-step", action="store_true", help="only the end-to-end runs")
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def apply_quick(args):
    """Small enough for 4 minutes on 2 idle cores: 8 steps of 16 images of 48 px per epoch."""
    args.arch, args.batch, args.crop, args.moco_k = "resnet18", 16, 48, 4096
    args.images, args.print_freq, args.step_steps, args.step_warmup = 128, 2, 3, 1
    args.workers = args.workers or 2


def _make_part(job):
    root, start, stop, seed = job
    rng = np.random.default_rng(seed)
    for k in range(start, stop):
        folder = os.path.join(root, "train", f"class_{k % 10}")
        os.makedirs(folder, exist_ok=True)
        width, height = (500, 375) if rng.random() < 0.7 else (375, 500)
        bench_data.make_image(rng, width, height).save(os.path.join(folder, f"{k:06d}.jpg"), quality=95)


def make_folder(root, images, processes):
    """`images` ImageNet-like JPEG files under root/train/class_*/, made by `processes` processes."""
    chunk = max(1, images // (4 * processes))
    jobs = [(root, s, min(images, s + chunk), 1000 + s) for s in range(0, images, chunk)]
    with multiprocessing.Pool(processes) as pool:
        pool.map(_make_part, jobs)
    return root


def run_e2e(name, flags, args, data, out_root):
    """Two epochs of main_moco.py with `flags`; the second epoch's log.txt record, plus wall time."""
    out = os.path.join(out_root, name)
    cmd = [sys.executable, os.path.join(REPO, "main_moco.py"), data, "-a", args.arch, "-b", str(args.batch),
           "--crop-size", str(args.crop), "--moco-k", str(args.moco_k), "-j", str(args.workers),
           "--epochs", "2", "-p", str(args.print_freq), "--output-dir", out,
           "--mlp", "--moco-t", "0.2", "--aug-plus", "--cos", "--lr", "0.03"] + flags
    if args.crop <= 32:
        cmd.append("--cifar-stem")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.set_timeout)
    except subprocess.TimeoutExpired:
        shutil.rmtree(out, ignore_errors=True)
        return {"error": f"timed out after {args.set_timeout:.0f} s", "wall_s": round(time.perf_counter() - start, 1)}
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "wall_s": wall}
    with open(os.path.join(out, "log.txt")) as f:
        records = [json.loads(line) for line in f if line.strip().startswith("{")]
    last = [r for r in records if r.get("epoch") == 1][-1]
    shutil.rmtree(out, ignore_errors=True)  # checkpoints of a large model fill disks
    return {**{k: last.get(k) for k in ("steady_images_per_s", "steady_data_fraction", "steady_steps",
                                         "images_per_s", "epoch_time_s")}, "wall_s": round(wall, 1)}


def run_step(flags, args, device):
    """Step-only capacity (images/s) of the same model and flags: random inputs on the device,
    `--step-steps` steps between two synchronisations."""
    result = bench_step.run({
        "arch": args.arch, "batch": args.batch, "crop": args.crop, "moco_k": args.moco_k, "mlp": True,
        "moco_t": 0.2, "amp": "--amp" in flags, "channels_last": "--channels-last" in flags,
        "compile": "--compile" in flags, "steps": args.step_steps, "warmup": args.step_warmup, "rounds": 1,
        "reference": False, "device": str(device)})
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's memory to the end-to-end run
    return result["ours"]["images_per_s"]


def measure_set(name, flags, args, data, out_root, device):
    """Step-only, end to end, step-only again, back to back; the ratio against the better step figure."""
    row = {}
    steps = [] if args.skip_step else [run_step(flags, args, device)]
    row.update(run_e2e(name, flags, args, data, out_root))
    if args.skip_step or "error" in row:
        return row
    steps.append(run_step(flags, args, device))
    row.update(compare(steps, row.get("steady_images_per_s")))
    return row


def compare(steps, e2e):
    """The step-only figures (before, after) against the end-to-end one: the better step figure, the
    spread of the two, the ratio, and a measurement error where end to end beats the step alone."""
    row = {"step_images_per_s": round(max(steps), 1), "step_images_per_s_before_after": [round(v, 1) for v in steps],
           "step_spread": round((max(steps) - min(steps)) / max(steps), 3)}
    if e2e:
        row["ratio_e2e_over_step"] = round(e2e / max(steps), 3)
        if row["ratio_e2e_over_step"] > 1.0:
            row["measurement_error"] = ("end to end faster than the step alone: the load changed between "
                                        "the measurements, or they did not measure the same work")
    return row


def main(args):
    if args.quick:
        apply_quick(args)
    args.workers = args.workers if args.workers is not None else cpu_count()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sets = {}
    for name in args.sets:
        flags = FLAG_SETS[name]
        if device.type != "cuda":
            flags = [f for f in flags if f not in CUDA_ONLY]
        if flags not in sets.values():
            sets[name] = flags
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x {cpu_count()}"
    results = {}
    report = {"device": device_name, "torch": torch.__version__, "usable_cpus": cpu_count(),
              "config": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}
    tmp = tempfile.mkdtemp(prefix="bench_e2e_")
    try:
        data = args.data
        if data is None:
            t0 = time.perf_counter()
            data = make_folder(os.path.join(tmp, "data"), args.images, cpu_count())
            print(f"generated {args.images} JPEG files in {time.perf_counter() - t0:.0f} s", flush=True)
        for name, flags in sets.items():
            row = measure_set(name, flags, args, data, tmp, device)
            results[name] = {"flags": " ".join(flags) or "(none)", **row}
            print(f"{name}: {results[name]}", flush=True)
            write_json(report, args.json)  # after each set: a run cut short keeps what it measured
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(report)
    write_json(report, args.json)
    return report


def write_json(report, path):
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2)


def print_table(report):
    print(f"\n{report['device']}, {report['config']['arch']}, batch {report['config']['batch']}, "
          f"crop {report['config']['crop']}, K {report['config']['moco_k']}, -j {report['config']['workers']}")
    print("| set | flags | end to end img/s | Data share | step-only img/s (before, after) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in report["results"].items():
        if "error" in r:
            print(f"| {name} | {r['flags']} | failed: {r['error']} | | | |")
            continue
        ratio = r.get("ratio_e2e_over_step", "-")
        if "measurement_error" in r:
            ratio = f"{ratio} (measurement error: above 1)"
        steps = r.get("step_images_per_s_before_after")
        print(f"| {name} | {r['flags']} | {r.get('steady_images_per_s')} | {r.get('steady_data_fraction')} | "
              f"{r.get('step_images_per_s', '-')}{f' ({steps[0]}, {steps[1]})' if steps else ''} | {ratio} |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
