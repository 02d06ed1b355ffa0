#!/usr/bin/env python
"""Unsupervised pre-training with MoCo v1/v2 (He et al. 2019; Chen et al. 2020).

Launch: `python main_moco.py DIR` (one device, or every local GPU), the reference's
`--multiprocessing-distributed --dist-url ... --world-size N --rank R`, torchrun, or SLURM srun.
"""
import contextlib
import os
import time

import torch

from moco import builder, cli, knn
from moco.checkpoint import remove_stale_partial_files
from moco.data import ResumableSampler, RobustImageFolder, ShardSampler, make_loader, require_split
from moco.distributed import (all_reduce_max, per_process_batch, plan_launch, process_group, run_processes,
                              setup_process, wrap_ddp)
from moco.errors import Preempted, UserError, run_cli
from moco.guard import NonFiniteLoss, PreemptionSignal, StepGuard
from moco.fastaug import train_pipeline
from moco.prefetch import DeviceBatches, SyncDebug
from moco.loader import linear_val_transform
from moco.logs import RunLog, require_tensorboard
from moco.meters import ThroughputWindow, TrainingMeters
from moco.models import model_constructor, require_usable_arch
from moco.outdir import RunLock, check_output_dir
from moco.precision import Precision, check_amp
from moco.resume import (TrainState, draw_data_seed, last_good_checkpoint, resume_point, resume_training,
                         save_training)
from moco.schedule import adjust_learning_rate


def get_args_parser():
    parser = cli.make_parser("MoCo unsupervised pre-training")
    cli.add_data_and_launch_args(parser, default_lr=0.03, default_epochs=200, default_schedule=[120, 160],
                                 default_wd=1e-4)
    parser.add_argument("--moco-dim", default=128, type=int, help="feature dimension")
    parser.add_argument("--moco-k", default=65536, type=int, help="queue size; number of negative keys")
    parser.add_argument("--moco-m", default=0.999, type=float, help="moco momentum of updating key encoder")
    parser.add_argument("--moco-t", default=0.07, type=float, help="softmax temperature")
    parser.add_argument("--mlp", action="store_true", help="use mlp head")
    parser.add_argument("--aug-plus", action="store_true", help="use moco v2 data augmentation")
    parser.add_argument("--cos", action="store_true", help="use cosine lr schedule")
    # additions of this project
    parser.add_argument("--bn-splits", default=1, type=int,
                        help="split BatchNorm imitating N devices on one (1 = plain BN)")
    parser.add_argument("--fast-aug", action="store_true",
                        help="loader workers only decode, crop and flip (uint8); colour jitter, grayscale, "
                             "blur and normalisation run on the whole batch on the training device, with "
                             "the same per-image distributions")
    parser.add_argument("--device-decode", action="store_true",
                        help="with --fast-aug: loader workers only read the files and draw the crops; the "
                             "training device decodes the JPEGs (nvJPEG on CUDA), crops, resizes and flips "
                             "the batch (implies --fast-aug)")
    parser.add_argument("--symmetric", action="store_true",
                        help="symmetric loss: each crop is query once and key once (losses summed)")
    parser.add_argument("--knn-freq", default=0, type=int, metavar="N",
                        help="kNN monitor every N epochs (DIR/train as bank, DIR/val as queries); 0 = off")
    parser.add_argument("--knn-k", default=200, type=int, help="neighbours of the kNN monitor")
    parser.add_argument("--knn-t", default=0.1, type=float, help="temperature of the kNN monitor")
    return parser


