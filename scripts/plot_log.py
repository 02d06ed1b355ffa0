#!/usr/bin/env python
"""Draw the training curves of main_moco.py and main_lincls.py runs from their log.txt, on one figure.

Pre-training runs: InfoNCE loss with its chance level log(K+1), the (K+1)-way instance-discrimination
top-1, learning rate, images per second and, where the run has it, the kNN monitor's top-1. Linear runs:
train loss, val acc@1 (solid) and acc@5 (dashed) with the best acc@1 starred, and learning rate.
Several runs overlay, a colour each. Needs matplotlib (pip install matplotlib).

    python scripts/plot_log.py runs/demo/pretrain runs/demo/linear_moco runs/demo/linear_random
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moco import curves  # noqa: E402
from moco.errors import run_cli  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="the --output-dir of a run (or its log.txt); several runs overlay")
    parser.add_argument("-o", "--output", default="curves.png",
                        help="the figure to write (.png, .pdf or .svg)")
    return parser


def main(args):
    curves.require_matplotlib()  # before reading anything: one line saying how to install it
    runs = curves.read_runs(args.runs)
    path = curves.save_figure(curves.plot_runs(runs), args.output)
    print(f"wrote {path}: " + "; ".join(f"{run.label} ({run.kind}, {len(run.records)} epochs)" for run in runs))
    return path


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(), prog="plot_log.py")
