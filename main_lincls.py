#!/usr/bin/env python
"""Linear classification on frozen MoCo features (He et al. 2019, Sec. 4.1 protocol).

Every backbone tensor is frozen and the network runs in eval() mode, so BN statistics never change;
only fc.weight and fc.bias are trained, by SGD with a step schedule.
"""
import contextlib
import functools
import os
import time

import torch
import torch.nn as nn

from moco import cli
from moco.checkpoint import (checkpoint_state_dict, copy_checkpoint, load_checkpoint, load_checkpoint_and_sha256,
                             remove_stale_partial_files, restore_training_state, save_checkpoint)
from moco.data import ResumableSampler, RobustImageFolder, ShardSampler, make_loader, require_split
from moco.distributed import (all_reduce_sum, barrier, per_process_batch, plan_launch, process_group,
                              run_processes, setup_process, wrap_ddp)
from moco.errors import UserError, run_cli
from moco.loader import linear_train_transform, linear_val_transform
from moco.logs import RunLog, require_tensorboard
from moco.meters import TrainingMeters, topk_correct
from moco.models import model_constructor, require_usable_arch
from moco.outdir import RunLock, check_output_dir
from moco.precision import Precision, check_amp
from moco.pretrained import FC_KEYS, backbone_from_moco
from moco.transfer import to_device
from moco.schedule import adjust_learning_rate


def get_args_parser():
    parser = cli.make_parser("Linear classification on frozen MoCo features")
    cli.add_data_and_launch_args(parser, default_lr=30.0, default_epochs=100, default_schedule=[60, 80],
                                 default_wd=0.0)
    parser.add_argument("-e", "--evaluate", dest="evaluate", action="store_true",
                        help="evaluate model on validation set")
    parser.add_argument("--pretrained", default="", type=str, help="path to moco pretrained checkpoint")
    parser.add_argument("--fresh", action="store_true",
                        help="start afresh even where --output-dir holds another linear run's "
                             "checkpoint.pth.tar and model_best.pth.tar, which this run then replaces "
                             "(without it, a run with the same flags is resumed and any other refused)")
    return parser


# --------------------------------------------------------------------------------------------------
# Loading MoCo weights into a plain classifier.
# --------------------------------------------------------------------------------------------------
def load_pretrained(model, path, arch, checkpoint=None):
    """Load the MoCo backbone of the checkpoint at `path` (or of `checkpoint`, loaded from there) into
    `model`; returns the backbone's weights."""
    if checkpoint is None:
        checkpoint = load_checkpoint(path, what="--pretrained checkpoint")
    backbone = backbone_from_moco(checkpoint, path)
    trained_arch = checkpoint.get("arch")
    if trained_arch is not None and trained_arch != arch:
        raise UserError(f"--pretrained checkpoint '{path}' was trained with --arch {trained_arch}, "
                        f"this run uses --arch {arch}")
    load_backbone(model, backbone, path, arch)
    return backbone


def load_backbone(model, backbone, path, arch):
    """Load `backbone` (of the checkpoint at `path`) into `model`; only fc.weight and fc.bias may be left
    missing."""
    model_state = model.state_dict()
    for key, value in backbone.items():
        if key not in model_state or model_state[key].shape != value.shape:
            found = tuple(model_state[key].shape) if key in model_state else "no such tensor"
            raise UserError(f"--pretrained checkpoint '{path}' does not fit --arch {arch}: '{key}' has shape "
                            f"{tuple(value.shape)} there, {found} here (another architecture or stem?)")
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    if set(missing) != FC_KEYS or unexpected:
        raise UserError(f"--pretrained checkpoint '{path}' does not fit --arch {arch}: missing "
                        f"{sorted(set(missing) - FC_KEYS)[:5]}, unexpected {unexpected[:5]}")


def sanity_check(model_state, pretrained_backbone):
    """Every non-fc tensor must equal the pretrained one: the backbone is frozen (BN statistics too)."""
    for key, value in pretrained_backbone.items():
        current = model_state["module." + key] if "module." + key in model_state else model_state[key]
        if not torch.equal(current.cpu(), value.cpu()):
            raise UserError(f"sanity check failed: backbone tensor '{key}' changed during linear "
                            f"training; the frozen-feature protocol is broken")