# --------------------------------------------------------------------------------------------------
# Checks that run once, before any process starts training.
# --------------------------------------------------------------------------------------------------
def preflight(args, plan):
    """Fail on bad input before anything is written or any process starts."""
    cli.check_args(args)
    check_amp(args)
    require_usable_arch(args.arch, args.cifar_stem, args.crop_size, fc_needed_by="--mlp" if args.mlp else None)
    require_split(args.data, "train")
    if args.knn_freq > 0:
        require_split(args.data, "val")
        # the monitor labels val/ images by the bank's classes: both must name the same classes
        cli.require_same_classes(args.data, "the kNN monitor (--knn-freq)")
    batch = per_process_batch(args.batch_size, plan.procs_per_node)
    if args.bn_splits < 1 or batch % args.bn_splits != 0:
        raise UserError(f"--bn-splits {args.bn_splits} must divide the per-process batch {batch}")
    global_batch = batch * plan.world_size
    keys_per_step = 2 * global_batch if args.symmetric else global_batch
    try:
        builder.check_queue_divisible(args.moco_k, keys_per_step)
    except ValueError as err:
        raise UserError(str(err)) from None
    check_output_dir(args.output_dir)


def main(args):
    require_tensorboard(args.tensorboard)
    if args.data is None:
        from moco.synthetic import default_dataset
        args.data = default_dataset(log=print)
    plan = plan_launch(args)
    preflight(args, plan)
    log = RunLog(args.output_dir, is_main=plan.rank == 0)
    # one run at a time per --output-dir: process 0 of the run holds the lock while it lives
    with RunLock(args.output_dir, "main_moco.py", log.info) if plan.rank == 0 else contextlib.nullcontext():
        if plan.rank == 0:
            remove_stale_partial_files(args.output_dir, log.info)
        args.resume = resume_point(args, log)
        if args.resume is None:
            return None
        return run_processes(train_process, plan, args)


# --------------------------------------------------------------------------------------------------
# One training process.
# --------------------------------------------------------------------------------------------------
def train_process(local_index, plan, args):
    with process_group(plan, local_index, args) as ctx, \
            RunLog(args.output_dir, ctx.is_main, args.tensorboard) as log:
        batch, workers = setup_process(args, ctx)
        state, encoder = training_state(args, ctx, batch, log)

        dataset, collate_fn, prepare = train_pipeline(args, state.data_seed, ctx.device)
        sampler = ResumableSampler(dataset, ctx.world_size, ctx.rank, state.data_seed, batch)
        loader = make_loader(dataset, sampler, batch, workers, ctx.device, drop_last=True, collate_fn=collate_fn)
        batches = DeviceBatches(loader, ctx.device, prepare)
        if sampler.steps_per_epoch() == 0:
            raise UserError(f"the {len(dataset)} training images give no full batch of {batch} per process")
        knn_loaders = make_knn_loaders(args, ctx, batch, workers) if args.knn_freq > 0 else None

        for line in describe_run(args, ctx, state, encoder, batch, workers, len(dataset)):
            log.info(f"=> {line}")
        first_epoch = state.epoch
        with PreemptionSignal() as preemption:
            guard = StepGuard(ctx.device, preemption)
            for epoch in range(first_epoch, args.epochs):
                state.epoch = epoch
                sampler.set_epoch(epoch, state.step_in_epoch)
                adjust_learning_rate(state.optimizer, epoch, args, cos=args.cos)
                stats, preempted = train_one_epoch(batches, sampler.steps_per_epoch(), state, guard, args, ctx,
                                                   log)
                if preempted:
                    raise save_and_stop(state, guard.preemption, args, ctx, log)
                stats["bad_images"] = merge_bad_images(dataset, ctx.device)
                if knn_loaders is not None and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
                    stats["knn_top1"] = knn.knn_top1(encoder, *knn_loaders, ctx.device, args.knn_k, args.knn_t,
                                                     args.channels_last)
                    log.info(f"=> epoch {epoch}: kNN top-1 {stats['knn_top1']:.2f}")
                state.epoch, state.step_in_epoch = epoch + 1, 0
                path = save_training(state, args, ctx)
                # the launch's full flags go with its first record (they are in every checkpoint too)
                log.record({"epoch": epoch, **stats, "checkpoint": path, "moco_k": args.moco_k,
                            "symmetric": args.symmetric, **({"args": vars(args)} if epoch == first_epoch else {})})
        log.info(f"=> done: {args.epochs} epochs; checkpoints and log.txt in {os.path.abspath(args.output_dir)}")


