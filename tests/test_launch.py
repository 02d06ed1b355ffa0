"""Launch checks (moco.distributed.check_launch): a launch that cannot work is refused with one line and
exit status 2 before any process group starts or any file is written.

The scripts themselves run in subprocesses with the GPUs hidden (conftest.cpu_env), so the CPU cases are
the same on every machine. The cases that need GPUs to be visible are checked two ways: through
`plan_launch(args, gpus=N)` with the launcher's real environment variables set (any machine), and as
real subprocesses marked `cuda`, which run where there is a GPU.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import main_moco
from conftest import LAUNCH_ENV, cpu_env, cuda_env
from moco.distributed import plan_launch, resolve_backend
from moco.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["-a", "resnet18", "--cifar-stem", "--crop-size", "16", "-b", "4", "-j", "0", "--epochs", "1"]
MOCO_TINY = TINY + ["--moco-dim", "8", "--moco-k", "16"]


def parse(argv):
    return main_moco.get_args_parser().parse_args(argv)


@pytest.fixture
def no_launcher(monkeypatch):
    """A shell without torchrun or SLURM variables, whatever started pytest; returns monkeypatch."""
    for key in list(os.environ):
        if key in LAUNCH_ENV or key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    return monkeypatch


def set_env(monkeypatch, **values):
    for key, value in values.items():
        monkeypatch.setenv(key, str(value))


def torchrun_env(monkeypatch, world, local_world, rank=0, local_rank=0):
    set_env(monkeypatch, RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE=local_world,
            MASTER_ADDR="127.0.0.1", MASTER_PORT=1)


def slurm_env(monkeypatch, ntasks, nnodes, procid=0, localid=0, **extra):
    """What srun sets for one of its tasks (the parts the launcher reads, and a few it does not)."""
    set_env(monkeypatch, SLURM_NTASKS=ntasks, SLURM_NNODES=nnodes, SLURM_PROCID=procid, SLURM_LOCALID=localid,
            SLURM_NODEID=procid * nnodes // ntasks, SLURM_JOB_ID=4242, SLURM_NODELIST="node[01-02]",
            SLURM_STEP_NODELIST="node[01-02]", SLURM_STEP_ID=0,
            SLURM_TASKS_PER_NODE=f"{ntasks // nnodes}(x{nnodes})", **extra)


def refused(args, gpus, *expected):
    with pytest.raises(UserError) as info:
        plan_launch(args, gpus=gpus)
    message = str(info.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message
    return message


# --------------------------------------------------------------------------------------------------
# the checks, with the number of visible GPUs given (any machine)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, expected", [
    ({"RANK": 3, "WORLD_SIZE": 2, "MASTER_ADDR": "h", "MASTER_PORT": 1}, ["RANK=3 and WORLD_SIZE=2 do not fit"]),
    ({"RANK": 0, "WORLD_SIZE": 0, "MASTER_ADDR": "h", "MASTER_PORT": 1}, ["WORLD_SIZE must be at least 1"]),
    ({"RANK": "", "WORLD_SIZE": 2, "MASTER_ADDR": "h", "MASTER_PORT": 1}, ["must both hold a number"]),
    ({"RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "h", "MASTER_PORT": "x"}, ["MASTER_PORT='x' is not an integer"]),
    ({"RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "h"}, ["MASTER_PORT is not"]),
    ({"SLURM_NTASKS": 4, "SLURM_PROCID": 0}, ["SLURM_NTASKS=4", "not started by srun", "other 3 task(s)"]),
    ({"SLURM_NTASKS": 2, "SLURM_PROCID": 0, "SLURM_STEP_ID": 4294967294}, ["not started by srun"]),
    ({"SLURM_NTASKS": "two", "SLURM_PROCID": 0}, ["SLURM_NTASKS='two' is not an integer"]),
])
def test_launch_environment_that_cannot_work_is_refused(no_launcher, env, expected):
    set_env(no_launcher, **env)
    refused(parse(["DIR"]), 0, *expected)


def test_srun_step_is_accepted_without_gpus(no_launcher):
    slurm_env(no_launcher, ntasks=4, nnodes=2, procid=3, localid=1)
    plan = plan_launch(parse(["DIR"]), gpus=0)
    assert (plan.mode, plan.world_size, plan.rank) == ("slurm", 4, 3)


def test_torchrun_more_processes_than_gpus(no_launcher):
    torchrun_env(no_launcher, world=8, local_world=8, rank=3, local_rank=3)
    message = refused(parse(["DIR"]), 1, "8 processes", "1 GPU is visible", "--nproc_per_node 1",
                      "CUDA_VISIBLE_DEVICES=")
    assert message.startswith("torchrun starts 8 processes on this node")


def test_torchrun_within_the_gpus_or_on_the_cpu_is_accepted(no_launcher):
    torchrun_env(no_launcher, world=4, local_world=2, rank=3, local_rank=1)  # 2 nodes x 2 processes
    for gpus in (2, 8, 0):  # 0: CPU processes on gloo, any number of them
        plan = plan_launch(parse(["DIR"]), gpus=gpus)
        assert (plan.mode, plan.world_size, plan.procs_per_node, plan.rank, plan.local_rank) == \
            ("torchrun", 4, 2, 3, 1)


def test_hidden_gpus_are_named(no_launcher):
    torchrun_env(no_launcher, world=2, local_world=2)
    no_launcher.setenv("CUDA_VISIBLE_DEVICES", "3")
    refused(parse(["DIR"]), 1, "2 processes", "1 GPU is visible (CUDA_VISIBLE_DEVICES='3')")


def test_slurm_more_tasks_per_node_than_gpus(no_launcher):
    slurm_env(no_launcher, ntasks=8, nnodes=2, procid=5, localid=1)
    refused(parse(["DIR"]), 2, "slurm starts 4 processes", "2 GPUs are visible", "--ntasks-per-node 2")


def test_slurm_local_id_beyond_the_gpus(no_launcher):
    # 3 tasks on 2 nodes: 3 // 2 = 1 per node passes, but srun put 2 on this node; the local id tells
    slurm_env(no_launcher, ntasks=3, nnodes=2, procid=1, localid=1)
    refused(parse(["DIR"]), 1, "local rank 1", "1 GPU is visible")


def test_slurm_tasks_with_gpus_of_their_own_are_accepted(no_launcher):
    # --gpus-per-task 1: each task sees one GPU (its own), 4 tasks per node is right
    slurm_env(no_launcher, ntasks=8, nnodes=2, procid=5, localid=1, SLURM_GPUS_PER_TASK=1)
    plan = plan_launch(parse(["DIR"]), gpus=1)
    assert (plan.mode, plan.world_size, plan.procs_per_node, plan.rank) == ("slurm", 8, 4, 5)
    assert plan.init_method == f"tcp://node01:{20000 + 4242}"


def test_spawn_takes_one_process_per_visible_gpu(no_launcher):
    plan = plan_launch(parse(["DIR", "--multiprocessing-distributed"]), gpus=3)
    assert (plan.mode, plan.world_size, plan.procs_per_node) == ("spawn", 3, 3)
    plan = plan_launch(parse(["DIR"]), gpus=2)  # a plain run on a 2-GPU node
    assert (plan.mode, plan.procs_per_node) == ("spawn", 2)
    refused(parse(["DIR", "--multiprocessing-distributed"]), 0, "--multiprocessing-distributed", "none")


@pytest.mark.parametrize("gpu,gpus,expected", [
    (0, 0, ["--gpu 0", "none is visible", "drop --gpu"]),
    (2, 2, ["--gpu 2 is out of range", "2 GPUs are visible", "0 to 1"]),
    (-1, 1, ["--gpu -1 is out of range", "1 GPU is visible", "0 to 0"]),
])
def test_gpu_flag(no_launcher, gpu, gpus, expected):
    refused(parse(["DIR", "--gpu", str(gpu)]), gpus, *expected)


def test_gpu_flag_in_range_is_a_single_process(no_launcher):
    plan = plan_launch(parse(["DIR", "--gpu", "1"]), gpus=2)
    assert (plan.mode, plan.world_size) == ("single", 1)


def test_backends(no_launcher):
    # nccl, the default, needs CUDA: CPU processes use gloo instead, so a plain CPU run just works
    assert resolve_backend("nccl", "cpu") == "gloo" and resolve_backend("nccl", "cuda") == "nccl"
    assert resolve_backend("gloo", "cuda") == "gloo"
    assert plan_launch(parse(["DIR"]), gpus=0).mode == "single"
    refused(parse(["DIR", "--dist-backend", "nccll"]), 0, "--dist-backend nccll", "available: gloo")
    refused(parse(["DIR", "--dist-backend", "nccll"]), 1, "--dist-backend nccll", "on GPUs")
    if dist.is_nccl_available():
        plan_launch(parse(["DIR", "--dist-backend", "nccl"]), gpus=1)
    else:
        refused(parse(["DIR", "--dist-backend", "nccl"]), 1, "--dist-backend nccl", "not available")
    if not dist.is_mpi_available():
        refused(parse(["DIR", "--dist-backend", "mpi"]), 0, "--dist-backend mpi", "not available")


# --------------------------------------------------------------------------------------------------
# the scripts: one line, exit status 2, nothing written (real subprocesses)
# --------------------------------------------------------------------------------------------------
def run_script(script, argv, env, cwd, launcher=(), timeout=240):
    return subprocess.run([sys.executable, *launcher, os.path.join(ROOT, script), *map(str, argv)],
                          cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def assert_refused(result, script, cwd, output_dir, *expected):
    """Exit 2, exactly one stderr line `script: error: ...` holding `expected`, no traceback, no output
    folder, and the working folder still empty."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not os.path.exists(output_dir)
    assert os.listdir(cwd) == []


