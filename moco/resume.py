"""Pre-training's run state (main_moco.py): what its checkpoints hold, saving and restoring it exactly, and
where a launch resumes.

A checkpoint keeps the reference's entries (`epoch`, `arch`, `state_dict`, `optimizer`) and adds what exact
resumption needs: the steps done in an unfinished epoch (a preemption's save), the global batch those steps
were counted in, the data seed, every process's RNG states and the loss scaler's state. The files
themselves (atomic writes, safe loading, names) are moco.checkpoint's.
"""
import os
import random

import torch

from moco.checkpoint import (capture_rng_state, checkpoint_state_dict, find_resume_checkpoint, first_nonfinite,
                             is_pretrain_state_dict, load_checkpoint, optimizer_tensors, pretrain_checkpoint_name,
                             restore_rng_state, restore_training_state, save_checkpoint, scan_resume_checkpoints)
from moco.distributed import barrier, broadcast_from_main
from moco.errors import UserError


class TrainState:
    """Everything a pre-training checkpoint holds: the DDP-wrapped model, its optimizer and precision (the
    loss scaler), and where the run is: the epoch being trained, the steps already done in it, the data
    seed and the global batch those steps are counted in."""

    def __init__(self, model, optimizer, precision, data_seed, global_batch, epoch=0, step_in_epoch=0):
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.data_seed = data_seed
        self.global_batch = global_batch
        self.epoch = epoch
        self.step_in_epoch = step_in_epoch


def draw_data_seed(args, device):
    """--seed, or a fresh random seed shared by all processes (and kept in checkpoints)."""
    seed = torch.tensor([args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)],
                        device=device)
    return int(broadcast_from_main(seed))


def last_good_checkpoint(args):
    """The newest checkpoint of this run in --output-dir (else its --resume), for error messages."""
    return find_resume_checkpoint(args.output_dir, args.arch, log=lambda _: None) or args.resume or "none yet"


def save_training(state, args, ctx):
    """Write `state` as a checkpoint (global rank 0 writes; every process takes part and waits for it):
    `checkpoint_{epoch:04d}.pth.tar` after a whole epoch, `..._iter{step:06d}` after a preemption."""
    rng_states = [None] * ctx.world_size
    torch.distributed.all_gather_object(rng_states, capture_rng_state())
    name = pretrain_checkpoint_name(state.epoch - 1 if not state.step_in_epoch else state.epoch,
                                    state.step_in_epoch)
    path = os.path.join(args.output_dir, name)
    state_dict, optimizer_state = state.model.state_dict(), state.optimizer.state_dict()
    # every process holds the same weights, so all of them stop here together
    bad = first_nonfinite(list(state_dict.items()) + list(optimizer_tensors(optimizer_state)))
    if bad is not None:
        raise UserError(f"'{bad}' became non-finite (NaN or inf) by epoch {state.epoch}, step "
                        f"{state.step_in_epoch}; {name} was not written. Last good checkpoint: "
                        f"{last_good_checkpoint(args)}. Try a lower --lr or check the data")
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
            "scaler": state.precision.state_dict(),
        }, path)
    # no process may go on (or exit, ending the job) while process 0 is still writing the checkpoint
    barrier()
    return path


def resume_training(path, state, ctx, log):
    """Restore `state` from the checkpoint at `path`: weights, optimizer, loss scaler, position, data seed
    and this process's RNG states (when the world size is the saved one)."""
    checkpoint = restore_training_state(path, state.model, state.optimizer)
    bad = first_nonfinite(list(checkpoint["state_dict"].items()) +
                          list(optimizer_tensors(checkpoint.get("optimizer") or {})))
    if bad is not None:
        raise UserError(f"checkpoint '{path}' holds non-finite weights ('{bad}'); resume from an earlier one "
                        f"with --resume")
    state.precision.load_state_dict(checkpoint.get("scaler"))
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


# --------------------------------------------------------------------------------------------------
# Where a launch resumes: decided once, before any process starts.
# --------------------------------------------------------------------------------------------------
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
    path, progress, skipped = found_progress(args, log)
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


def found_progress(args, log):
    """(checkpoint path or '', its progress as (epochs done, steps of the next), {skipped path: reason}):
    --resume's, else the newest usable checkpoint in --output-dir, else --start-epoch's."""
    if args.resume:
        checkpoint = check_resume_file(args.resume, args.arch)
        return args.resume, (checkpoint.get("epoch", 0), checkpoint.get("step_in_epoch", 0)), {}
    scan = scan_resume_checkpoints(args.output_dir, args.arch)
    skipped = {}
    for skipped_path, _, reason in scan.skipped:
        log.info(f"=> skipping {reason}")
        skipped[skipped_path] = reason
    return scan.path or "", scan.progress if scan.path else (args.start_epoch, 0), skipped
