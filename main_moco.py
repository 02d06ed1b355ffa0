#!/usr/bin/env python
"""Unsupervised pre-training with MoCo v1/v2 (He et al. 2019; Chen et al. 2020).

Launch: `python main_moco.py DIR` (one device, or every local GPU), the reference's
`--multiprocessing-distributed --dist-url ... --world-size N --rank R`, torchrun, or SLURM srun.
"""
import contextlib
import os
import random
import time

import torch

from moco import builder, cli, knn
from moco.checkpoint import (capture_rng_state, checkpoint_state_dict, find_resume_checkpoint, first_nonfinite,
                             is_pretrain_state_dict, load_checkpoint, optimizer_tensors, pretrain_checkpoint_name,
                             remove_stale_partial_files, restore_rng_state, restore_training_state,
                             save_checkpoint, scan_resume_checkpoints)
from moco.data import ResumableSampler, RobustImageFolder, ShardSampler, make_loader, require_split
from moco.distributed import (all_reduce_max, barrier, broadcast_from_main, plan_launch,
                              process_group, run_processes, wrap_ddp)
from moco.errors import Preempted, UserError, run_cli
from moco.guard import NonFiniteLoss, StepGuard
from moco.fastaug import train_pipeline
from moco.prefetch import DeviceBatches, SyncDebug
from moco.loader import linear_val_transform
from moco.logs import RunLog, require_tensorboard
from moco.meters import ThroughputWindow, TrainingMeters
from moco.models import model_constructor, require_usable_arch
from moco.outdir import RunLock, check_output_dir
from moco.runtime import Precision, PreemptionSignal, check_amp, per_process_batch, setup_process
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


def check_resume_file(path, arch):
    """The loaded --resume checkpoint, or UserError unless it is a MoCo pre-training checkpoint of `arch`."""
    checkpoint = load_checkpoint(path, what="--resume checkpoint")
    state_dict = checkpoint_state_dict(checkpoint, path, what="--resume checkpoint")
    if not is_pretrain_state_dict(state_dict):
        raise UserError(f"--resume checkpoint '{path}' is not a MoCo pre-training checkpoint "
                        f"(no encoder_q weights)")
    if checkpoint.get("arch", arch) != arch:
        raise UserError(f"--resume checkpoint '{path}' was trained with --arch {checkpoint['arch']}, "
                        f"this run uses --arch {arch}")
    return checkpoint


