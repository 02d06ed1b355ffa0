#!/usr/bin/env python
"""The main job end to end on the built-in synthetic data, on 2 CPU cores in under ten minutes:

1. generate (or reuse) the built-in dataset;
2. pre-train MoCo with the v2 recipe scaled to it (main_moco.py);
3. evaluate MoCo features and random-init features with kNN and with the linear protocol
   (main_lincls.py), and print both side by side;
4. with matplotlib installed, draw the runs' training curves (curves.png) and the two results side by
   side (results.png).
"""
import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import main_lincls  # noqa: E402
import main_moco  # noqa: E402
from moco import curves, synthetic  # noqa: E402
from moco.data import RobustImageFolder, make_loader  # noqa: E402
from moco.errors import UserError, run_cli  # noqa: E402
from moco.knn import knn_top1  # noqa: E402
from moco.loader import linear_val_transform  # noqa: E402
from moco.models import model_constructor  # noqa: E402

ARCH = "resnet18"


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output-dir", default=os.path.join(REPO, "runs", "demo"),
                        help="checkpoints and logs go here (pretrain/, linear_moco/, linear_random/)")
    parser.add_argument("--seed", default=0, type=int, help="seed of the data and of training")
    parser.add_argument("--data", default=None, help="an ImageFolder root; default: the built-in dataset")
    parser.add_argument("--epochs", default=16, type=int, help="pre-training epochs")
    parser.add_argument("--batch-size", default=128, type=int)
    parser.add_argument("--lr", default=0.015, type=float, help="pre-training lr (cosine schedule)")
    parser.add_argument("--moco-k", default=1024, type=int)
    parser.add_argument("--moco-m", default=0.99, type=float)
    parser.add_argument("--crop-size", default=32, type=int)
    parser.add_argument("--bn-splits", default=8, type=int)
    parser.add_argument("--linear-epochs", default=10, type=int)
    parser.add_argument("--linear-lr", default=10.0, type=float)
    parser.add_argument("--linear-batch-size", default=256, type=int)
    parser.add_argument("--knn-k", default=200, type=int)
    parser.add_argument("--workers", default=2, type=int)
    parser.add_argument("--print-freq", default=10, type=int)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    return parser


def pretrain(args, data):
    out = os.path.join(args.output_dir, "pretrain")
    argv = ["-a", ARCH, "--crop-size", str(args.crop_size), "-b", str(args.batch_size),
            "--lr", str(args.lr), "--wd", "5e-4", "--epochs", str(args.epochs), "--moco-k", str(args.moco_k),
            "--moco-m", str(args.moco_m), "--moco-t", "0.2", "--mlp", "--aug-plus", "--cos",
            "--bn-splits", str(args.bn_splits), "-j", str(args.workers), "-p", str(args.print_freq),
            "--seed", str(args.seed), "--output-dir", out, data]
    print(f"\n== 1/3 pre-training: python main_moco.py {' '.join(argv)}", flush=True)
    main_moco.main(main_moco.get_args_parser().parse_args(argv))
    final = os.path.join(out, f"checkpoint_{args.epochs - 1:04d}.pth.tar")
    for name in os.listdir(out):  # a checkpoint per epoch is the reference's way; the demo keeps the last
        if name.startswith("checkpoint_") and os.path.join(out, name) != final:
            os.remove(os.path.join(out, name))
    return final


def backbone(args, checkpoint):
    """The ResNet's pooled-feature extractor: the checkpoint's query encoder, or (checkpoint None) the
    random initialisation of `--seed`, the same whatever ran before (the baseline of the comparison)."""
    torch.manual_seed(args.seed)
    model = model_constructor(ARCH)(num_classes=1)
    if checkpoint:
        main_lincls.load_pretrained(model, checkpoint, ARCH)
    model.fc = torch.nn.Identity()
    return model


def knn_accuracy(args, data, checkpoint):
    """kNN top-1 of the backbone's pooled features (train as bank, val as queries)."""
    model = backbone(args, checkpoint)
    transform = linear_val_transform(args.crop_size)
    loaders = []
    for split in ("train", "val"):
        dataset = RobustImageFolder(os.path.join(data, split), transform)
        loaders.append(make_loader(dataset, None, 256, 0, torch.device("cpu"), drop_last=False))
    return knn_top1(model, loaders[0], loaders[1], len(loaders[0].dataset.classes), torch.device("cpu"),
                    k=args.knn_k, t=0.1)


