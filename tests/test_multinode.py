"""Several nodes simulated on one machine, on the CPU with gloo: two torchrun agents meeting through a c10d
rendezvous on localhost, and the environment srun gives each task (SLURM_PROCID, SLURM_NTASKS, ...).

What must hold: `-b` is the batch of ONE node (global batch = b x nodes), exactly one checkpoint and one
log are written (by global rank 0), and a checkpoint resumes on a different number of nodes when the
global batch is kept. Each run is 2 nodes x 2 processes, 2 steps of 2 images per process.
"""
import os
import sys

import pytest
import torch

from conftest import cpu_env, make_image_folder, start_logged, wait_all
from moco.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "main_moco.py")
NODES, PER_NODE = 2, 2
WORLD = NODES * PER_NODE
B_NODE = 4  # -b: per node; 2 per process, a global batch of 8
GLOBAL = B_NODE * NODES
K = 16
TRAIN_IMAGES = 16  # 4 per process: 2 steps
FLAGS = ["-a", "resnet18", "--cifar-stem", "--crop-size", "16", "--moco-dim", "8", "--moco-k", str(K),
         "-b", str(B_NODE), "--epochs", "1", "-j", "0", "-p", "1", "--seed", "3"]
TIMEOUT = 400


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """2 classes x 8 train and 2 x 2 val images of 20 x 20 px."""
    return make_image_folder(tmp_path_factory.mktemp("multinode_images"), classes=2, train_per_class=8,
                             val_per_class=2, size=(20, 20))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_all_succeeded(results):
    for code, out, err in results:
        assert code == 0, out[-2000:] + err[-4000:]


def start_line(results):
    """The one line, of all processes' output, that describes the run (rank 0 prints it, nobody else)."""
    lines = [line for _, out, _ in results for line in out.splitlines() if "world size" in line]
    assert len(lines) == 1, lines
    return lines[0]


def check_one_epoch(out_dir, line):
    assert f"world size {WORLD} ({PER_NODE} per node" in line, line
    assert f"per-process batch {B_NODE // PER_NODE} (global {GLOBAL})" in line, line
    assert sorted(os.listdir(out_dir)) == ["checkpoint_0000.pth.tar", "log.txt"]
    checkpoint = load(os.path.join(out_dir, "checkpoint_0000.pth.tar"))
    assert checkpoint["epoch"] == 1 and len(checkpoint["rng_states"]) == WORLD
    steps = TRAIN_IMAGES // WORLD // (B_NODE // PER_NODE)
    assert checkpoint["state_dict"]["module.queue_ptr"].item() == steps * GLOBAL % K
    with open(os.path.join(out_dir, "log.txt")) as f:
        records = f.read().splitlines()
    assert len(records) == 1 and f'"steps": {steps}' in records[0]
    return checkpoint


def resume_on_one_node(images, checkpoint_dir, tmp_path):
    """One node, one process, -b = the old global batch: the run goes on from the multi-node checkpoint."""
    out = tmp_path / "one_node"
    argv = [sys.executable, SCRIPT, *FLAGS, "-b", GLOBAL, "--epochs", "2", "--output-dir", out,
            "--resume", os.path.join(checkpoint_dir, "checkpoint_0000.pth.tar"), images]
    [(code, stdout, stderr)] = wait_all([start_logged(argv, cpu_env(), tmp_path, tmp_path / "resume")], TIMEOUT)
    assert code == 0, stdout[-2000:] + stderr[-3000:]
    assert "=> resuming from" in stdout and f"per-process batch {GLOBAL} (global {GLOBAL})" in stdout
    assert sorted(os.listdir(out)) == ["checkpoint_0001.pth.tar", "log.txt"]
    resumed = load(out / "checkpoint_0001.pth.tar")
    steps = TRAIN_IMAGES // GLOBAL
    first = load(os.path.join(checkpoint_dir, "checkpoint_0000.pth.tar"))
    assert resumed["epoch"] == 2
    assert resumed["state_dict"]["module.queue_ptr"].item() == \
        (first["state_dict"]["module.queue_ptr"].item() + steps * GLOBAL) % K


def test_two_torchrun_agents(images, tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 2` twice, as on two machines; the first agent hosts the
    rendezvous store on a free port."""
    port, run_id = free_port(), f"moco-test-{os.getpid()}-{free_port()}"
    out = tmp_path / "out"
    agents = []
    for node in range(NODES):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", NODES, "--nproc_per_node", PER_NODE,
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
                "--rdzv-conf", f"is_host={int(node == 0)},join_timeout=300", "--local-addr", "127.0.0.1",
                "--max-restarts", "0", SCRIPT, *FLAGS, "--output-dir", out, images]
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        agents.append(start_logged(argv, cpu_env(), cwd, tmp_path / f"agent{node}"))
    results = wait_all(agents, TIMEOUT)
    assert_all_succeeded(results)
    check_one_epoch(out, start_line(results))
    assert os.listdir(tmp_path / "node0") == [] and os.listdir(tmp_path / "node1") == []
    resume_on_one_node(images, out, tmp_path)


def test_srun_environment(images, tmp_path):
    """Four tasks with the variables srun sets (2 nodes x 2 tasks, first node 'localhost'), started here."""
    out = tmp_path / "out"
    tasks = []
    for rank in range(WORLD):
        env = cpu_env(SLURM_PROCID=rank, SLURM_NTASKS=WORLD, SLURM_NNODES=NODES, SLURM_LOCALID=rank % PER_NODE,
                      SLURM_NODEID=rank // PER_NODE, SLURM_JOB_ID=os.getpid(), SLURM_STEP_ID=0,
                      SLURM_NTASKS_PER_NODE=PER_NODE, SLURM_TASKS_PER_NODE=f"{PER_NODE}(x{NODES})",
                      SLURM_JOB_NODELIST="localhost,node2", SLURM_STEP_NODELIST="localhost,node2",
                      SLURM_NODELIST="localhost,node2", MASTER_PORT=free_port())
        if rank:
            env["MASTER_PORT"] = tasks[0].master_port  # what a job script exports, the same for every task
        cwd = tmp_path / f"task{rank}"
        cwd.mkdir()
        task = start_logged([sys.executable, SCRIPT, *FLAGS, "--output-dir", out, images], env, cwd,
                            tmp_path / f"task{rank}")
        task.master_port = env["MASTER_PORT"]
        tasks.append(task)
    results = wait_all(tasks, TIMEOUT)
    assert_all_succeeded(results)
    check_one_epoch(out, start_line(results))
    assert all(os.listdir(tmp_path / f"task{rank}") == [] for rank in range(WORLD))