# --------------------------------------------------------------------------------------------------
# Checks before any process starts.
# --------------------------------------------------------------------------------------------------
def preflight(args, plan):
    """Fail on bad input before anything is written or any process starts. Returns the --pretrained
    backbone (None without --pretrained), read once: its content hash goes to `args.pretrained_sha256`."""
    cli.check_args(args)
    check_amp(args)
    require_usable_arch(args.arch, args.cifar_stem, args.crop_size,
                        fc_needed_by="main_lincls.py (it trains fc.weight and fc.bias only)")
    require_split(args.data, "val")
    if not args.evaluate:
        require_split(args.data, "train")
        # labels are class-folder indices: train/ and val/ must name the same classes
        cli.require_same_classes(args.data, "linear classification")
    if args.evaluate and not args.resume:
        # without a trained fc layer the accuracy would be that of a random classifier
        raise UserError("-e evaluates a trained linear classifier: pass its checkpoint (checkpoint.pth.tar or "
                        "model_best.pth.tar of a main_lincls.py run) with --resume")
    if not args.evaluate and not args.resume and args.start_epoch >= args.epochs:
        raise UserError(f"--start-epoch {args.start_epoch} with --epochs {args.epochs} leaves no epoch to "
                        f"train; pass a larger --epochs")
    per_process_batch(args.batch_size, plan.procs_per_node)
    backbone, args.pretrained_sha256 = None, ""
    if args.pretrained:
        checkpoint, args.pretrained_sha256 = load_checkpoint_and_sha256(args.pretrained, "--pretrained checkpoint")
        model = model_constructor(args.arch, args.cifar_stem)()
        backbone = load_pretrained(model, args.pretrained, args.arch, checkpoint)
    if args.resume:
        checkpoint = load_checkpoint(args.resume, what="--resume checkpoint")
        resumed = checkpoint_state_dict(checkpoint, args.resume, what="--resume checkpoint")
        if backbone is not None:
            require_same_backbone(resumed, backbone, args)
        if "best_acc1" not in checkpoint:
            raise UserError(f"--resume checkpoint '{args.resume}' is not a linear-classification checkpoint "
                            f"(no best_acc1); to start from MoCo weights use --pretrained")
        if not args.evaluate and checkpoint.get("epoch", 0) > args.epochs:
            raise UserError(f"--epochs {args.epochs} is below the {checkpoint['epoch']} epochs already done in "
                            f"--resume checkpoint '{args.resume}'; pass a larger --epochs to train on")
        if checkpoint.get("arch", args.arch) != args.arch:
            raise UserError(f"--resume checkpoint '{args.resume}' was trained with --arch "
                            f"{checkpoint['arch']}, this run uses --arch {args.arch}")
    if not args.evaluate:
        check_output_dir(args.output_dir)
    return backbone


def require_same_backbone(resumed, backbone, args):
    """A linear checkpoint carries its backbone: resumed with another --pretrained, its fc layer would be
    trained on (and the sanity check would compare against) other features."""
    for key, value in backbone.items():
        theirs = resumed.get("module." + key, resumed.get(key))
        if theirs is None or theirs.shape != value.shape or not torch.equal(theirs, value):
            raise UserError(f"--resume checkpoint '{args.resume}' was trained on other backbone weights than "
                            f"--pretrained '{args.pretrained}' ('{key}' differs); pass the --pretrained of that "
                            f"run, or drop --resume to start a new linear run")


# what makes two linear runs the same run: a run with equal values resumes the other's checkpoint
RUN_IDENTITY = (("arch", "--arch"), ("pretrained", "--pretrained"),
                ("pretrained_sha256", "the content (sha256) of --pretrained"), ("data", "DIR"), ("lr", "--lr"),
                ("batch_size", "--batch-size"), ("schedule", "--schedule"), ("momentum", "--momentum"),
                ("weight_decay", "--wd"), ("crop_size", "--crop-size"), ("cifar_stem", "--cifar-stem"),
                ("seed", "--seed"))