def linear_accuracy(args, data, checkpoint, name):
    out = os.path.join(args.output_dir, name)
    argv = ["-a", ARCH, "--crop-size", str(args.crop_size), "-b", str(args.linear_batch_size),
            "--lr", str(args.linear_lr), "--epochs", str(args.linear_epochs),
            "--schedule", str(int(args.linear_epochs * 0.6)), str(int(args.linear_epochs * 0.8)),
            "-j", str(args.workers), "-p", str(args.print_freq * 10), "--seed", str(args.seed),
            "--output-dir", out, data]
    if checkpoint:
        argv = ["--pretrained", checkpoint] + argv
    print(f"\n== linear classification ({name}): python main_lincls.py {' '.join(argv)}", flush=True)
    return main_lincls.main(main_lincls.get_args_parser().parse_args(argv))["best_acc1"]


def apply_tiny(args):
    """Seconds-long settings for the smoke test: tiny data, one epoch each."""
    args.epochs, args.batch_size, args.moco_k, args.bn_splits, args.crop_size = 1, 16, 64, 2, 24
    args.linear_epochs, args.linear_batch_size, args.workers, args.print_freq, args.knn_k = 1, 16, 0, 1, 10


def main(args):
    start = time.time()
    if args.tiny:
        apply_tiny(args)
    data = args.data or synthetic.default_dataset(seed=args.seed, **(synthetic.TINY if args.tiny else {}))
    checkpoint = pretrain(args, data)
    print("\n== 2/3 kNN evaluation (train as memory bank, val as queries)", flush=True)
    results = {"moco": {"knn_top1": knn_accuracy(args, data, checkpoint)},
               "random": {"knn_top1": knn_accuracy(args, data, None)}}
    print(f"kNN top-1: MoCo {results['moco']['knn_top1']:.1f}, random init "
          f"{results['random']['knn_top1']:.1f}", flush=True)
    print("\n== 3/3 linear classification on frozen features", flush=True)
    results["moco"]["linear_top1"] = linear_accuracy(args, data, checkpoint, "linear_moco")
    results["random"]["linear_top1"] = linear_accuracy(args, data, None, "linear_random")
    results["minutes"] = round((time.time() - start) / 60, 2)
    print_table(results, args, checkpoint)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    draw_figures(args, results, data)
    return results


def draw_figures(args, results, data):
    """curves.png (the three runs' training curves) and results.png (random init vs MoCo) in the output
    folder; without matplotlib, one line saying how to get them. Returns the paths written."""
    try:
        curves.require_matplotlib()
    except UserError as err:
        print(f"\nno figures: {err}", flush=True)
        return []
    runs = curves.read_runs([os.path.join(args.output_dir, name)
                             for name in ("pretrain", "linear_moco", "linear_random")])
    num_classes = sum(entry.is_dir() for entry in os.scandir(os.path.join(data, "train")))
    paths = [curves.save_figure(curves.plot_runs(runs), os.path.join(args.output_dir, "curves.png")),
             curves.save_figure(curves.plot_comparison(results, num_classes),
                                os.path.join(args.output_dir, "results.png"))]
    print(f"\nfigures: {paths[0]} (training curves; redraw with scripts/plot_log.py), "
          f"{paths[1]} (random init vs MoCo)", flush=True)
    return paths


def print_table(results, args, checkpoint):
    print("\n| features | kNN top-1 | linear top-1 |\n|---|---|---|")
    for name, label in (("random", "random init"), ("moco", "MoCo v2")):
        row = results[name]
        print(f"| {label} | {row['knn_top1']:.1f} | {row['linear_top1']:.1f} |")
    margin = results["moco"]["knn_top1"] - results["random"]["knn_top1"]
    print(f"\nMoCo - random (kNN): {margin:+.1f} points; {results['minutes']:.1f} minutes in all")
    print(f"pre-training checkpoint: {checkpoint}")
    print(f"logs: {args.output_dir}/*/log.txt; results: {args.output_dir}/results.json")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(), prog="demo.py")