def resume_point(args, log):
    """The checkpoint to resume from ('' to start afresh), or None when it already holds all --epochs.

    Refuses --epochs below the progress already made, and a run that would replace a file in
    --output-dir it did not write (one auto-resume skipped, or another run's).
    """
    skipped = {}
    if args.resume:
        checkpoint = check_resume_file(args.resume, args.arch)
        path, progress = args.resume, (checkpoint.get("epoch", 0), checkpoint.get("step_in_epoch", 0))
    else:
        scan = scan_resume_checkpoints(args.output_dir, args.arch)
        for skipped_path, _, reason in scan.skipped:
            log.info(f"=> skipping {reason}")
            skipped[skipped_path] = reason
        path, progress = scan.path or "", scan.progress if scan.path else (args.start_epoch, 0)
    done, step = progress
    if (args.epochs, 0) < progress:
        where = f"'{path}' holds {done} epochs{f' and {step} steps' if step else ''}" if path else \
            f"--start-epoch {args.start_epoch} lies beyond it"
        raise UserError(f"--epochs {args.epochs} is below the progress already made ({where}); pass a larger "
                        f"--epochs to train on, or another --output-dir for a new run")
    if path and progress == (args.epochs, 0):
        log.info(f"=> nothing to do: '{path}' already holds all {args.epochs} epochs")
        return None
    if progress == (args.epochs, 0):  # no checkpoint, and --start-epoch leaves no epoch to train
        raise UserError(f"--start-epoch {args.start_epoch} with --epochs {args.epochs} leaves no epoch to "
                        f"train; pass a larger --epochs")
    for epoch in range(done, args.epochs):
        ahead = os.path.join(args.output_dir, pretrain_checkpoint_name(epoch))
        if os.path.exists(ahead):
            why = skipped.get(ahead, f"'{ahead}' is newer than the checkpoint this run starts from")
            raise UserError(f"this run would replace {ahead} after epoch {epoch}, a file it did not write "
                            f"({why}); move it away or choose another --output-dir")
    return path


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

        model, base = build_model(args, ctx)
        precision = Precision(args.amp, ctx.device)
        optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay, fused=precision.fused_sgd or None)
        state = TrainState(data_seed=draw_data_seed(args, ctx.device), global_batch=batch * ctx.world_size,
                           epoch=args.start_epoch)
        if args.resume:
            resume(args.resume, model, optimizer, precision, state, ctx, log)
        precision.configure(optimizer)  # after resume: loading restores the optimizer's flags

        dataset, collate_fn, prepare = train_pipeline(args, state.data_seed, ctx.device)
        sampler = ResumableSampler(dataset, ctx.world_size, ctx.rank, state.data_seed, batch)
        loader = make_loader(dataset, sampler, batch, workers, ctx.device, drop_last=True, collate_fn=collate_fn)
        batches = DeviceBatches(loader, ctx.device, prepare)
        if sampler.steps_per_epoch() == 0:
            raise UserError(f"the {len(dataset)} training images give no full batch of {batch} per process")
        knn_loaders = make_knn_loaders(args, ctx, batch, workers) if args.knn_freq > 0 else None

        log.info(f"=> {describe_run(args, ctx, batch, workers, precision, len(dataset))}")
        log.info(f"=> model: MoCo over {args.arch}{' + MLP head' if args.mlp else ''}, "
                 f"{sum(p.numel() for p in base.parameters())} parameters in each encoder")
        with PreemptionSignal() as preemption:
            guard = StepGuard(ctx.device, preemption)
            for epoch in range(state.epoch, args.epochs):
                sampler.set_epoch(epoch, state.step_in_epoch)
                lr = adjust_learning_rate(optimizer, epoch, args, cos=args.cos)
                stats = train_one_epoch(batches, model, optimizer, precision, epoch, args, ctx, log,
                                        lr, state, guard, sampler.steps_per_epoch())
                stats["bad_images"] = merge_bad_images(dataset, ctx.device)
                if knn_loaders is not None and ((epoch + 1) % args.knn_freq == 0 or epoch + 1 == args.epochs):
                    stats["knn_top1"] = knn.knn_top1(base, *knn_loaders, ctx.device, args.knn_k,
                                                     args.knn_t, args.channels_last)
                    log.info(f"=> epoch {epoch}: kNN top-1 {stats['knn_top1']:.2f}")
                state.epoch, state.step_in_epoch = epoch + 1, 0
                path = save(args, model, optimizer, precision, state, ctx)
                log.record({"epoch": epoch, **stats, "checkpoint": path, "moco_k": args.moco_k,
                            "symmetric": args.symmetric})
        log.info(f"=> done: {args.epochs} epochs; checkpoints and log.txt in {os.path.abspath(args.output_dir)}")


class TrainState:
    """Where the run is: the next epoch, steps already done in it, and the data seed."""

    def __init__(self, data_seed, global_batch, epoch=0, step_in_epoch=0):
        self.data_seed = data_seed
        self.global_batch = global_batch
        self.epoch = epoch
        self.step_in_epoch = step_in_epoch


def draw_data_seed(args, device):
    """--seed, or a fresh random seed shared by all processes (and kept in checkpoints)."""
    seed = torch.tensor([args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)],
                        device=device)
    return int(broadcast_from_main(seed))


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


def describe_run(args, ctx, batch, workers, precision, num_images):
    return (f"world size {ctx.world_size} ({ctx.procs_per_node} per node, backend {ctx.backend}, "
            f"device {ctx.device}), per-process batch {batch} (global {batch * ctx.world_size}), "
            f"{workers} loader workers per process, {precision.describe()}, {num_images} training images; "
            f"args: {vars(args)}")


