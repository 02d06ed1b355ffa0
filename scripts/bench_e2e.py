#!/usr/bin/env python
"""End-to-end pre-training throughput of main_moco.py itself, for several flag sets side by side.

For each flag set it runs `main_moco.py` (a subprocess of this interpreter: the real script, loop,
loader, workers and checkpoints) for two epochs on a generated ImageNet-like JPEG folder (500 x 375 or
375 x 500 px, about 110 kB per file: bench_common.generate_jpegs) with the MoCo v2 recipe, and reads the
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
import json
import os
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/, where bench_common lives
import bench_common  # noqa: E402  (it puts the repository on sys.path)
import bench_step  # noqa: E402
from bench_common import REPO, UserError  # noqa: E402

FLAG_SETS = {
    "default": [],
    "amp": ["--amp", "--channels-last"],
    "fast": ["--amp", "--channels-last", "--fast-aug"],
    "fast-compile": ["--amp", "--channels-last", "--fast-aug", "--compile"],
    "decode": ["--amp", "--channels-last", "--device-decode"],
    "decode-compile": ["--amp", "--channels-last", "--device-decode", "--compile"],
}
CUDA_ONLY = ("--amp", "--compile")


# Small enough for 4 minutes on 2 idle cores: 8 steps of 16 images of 48 px per epoch.
QUICK = {"arch": "resnet18", "batch": 16, "crop": 48, "moco_k": 4096, "images": 128, "print_freq": 2,
         "step_steps": 3, "step_warmup": 1, "workers": 2}


def get_args_parser():
    parser = bench_common.new_parser(__doc__)
    bench_common.add_flags(parser, quick=False)
    parser.add_argument("--sets", nargs="+", default=list(FLAG_SETS), choices=list(FLAG_SETS))
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", default=256, type=int, help="-b of main_moco.py")
    parser.add_argument("--crop", default=224, type=int)
    parser.add_argument("--moco-k", default=65536, type=int)
    bench_common.add_flags(parser, workers=None, images=22528)
    parser.add_argument("--print-freq", default=10, type=int, help="-p: the synchronised points")
    parser.add_argument("--data", default=None, help="existing folder with train/ (else generated)")
    parser.add_argument("--step-steps", default=20, type=int, help="timed steps of each step-only run")
    parser.add_argument("--step-warmup", default=3, type=int, help="untimed steps before them")
    parser.add_argument("--set-timeout", default=None, type=float,
                        help="seconds allowed to one end-to-end run (None: no limit)")
    parser.add_argument("--skip-step", action="store_true", help="only the end-to-end runs")
    bench_common.add_flags(parser, json=None)
    return parser


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
    result = bench_step.run_moco_v2(args, amp="--amp" in flags, channels_last="--channels-last" in flags,
                                    compile="--compile" in flags, steps=args.step_steps, warmup=args.step_warmup,
                                    rounds=1, reference=False, device=str(device))
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


def flag_sets(names, device):
    """The flag sets to run: without CUDA, --amp and --compile are left out, and so are the sets that
    then repeat an earlier one."""
    sets = {}
    for name in names:
        flags = FLAG_SETS[name]
        if device.type != "cuda":
            flags = [f for f in flags if f not in CUDA_ONLY]
        if flags not in sets.values():
            sets[name] = flags
    return sets


def main(args=None):
    parser = get_args_parser()
    args = bench_common.arguments(parser, args)
    if args.quick:
        bench_common.apply_quick(args, parser, QUICK)
    args.workers = args.workers if args.workers is not None else bench_common.usable_cores()
    if args.data is not None and not os.path.isdir(os.path.join(args.data, "train")):
        raise UserError(f"--data {args.data}: no train/ folder in it (main_moco.py reads DIR/train/CLASS/*)")
    device = bench_common.resolve_device("auto")
    with bench_common.recording_machine(device) as machine, bench_common.scratch_folder("bench_e2e_") as tmp:
        report = {"device": machine["device_name"], "torch": torch.__version__, "usable_cpus": machine["usable_cores"],
                  "config": {k: v for k, v in vars(args).items() if k != "json"}, "machine": machine, "results": {}}
        data = args.data or os.path.join(tmp, "data")
        if args.data is None:
            bench_common.generate_jpegs(os.path.join(data, "train"), args.images, classes=10, seed=1000,
                                        processes=bench_common.usable_cores())
        for name, flags in flag_sets(args.sets, device).items():
            report["results"][name] = {"flags": " ".join(flags) or "(none)",
                                       **measure_set(name, flags, args, data, tmp, device)}
            print(f"{name}: {report['results'][name]}", flush=True)
            bench_common.write_json(report, args.json)  # after each set: a run cut short keeps what it measured
    print_table(report)
    bench_common.write_json(report, args.json)
    return report


def print_table(report):
    config = report["config"]
    print(f"\n{report['device']}, {config['arch']}, batch {config['batch']}, crop {config['crop']}, "
          f"K {config['moco_k']}, -j {config['workers']}")
    bench_common.print_markdown_table(
        ["set", "flags", "end to end img/s", "Data share", "step-only img/s (before, after)", "ratio"],
        [table_row(name, r) for name, r in report["results"].items()])


def table_row(name, r):
    if "error" in r:
        return [name, r["flags"], f"failed: {r['error']}", "", "", ""]
    ratio = r.get("ratio_e2e_over_step", "-")
    if "measurement_error" in r:
        ratio = f"{ratio} (measurement error: above 1)"
    steps = r.get("step_images_per_s_before_after")
    step = f"{r.get('step_images_per_s', '-')}{f' ({steps[0]}, {steps[1]})' if steps else ''}"
    return [name, r["flags"], r.get("steady_images_per_s"), r.get("steady_data_fraction"), step, ratio]


if __name__ == "__main__":
    bench_common.run_script(main, get_args_parser)