def run_identity(args):
    """The flags of RUN_IDENTITY, with paths made absolute; stored in every checkpoint as `run`.

    A path says where the weights were, not what they are: the file behind --pretrained may have been
    replaced since, so its content hash (`args.pretrained_sha256`, taken once at start) is part of it."""
    identity = {dest: getattr(args, dest, None) for dest, _ in RUN_IDENTITY}
    for dest in ("pretrained", "data"):
        identity[dest] = os.path.realpath(identity[dest]) if identity[dest] else ""
    return identity


def earlier_run(args, log):
    """Decide what to do with an earlier run's results in --output-dir: resume them (same flags), replace
    them (--fresh), or refuse. Returns (checkpoint to resume from or '', None), or (None, its best top-1)
    when the earlier run already did all --epochs."""
    path = os.path.join(args.output_dir, "checkpoint.pth.tar")
    best = os.path.join(args.output_dir, "model_best.pth.tar")
    if not os.path.exists(path) and not os.path.exists(best):
        return args.resume, None
    if args.fresh:
        log.info(f"=> --fresh: this run replaces the linear results in '{args.output_dir}'")
        return args.resume, None
    hint = "choose another --output-dir, or pass --fresh to start over and replace them"
    if not os.path.exists(path):
        raise UserError(f"--output-dir '{args.output_dir}' holds '{best}' of an earlier run but no "
                        f"checkpoint.pth.tar to resume; {hint}")
    checkpoint = load_checkpoint(path, what="checkpoint of an earlier run in --output-dir")
    if "best_acc1" not in checkpoint:
        raise UserError(f"--output-dir '{args.output_dir}' holds '{path}', which is not a linear-"
                        f"classification checkpoint; {hint}")
    theirs, ours = checkpoint.get("run"), run_identity(args)
    if not isinstance(theirs, dict):
        raise UserError(f"--output-dir '{args.output_dir}' holds the results of a linear run that did not "
                        f"record its flags ('{path}'); {hint}")
    for dest, flag in RUN_IDENTITY:
        if theirs.get(dest) != ours[dest]:
            raise UserError(f"--output-dir '{args.output_dir}' holds the results of another linear run "
                            f"({flag} {theirs.get(dest)!r} there, {ours[dest]!r} here); {hint}")
    done = checkpoint.get("epoch", 0)
    if done > args.epochs:
        raise UserError(f"--epochs {args.epochs} is below the {done} epochs already done in '{path}'; pass a "
                        f"larger --epochs to train on, or another --output-dir for a new run")
    if done == args.epochs:
        log.info(f"=> nothing to do: '{path}' already holds all {args.epochs} epochs of this run (best top-1 "
                 f"{checkpoint['best_acc1']:.3f})")
        return None, float(checkpoint["best_acc1"])
    if args.resume and os.path.realpath(args.resume) != os.path.realpath(path):
        raise UserError(f"--output-dir '{args.output_dir}' holds this run's '{path}' ({done} epochs) and "
                        f"--resume names another checkpoint; drop --resume to continue it, or pass --fresh")
    return path, None


def main(args):
    require_tensorboard(args.tensorboard)
    if args.data is None:
        from moco.synthetic import default_dataset
        args.data = default_dataset(log=print)
    plan = plan_launch(args)
    # every process of this node takes the backbone read here: the weights that were checked and hashed
    process = functools.partial(lincls_process, backbone=preflight(args, plan))
    if args.evaluate:  # writes nothing
        return run_processes(process, plan, args)
    log = RunLog(args.output_dir, is_main=plan.rank == 0)
    # one run at a time per --output-dir: process 0 of the run holds the lock while it lives
    with RunLock(args.output_dir, "main_lincls.py", log.info) if plan.rank == 0 else contextlib.nullcontext():
        if plan.rank == 0:
            remove_stale_partial_files(args.output_dir, log.info)
        args.resume, finished_best = earlier_run(args, log)
        if args.resume is None:
            return {"best_acc1": finished_best}
        return run_processes(process, plan, args)


