#!/usr/bin/env python
"""The demo (scripts/demo.py) for several seeds: mean and spread of kNN and linear top-1, MoCo against
random-init features. Each seed generates its own data set and trains from scratch.

    python scripts/bench_demo.py --seeds 0 1 2
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import demo  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir", default=os.path.join(demo.REPO, "runs", "bench_demo"))
    parser.add_argument("--tiny", action="store_true", help="seconds-long settings (smoke test)")
    args = parser.parse_args(argv)
    machine = {"cores": os.cpu_count(), "load_before": os.getloadavg()}
    runs = {}
    for seed in args.seeds:
        demo_argv = ["--seed", str(seed), "--output-dir", os.path.join(args.output_dir, f"seed{seed}")]
        runs[seed] = demo.main(demo.get_args_parser().parse_args(demo_argv + (["--tiny"] if args.tiny else [])))
    machine["load_after"] = os.getloadavg()
    summary = summarize(runs)
    print_summary(runs, summary)
    print(describe_machine(machine))
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump({"runs": runs, "summary": summary, "machine": machine}, f, indent=1)
    return summary


def describe_machine(machine):
    """One line to paste under the table: the timings mean little without the cores and the load
    (os.getloadavg: processes running or waiting over the last 1, 5 and 15 minutes) they ran under."""
    def load(values):
        return " / ".join(f"{v:.2f}" for v in values)
    return (f"\nmachine: {machine['cores']} CPU cores (os.cpu_count), no GPU used; load average (1 / 5 / 15 "
            f"min) {load(machine['load_before'])} before, {load(machine['load_after'])} after")


def summarize(runs):
    """Mean and sample standard deviation of every metric, and of the MoCo - random kNN margin."""
    series = {}
    for result in runs.values():
        for features in ("moco", "random"):
            for metric in ("knn_top1", "linear_top1"):
                series.setdefault(f"{features} {metric}", []).append(result[features][metric])
        series.setdefault("knn margin", []).append(result["moco"]["knn_top1"] - result["random"]["knn_top1"])
        series.setdefault("minutes", []).append(result["minutes"])
    return {name: {"mean": statistics.fmean(values),
                   "std": statistics.stdev(values) if len(values) > 1 else 0.0} for name, values in series.items()}


def print_summary(runs, summary):
    print("\n| seed | random kNN | MoCo kNN | margin | random linear | MoCo linear | minutes |")
    print("|---|---|---|---|---|---|---|")
    for seed, r in runs.items():
        print(f"| {seed} | {r['random']['knn_top1']:.1f} | {r['moco']['knn_top1']:.1f} | "
              f"{r['moco']['knn_top1'] - r['random']['knn_top1']:+.1f} | {r['random']['linear_top1']:.1f} | "
              f"{r['moco']['linear_top1']:.1f} | {r['minutes']:.1f} |")
    cell = {name: f"{v['mean']:.1f} ± {v['std']:.1f}" for name, v in summary.items()}
    print(f"| mean ± std | {cell['random knn_top1']} | {cell['moco knn_top1']} | {cell['knn margin']} | "
          f"{cell['random linear_top1']} | {cell['moco linear_top1']} | {cell['minutes']} |")


if __name__ == "__main__":
    main()
