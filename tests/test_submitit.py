"""run_with_submitit.py with the real submitit's local executor: real job processes, real signals.

The local executor starts a controller process that starts one process per task, as sbatch and srun do;
SIGUSR2 to a task is what SLURM sends before a time limit (submitit's --signal) and on a signalled
preemption, and what submitit's own tests use to interrupt a job.
"""
import importlib.util
import os
import re
import shutil
import signal
import sys
import time

import pytest
import torch

from conftest import assert_same_training_state, cpu_env, kill_tree, make_image_folder, start_logged, wait_all

needs_submitit = pytest.mark.skipif(importlib.util.find_spec("submitit") is None,
                                    reason="submitit is not installed (pip install submitit); the launcher "
                                           "needs it to submit jobs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "run_with_submitit.py")
STEPS = 6  # per epoch: 48 training images in batches of 8
TRAIN = ["-a", "resnet18", "--crop-size", "16", "--moco-dim", "16", "-b", "8", "--moco-k", "48", "-p", "1",
         "-j", "0", "--seed", "0", "--epochs", "2"]
METER_LINE = re.compile(r"^Epoch: \[(\d+)\]\[\s*(\d+)/(\d+)\]", re.M)
JOB_LINE = re.compile(r"submitit job (\S+), task 0 of 1 on \S+ \(pid (\d+)\)")

pytestmark = pytest.mark.filterwarnings("ignore:You have chosen to seed training")


def launch(tmp_path, output_dir, *script_argv, launcher_argv=("--local", "--ngpus", "0")):
    """Start the launcher (it waits for its local job); its stdout and stderr go to files."""
    argv = [sys.executable, LAUNCHER, *launcher_argv, "main_moco.py", *script_argv, "--output-dir", output_dir]
    return start_logged(argv, cpu_env(threads=1), ROOT, tmp_path / "launcher")


def job_files(output_dir):
    """(job folder, task 0's stdout log, its stderr log) in the default job folder."""
    folder = os.path.join(output_dir, "submitit")
    logs = sorted(name for name in os.listdir(folder) if name.endswith("_0_log.out"))
    assert len(logs) == 1, os.listdir(folder)
    out = os.path.join(folder, logs[0])
    return folder, out, out[:-len(".out")] + ".err"


def read(path):
    with open(path) as f:
        return f.read()


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("submitit_images"), classes=2, train_per_class=24,
                             val_per_class=3, size=(20, 20))


@pytest.fixture(scope="module")
def uninterrupted(images, tmp_path_factory):
    """A local job of two seeded epochs that nobody interrupts: (output dir, launcher's status, stdout,
    stderr)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = str(tmp / "run")
    [(code, stdout, stderr)] = wait_all([launch(tmp, out, *TRAIN, images)], timeout=900)
    return out, code, stdout, stderr


@needs_submitit
def test_local_job_trains_and_writes_checkpoints_and_log(uninterrupted):
    out, code, stdout, stderr = uninterrupted
    assert code == 0, stdout + stderr
    folder, log, err_log = job_files(out)
    job_id = re.search(r"submitted main_moco.py as job (\S+) ", stdout).group(1)
    # the launcher names the job, its folder and its logs, then reports the job's end
    assert f"job folder: {folder}" in stdout and f"log of task 0: {log}" in stdout
    assert f"job {job_id} ended with status 0: main_moco.py finished" in stdout
    # the job says who it is and where its logs are, then trains
    text = read(log)
    assert JOB_LINE.search(text).group(1) == job_id and f"logs {log} and {err_log}" in text
    assert len(METER_LINE.findall(text)) == 2 * STEPS
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == \
        ["checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"]
    assert [line.count('"epoch"') for line in read(os.path.join(out, "log.txt")).splitlines()] == [1, 1]
    assert load(os.path.join(out, "checkpoint_0001.pth.tar"))["epoch"] == 2


@needs_submitit
def test_interrupted_local_job_is_requeued_and_ends_bit_exact(uninterrupted, images, tmp_path):
    """SIGUSR2 mid-epoch: the job saves through the trainer's SIGTERM path after the current step,
    submitit requeues it, and the requeued job resumes there and ends where the uninterrupted job did."""
    reference, code, _, _ = uninterrupted
    assert code == 0
    out = str(tmp_path / "run")
    launcher = launch(tmp_path, out, *TRAIN, images)
    try:
        pid, seen = wait_for_second_step(out)
        os.kill(pid, signal.SIGUSR2)
    except BaseException:
        kill_tree(launcher)
        raise
    [(code, stdout, stderr)] = wait_all([launcher], timeout=900)
    _, log, _ = job_files(out)
    text = read(log) + read(log[:-len(".out")] + ".err")
    assert code == 0, stdout + stderr + text
    # one task process was interrupted and a second one started (same job id, new pid)
    starts = JOB_LINE.findall(text)
    assert len(starts) == 2 and starts[0][0] == starts[1][0] and starts[0][1] == str(pid) != starts[1][1], text
    assert re.search(r"Requeued job \S+ \(\d+ remaining timeouts\)", text), text
    # the first run saved mid-epoch after the step it was in, the second resumed right there
    saved = re.search(r"=> SIGTERM: saved (\S+checkpoint_(\d{4})_iter(\d{6})\.pth\.tar) after step", text)
    assert saved, text
    path, epoch, step = saved.group(1), int(saved.group(2)), int(saved.group(3))
    assert (epoch, step) > seen and 0 < step < STEPS, (seen, epoch, step)
    assert f"resuming from '{path}' (epoch {epoch}, step {step}" in text
    # every step ran once: the interrupted run's steps plus the requeued run's
    assert len(METER_LINE.findall(text)) == 2 * STEPS
    final, expected = (load(os.path.join(folder, "checkpoint_0001.pth.tar")) for folder in (out, reference))
    assert final["step_in_epoch"] == expected["step_in_epoch"] == 0
    assert_same_training_state(final, expected)


def wait_for_second_step(output_dir, timeout=600):
    """The task's pid once its log shows step 1 of epoch 0 done (training is under way, mid-epoch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, log, _ = job_files(output_dir)
            text = read(log)
        except (OSError, AssertionError):
            time.sleep(0.05)
            continue
        steps = [(int(e), int(s)) for e, s, _ in METER_LINE.findall(text)]
        job = JOB_LINE.search(text)
        if job and steps and steps[-1] >= (0, 1):
            return int(job.group(2)), steps[-1]
        time.sleep(0.02)
    pytest.fail(f"the job in {output_dir} did not reach step 1 within {timeout} s")


