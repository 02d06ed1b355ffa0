"""Command-line flags both scripts share, with the reference's names, aliases, dests and defaults."""
import argparse
import math
import os

from moco.errors import UserError
from moco.models import model_names


def add_data_and_launch_args(parser, default_lr, default_epochs, default_schedule, default_wd):
    """The reference's flags common to main_moco.py and main_lincls.py, then this project's additions."""
    add_reference_args(parser, default_lr, default_epochs, default_schedule, default_wd)
    add_project_args(parser)


def add_reference_args(parser, default_lr, default_epochs, default_schedule, default_wd):
    """The reference implementation's shared flags: names, aliases, dests and defaults unchanged."""
    parser.add_argument("data", metavar="DIR", nargs="?", default=None,
                        help="path to the dataset (ImageNet layout: DIR/train, DIR/val); "
                             "omitted: the built-in synthetic dataset")
    parser.add_argument("-a", "--arch", metavar="ARCH", default="resnet50", choices=model_names(),
                        help="model architecture: " + " | ".join(model_names()))
    parser.add_argument("-j", "--workers", default=32, type=int, metavar="N",
                        help="data loading workers per node (each of n processes gets ceil(j/n))")
    parser.add_argument("--epochs", default=default_epochs, type=int, metavar="N",
                        help="number of total epochs to run")
    parser.add_argument("--start-epoch", default=0, type=int, metavar="N",
                        help="manual epoch number (useful on restarts)")
    parser.add_argument("-b", "--batch-size", default=256, type=int, metavar="N",
                        help="mini-batch size: the total of all GPUs on ONE node; each process gets "
                             "b / processes-per-node")
    parser.add_argument("--lr", "--learning-rate", default=default_lr, type=float, metavar="LR",
                        help="initial learning rate", dest="lr")
    parser.add_argument("--schedule", default=list(default_schedule), nargs="*", type=int,
                        help="learning rate schedule (when to drop lr by 10x)")
    parser.add_argument("--momentum", default=0.9, type=float, metavar="M", help="momentum of SGD solver")
    parser.add_argument("--wd", "--weight-decay", default=default_wd, type=float, metavar="W",
                        help="weight decay", dest="weight_decay")
    parser.add_argument("-p", "--print-freq", default=10, type=int, metavar="N", help="print frequency")
    parser.add_argument("--resume", default="", type=str, metavar="PATH",
                        help="path to latest checkpoint")
    parser.add_argument("--world-size", default=-1, type=int,
                        help="number of nodes for distributed training")
    parser.add_argument("--rank", default=-1, type=int, help="node rank for distributed training")
    parser.add_argument("--dist-url", default="auto", type=str,
                        help="url used to set up distributed training; 'auto': env:// under torchrun, "
                             "the first SLURM node under srun, a free local port on one node")
    parser.add_argument("--dist-backend", default="nccl", type=str,
                        help="distributed backend (gloo is used on the CPU)")
    parser.add_argument("--seed", default=None, type=int, help="seed for initializing training")
    parser.add_argument("--gpu", default=None, type=int, help="GPU id to use")
    parser.add_argument("--multiprocessing-distributed", action="store_true",
                        help="use multi-processing distributed training to launch N processes per node, "
                             "which has N GPUs")


def add_project_args(parser):
    """This project's additions: all off or neutral by default."""
    parser.add_argument("--crop-size", default=224, type=int, metavar="N", help="training crop size")
    parser.add_argument("--cifar-stem", action="store_true",
                        help="3x3 stride-1 first conv and no max-pool, for small (32-64 px) images")
    parser.add_argument("--output-dir", default=".", type=str, metavar="DIR",
                        help="where checkpoints and log.txt are written")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision on CUDA: bf16 autocast where supported, else fp16 + GradScaler")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard scalars (per print step and per epoch) to "
                             "OUTPUT_DIR/tensorboard/; needs the tensorboard package")


def make_parser(description):
    return argparse.ArgumentParser(description=description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


# --------------------------------------------------------------------------------------------------
# Value ranges of the flags of both scripts, checked before anything starts.
# --------------------------------------------------------------------------------------------------
def _at_least(low):
    return lambda value: value >= low, f">= {low}"


def _above(low):
    return lambda value: value > low, f"> {low}"


def _between(low, high):
    return lambda value: low <= value <= high, f"in [{low}, {high}]"


FLOAT32_MAX = 3.4028234663852886e38  # the largest float32; a larger flag value overflows in the optimizer
# (dest, flag, (test, what the test asks)); flags a script does not have are not checked
RANGES = (
    ("epochs", "--epochs", _at_least(0)),
    ("start_epoch", "--start-epoch", _at_least(0)),
    ("workers", "--workers", _at_least(0)),
    ("lr", "--lr", _at_least(0)),
    ("momentum", "--momentum", _at_least(0)),
    ("weight_decay", "--wd", _at_least(0)),
    ("print_freq", "--print-freq", _at_least(1)),
    ("crop_size", "--crop-size", _at_least(1)),
    ("moco_dim", "--moco-dim", _at_least(1)),
    ("moco_k", "--moco-k", _at_least(1)),
    ("moco_m", "--moco-m", _between(0, 1)),
    ("moco_t", "--moco-t", _above(0)),
    ("knn_freq", "--knn-freq", _at_least(0)),
    ("knn_k", "--knn-k", _at_least(1)),
    ("knn_t", "--knn-t", _above(0)),
)


def check_args(args):
    """UserError naming the first flag whose value is out of range (or not a finite number)."""
    for dest, flag, (test, wanted) in RANGES:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} {value} must be a finite number")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:  # the optimizer and model compute in float32
            raise UserError(f"{flag} {value} is out of range: it must be at most {FLOAT32_MAX:.4g} in size "
                            f"(float32)")
        if not test(value):
            raise UserError(f"{flag} {value} is out of range: it must be {wanted}")
    for milestone in getattr(args, "schedule", None) or []:
        if milestone < 0:
            raise UserError(f"--schedule {milestone} is out of range: milestones are epochs, >= 0")


def class_folders(folder):
    """The class folders of an ImageFolder root, as torchvision lists them (sub-folders, sorted)."""
    try:
        return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    except OSError:
        return None  # unreadable: the image folder itself reports it when it is opened


def require_same_classes(data, purpose):
    """UserError unless DIR/train and DIR/val hold the same class folders: labels are indices into the
    sorted class list, so a class missing or added on one side shifts every label after it and the
    top-1 of `purpose` would compare the wrong classes without a word."""
    train, val = (class_folders(os.path.join(data, split)) for split in ("train", "val"))
    if train is None or val is None or train == val:
        return
    missing, extra = sorted(set(train) - set(val)), sorted(set(val) - set(train))
    parts = ([f"val/ lacks {missing[:5]}"] if missing else []) + ([f"val/ has extra {extra[:5]}"] if extra else [])
    raise UserError(f"the class folders of '{os.path.join(data, 'train')}' ({len(train)}) and "
                    f"'{os.path.join(data, 'val')}' ({len(val)}) differ ({', '.join(parts)}); {purpose} needs "
                    f"the same classes in both")
