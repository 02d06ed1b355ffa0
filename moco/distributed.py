"""Process-group helpers that also work with no process group at all (then they are identities),
and the launcher that gives every launch mode one code path."""
import contextlib
import datetime
import inspect
import math
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moco.errors import INTERRUPTED_EXIT, Preempted, UserError
from moco.seeding import seed_everything, set_cudnn_mode


def is_distributed():
    """True inside an initialised process group (of any size, one included)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def concat_all_gather(tensor):
    """Concatenate `tensor` from every process along dim 0, in rank order. Carries no gradient.

    Every process must pass a tensor of the same shape. Without a process group, or in a world of one,
    the input itself is returned.
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor.detach()
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def concat_all_gather_varlen(tensor):
    """Like `concat_all_gather`, for tensors whose first dimension differs between processes."""
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = concat_all_gather(length).tolist()
    longest = max(lengths)
    padded = tensor.new_zeros((longest,) + tuple(tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    gathered = concat_all_gather(padded)
    return torch.cat([gathered[r * longest:r * longest + n] for r, n in enumerate(lengths)])


@torch.no_grad()
def broadcast_from_main(tensor):
    """Overwrite `tensor` in place with process 0's copy (no-op without a process group)."""
    if get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


@torch.no_grad()
def all_reduce_sum(tensor):
    """Sum `tensor` over processes in place (no-op without a process group)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def all_reduce_max(tensor):
    """Element-wise maximum of `tensor` over processes in place (no-op without a process group)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


# --------------------------------------------------------------------------------------------------
# One process's share of the node's batch and loader workers.
# --------------------------------------------------------------------------------------------------
def per_process_batch(batch_size, procs_per_node):
    """`-b` is the batch of one node (the reference's meaning); each process takes its share."""
    if batch_size < procs_per_node:
        raise UserError(f"--batch-size {batch_size} is smaller than the {procs_per_node} processes per "
                        f"node; each process needs at least one image")
    return batch_size // procs_per_node


def workers_per_process(workers, procs_per_node):
    return math.ceil(workers / procs_per_node)


def setup_process(args, ctx):
    """Seed like the reference (when --seed), pick the cuDNN mode, and return this process's share of
    the node's batch and loader workers."""
    if args.seed is not None:
        seed_everything(args.seed, uses_cudnn=ctx.device.type == "cuda")
    set_cudnn_mode(args.seed)
    return (per_process_batch(args.batch_size, ctx.procs_per_node),
            workers_per_process(args.workers, ctx.procs_per_node))


# ---------------------------------------------------------------------------------------------------
# Launching: one code path for the reference flags, torchrun / SLURM, several local GPUs, one device.
# ---------------------------------------------------------------------------------------------------
@dataclass
class LaunchPlan:
    """How this run starts its processes.

    mode: 'torchrun', 'slurm', 'spawn' (one process per local GPU, started here) or 'single'.
    For 'spawn', `rank` is the first global rank on this node; each child adds its local index.
    """
    mode: str
    world_size: int
    procs_per_node: int
    rank: int
    local_rank: int
    init_method: str

    @property
    def spawns(self):
        return self.mode == "spawn"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist):
    """The first host of a SLURM node list such as 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise UserError(f"cannot read the SLURM node list '{nodelist}'")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def _env_int(name, default=None):
    """The integer in environment variable `name` (`default` when unset or empty); a UserError naming
    the variable when it holds something else."""
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; unset it or give a "
                        f"whole number") from None


def visible_gpus():
    """The CUDA devices this process may use (CUDA_VISIBLE_DEVICES applied); 0 without CUDA.

    CUDA_VISIBLE_DEVICES='' counts as no GPU even when it was set after CUDA was initialised in this
    process (torch reads it once, at initialisation): the test suite sets it per test to keep runs of
    the scripts inside its own process on the CPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_launch(args, gpus=None):
    """Decide the launch mode from the environment and the reference flags, and refuse a launch that
    cannot work (see `check_launch`) before any process group starts. `gpus`: the number of visible
    CUDA devices (default: this machine's)."""
    gpus = visible_gpus() if gpus is None else gpus
    plan = _plan(args, gpus)
    check_launch(plan, args, gpus)
    return plan


def _plan(args, gpus):
    explicit_url = args.dist_url not in ("", "auto")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, or any env:// launcher
        world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
        _check_env_rank(world, rank)
        if not explicit_url:
            _require_master_env()
        return LaunchPlan("torchrun", world, _env_int("LOCAL_WORLD_SIZE", world), rank,
                          _env_int("LOCAL_RANK", 0), args.dist_url if explicit_url else "env://")
    if _env_int("SLURM_NTASKS", 1) > 1 and "SLURM_PROCID" in os.environ:  # srun, one task per GPU
        _require_srun()
        world = _env_int("SLURM_NTASKS")
        nodes = _env_int("SLURM_NNODES", 1)
        if explicit_url:
            url = args.dist_url
        else:
            host = os.environ.get("MASTER_ADDR") or first_slurm_host(
                os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
            port = _env_int("MASTER_PORT") or 20000 + _env_int("SLURM_JOB_ID", 0) % 20000
            url = f"tcp://{host}:{port}"
        return LaunchPlan("slurm", world, max(1, world // nodes), _env_int("SLURM_PROCID"),
                          _env_int("SLURM_LOCALID", 0), url)
    if args.multiprocessing_distributed:
        if gpus == 0:
            raise UserError("--multiprocessing-distributed starts one process per CUDA GPU and this machine "
                            "has none; use torchrun --nproc_per_node N for several CPU processes")
        nodes = max(1, args.world_size)
        if nodes > 1 and not explicit_url:
            raise UserError("--world-size > 1 needs --dist-url tcp://HOST:PORT of the node with --rank 0")
        if nodes > 1 and args.rank < 0:
            raise UserError("--world-size > 1 needs --rank (this node's rank, 0 to world-size - 1)")
        url = args.dist_url if explicit_url else f"tcp://127.0.0.1:{free_port()}"
        return LaunchPlan("spawn", nodes * gpus, gpus, max(0, args.rank) * gpus, 0, url)
    if gpus > 1 and args.gpu is None:  # a plain run on a multi-GPU node uses all of them
        url = args.dist_url if explicit_url else f"tcp://127.0.0.1:{free_port()}"
        return LaunchPlan("spawn", gpus, gpus, 0, 0, url)
    return LaunchPlan("single", 1, 1, 0, 0, "single")


def _check_env_rank(world, rank):
    if world is None or rank is None:
        raise UserError("RANK and WORLD_SIZE must both hold a number (as torchrun sets them); unset both "
                        "for a single-process run")
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} and WORLD_SIZE={world} do not fit: WORLD_SIZE must be at least 1 and "
                        f"RANK between 0 and WORLD_SIZE - 1; unset both for a single-process run")


def _require_master_env():
    """env:// finds its peers through MASTER_ADDR:MASTER_PORT; without them init_process_group raises a
    ValueError deep inside torch. torchrun sets both; a hand-made environment may not."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise UserError(f"RANK and WORLD_SIZE are set (a launch through env://) but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not: set MASTER_ADDR and MASTER_PORT to "
                        f"the address of rank 0, start the run with torchrun, or unset RANK and WORLD_SIZE")
    _env_int("MASTER_PORT")


# SLURM's id of the batch step (the job script itself), which srun's steps never have
_SLURM_BATCH_STEP = {"4294967294", "batch"}


def _require_srun():
    """SLURM_NTASKS > 1 in a process that srun did not start (a job script calling python directly, or
    a shell of salloc) means that no other task will ever come: the run would wait for them until the
    rendezvous times out. srun sets SLURM_STEP_ID (and the older SLURM_STEPID) for each task it starts."""
    step = os.environ.get("SLURM_STEP_ID") or os.environ.get("SLURM_STEPID")
    if step and step not in _SLURM_BATCH_STEP:
        return
    ntasks = os.environ.get("SLURM_NTASKS")
    raise UserError(f"SLURM_NTASKS={ntasks} but this process was not started by srun (no SLURM_STEP_ID), so "
                    f"the other {int(ntasks) - 1} task(s) will never join: start the script with "
                    f"`srun python ...` in the job script, or unset SLURM_NTASKS for a single-process run")


# ---------------------------------------------------------------------------------------------------
# Launch checks: each a UserError (one line, exit 2) before any process group or file exists.
# ---------------------------------------------------------------------------------------------------
_HOW_TO_START_FEWER = {
    "torchrun": "torchrun --nproc_per_node {gpus}",
    "slurm": "srun --ntasks-per-node {gpus} (or --gpus-per-task 1)",
}


def _visibility():
    """' (CUDA_VISIBLE_DEVICES=...)' when that variable limits what this process sees, else ''."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f" (CUDA_VISIBLE_DEVICES={hidden!r})" if hidden is not None else ""


def _gpus_seen(gpus):
    """'1 GPU is visible', with the CUDA_VISIBLE_DEVICES that limits it when one is set."""
    return (f"{gpus} GPU is visible" if gpus == 1 else f"{gpus} GPUs are visible") + _visibility()


def _check_gpu_flag(gpu, gpus):
    if gpu is None:
        return
    if gpus == 0:
        raise UserError(f"--gpu {gpu} asks for a CUDA GPU and none is visible{_visibility()}; "
                        f"drop --gpu to train on the CPU")
    if not 0 <= gpu < gpus:
        raise UserError(f"--gpu {gpu} is out of range: {_gpus_seen(gpus)}, numbered 0 to {gpus - 1}; "
                        f"pass one of those or drop --gpu")


def _check_processes_per_gpu(plan, gpus):
    """Every local process needs a GPU of its own: two NCCL ranks on one device fail ('invalid usage')."""
    if gpus == 0 or plan.mode == "single":
        return  # CPU processes on gloo, any number of them
    if plan.mode == "slurm" and os.environ.get("SLURM_GPUS_PER_TASK"):
        return  # SLURM gave each task GPUs of its own (its CUDA_VISIBLE_DEVICES differs per task)
    fix = _HOW_TO_START_FEWER.get(plan.mode, "fewer processes per node").format(gpus=gpus)
    cpu = "or CUDA_VISIBLE_DEVICES= to train on the CPU with gloo"
    if plan.procs_per_node > gpus:
        raise UserError(f"{plan.mode} starts {plan.procs_per_node} processes on this node but only "
                        f"{_gpus_seen(gpus)}; each process needs a GPU of its own: start at most {gpus} "
                        f"per node ({fix}), {cpu}")
    if plan.local_rank >= gpus:
        raise UserError(f"{plan.mode} gave this process local rank {plan.local_rank} but only "
                        f"{_gpus_seen(gpus)}; each process needs a GPU of its own: start at most {gpus} "
                        f"per node ({fix}), {cpu}")


_BACKENDS = {
    "gloo": lambda: dist.is_gloo_available(),
    "nccl": lambda: dist.is_nccl_available(),
    "mpi": lambda: dist.is_mpi_available(),
    "ucc": lambda: getattr(dist, "is_ucc_available", lambda: False)(),
}


def resolve_backend(requested, device_type):
    """The backend of a process on `device_type`: --dist-backend, except nccl (the default, GPU only),
    which becomes gloo on the CPU."""
    return "gloo" if device_type != "cuda" and requested == "nccl" else requested


def _check_backend(requested, gpus):
    backend = resolve_backend(requested, "cuda" if gpus else "cpu")
    if not (dist.is_available() and backend in _BACKENDS and _BACKENDS[backend]()):
        available = [name for name, present in _BACKENDS.items() if dist.is_available() and present()]
        where = "GPUs" if gpus else "the CPU"
        raise UserError(f"--dist-backend {requested} is not available in this PyTorch build on {where}; "
                        f"available: {', '.join(available) or 'none (torch.distributed is missing)'}")


def check_launch(plan, args, gpus):
    """Refuse what would crash later or silently misbehave: --gpu without a GPU or out of range, more
    processes on a node than visible GPUs (torchrun, SLURM, spawn), and a --dist-backend this PyTorch
    lacks. `gpus` is the number of visible CUDA devices (0: processes run on the CPU with gloo)."""
    _check_gpu_flag(args.gpu, gpus)
    _check_processes_per_gpu(plan, gpus)
    _check_backend(args.dist_backend, gpus)


@dataclass
class ProcessContext:
    """What a training process knows about its place in the run."""
    rank: int
    local_rank: int
    world_size: int
    procs_per_node: int
    device: torch.device
    backend: str

    @property
    def is_main(self):
        return self.rank == 0


def _device_for(plan, local_rank, args):
    if not visible_gpus():
        return torch.device("cpu")
    if plan.mode == "single":
        return torch.device("cuda", args.gpu if args.gpu is not None else 0)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@contextlib.contextmanager
def process_group(plan, local_index, args):
    """Initialise this process's group (a world of one included) and tear it down afterwards."""
    local_rank = local_index if plan.spawns else plan.local_rank
    rank = plan.rank + local_index if plan.spawns else plan.rank
    device = _device_for(plan, local_rank, args)
    backend = resolve_backend(args.dist_backend, device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=60)  # kNN monitors and checkpoint saves can take a while
    if plan.mode == "single":
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        say_what_we_wait_for(plan, rank, timeout)
        with ctrl_c_ends_the_process():
            dist.init_process_group(backend, init_method=plan.init_method, rank=rank,
                                    world_size=plan.world_size, timeout=timeout)
    try:
        yield ProcessContext(rank, local_rank, plan.world_size, plan.procs_per_node, device, backend)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def ctrl_c_ends_the_process():
    """Ctrl-C (SIGINT) ends the process at once inside the block. The rendezvous waits in C++ and never
    returns to Python before its timeout, so Python's own handler (KeyboardInterrupt) would run only
    then: an hour later. SIGTERM's default action already ends it."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
    except ValueError:  # not the main thread: nothing to change
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def say_what_we_wait_for(plan, rank, timeout):
    """One line from every process before the rendezvous, which blocks silently until all processes have
    joined: how many, where, and for how long (a missing process is otherwise an hour of silence)."""
    where = plan.init_method
    if where == "env://":
        where = f"env:// (MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')})"
    print(f"=> {plan.mode}: process {rank} of {plan.world_size} waits for all {plan.world_size} processes to "
          f"join at {where} (gives up after {int(timeout.total_seconds() // 60)} min; Ctrl-C stops it)",
          flush=True)


def wrap_ddp(model, device, sync_buffers_each_step=True):
    """DistributedDataParallel in every launch mode (so state_dict keys start with 'module.').

    Buffers are made identical on every process at the start. With `sync_buffers_each_step=False`,
    DDP skips re-broadcasting them before every forward: MoCo's queue and key encoder stay identical
    on every process by construction, and rank 0, which writes checkpoints, never receives anything.
    """
    for buffer in model.buffers():
        broadcast_from_main(buffer)
    kwargs = {}
    if not sync_buffers_each_step:
        accepted = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
        kwargs = ({"forward_sync_buffers": False} if "forward_sync_buffers" in accepted
                  else {"broadcast_buffers": False})
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def _spawned_entry(local_index, fn, plan, args):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the parent ignores it, and passed that on
    try:
        fn(local_index, plan, args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted as err:
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED_EXIT)


def run_processes(fn, plan, args):
    """Run `fn(local_index, plan, args)` in this process, or once per local GPU for 'spawn'."""
    if not plan.spawns:
        return fn(0, plan, args)
    import torch.multiprocessing as mp
    # Ctrl-C reaches the children too: they save and stop (exit 130), or stop at a second Ctrl-C. This
    # process only waits for them; a KeyboardInterrupt here would kill them in the middle of that save.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        mp.spawn(_spawned_entry, nprocs=plan.procs_per_node, args=(fn, plan, args))
    except mp.ProcessExitedException as err:  # the child already printed its one line
        sys.exit(err.exit_code if err.exit_code and err.exit_code > 0 else 1)
    finally:
        signal.signal(signal.SIGINT, previous)
