"""Hostile launches and signals, each run as `python main_moco.py ...` in a real subprocess on tiny
generated image folders (issue 18: items 1, 2, 7, 9, 10, 11 and 14).

A run must never wait silently (a FIFO among the images, SLURM variables without srun, a rendezvous
that never completes), a bad environment is one line and exit 2, Ctrl-C saves like SIGTERM (exit 130),
nothing follows the one-line error, and a partly unreadable folder trains on.
"""
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from conftest import cpu_env, descendants, kill_tree, make_image_folder
from moco.distributed import free_port, plan_launch, visible_gpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCO = os.path.join(ROOT, "main_moco.py")
# 8 x 8 px crops in batches of 4 on the smallest torchvision ResNet
TINY = ["-a", "resnet18", "--cifar-stem", "--crop-size", "8", "-b", "4", "-p", "1", "--moco-dim", "8",
        "--moco-k", "16", "--seed", "0"]
ERROR = "main_moco.py: error: "


class Run:
    """`python main_moco.py ARGV` started in a session of its own (as a terminal's foreground job is: a
    killpg reaches it and its DataLoader workers), output in files."""

    def __init__(self, argv, tmp_path, env=None, name="run", preexec_fn=None):
        self.out_path, self.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, MOCO, *map(str, argv)], cwd=str(tmp_path),
                                         env=env or cpu_env(), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=preexec_fn)

    @property
    def out(self):
        return self.out_path.read_text()

    @property
    def err(self):
        return self.err_path.read_text()

    def wait(self, timeout):
        """The exit status; on a timeout, kill the run with its workers and fail (a hang)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc)
            pytest.fail(f"main_moco.py did not end within {timeout} s (a hang?); stdout ends "
                        f"{self.out[-600:]!r}, stderr ends {self.err[-600:]!r}")

    def wait_for(self, text, timeout, stream="out"):
        """Poll the output until it holds `text`; fail (killing the run) if it ends or times out first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in getattr(self, stream):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        kill_tree(self.proc)
        pytest.fail(f"no {text!r} in the {stream} of main_moco.py within {timeout} s (exit status "
                    f"{self.proc.returncode}); stdout ends {self.out[-600:]!r}, stderr ends {self.err[-600:]!r}")

    def signal_group(self, signum):
        os.killpg(self.proc.pid, signum)


def assert_one_line_error(run, code, *expected):
    """Exit 2 (or `code`), no traceback, and the last line of stderr is our one error line."""
    err = run.err
    assert code == 2, f"exit status {code}; stderr ends {err[-1500:]!r}"
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(ERROR), err[-1500:]
    assert sum(line.startswith(ERROR) for line in lines) == 1
    for words in expected:
        assert words in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    """2 classes x 8 training images of 8 x 8 px: 4 steps an epoch."""
    return make_image_folder(tmp_path_factory.mktemp("small"), classes=2, train_per_class=8, val_per_class=1,
                             size=(8, 8))


@pytest.fixture(scope="module")
def longer_images(tmp_path_factory):
    """2 classes x 40 training images of 8 x 8 px: 20 steps an epoch, time to press Ctrl-C mid-epoch."""
    return make_image_folder(tmp_path_factory.mktemp("longer"), classes=2, train_per_class=40, val_per_class=1,
                             size=(8, 8))


# --------------------------------------------------------------------------------------------------
# 1. A FIFO among the images (opening one waits for a writer, in an uninterruptible open)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", ["0", "2"])
def test_fifo_in_train_is_skipped_with_one_warning(small_images, tmp_path, workers):
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", small_images, str(data)], check=True)
    fifo = data / "train" / "class0" / "img100.png"
    os.mkfifo(fifo)
    run = Run(TINY + ["-j", workers, "--epochs", "1", "--output-dir", tmp_path / "out", data], tmp_path)
    code = run.wait(timeout=240)
    assert code == 0, run.err[-2000:]
    assert "Traceback" not in run.err
    warnings = [line for line in run.err.splitlines() if str(fifo) in line]
    assert len(warnings) == 1 and "a FIFO" in warnings[0] and "not opened" in warnings[0], run.err[-2000:]
    assert (tmp_path / "out" / "checkpoint_0000.pth.tar").is_file()


# --------------------------------------------------------------------------------------------------
# 2. SLURM variables without srun; what a rendezvous waits for; signals while it waits
# --------------------------------------------------------------------------------------------------
def slurm_task_env(ntasks, procid, port, **extra):
    return cpu_env(SLURM_NTASKS=ntasks, SLURM_PROCID=procid, SLURM_LOCALID=procid, SLURM_NNODES=1,
                   SLURM_JOB_ID=77, SLURM_JOB_NODELIST="localhost", SLURM_NODELIST="localhost",
                   MASTER_PORT=port, **extra)