@needs_submitit
def test_failing_job_shows_the_users_error_in_its_log_and_in_the_launcher(images, tmp_path):
    """K=36 is not a multiple of the batch of 8: the job stops with the script's one-line error."""
    out = str(tmp_path / "run")
    argv = [a if a != "48" else "36" for a in TRAIN]
    [(code, stdout, stderr)] = wait_all([launch(tmp_path, out, *argv, images)], timeout=600)
    assert code == 2, stdout + stderr
    _, _, err_log = job_files(out)
    job_log = read(err_log)
    error = re.search(r"^main_moco\.py: error: .*K=36.*$", job_log, re.M)
    assert error, job_log
    assert f"ended with status 2: {error.group(0)}" in stderr
    assert err_log in stderr
    assert not [name for name in os.listdir(out) if name.startswith("checkpoint")]


def test_bad_launcher_input_is_refused_before_anything_is_submitted(images, tmp_path):
    cases = [
        ([], "name the script to run"),
        (["--local", "--nodes", "2"], "--local runs on this machine, one node"),
        (["--local", "--timeout", "0"], "--timeout 0 is out of range"),
    ]
    if shutil.which("srun") is None:  # (on a SLURM machine this would submit a real job)
        cases.append((["--ngpus", "0"], "SLURM's srun is not found on this machine"))
    for launcher_argv, message in cases:
        argv = [sys.executable, LAUNCHER, *launcher_argv] + (["main_moco.py", images] if launcher_argv else [])
        proc = start_logged(argv, cpu_env(), ROOT, tmp_path / "refused")
        [(code, stdout, stderr)] = wait_all([proc], timeout=120)
        assert code == 2 and message in stderr.splitlines()[-1], (launcher_argv, stderr)
        assert "Traceback" not in stderr
    # the script's own flags are checked by its parser before submission
    proc = start_logged([sys.executable, LAUNCHER, "--local", "main_moco.py", "--no-such-flag", images],
                        cpu_env(), ROOT, tmp_path / "script_flag")
    [(code, _, stderr)] = wait_all([proc], timeout=120)
    assert code == 2 and "unrecognized arguments: --no-such-flag" in stderr
    assert not os.path.exists(os.path.join(ROOT, "submitit"))


def test_without_submitit_one_line_says_how_to_install_it(images, tmp_path):
    """sys.modules[name] = None is Python's own way to make `import name` fail, as on a machine
    without the package."""
    code = ("import runpy, sys; sys.modules['submitit'] = None; "
            f"sys.argv = [{LAUNCHER!r}, '--local', 'main_moco.py', {images!r}]; "
            f"runpy.run_path({LAUNCHER!r}, run_name='__main__')")
    proc = start_logged([sys.executable, "-c", code], cpu_env(), ROOT, tmp_path / "no_submitit")
    [(status, _, stderr)] = wait_all([proc], timeout=120)
    assert status == 2 and stderr.splitlines()[-1] == (
        "run_with_submitit.py: error: submitting jobs needs submitit, which is not installed; install it "
        "with: pip install submitit")


@needs_submitit
@pytest.mark.skipif(torch.cuda.is_available(), reason="two CPU tasks: on a GPU machine they would take GPUs")
def test_two_task_job_finds_its_rendezvous_from_the_job(images, tmp_path):
    """--ngpus 2 starts two tasks; they form one gloo group from the job's own environment (rank, world
    size, first host, a port from the job id), with nothing set by hand."""
    out = str(tmp_path / "run")
    argv = ["-a", "resnet18", "--crop-size", "16", "--moco-dim", "16", "-b", "16", "--moco-k", "48", "-p", "1",
            "-j", "0", "--seed", "0", "--epochs", "1"]  # -b is per node: 8 per task
    proc = launch(tmp_path, out, *argv, images, launcher_argv=("--local", "--ngpus", "2"))
    [(code, stdout, stderr)] = wait_all([proc], timeout=900)
    folder = os.path.join(out, "submitit")
    logs = {name: read(os.path.join(folder, name)) for name in os.listdir(folder) if name.endswith("_log.out")}
    assert code == 0, stdout + stderr + "\n".join(logs.values())
    assert sorted(name.split("_")[1] for name in logs) == ["0", "1"]
    task0 = next(text for name, text in logs.items() if name.endswith("_0_log.out"))
    assert "=> world size 2 (2 per node, backend gloo, device cpu), per-process batch 8 (global 16)" in task0
    assert re.search(r"submitit job \S+, task 1 of 2 on ", "\n".join(logs.values()))
    assert load(os.path.join(out, "checkpoint_0000.pth.tar"))["epoch"] == 1