def training_state(args, ctx, batch, log):
    """The TrainState this process starts from (a new model, or --resume's), and the query encoder."""
    model, encoder = build_model(args, ctx)
    precision = Precision(args.amp, ctx.device)
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, fused=precision.fused_sgd or None)
    state = TrainState(model, optimizer, precision, data_seed=draw_data_seed(args, ctx.device),
                       global_batch=batch * ctx.world_size, epoch=args.start_epoch)
    if args.resume:
        resume_training(args.resume, state, ctx, log)
    precision.configure(optimizer)  # after resume: loading restores the optimizer's flags
    return state, encoder


def build_model(args, ctx):
    """The MoCo module on this process's device, DDP-wrapped in every launch mode."""
    model = builder.MoCo(model_constructor(args.arch, args.cifar_stem), args.moco_dim, args.moco_k,
                         args.moco_m, args.moco_t, args.mlp, bn_splits=args.bn_splits,
                         symmetric=args.symmetric)
    model.to(ctx.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    base = model.encoder_q
    if args.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    return wrap_ddp(model, ctx.device, sync_buffers_each_step=False), base


def make_knn_loaders(args, ctx, batch, workers):
    transform = linear_val_transform(args.crop_size)
    bank = RobustImageFolder(os.path.join(args.data, "train"), transform)
    queries = RobustImageFolder(os.path.join(args.data, "val"), transform)
    return (make_loader(bank, ShardSampler(len(bank), ctx.world_size, ctx.rank), batch, workers,
                        ctx.device, drop_last=False),
            make_loader(queries, ShardSampler(len(queries), ctx.world_size, ctx.rank), batch, workers,
                        ctx.device, drop_last=False),
            len(bank.classes))


def describe_run(args, ctx, state, encoder, batch, workers, num_images):
    """The run's opening lines: launch, data, recipe, model, where it starts and where results go.
    (The full flags go to log.txt with the first epoch's record, and into every checkpoint.)"""
    pipeline = ("--device-decode (decoding and augmentation on the device)" if args.device_decode else
                "--fast-aug (colour augmentation on the device)" if args.fast_aug else "the PIL pipeline")
    head = "MLP head" if args.mlp else "linear head"
    schedule = "cosine" if args.cos else f"steps at epochs {args.schedule}"
    start = (f"epoch {state.epoch}" + (f", step {state.step_in_epoch}" if state.step_in_epoch else "")
             + (f" of '{args.resume}'" if args.resume else " (a new run)"))
    return [
        f"world size {ctx.world_size} ({ctx.procs_per_node} per node, backend {ctx.backend}, device {ctx.device}), "
        f"per-process batch {batch} (global {state.global_batch}), {workers} loader workers per process, "
        f"{state.precision.describe()}",
        f"data: {num_images} training images in {os.path.join(args.data, 'train')}, data seed {state.data_seed}; "
        f"MoCo {'v2' if args.aug_plus else 'v1'} augmentation, {pipeline}",
        f"recipe: K {args.moco_k}, m {args.moco_m}, T {args.moco_t}, dim {args.moco_dim}, {head}"
        f"{', symmetric loss' if args.symmetric else ''}; SGD lr {args.lr} ({schedule}), momentum "
        f"{args.momentum}, wd {args.weight_decay}; {args.epochs} epochs",
        f"model: MoCo over {args.arch}{' + MLP head' if args.mlp else ''}, "
        f"{sum(p.numel() for p in encoder.parameters())} parameters in each encoder"
        f"{model_options(args)}",
        f"starting at {start}; checkpoints and log.txt go to {os.path.abspath(args.output_dir)}",
    ]


def model_options(args):
    """The project's model and speed options a run uses, for its opening lines ('' for none)."""
    options = [f"BatchNorm split over {args.bn_splits} groups" if args.bn_splits > 1 else "",
               "small-image stem" if args.cifar_stem else "", "channels-last" if args.channels_last else "",
               "compiled" if args.compile else ""]
    return "".join(f"; {option}" for option in options if option)


def train_one_epoch(batches, steps, state, guard, args, ctx, log):
    """Epoch `state.epoch` from step `state.step_in_epoch` on, of `steps`. Nothing in a step waits for the
    device except the StepGuard check every --print-freq steps (which also prints the meters) and the
    epoch's end. Returns (the epoch's statistics, False), or (None, True) when a preemption (SIGTERM or
    Ctrl-C) stopped it: `state.step_in_epoch` then counts the steps done, and the caller saves."""
    epoch, start_step, lr = state.epoch, state.step_in_epoch, state.optimizer.param_groups[0]["lr"]
    meters = TrainingMeters(steps, prefix=f"Epoch: [{epoch}]")
    window = ThroughputWindow(skip=start_step + max(1, steps // 10))
    state.model.train()
    epoch_start = end = time.time()
    sync_debug = SyncDebug()  # MOCO_SYNC_DEBUG=error: any wait for the GPU outside the check below raises
    for i, (im_q, im_k) in enumerate(sync_debug.steps(batches), start=start_step):
        meters.data_time.update(time.time() - end)  # waiting for the loader (and, on the CPU, --fast-aug)
        with state.precision.autocast():
            logits, labels = state.model(im_q, im_k)
            loss = builder.contrastive_loss(logits.float(), labels, args.symmetric)
        guard.observe(loss)
        meters.update(loss, logits, labels)
        state.precision.backward_and_step(loss, state.optimizer)
        meters.batch_time.update(time.time() - end)
        end = time.time()
        if not guard.due(i, args.print_freq, steps - 1):
            continue
        sync_debug.check_point()  # the one declared wait of the loop, until the next step
        stop_now = check_step(guard, epoch, i, args)
        window.mark(i, time.time(), meters.data_time.sum)
        if i % args.print_freq == 0:
            images_per_s = im_q.shape[0] * ctx.world_size / max(meters.batch_time.avg, 1e-9)
            log.info(meters.line(i, [f"LR {lr:.4g}", f"Img/s {images_per_s:.1f}"]))
            log.scalars(epoch * steps + i, meters, lr=lr, images_per_s=images_per_s)
        if stop_now:
            state.step_in_epoch = i + 1
            return None, True
    seconds, done = time.time() - epoch_start, steps - start_step
    images_per_step = batches.loader.batch_size * ctx.world_size
    return {"loss": meters.loss.avg, "acc1": meters.top1.avg, "acc5": meters.top5.avg, "lr": lr, "steps": done,
            "epoch_time_s": round(seconds, 3),
            "images_per_s": round(done * images_per_step / max(seconds, 1e-9), 1),
            **window.summary(images_per_step)}, False


def save_and_stop(state, preemption, args, ctx, log):
    """Save a preempted epoch's progress; returns the Preempted exception that ends the run with
    `preemption`'s exit code (143 for SIGTERM, 130 for Ctrl-C)."""
    path = save_training(state, args, ctx)
    log.info(f"=> {preemption.name or 'SIGTERM'}: saved {path} after step {state.step_in_epoch} of epoch "
             f"{state.epoch}; run the same command again to resume there")
    return Preempted(path, preemption.exit_code)


def merge_bad_images(dataset, device):
    """Distinct unreadable training images met by any process so far. Every process learns of them,
    so an image another process has reported is neither reported nor counted again."""
    flags = all_reduce_max(dataset.bad_flags.clone().to(device))
    dataset.bad_flags.copy_(flags.cpu())
    return int(flags.sum())


def check_step(guard, epoch, step, args):
    """Agree across processes on a non-finite loss since the last check (stop with an error, before
    any checkpoint is written) or a SIGTERM (True: save and stop)."""
    try:
        return guard.check(epoch, step)
    except NonFiniteLoss as err:
        raise UserError(f"{err.describe()}; stopping before it reaches a checkpoint. Last good checkpoint: "
                        f"{last_good_checkpoint(args)}. Try a lower --lr or check the data") from None


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(), prog="main_moco.py")