CPU_CASES = {
    "gpu-without-gpu": (["--gpu", "0"], ["--gpu 0 asks for a CUDA GPU", "none is visible",
                                         "CUDA_VISIBLE_DEVICES=''", "drop --gpu"]),
    "amp-without-cuda": (["--amp"], ["--amp needs a CUDA GPU", "without --amp"]),
    "unknown-backend": (["--dist-backend", "nccll"], ["--dist-backend nccll is not available", "gloo"]),
}


@pytest.mark.parametrize("script", ["main_moco.py", "main_lincls.py"])
@pytest.mark.parametrize("case", sorted(CPU_CASES))
def test_script_refuses_on_the_cpu(script, case, image_folder, tmp_path):
    flags, expected = CPU_CASES[case]
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    argv = (MOCO_TINY if script == "main_moco.py" else TINY) + flags + ["--output-dir", out, image_folder]
    result = run_script(script, argv, cpu_env(), cwd)
    assert_refused(result, script, cwd, out, *expected)


# --------------------------------------------------------------------------------------------------
# the same on a machine with GPUs: more processes than GPUs, --gpu out of range
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("script", ["main_moco.py", "main_lincls.py"])
def test_script_refuses_gpu_out_of_range(script, image_folder, tmp_path):
    gpus = torch.cuda.device_count()
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    argv = (MOCO_TINY if script == "main_moco.py" else TINY) + ["--gpu", gpus, "--output-dir", out, image_folder]
    result = run_script(script, argv, cuda_env(), cwd)
    assert_refused(result, script, cwd, out, f"--gpu {gpus} is out of range", f"0 to {gpus - 1}")