def train_one_epoch(batches, model, optimizer, precision, epoch, args, ctx, log, lr, state, guard, steps):
    """One epoch from `state.step_in_epoch`. Nothing in a step waits for the device except the
    StepGuard check every --print-freq steps (which also prints the meters) and the epoch's end."""
    meters = TrainingMeters(steps, prefix=f"Epoch: [{epoch}]")
    window = ThroughputWindow(skip=state.step_in_epoch + max(1, steps // 10))
    model.train()
    start_step = state.step_in_epoch
    epoch_start = end = time.time()
    sync_debug = SyncDebug()  # MOCO_SYNC_DEBUG=error: any wait for the GPU outside the check below raises
    for i, (im_q, im_k) in enumerate(sync_debug.steps(batches), start=start_step):
        meters.data_time.update(time.time() - end)  # waiting for the loader (and, on the CPU, --fast-aug)
        with precision.autocast():
            logits, labels = model(im_q, im_k)
            loss = builder.contrastive_loss(logits.float(), labels, args.symmetric)
        guard.observe(loss)
        meters.update(loss, logits, labels)
        precision.backward_and_step(loss, optimizer)
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
            state.epoch, state.step_in_epoch = epoch, i + 1
            path = save(args, model, optimizer, precision, state, ctx)
            log.info(f"=> {guard.preemption.name or 'SIGTERM'}: saved {path} after step {i + 1} of epoch "
                     f"{epoch}; run the same command again to resume there")
            raise Preempted(path, guard.preemption.exit_code)
    seconds = time.time() - epoch_start
    done = steps - start_step
    images_per_step = batches.loader.batch_size * ctx.world_size
    return {"loss": meters.loss.avg, "acc1": meters.top1.avg, "acc5": meters.top5.avg, "lr": lr, "steps": done,
            "epoch_time_s": round(seconds, 3),
            "images_per_s": round(done * images_per_step / max(seconds, 1e-9), 1),
            **window.summary(images_per_step)}


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
        last = find_resume_checkpoint(args.output_dir, args.arch, log=lambda _: None) or args.resume
        raise UserError(f"{err.describe()}; stopping before it reaches a checkpoint. Last good checkpoint: "
                        f"{last or 'none yet'}. Try a lower --lr or check the data") from None


def save(args, model, optimizer, precision, state, ctx):
    """Write a checkpoint (global rank 0 only) of SPEC's format plus what exact resumption needs."""
    rng_states = [None] * ctx.world_size
    torch.distributed.all_gather_object(rng_states, capture_rng_state())
    name = pretrain_checkpoint_name(state.epoch - 1 if not state.step_in_epoch else state.epoch,
                                    state.step_in_epoch)
    path = os.path.join(args.output_dir, name)
    state_dict, optimizer_state = model.state_dict(), optimizer.state_dict()
    # every process holds the same weights, so all of them stop here together
    bad = first_nonfinite(list(state_dict.items()) + list(optimizer_tensors(optimizer_state)))
    if bad is not None:
        last = find_resume_checkpoint(args.output_dir, args.arch, log=lambda _: None) or args.resume
        raise UserError(f"'{bad}' became non-finite (NaN or inf) by epoch {state.epoch}, step "
                        f"{state.step_in_epoch}; {name} was not written. Last good checkpoint: "
                        f"{last or 'none yet'}. Try a lower --lr or check the data")
    if ctx.is_main and os.path.exists(path):
        raise UserError(f"this run would replace {path}, a file it did not write; move it away and resume")
    if ctx.is_main:
        save_checkpoint({
            "epoch": state.epoch,
            "arch": args.arch,
            "state_dict": state_dict,
            "optimizer": optimizer_state,
            "step_in_epoch": state.step_in_epoch,
            "global_batch": state.global_batch,
            "data_seed": state.data_seed,
            "args": {key: value for key, value in vars(args).items()},
            "rng_states": rng_states,
            "scaler": precision.state_dict(),
        }, path)
    # no process may go on (or exit, ending the job) while process 0 is still writing the checkpoint
    barrier()
    return path


def resume(path, model, optimizer, precision, state, ctx, log):
    checkpoint = restore_training_state(path, model, optimizer)
    bad = first_nonfinite(list(checkpoint["state_dict"].items()) +
                          list(optimizer_tensors(checkpoint.get("optimizer") or {})))
    if bad is not None:
        raise UserError(f"checkpoint '{path}' holds non-finite weights ('{bad}'); resume from an earlier one "
                        f"with --resume")
    precision.load_state_dict(checkpoint.get("scaler"))
    state.epoch = checkpoint.get("epoch", 0)
    state.step_in_epoch = checkpoint.get("step_in_epoch", 0)
    saved_batch = checkpoint.get("global_batch")
    if state.step_in_epoch and saved_batch and saved_batch != state.global_batch:
        # the position inside the epoch is counted in steps of the saved global batch
        raise UserError(f"'{path}' was saved {state.step_in_epoch} steps into epoch {state.epoch} with a global "
                        f"batch of {saved_batch}; this launch has {state.global_batch} ({ctx.world_size} "
                        f"processes). Relaunch with the same global batch (-b per node x nodes), or resume "
                        f"from an end-of-epoch checkpoint with --resume")
    state.data_seed = checkpoint.get("data_seed", state.data_seed)
    rng_states = checkpoint.get("rng_states")
    if rng_states and len(rng_states) == ctx.world_size:
        restore_rng_state(rng_states[ctx.rank])
    log.info(f"=> resuming from '{path}' (epoch {state.epoch}, step {state.step_in_epoch} of it)")


if __name__ == "__main__":
    run_cli(main, get_args_parser().parse_args(), prog="main_moco.py")