# --------------------------------------------------------------------------------------------------
# One process.
# --------------------------------------------------------------------------------------------------
def build_classifier(args, num_classes, device, backbone=None):
    """The classifier to train: the --pretrained `backbone` (read from the file when not given), frozen,
    and a new fc layer. Returns (model, the backbone's weights or None)."""
    model = model_constructor(args.arch, args.cifar_stem)(num_classes=num_classes)
    for name, param in model.named_parameters():
        param.requires_grad = name in FC_KEYS
    nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(model.fc.bias)
    if backbone is not None:
        load_backbone(model, backbone, args.pretrained, args.arch)
    elif args.pretrained:
        backbone = load_pretrained(model, args.pretrained, args.arch)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, backbone


def lincls_process(local_index, plan, args, backbone=None):
    with process_group(plan, local_index, args) as ctx, \
            RunLog(args.output_dir, ctx.is_main, args.tensorboard) as log:
        batch, workers = setup_process(args, ctx)
        val_set = RobustImageFolder(os.path.join(args.data, "val"), linear_val_transform(args.crop_size))
        train_set = None if args.evaluate else RobustImageFolder(
            os.path.join(args.data, "train"), linear_train_transform(args.crop_size),
            data_seed=args.seed if args.seed is not None else 0)
        model, optimizer, backbone = classifier_and_optimizer(args, len(val_set.classes), ctx.device, backbone)
        precision = Precision(args.amp, ctx.device)
        best_acc1 = 0.0
        if args.resume:
            best_acc1 = resume(args, model, optimizer, log)
        val_loader = make_loader(val_set, ShardSampler(len(val_set), ctx.world_size, ctx.rank), batch,
                                 workers, ctx.device, drop_last=False)
        for line in describe_run(args, ctx, batch, workers, precision, val_set, train_set):
            log.info(f"=> {line}")
        if args.evaluate:
            acc1, acc5 = validate(val_loader, model, precision, args, ctx, log)
            log.info(f"=> evaluation: Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} on {len(val_set)} images")
            return {"acc1": acc1, "acc5": acc5}
        sampler = ResumableSampler(train_set, ctx.world_size, ctx.rank, train_set.data_seed, batch)
        if sampler.steps_per_epoch() == 0:
            raise UserError(f"the {len(train_set)} training images give no full batch of {batch} per process")
        train_loader = make_loader(train_set, sampler, batch, workers, ctx.device, drop_last=True)
        first_epoch = args.start_epoch
        for epoch in range(first_epoch, args.epochs):
            sampler.set_epoch(epoch)
            lr = adjust_learning_rate(optimizer, epoch, args)
            train_stats = train_one_epoch(train_loader, model, optimizer, precision, epoch, lr, args, ctx, log)
            acc1, acc5 = validate(val_loader, model, precision, args, ctx, log)
            is_best = acc1 > best_acc1
            best_acc1 = max(acc1, best_acc1)
            if epoch == first_epoch and backbone is not None:  # before the save: no broken checkpoint
                sanity_check(model.state_dict(), backbone)
            if ctx.is_main:
                save_linear(args, epoch, model, optimizer, best_acc1, is_best)
            barrier()  # every process waits for the files, so none ends the job while they are written
            # the launch's full flags go with its first record
            log.record({"epoch": epoch, **train_stats, "val_acc1": acc1, "val_acc5": acc5, "best_acc1": best_acc1,
                        **({"args": vars(args)} if epoch == first_epoch else {})},
                       saved=os.path.join(args.output_dir, "checkpoint.pth.tar"))
        log.info(f"=> best top-1 {best_acc1:.3f}; checkpoint.pth.tar and model_best.pth.tar in "
                 f"{os.path.abspath(args.output_dir)}")
        return {"best_acc1": best_acc1}