def test_slurm_variables_without_srun_are_refused(small_images, tmp_path):
    """`sbatch --ntasks=2` whose script calls python directly: one process with SLURM_NTASKS=2 and no
    step of srun; the second task never comes."""
    env = slurm_task_env(2, 0, free_port())
    run = Run(TINY + ["-j", "0", "--epochs", "1", "--output-dir", tmp_path / "out", small_images], tmp_path, env)
    line = assert_one_line_error(run, run.wait(timeout=120), "SLURM_NTASKS=2", "not started by srun", "srun python")
    assert "1 task(s) will never join" in line
    assert not (tmp_path / "out").exists()


def test_rendezvous_says_what_it_waits_for_and_signals_end_it(small_images, tmp_path):
    """Two tasks of a four-task srun step whose other two never start: each says at once how many
    processes it waits for and where; Ctrl-C ends the first and SIGTERM the second while they wait."""
    port = free_port()
    runs = [Run(TINY + ["-j", "0", "--epochs", "1", "--output-dir", tmp_path / "out", small_images], tmp_path,
                slurm_task_env(4, rank, port, SLURM_STEP_ID=0), name=f"rank{rank}") for rank in (0, 1)]
    for rank, run in enumerate(runs):
        run.wait_for(f"=> slurm: process {rank} of 4 waits for all 4 processes to join at "
                     f"tcp://localhost:{port}", timeout=120)
    time.sleep(1.0)  # into the rendezvous itself
    runs[0].signal_group(signal.SIGINT)
    runs[1].signal_group(signal.SIGTERM)
    codes = [run.wait(timeout=30) for run in runs]
    assert codes[0] in (130, -signal.SIGINT), runs[0].err[-1500:]
    assert codes[1] in (143, -signal.SIGTERM), runs[1].err[-1500:]


# --------------------------------------------------------------------------------------------------
# 7. The environment: the data cache, torchrun's variables
# --------------------------------------------------------------------------------------------------
def _read_only_folder(tmp_path):
    """A folder this process cannot create anything in: one without write permission, or, where
    permissions do not stop this user (root), a folder of sysfs, where mkdir is refused."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    if not os.access(folder, os.W_OK):
        return str(folder / "cache")
    try:
        os.mkdir("/sys/fs/moco-cache-probe")
    except OSError as err:
        if err.errno in (errno.EROFS, errno.EPERM, errno.EACCES):
            return "/sys/fs/moco-cache"
    else:
        os.rmdir("/sys/fs/moco-cache-probe")
    pytest.skip("no folder here refuses writes by this user")


def _small_file_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # python ignores SIGXFSZ: writes fail with EFBIG


ENVIRONMENTS = {
    "cache-is-a-file": (lambda t: {"MOCO_DATA_CACHE": t / "afile"}, ["MOCO_DATA_CACHE", "is a file"]),
    "cache-under-a-file": (lambda t: {"MOCO_DATA_CACHE": t / "afile" / "cache"},
                           ["MOCO_DATA_CACHE", "Not a directory"]),
    "cache-read-only": (lambda t: {"MOCO_DATA_CACHE": _read_only_folder(t)}, ["MOCO_DATA_CACHE", "writable"]),
    "cache-full": (lambda t: {"MOCO_DATA_CACHE": t / "cache"}, ["MOCO_DATA_CACHE", "File too large"]),
    "rank-without-master": (lambda t: {"RANK": 0, "WORLD_SIZE": 2}, ["MASTER_ADDR and MASTER_PORT are not"]),
    "world-size-not-a-number": (lambda t: {"RANK": 0, "WORLD_SIZE": "abc", "MASTER_ADDR": "127.0.0.1",
                                           "MASTER_PORT": 29999}, ["WORLD_SIZE='abc' is not an integer"]),
}


@pytest.mark.parametrize("case", list(ENVIRONMENTS))
def test_bad_environment_is_one_line(case, small_images, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    make_env, expected = ENVIRONMENTS[case]
    env = make_env(tmp_path)
    argv = TINY + ["-j", "0", "--epochs", "1", "--output-dir", tmp_path / "out"]
    if "MOCO_DATA_CACHE" not in env:  # the cache cases omit DIR to reach the built-in data; the others need not
        argv.append(small_images)
    run = Run(argv, tmp_path, cpu_env(**env),
              preexec_fn=_small_file_limit if case == "cache-full" else None)
    assert_one_line_error(run, run.wait(timeout=120), *expected)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# 9. Ctrl-C: the whole foreground process group (trainer and loader workers) gets SIGINT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", ["0", "2"])
def test_ctrl_c_saves_after_the_step_and_exits_130(longer_images, tmp_path, workers):
    out = tmp_path / "out"
    run = Run(TINY + ["-j", workers, "--epochs", "1", "--output-dir", out, longer_images], tmp_path)
    run.wait_for("Epoch: [0][ 1/20]", timeout=180)
    run.signal_group(signal.SIGINT)
    code = run.wait(timeout=120)
    assert code == 130, run.err[-2000:]
    assert "Traceback" not in run.err and "Exception ignored" not in run.err, run.err[-3000:]
    saved = sorted(p.name for p in out.glob("checkpoint_0000_iter*.pth.tar"))
    assert len(saved) == 1, sorted(p.name for p in out.iterdir())
    assert f"=> SIGINT: saved {out / saved[0]}" in run.out, run.out[-1500:]
    assert not (out / "checkpoint_0000.pth.tar").exists()  # stopped mid-epoch, not at its end


def test_second_ctrl_c_stops_without_saving(longer_images, tmp_path):
    out = tmp_path / "out"
    run = Run(TINY + ["-j", "0", "--epochs", "1", "--output-dir", out, longer_images], tmp_path)
    run.wait_for("Epoch: [0][ 1/20]", timeout=180)
    run.signal_group(signal.SIGINT)
    run.wait_for("Ctrl-C again stops without saving", timeout=60, stream="err")
    run.signal_group(signal.SIGINT)
    code = run.wait(timeout=60)
    assert code == 130, run.err[-2000:]
    assert "Traceback" not in run.err, run.err[-3000:]
    assert run.err.strip().splitlines()[-1] == "main_moco.py: interrupted (Ctrl-C); stopped without saving"


# --------------------------------------------------------------------------------------------------
# 10. Nothing after the one-line error while loader workers are busy
# --------------------------------------------------------------------------------------------------
def children_when_written(run, text, timeout):
    """The processes below the run at the moment `text` appears in its stderr (polled every few ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.proc.poll() is None:
        if text in run.err:
            return descendants(run.proc.pid)
        time.sleep(0.003)
    return []


def test_nothing_follows_the_error_line_with_busy_workers(tmp_path):
    """A worker finds the folder unreadable (9 images in 10) and raises while the other worker is busy.
    The workers must be shut down before the one-line error is written, and nothing may follow it: no
    'Exception ignored in atexit callback ... DataLoader worker ... killed by signal' block (before
    the fix, the workers were still alive at the line and were killed at the interpreter's exit), and no
    warning of a worker that was still reading."""
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=40, val_per_class=1, size=(8, 8))
    for c in range(2):
        for i in range(40):
            if i % 10:
                (tmp_path / "data" / "train" / f"class{c}" / f"img{i:03d}.png").write_bytes(b"not an image")
    run = Run(TINY + ["-j", "2", "--epochs", "1", "--output-dir", tmp_path / "out", data], tmp_path, name="run")
    alive = children_when_written(run, ERROR, timeout=180)
    assert alive == [], f"loader workers {alive} still running when the error line was written"
    assert_one_line_error(run, run.wait(timeout=60), "are unreadable", "%")


