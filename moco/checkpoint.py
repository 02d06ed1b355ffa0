"""Checkpoints: atomic saves, loading with clear errors, RNG states, and finding where to resume.

Pre-training checkpoints keep the reference format (`epoch`, `arch`, `state_dict` with `module.` keys,
`optimizer`) and add what exact resumption needs. Everything stored is plain data (tensors, numbers,
strings, lists, dicts), so every checkpoint loads with `torch.load(weights_only=True)`.
"""
import errno
import hashlib
import io
import os
import random
import re
import shutil

import numpy as np
import torch

from moco.errors import UserError
from moco.outdir import pid_alive

PRETRAIN_NAME = re.compile(r"^checkpoint_(\d{4,})(?:_iter(\d{6,}))?\.pth\.tar$")
# the partial file of a save in progress (save_checkpoint, copy_checkpoint): .<name>.tmp<pid of the writer>
PARTIAL_NAME = re.compile(r"^\.((?:checkpoint|model_best)[^/]*\.pth\.tar)\.tmp(\d+)$")


def save_checkpoint(state, path):
    """Write `state` to `path` atomically: a killed or failed save (a full disk, a file size limit)
    leaves the previous file intact and no partial file behind; a failure raises UserError naming
    the file and the reason."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
        raise UserError(f"cannot write checkpoint '{path}': {write_failure(err)}; nothing was replaced, the "
                        f"partial file is removed") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_failure(err):
    """Why a write failed, in words: the system's reason, or (torch.save hides it) the likely ones."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return "the write failed (disk full, or over a file size limit?)"


def describe_error(err):
    """`err` in a few words for a one-line message: its strerror, or its type and first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first[:160]}" if first else type(err).__name__


def copy_checkpoint(src, dst):
    """Copy a checkpoint file atomically (used for model_best.pth.tar); a failure raises UserError."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(dst)), f".{os.path.basename(dst)}.tmp{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as err:
        raise UserError(f"cannot write checkpoint '{dst}': {write_failure(err)}; nothing was replaced, the "
                        f"partial file is removed") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, what="checkpoint"):
    """Load a checkpoint dict on the CPU, or raise UserError naming the file and the problem."""
    require_file(path, what)
    return _loaded(lambda: torch.load(path, map_location="cpu", weights_only=True), path, what)


def load_checkpoint_and_sha256(path, what="checkpoint"):
    """(checkpoint, sha256 of its file) from one read of the file: the hash is of the very bytes loaded,
    even if the file is replaced meanwhile. Errors as `load_checkpoint`'s."""
    require_file(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise UserError(f"cannot read {what} '{path}': {err.strerror or describe_error(err)}") from None
    checkpoint = _loaded(lambda: torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), path, what)
    return checkpoint, hashlib.sha256(data).hexdigest()


def require_file(path, what):
    if not os.path.exists(path):
        raise UserError(f"{what} '{path}' does not exist")
    if os.path.isdir(path):
        raise UserError(f"{what} '{path}' is a directory, not a checkpoint file")