@pytest.mark.cuda
def test_srun_task_beyond_the_gpus_is_refused(image_folder, tmp_path):
    """One task of an srun with a task more per node than there are GPUs: refused before it waits for
    the others (which never start here)."""
    gpus = torch.cuda.device_count()
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    env = cuda_env(SLURM_NTASKS=gpus + 1, SLURM_NNODES=1, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_JOB_ID=7,
                   SLURM_STEP_ID=0, SLURM_NODELIST="localhost", SLURM_STEP_NODELIST="localhost")
    result = run_script("main_moco.py", MOCO_TINY + ["--output-dir", out, image_folder], env, cwd)
    assert_refused(result, "main_moco.py", cwd, out, f"slurm starts {gpus + 1} processes",
                   f"--ntasks-per-node {gpus}")


@pytest.mark.cuda
def test_torchrun_more_processes_than_gpus_is_refused(image_folder, tmp_path):
    """Every worker prints the one line and exits 2 before NCCL starts; torchrun then fails (its own
    report, with its exit status 1, follows)."""
    gpus = torch.cuda.device_count()
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus + 1)]
    result = run_script("main_moco.py", MOCO_TINY + ["--output-dir", out, image_folder], cuda_env(), cwd,
                        launcher=launcher)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("main_moco.py: error: ")]
    assert len(ours) == gpus + 1, result.stderr[-3000:]
    assert all(f"torchrun starts {gpus + 1} processes on this node" in line and
               f"--nproc_per_node {gpus}" in line for line in ours)
    assert not os.path.exists(out) and os.listdir(cwd) == []