# --------------------------------------------------------------------------------------------------
# 11. A folder that is 70 % readable, with its unreadable images together
# --------------------------------------------------------------------------------------------------
def test_seventy_percent_readable_folder_trains_on(tmp_path):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=100, val_per_class=1, size=(8, 8))
    broken = [os.path.join(data, "train", "class0", f"img{i:03d}.png") for i in range(20, 80)]
    for path in broken:  # 60 in a row, in the order of the folder: 30 % of the 200 images
        with open(path, "wb") as f:
            f.write(b"\x89PNG not an image")
    run = Run(["-a", "resnet18", "--cifar-stem", "--crop-size", "8", "-b", "40", "-p", "1", "--moco-dim", "8",
               "--moco-k", "80", "--seed", "0", "-j", "0", "--epochs", "1", "--output-dir", tmp_path / "out", data],
              tmp_path)
    code = run.wait(timeout=240)
    assert code == 0, run.err[-2000:]
    warned = {path for path in broken if path in run.err}
    assert warned == set(broken)  # every index is drawn once an epoch, each unreadable one said once
    record = json.loads((tmp_path / "out" / "log.txt").read_text().splitlines()[-1])
    assert record["bad_images"] == 60


# --------------------------------------------------------------------------------------------------
# 14. Tests not marked `cuda` run on the CPU, in this process and in the children they start
# --------------------------------------------------------------------------------------------------
def test_unmarked_tests_see_no_gpu_in_process_and_in_children():
    from main_moco import get_args_parser
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""
    assert visible_gpus() == 0
    plan = plan_launch(get_args_parser().parse_args(["DIR"]))
    assert (plan.mode, plan.world_size) == ("single", 1)
    child = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "''"


@pytest.mark.cuda
def test_cuda_marked_tests_keep_the_gpus():
    import torch
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != ""
    assert visible_gpus() == torch.cuda.device_count() > 0