def classifier_and_optimizer(args, num_classes, device, backbone):
    """The DDP-wrapped classifier (see build_classifier), SGD over its fc layer alone, and the backbone."""
    model, backbone = build_classifier(args, num_classes, device, backbone)
    if args.compile:
        model.compile()
    model = wrap_ddp(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2, "only fc.weight and fc.bias are trained"
    optimizer = torch.optim.SGD(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    return model, optimizer, backbone


def describe_run(args, ctx, batch, workers, precision, val_set, train_set):
    """The run's opening lines: launch, data, protocol, where it starts and where results go. (The full
    flags go to log.txt with the first epoch's record.)"""
    pretrained = (f"--pretrained '{args.pretrained}' (sha256 {args.pretrained_sha256[:12]}...)" if args.pretrained
                  else "no --pretrained (random weights)")
    images = f"{len(train_set)} training and {len(val_set)} validation images" if train_set else \
        f"{len(val_set)} validation images"
    lines = [f"world size {ctx.world_size} ({ctx.procs_per_node} per node, backend {ctx.backend}, device "
             f"{ctx.device}), per-process batch {batch}, {workers} loader workers per process, "
             f"{precision.describe()}",
             f"data: {images} in {args.data}, {len(val_set.classes)} classes",
             f"model: linear classifier on frozen {args.arch} features of {pretrained}"]
    if args.evaluate:
        return lines + [f"evaluating '{args.resume}'; nothing is written"]
    return lines + [f"recipe: SGD lr {args.lr} (steps at epochs {args.schedule}), momentum {args.momentum}, wd "
                    f"{args.weight_decay}; {args.epochs} epochs, starting at epoch {args.start_epoch}; "
                    f"checkpoints and log.txt go to {os.path.abspath(args.output_dir)}"]


def resume(args, model, optimizer, log):
    checkpoint = restore_training_state(args.resume, model, optimizer)
    args.start_epoch = checkpoint.get("epoch", args.start_epoch)
    log.info(f"=> resuming from '{args.resume}' (epoch {args.start_epoch}, best top-1 "
             f"{checkpoint['best_acc1']:.3f})")
    return float(checkpoint["best_acc1"])


def save_linear(args, epoch, model, optimizer, best_acc1, is_best):
    path = os.path.join(args.output_dir, "checkpoint.pth.tar")
    save_checkpoint({"epoch": epoch + 1, "arch": args.arch, "state_dict": model.state_dict(),
                     "best_acc1": best_acc1, "optimizer": optimizer.state_dict(), "run": run_identity(args)},
                    path)
    if is_best:
        copy_checkpoint(path, os.path.join(args.output_dir, "model_best.pth.tar"))


def train_one_epoch(loader, model, optimizer, precision, epoch, lr, args, ctx, log):
    meters = TrainingMeters(len(loader), prefix=f"Epoch: [{epoch}]")
    # eval(): under the frozen-feature protocol BN statistics must not change
    model.eval()
    criterion = nn.CrossEntropyLoss()
    end = time.time()
    for i, (images, target) in enumerate(loader):
        meters.data_time.update(time.time() - end)
        images, target = to_device(images, ctx.device, args.channels_last), target.to(ctx.device)
        with precision.autocast():
            output = model(images)
            loss = criterion(output.float(), target)
        if not torch.isfinite(loss).item():
            raise UserError(f"the loss became {loss.item()} at epoch {epoch}, step {i}; try a lower --lr")
        meters.update(loss, output, target)
        precision.backward_and_step(loss, optimizer)
        meters.batch_time.update(time.time() - end)
        end = time.time()
        if i % args.print_freq == 0:
            log.info(meters.line(i, [f"LR {lr:.4g}"]))
            log.scalars(epoch * len(loader) + i, meters, lr=lr)
    return {"train_loss": meters.loss.avg, "train_acc1": meters.top1.avg, "train_acc5": meters.top5.avg,
            "lr": lr}


@torch.no_grad()
def validate(loader, model, precision, args, ctx, log):
    """Top-1/top-5 over the whole val set, each image counted once across processes."""
    # the plain module, not DDP: DDP's forward may broadcast buffers, a collective that a process
    # holding fewer val batches (none, when there are fewer images than processes) would never join
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # correct@1, correct@5, images
    for images, target in loader:
        images, target = to_device(images, ctx.device, args.channels_last), target.to(ctx.device)
        with precision.autocast():
            output = model(images)
        correct1, correct5 = topk_correct(output.float(), target, topk=(1, 5))
        totals += torch.stack([correct1, correct5, correct1.new_tensor(images.shape[0])]).to(totals.dtype)
    correct1, correct5, count = all_reduce_sum(totals).tolist()
    acc1, acc5 = 100.0 * correct1 / max(count, 1), 100.0 * correct5 / max(count, 1)
    log.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} ({int(count)} images)")
    return acc1, acc5


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(), prog="main_lincls.py")
