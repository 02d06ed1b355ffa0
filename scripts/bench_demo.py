#!/usr/bin/env python
"""The demo (scripts/demo.py) for several seeds: mean and spread of kNN and linear top-1, MoCo against
random-init features. Each seed generates its own data set and trains from scratch.

    python scripts/bench_demo.py --seeds 0 1 2
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/, where bench_common lives
import bench_common  # noqa: E402  (it puts the repository on sys.path)
import demo  # noqa: E402


def get_args_parser():
    parser = bench_common.new_parser(__doc__)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir", default=os.path.join(bench_common.REPO, "runs", "bench_demo"))
    parser.add_argument("--tiny", action="store_true", help="seconds-long settings (smoke test)")
    return parser


def main(args=None):
    args = bench_common.arguments(get_args_parser(), args)
    with bench_common.recording_machine() as machine:
        runs = {seed: run_demo(seed, args) for seed in args.seeds}
    summary = summarize(runs)
    print_summary(runs, summary)
    print(describe_machine(machine))
    bench_common.write_json({"runs": runs, "summary": summary, "machine": machine},
                            os.path.join(args.output_dir, "summary.json"))
    return summary


def run_demo(seed, args):
    """One demo: its own generated data set, trained from scratch, in OUTPUT_DIR/seed<seed>."""
    argv = ["--seed", str(seed), "--output-dir", os.path.join(args.output_dir, f"seed{seed}")]
    return demo.main(demo.get_args_parser().parse_args(argv + (["--tiny"] if args.tiny else [])))


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
    rows = [[seed, f"{r['random']['knn_top1']:.1f}", f"{r['moco']['knn_top1']:.1f}",
             f"{r['moco']['knn_top1'] - r['random']['knn_top1']:+.1f}", f"{r['random']['linear_top1']:.1f}",
             f"{r['moco']['linear_top1']:.1f}", f"{r['minutes']:.1f}"] for seed, r in runs.items()]
    cell = {name: f"{v['mean']:.1f} ± {v['std']:.1f}" for name, v in summary.items()}
    rows.append(["mean ± std"] + [cell[name] for name in ("random knn_top1", "moco knn_top1", "knn margin",
                                                            "random linear_top1", "moco linear_top1", "minutes")])
    print()
    bench_common.print_markdown_table(
        ["seed", "random kNN", "MoCo kNN", "margin", "random linear", "MoCo linear", "minutes"], rows)


if __name__ == "__main__":
    bench_common.run_script(main, get_args_parser)
