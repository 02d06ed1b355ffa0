"""Shared fixtures: small generated ImageNet-layout folders (DIR/train/<class>/*.png, DIR/val/...)."""
import itertools
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_image_folder(root, classes=3, train_per_class=16, val_per_class=5, size=(40, 48), seed=0):
    """Write random RGB PNGs in the ImageNet layout under `root`; return `root` as a string."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = (rng.random((size[0], size[1], 3)) * 255).astype(np.uint8)
                pixels[..., c % 3] //= 2  # a faint class signal
                Image.fromarray(pixels).save(os.path.join(folder, f"img{i:03d}.png"))
    return str(root)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A read-only shared folder: 3 classes x 16 train and 5 val images of 40 x 48 px."""
    return make_image_folder(tmp_path_factory.mktemp("images"))


# --------------------------------------------------------------------------------------------------
# Isolation: every child process a test starts is a CPU run unless the test asks for CUDA, and no two
# tests (or xdist workers) share a cache folder or a port.
# --------------------------------------------------------------------------------------------------
_CACHES = itertools.count()
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def cpu_env(threads=1, **extra):
    """os.environ for a child that must run on the CPU on any machine: GPUs hidden
    (CUDA_VISIBLE_DEVICES=''), no launcher variables (torchrun's, SLURM's) inherited from the shell that
    started pytest, `threads` intra-op threads, unbuffered output; then `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cuda_env(threads=1, one_gpu=False, **extra):
    """Like `cpu_env`, with the GPUs this pytest process sees left visible: all of them, or with
    `one_gpu` only the first (its CUDA_VISIBLE_DEVICES' first entry, else GPU 0). A
    CUDA_VISIBLE_DEVICES given in `extra` is the caller's choice and stays as given."""
    env = cpu_env(threads, **extra)
    if "CUDA_VISIBLE_DEVICES" in extra:
        return env
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if one_gpu:
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0].strip() if visible else "0"
    elif visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    else:
        del env["CUDA_VISIBLE_DEVICES"]
    return env


@pytest.fixture(autouse=True)
def _private_data_cache(tmp_path_factory, monkeypatch):
    """The built-in synthetic data set's cache (MOCO_DATA_CACHE) in a folder of this test's own (created
    only when a test generates data), never ~/.cache or another xdist worker's folder."""
    monkeypatch.setenv("MOCO_DATA_CACHE", str(tmp_path_factory.getbasetemp() / f"data-cache-{next(_CACHES)}"))


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """Tests not marked `cuda` run on the CPU on any machine: CUDA_VISIBLE_DEVICES='' for this test, which
    the children it starts inherit and which moco.distributed.visible_gpus() honours in this process too
    (torch reads the variable only once). Without it, a main_moco / main_lincls run inside pytest on a
    machine with 2+ GPUs would start one process per GPU, and on one GPU would train there."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where torch sees a CUDA GPU and are skipped, with the reason, elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def descendants(pid):
    """The ids of all processes below `pid`, read from /proc (empty where there is no /proc)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc):
    """Kill a child started by a test and every process below it (torchrun puts its workers in sessions
    of their own, so a process group would miss them); then reap the child."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def start_logged(argv, env, cwd, log_stem):
    """Popen `argv` with stdout and stderr in files LOG_STEM.out / LOG_STEM.err (pipes could fill up and
    stall a process that its peers are waiting for)."""
    out, err = open(f"{log_stem}.out", "w"), open(f"{log_stem}.err", "w")
    with out, err:
        proc = subprocess.Popen([str(a) for a in argv], cwd=str(cwd), env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)
    proc.log_stem = str(log_stem)
    return proc


def wait_all(procs, timeout):
    """Wait for processes of `start_logged` together; on a timeout kill them all (and their children)
    and fail. Returns [(returncode, stdout, stderr)] in order."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            kill_tree(proc)
        pytest.fail(f"{len(procs)} processes did not finish within {timeout} s (a hang?)")
    results = []
    for proc in procs:
        with open(f"{proc.log_stem}.out") as out, open(f"{proc.log_stem}.err") as err:
            results.append((proc.returncode, out.read(), err.read()))
    return results


def _gloo_child(rank, world, store, outdir, body):
    import datetime
    import traceback
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        body(rank, world)
        open(os.path.join(outdir, f"ok.{rank}"), "w").close()
    except BaseException:
        with open(os.path.join(outdir, f"fail.{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def fork_gloo_pair(body, tmp_path, what):
    """Run `body(rank, world)` in both processes of a forked 2-process gloo group (the children start with
    torch already imported, as DataLoader workers do); fail with the children's tracebacks unless both
    returned."""
    import torch.multiprocessing as mp
    try:
        mp.start_processes(_gloo_child, args=(2, str(tmp_path / "store"), str(tmp_path), body), nprocs=2,
                           join=True, start_method="fork")
    except Exception as exc:
        failures = "\n".join(p.read_text() for p in sorted(tmp_path.glob("fail.*")))
        pytest.fail(f"{what} failed:\n{failures or exc}")
    assert (tmp_path / "ok.0").exists() and (tmp_path / "ok.1").exists()


def assert_same_training_state(a, b):
    """Bit-identical weights, buffers (queue, BN statistics) and optimizer state."""
    assert a["epoch"] == b["epoch"]
    assert list(a["state_dict"]) == list(b["state_dict"])
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sorted(state_a) == sorted(state_b) and len(state_a) > 0
    for index in state_a:
        assert torch.equal(state_a[index]["momentum_buffer"], state_b[index]["momentum_buffer"]), index