def _loaded(load, path, what):
    """The checkpoint dict that `load()` returns, its failures turned into one UserError each."""
    try:
        checkpoint = load()
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EIO) and err.strerror:  # the file system's reason
            raise UserError(f"cannot read {what} '{path}': {err.strerror}") from None
        raise UserError(f"{what} '{path}' is not a readable PyTorch checkpoint: corrupt, truncated, or "
                        f"holding more than tensors and plain data ({describe_error(err)})") from None
    except Exception as err:  # noqa: BLE001  (any failure of the loader is the file's)
        # the safe loader also refuses files holding arbitrary python objects: we never run their code
        raise UserError(f"{what} '{path}' is not a readable PyTorch checkpoint: corrupt, truncated, or "
                        f"holding more than tensors and plain data ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{what} '{path}' holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def checkpoint_state_dict(checkpoint, path, what="checkpoint"):
    """The model weights of a loaded checkpoint (`state_dict`), or UserError if it has none."""
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserError(f"{what} '{path}' has no 'state_dict' of model weights")
    return state_dict


def restore_training_state(path, model, optimizer):
    """Load a checkpoint of this script into the DDP-wrapped `model` and its `optimizer`.

    Returns the checkpoint dict for the script's own entries (epoch, best_acc1, RNG states, ...).
    """
    checkpoint = load_checkpoint(path, what="--resume checkpoint")
    state_dict = checkpoint_state_dict(checkpoint, path, what="--resume checkpoint")
    if not next(iter(state_dict)).startswith("module."):
        state_dict = {"module." + key: value for key, value in state_dict.items()}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise UserError(f"--resume checkpoint '{path}' does not fit this model "
                        f"({(lines[1] if len(lines) > 1 else lines[0])[:200]})") from None
    if "optimizer" in checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
    return checkpoint


def capture_rng_state():
    """The RNG states of python, numpy, torch (CPU) and every CUDA device, as plain python data
    (lists of ints), which both `all_gather_object` and `torch.load(weights_only=True)` accept."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *(x.item() if hasattr(x, "item") else x
                                                       for x in np_state[2:])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda_states])


def pretrain_checkpoint_name(epoch, step_in_epoch=0):
    """`checkpoint_{epoch:04d}.pth.tar` after epoch `epoch`; a mid-epoch (preemption) save of
    `step_in_epoch` finished steps of `epoch` is `checkpoint_{epoch:04d}_iter{step:06d}.pth.tar`."""
    if step_in_epoch:
        return f"checkpoint_{epoch:04d}_iter{step_in_epoch:06d}.pth.tar"
    return f"checkpoint_{epoch:04d}.pth.tar"


def pretrain_checkpoints(output_dir):
    """Pre-training checkpoints in `output_dir`, newest progress first, as (path, progress) pairs.

    Progress is (epochs completed, steps of the next epoch completed).
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = PRETRAIN_NAME.match(name)
        if not match:
            continue
        epoch, step = int(match.group(1)), int(match.group(2) or 0)
        progress = (epoch, step) if step else (epoch + 1, 0)
        found.append((os.path.join(output_dir, name), progress))
    return sorted(found, key=lambda item: item[1], reverse=True)


def is_pretrain_state_dict(state_dict):
    """True for the weights of a MoCo model (query encoder under `module.encoder_q.` or `encoder_q.`)."""
    return any(isinstance(key, str) and (key.startswith("encoder_q.") or ".encoder_q." in key)
               for key in state_dict)


class ResumeScan:
    """What auto-resume found in an output folder: the checkpoint to resume from (or None), its
    progress (epochs completed, steps of the next epoch completed), and the pre-training-named files
    it skipped as (path, progress, reason) triples."""

    def __init__(self):
        self.path = None
        self.progress = (0, 0)
        self.skipped = []


def scan_resume_checkpoints(output_dir, arch):
    """Find the newest checkpoint in `output_dir` that loads and is a MoCo pre-training checkpoint.

    Files that do not load, or hold other weights (a main_lincls checkpoint under a pre-training
    name, say), are skipped and listed, never touched. A checkpoint of another architecture raises
    UserError, because starting afresh there would later overwrite it.
    """
    scan = ResumeScan()
    for path, progress in pretrain_checkpoints(output_dir):
        try:
            checkpoint = load_checkpoint(path)
            state_dict = checkpoint_state_dict(checkpoint, path)
        except UserError as err:
            scan.skipped.append((path, progress, str(err)))
            continue
        if not is_pretrain_state_dict(state_dict):
            scan.skipped.append((path, progress, f"'{path}' is not a MoCo pre-training checkpoint (no "
                                                 f"encoder_q weights; a main_lincls checkpoint?)"))
            continue
        if checkpoint.get("arch") != arch:
            raise UserError(
                f"--output-dir '{output_dir}' holds checkpoints of another run (arch "
                f"'{checkpoint.get('arch')}', this run: '{arch}'); choose another --output-dir or pass "
                f"--resume explicitly")
        scan.path, scan.progress = path, progress
        return scan
    return scan


def find_resume_checkpoint(output_dir, arch, log=print):
    """The newest checkpoint in `output_dir` that loads and is this run's (same arch), or None.

    Every file skipped on the way is named through `log`; see `scan_resume_checkpoints`.
    """
    scan = scan_resume_checkpoints(output_dir, arch)
    for _, _, reason in scan.skipped:
        log(f"=> skipping {reason}")
    return scan.path


def first_nonfinite(named_tensors):
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in named_tensors:
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def optimizer_tensors(optimizer_state):
    """(name, tensor) pairs of an optimizer's state_dict (momentum buffers and the like)."""
    for index, entry in optimizer_state.get("state", {}).items():
        for key, value in entry.items():
            yield f"optimizer state {index}.{key}", value


def remove_stale_partial_files(output_dir, log):
    """Remove the partial files of saves that a killed process (kill -9, a node lost) left in
    `output_dir`, naming each through `log`. A partial file whose writer is alive is kept: the caller
    holds the folder's run lock, so such a writer would be another process of this host still saving."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        match = PARTIAL_NAME.match(name)
        if not match or pid_alive(int(match.group(2))):
            continue
        path = os.path.join(output_dir, name)
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        except OSError as err:
            log(f"=> cannot remove '{path}', the partial file of an interrupted save: {err.strerror}")
            continue
        log(f"=> removed '{path}', the partial file of a save cut short when process {match.group(2)} "
            f"ended (a finished '{match.group(1)}' is a file of its own and stays untouched)")
        removed.append(path)
    return removed
