"""main_moco.py end to end on the CPU: short runs on tiny generated ImageFolders.

Most runs call `main_moco.main` in this process; subprocesses only where the process itself is the
subject (SIGTERM, torchrun, the command line's exit status). Every run uses resnet18 at a 16 or 32 px
crop so that the whole file stays within a few minutes on two cores.
"""
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch

import main_moco
from conftest import assert_same_training_state, make_image_folder
from moco.errors import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "main_moco.py")
SMALL = ["-a", "resnet18", "--crop-size", "16", "--moco-dim", "16", "-b", "8", "--moco-k", "48", "-p", "1",
         "-j", "0"]
STEPS = 4  # per epoch: 32 training images in batches of 8
METER_LINE = re.compile(r"^Epoch: \[(\d+)\]\[\s*(\d+)/(\d+)\]\tTime .*\tData .*\tLoss .*\tAcc@1 .*\tAcc@5 .*"
                        r"\tLR \S+\tImg/s \S+$")

pytestmark = pytest.mark.filterwarnings("ignore:You have chosen to seed training")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def parse(argv):
    return main_moco.get_args_parser().parse_args(argv)


def train(argv):
    """Run main_moco.main in this process; return what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main_moco.main(parse(argv))
    return out.getvalue()


def run_cli_inprocess(argv, capsys):
    """The script's entry point (`run_cli`) in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main_moco.main, parse(argv), prog="main_moco.py")
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def log_records(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f.read().splitlines()]


def snapshot(folder):
    """Every file under `folder` with its bytes' hash and mtime: to prove nothing was touched."""
    found = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(),
                                                        os.stat(path).st_mtime_ns)
    return found


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env():
    """The same intra-op threads as this process, so subprocess results compare bit for bit."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch.get_num_threads())
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """2 classes x 16 train (4 steps of 8 per epoch) and 2 x 3 val images, 20 x 20 px."""
    return make_image_folder(tmp_path_factory.mktemp("moco_images"), classes=2, train_per_class=16,
                             val_per_class=3, size=(20, 20))


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """An uninterrupted seeded 2-epoch run (v1 recipe, no loader workers): (output dir, its stdout)."""
    out = str(tmp_path_factory.mktemp("reference"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stdout = train(SMALL + ["--seed", "0", "--epochs", "2", "-j", "0", "--output-dir", out, images])
    # the reference's warning about deterministic cuDNN belongs where cuDNN runs, not on the CPU
    assert torch.cuda.is_available() or not [w for w in caught if "CUDNN" in str(w.message)]
    return out, stdout


# --------------------------------------------------------------------------------------------------
# one-epoch runs and what they write
# --------------------------------------------------------------------------------------------------
def test_v1_run_writes_spec_checkpoints(reference):
    out, _ = reference
    assert sorted(name for name in os.listdir(out) if name.startswith("checkpoint")) == [
        "checkpoint_0000.pth.tar", "checkpoint_0001.pth.tar"]
    assert not [name for name in os.listdir(out) if "tmp" in name]
    for epoch in (0, 1):
        checkpoint = load(os.path.join(out, f"checkpoint_{epoch:04d}.pth.tar"))
        assert checkpoint["epoch"] == epoch + 1
        assert checkpoint["arch"] == "resnet18"
        keys = list(checkpoint["state_dict"])
        assert all(key.startswith("module.") for key in keys)
        assert "module.encoder_q.conv1.weight" in keys and "module.encoder_k.fc.weight" in keys
        assert "module.queue" in keys and "module.queue_ptr" in keys
        assert checkpoint["state_dict"]["module.queue"].shape == (16, 48)
        assert checkpoint["state_dict"]["module.encoder_q.fc.weight"].shape == (16, 512)
        # 4 steps of 8 keys per epoch into a queue of 48
        assert checkpoint["state_dict"]["module.queue_ptr"].item() == (epoch + 1) * 32 % 48
        optimizer = checkpoint["optimizer"]
        assert optimizer["param_groups"][0]["lr"] == 0.03
        assert optimizer["param_groups"][0]["momentum"] == 0.9
        assert optimizer["param_groups"][0]["weight_decay"] == 1e-4
        assert len(optimizer["state"]) == len([k for k in keys if "encoder_q" in k and
                                               ("weight" in k or "bias" in k)])
        assert checkpoint["args"]["arch"] == "resnet18" and checkpoint["args"]["moco_k"] == 48
        assert checkpoint["args"]["seed"] == 0
        assert isinstance(checkpoint["rng_states"], list) and len(checkpoint["rng_states"]) == 1
        assert {"python", "numpy", "torch"} <= set(checkpoint["rng_states"][0])
        assert checkpoint["step_in_epoch"] == 0
        assert "scaler" in checkpoint
    first = load(os.path.join(out, "checkpoint_0000.pth.tar"))["state_dict"]
    second = load(os.path.join(out, "checkpoint_0001.pth.tar"))["state_dict"]
    assert not torch.equal(first["module.encoder_q.conv1.weight"], second["module.encoder_q.conv1.weight"])
    # the key encoder follows by momentum 0.999: close to, but not equal to, the query encoder
    assert not torch.equal(second["module.encoder_q.conv1.weight"], second["module.encoder_k.conv1.weight"])


def test_v1_run_logs(reference):
    out, stdout = reference
    records = log_records(out)
    assert [r["epoch"] for r in records] == [0, 1]
    for record in records:
        assert record["steps"] == STEPS
        assert record["bad_images"] == 0
        assert record["lr"] == 0.03
        assert 0.0 < record["loss"] < 100.0
        assert 0.0 <= record["acc1"] <= record["acc5"] <= 100.0
        assert record["checkpoint"].endswith(f"checkpoint_{record['epoch']:04d}.pth.tar")
    lines = stdout.splitlines()
    meter = [METER_LINE.match(line) for line in lines]
    steps = [(int(m.group(1)), int(m.group(2)), int(m.group(3))) for m in meter if m]
    assert steps == [(e, s, STEPS) for e in (0, 1) for s in range(STEPS)]  # -p 1: every step
    start = [line for line in lines if "world size" in line]
    assert len(start) == 1
    assert "world size 1" in start[0] and "per-process batch 8" in start[0]
    if not torch.cuda.is_available():  # one process in a world of one, on gloo
        assert "backend gloo" in start[0] and "device cpu" in start[0]
    assert "0 loader workers per process" in start[0]
    # a summary, one line each: data, recipe, model, where it starts and where results go; no args dict
    opening = lines[lines.index(start[0]):lines.index(start[0]) + 5]
    assert [line.split(":")[0] for line in opening[1:4]] == ["=> data", "=> recipe", "=> model"]
    assert opening[4] == f"=> starting at epoch 0 (a new run); checkpoints and log.txt go to {os.path.abspath(out)}"
    assert "32 training images" in opening[1] and "K 48, m 0.999, T 0.07" in opening[2]
    assert "'moco_k'" not in stdout
    # the full flags go with the launch's first record of log.txt (and into every checkpoint)
    assert records[0]["args"]["moco_k"] == 48 and records[0]["args"]["arch"] == "resnet18"
    assert "args" not in records[1]


def test_v2_recipe_with_knn_monitor(images, tmp_path):
    out = str(tmp_path)
    stdout = train(SMALL + ["--mlp", "--moco-t", "0.2", "--aug-plus", "--cos", "--epochs", "2", "-j", "0",
                            "--knn-freq", "1", "--knn-k", "5", "--cifar-stem", "--output-dir", out, images])
    checkpoint = load(os.path.join(out, "checkpoint_0001.pth.tar"))
    keys = checkpoint["state_dict"]
    assert keys["module.encoder_q.conv1.weight"].shape == (64, 3, 3, 3)  # --cifar-stem
    assert keys["module.encoder_q.fc.0.weight"].shape == (512, 512)  # the MLP head
    assert keys["module.encoder_q.fc.2.weight"].shape == (16, 512)
    assert checkpoint["args"]["moco_t"] == 0.2 and checkpoint["args"]["aug_plus"]
    records = log_records(out)
    assert [r["lr"] for r in records] == [pytest.approx(0.03), pytest.approx(0.015)]  # cosine over 2 epochs
    for record in records:
        assert 0.0 <= record["knn_top1"] <= 100.0
    assert stdout.count("kNN top-1") == 2


def test_symmetric_loss_run(images, tmp_path):
    out = str(tmp_path)
    train(SMALL + ["--symmetric", "--epochs", "1", "-j", "0", "--output-dir", out, images])
    checkpoint = load(os.path.join(out, "checkpoint_0000.pth.tar"))
    # 4 steps enqueue 2 x 8 keys each into a queue of 48
    assert checkpoint["state_dict"]["module.queue_ptr"].item() == STEPS * 16 % 48
    record, = log_records(out)
    assert record["steps"] == STEPS and 0.0 < record["loss"] < 100.0


def test_symmetric_needs_k_divisible_by_twice_the_batch(images, tmp_path, capsys):
    code, _, err = run_cli_inprocess(SMALL + ["--moco-k", "40", "--symmetric", "--output-dir",
                                              str(tmp_path), images], capsys)
    assert code == 2 and "16" in err and "K=40" in err
    assert os.listdir(tmp_path) == []


def test_bn_splits_channels_last_run_with_a_corrupt_image(images, tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(images, data)
    bad = os.path.join(data, "train", "class1", "img005.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    out = str(tmp_path / "out")
    capsys.readouterr()
    stdout = train(SMALL + ["--bn-splits", "2", "--channels-last", "--epochs", "1", "-j", "0", "--output-dir",
                            out, data])
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if bad in line]) == 1
    record, = log_records(out)
    assert record["bad_images"] == 1 and record["steps"] == STEPS
    assert "BatchNorm split over 2 groups" in stdout and "channels-last" in stdout
    assert record["args"]["bn_splits"] == 2 and record["args"]["channels_last"] is True
    keys = load(os.path.join(out, "checkpoint_0000.pth.tar"))["state_dict"]
    # SplitBatchNorm keeps BatchNorm2d's state, so the weights load into a plain ResNet
    assert "module.encoder_q.bn1.running_mean" in keys and "module.encoder_q.bn1.num_batches_tracked" in keys
    assert keys["module.encoder_q.bn1.num_batches_tracked"].item() == STEPS


# --------------------------------------------------------------------------------------------------
# resuming: explicit, automatic, after SIGTERM; bit for bit against the uninterrupted run
# --------------------------------------------------------------------------------------------------
def test_resume_is_bit_exact(reference, images, tmp_path):
    ref, _ = reference
    stdout = train(SMALL + ["--seed", "0", "--epochs", "2", "-j", "0", "--output-dir", str(tmp_path),
                            "--resume", os.path.join(ref, "checkpoint_0000.pth.tar"), images])
    assert "resuming from" in stdout and "checkpoint_0000.pth.tar" in stdout
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0001.pth.tar", "log.txt"]
    assert [r["epoch"] for r in log_records(str(tmp_path))] == [1]
    assert_same_training_state(load(str(tmp_path / "checkpoint_0001.pth.tar")),
                               load(os.path.join(ref, "checkpoint_0001.pth.tar")))


def test_auto_resume_with_loader_workers_is_bit_exact(reference, images, tmp_path):
    ref, _ = reference
    argv = SMALL + ["--seed", "0", "-j", "2", "--output-dir", str(tmp_path), images]
    first = train(argv + ["--epochs", "1"])
    assert "resuming" not in first and "2 loader workers per process" in first
    # the data stream does not depend on the number of workers: epoch 0 equals the 0-worker run's
    assert_same_training_state(load(str(tmp_path / "checkpoint_0000.pth.tar")),
                               load(os.path.join(ref, "checkpoint_0000.pth.tar")))
    second = train(argv + ["--epochs", "2"])  # same folder, no --resume: picks up checkpoint_0000
    assert re.search(r"resuming from '.*checkpoint_0000\.pth\.tar'", second)
    assert [r["epoch"] for r in log_records(str(tmp_path))] == [0, 1]
    assert_same_training_state(load(str(tmp_path / "checkpoint_0001.pth.tar")),
                               load(os.path.join(ref, "checkpoint_0001.pth.tar")))
    third = train(argv + ["--epochs", "2"])  # already finished: resumes at the end, trains nothing
    assert "checkpoint_0001.pth.tar" in third
    assert [r["epoch"] for r in log_records(str(tmp_path))] == [0, 1]


def test_fast_aug_runs_and_resumes_bit_exact(images, tmp_path):
    """--fast-aug: uint8 crops from the workers, colour augmentation on the batch; its parameters are
    drawn in the workers from the per-sample seed, so resuming is still exact, with any worker count."""
    argv = SMALL + ["--seed", "0", "--fast-aug", "--aug-plus", "--mlp", "--channels-last"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(argv + ["--epochs", "2", "-j", "0", "--output-dir", straight, images])
    train(argv + ["--epochs", "1", "-j", "2", "--output-dir", resumed, images])
    stdout = train(argv + ["--epochs", "2", "-j", "2", "--output-dir", resumed, images])
    assert "resuming from" in stdout
    final = load(os.path.join(straight, "checkpoint_0001.pth.tar"))
    assert final["args"]["fast_aug"] is True
    assert_same_training_state(load(os.path.join(resumed, "checkpoint_0001.pth.tar")), final)
    assert all(math.isfinite(r["loss"]) for r in log_records(straight))


def jpeg_copy(images, root):
    """`images` re-encoded as JPEG files (what --device-decode hands to the device's decoder)."""
    from PIL import Image
    for folder, _, files in os.walk(images):
        for name in files:
            target = os.path.join(root, os.path.relpath(folder, images), name.replace(".png", ".jpg"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Image.open(os.path.join(folder, name)).save(target, quality=95)
    return str(root)


def test_device_decode_runs_reports_a_body_only_corrupt_jpeg_and_resumes_bit_exact(images, tmp_path, capsys):
    """--device-decode: workers ship the file bytes and draw the crops; the device decodes. A JPEG whose
    header reads but whose body is cut is found by the decoder, reported once and counted; resuming
    with another worker count is still exact."""
    data = jpeg_copy(images, tmp_path / "data")
    bad = os.path.join(data, "train", "class1", "img004.jpg")
    with open(bad, "rb") as f:
        body = f.read()
    with open(bad, "wb") as f:
        f.write(body[:len(body) // 2])
    argv = SMALL + ["--seed", "0", "--device-decode", "--aug-plus", "--mlp", data]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    capsys.readouterr()
    train(argv + ["--epochs", "2", "-j", "0", "--output-dir", straight])
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if bad in line and "unreadable" in line]) == 1
    records = log_records(straight)
    assert [r["bad_images"] for r in records] == [1, 1] and all(math.isfinite(r["loss"]) for r in records)
    train(argv + ["--epochs", "1", "-j", "2", "--output-dir", resumed])
    stdout = train(argv + ["--epochs", "2", "-j", "2", "--output-dir", resumed])
    assert "resuming from" in stdout
    final = load(os.path.join(straight, "checkpoint_0001.pth.tar"))
    assert final["args"]["device_decode"] is True
    assert_same_training_state(load(os.path.join(resumed, "checkpoint_0001.pth.tar")), final)


def test_mid_epoch_checkpoint_refuses_another_global_batch(reference, images, tmp_path, capsys):
    """Steps into an epoch count batches of the saved global batch: a launch with another one refuses
    (an end-of-epoch checkpoint resumes with any batch)."""
    ref, _ = reference
    checkpoint = load(os.path.join(ref, "checkpoint_0000.pth.tar"))
    assert checkpoint["global_batch"] == 8
    checkpoint.update(epoch=1, step_in_epoch=2, global_batch=16)
    out = str(tmp_path / "out")
    os.makedirs(out)
    torch.save(checkpoint, os.path.join(out, "checkpoint_0001_iter000002.pth.tar"))
    before = snapshot(out)
    code, _, err = run_cli_inprocess(SMALL + ["--epochs", "2", "--output-dir", out, images], capsys)
    assert code == 2 and "Traceback" not in err
    line, = [line for line in err.splitlines() if line.startswith("main_moco.py: error:")]
    assert "global batch of 16" in line and "has 8" in line
    assert snapshot(out) == before


def test_epoch_record_has_the_steady_state_window(reference):
    out, _ = reference
    for record in log_records(out):  # 4 steps, -p 1: the window runs from step 1 to step 3
        assert record["steady_steps"] == 2 and record["steady_images_per_s"] > 0
        assert 0 <= record["steady_data_fraction"] <= 1


def test_sigterm_saves_mid_epoch_and_resumes_bit_exact(reference, images, tmp_path):
    ref, _ = reference
    out = str(tmp_path / "out")
    argv = SMALL + ["--seed", "0", "--epochs", "2", "-j", "0", "--output-dir", out, images]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, SCRIPT] + argv, cwd=ROOT, env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        seen = []
        try:
            for line in proc.stdout:
                seen.append(line)
                match = METER_LINE.match(line.rstrip("\n"))
                if match and int(match.group(2)) >= 1:
                    proc.send_signal(signal.SIGTERM)
                    break
            rest = proc.stdout.read()
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout = "".join(seen) + rest
    err = (tmp_path / "stderr.txt").read_text()
    assert code == 143, stdout + err
    assert "Traceback" not in err
    assert "SIGTERM" in stdout
    saved = [name for name in os.listdir(out) if "_iter" in name]
    assert len(saved) == 1, os.listdir(out)
    epoch, step = map(int, re.match(r"checkpoint_(\d{4})_iter(\d{6})\.pth\.tar$", saved[0]).groups())
    assert step >= 2  # the step whose meter line we waited for, and at least one more
    interrupted = load(os.path.join(out, saved[0]))
    assert interrupted["epoch"] == epoch and interrupted["step_in_epoch"] == step
    assert not os.path.exists(os.path.join(out, "checkpoint_0001.pth.tar"))

    resumed = train(argv)  # the same command again
    assert f"resuming from '{os.path.join(out, saved[0])}' (epoch {epoch}, step {step}" in resumed
    resumed_steps = [(int(m.group(1)), int(m.group(2))) for m in map(METER_LINE.match, resumed.splitlines())
                     if m]
    # it continues at the next step, not at the start of the epoch
    assert resumed_steps[0] == ((epoch, step) if step < STEPS else (epoch + 1, 0))
    assert len(resumed_steps) == 2 * STEPS - (epoch * STEPS + step)
    assert_same_training_state(load(os.path.join(out, "checkpoint_0001.pth.tar")),
                               load(os.path.join(ref, "checkpoint_0001.pth.tar")))


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, no traceback, nothing written
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def guarded_output(tmp_path):
    """An output folder holding an earlier log, which a failing run must leave alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.txt").write_text('{"epoch": 0}\n')
    return str(out)


def _check_refused(code, out, err, output_dir, before, *expected):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("main_moco.py: error: ")
    for text in expected:
        assert text in lines[0]
    assert "Traceback" not in err and "Traceback" not in out
    assert snapshot(output_dir) == before


def test_missing_data_folder(tmp_path, guarded_output, capsys):
    before = snapshot(guarded_output)
    missing = str(tmp_path / "missing")
    code, out, err = run_cli_inprocess(SMALL + ["--output-dir", guarded_output, missing], capsys)
    _check_refused(code, out, err, guarded_output, before, missing, "does not exist")


def test_data_folder_without_train(tmp_path, guarded_output, capsys):
    data = tmp_path / "data"
    (data / "val" / "a").mkdir(parents=True)
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["--output-dir", guarded_output, str(data)], capsys)
    _check_refused(code, out, err, guarded_output, before, "'train'", str(data))


def test_empty_class_folders(tmp_path, guarded_output, capsys):
    data = tmp_path / "data"
    for name in ("a", "b"):
        (data / "train" / name).mkdir(parents=True)
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["--output-dir", guarded_output, str(data)], capsys)
    _check_refused(code, out, err, guarded_output, before, os.path.join(str(data), "train"))


def test_too_few_images_for_one_batch(tmp_path, guarded_output, capsys):
    data = make_image_folder(tmp_path / "data", classes=1, train_per_class=3, val_per_class=1, size=(8, 8))
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["--output-dir", guarded_output, data], capsys)
    _check_refused(code, out, err, guarded_output, before, "3 training images", "8")


def test_queue_not_divisible_by_global_batch(images, guarded_output, capsys):
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["--moco-k", "36", "--output-dir", guarded_output, images],
                                       capsys)
    _check_refused(code, out, err, guarded_output, before, "K=36", "--moco-k")


def test_checks_use_the_global_batch_of_a_torchrun_world(images, guarded_output, capsys, monkeypatch):
    # a torchrun environment of 2 processes on this node: refused before any process group exists
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "2"),
                        ("MASTER_ADDR", "localhost"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["-b", "1", "--moco-k", "32", "--output-dir",
                                                     guarded_output, images], capsys)
    _check_refused(code, out, err, guarded_output, before, "--batch-size 1", "2 processes")
    # -b 24 is 12 per process, 24 in all: K=36 is not a multiple, K=48 would be
    code, out, err = run_cli_inprocess(SMALL + ["-b", "24", "--moco-k", "36", "--output-dir",
                                                     guarded_output, images], capsys)
    _check_refused(code, out, err, guarded_output, before, "K=36", "24")


def test_batch_smaller_than_processes(images, guarded_output, capsys):
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["-b", "0", "--output-dir", guarded_output, images],
                                       capsys)
    _check_refused(code, out, err, guarded_output, before, "--batch-size 0")


def test_bn_splits_must_divide_the_batch(images, guarded_output, capsys):
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["--bn-splits", "3", "--output-dir", guarded_output, images],
                                       capsys)
    _check_refused(code, out, err, guarded_output, before, "--bn-splits 3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="--amp is valid on this machine")
def test_amp_without_cuda(images, guarded_output, capsys):
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["--amp", "--output-dir", guarded_output, images], capsys)
    _check_refused(code, out, err, guarded_output, before, "--amp", "CUDA")


def test_resume_missing_file(images, tmp_path, guarded_output, capsys):
    missing = str(tmp_path / "nope.pth.tar")
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["--resume", missing, "--output-dir", guarded_output, images],
                                       capsys)
    _check_refused(code, out, err, guarded_output, before, missing, "does not exist")


def test_resume_file_that_is_not_a_checkpoint(images, tmp_path, guarded_output, capsys):
    text = tmp_path / "notes.pth.tar"
    text.write_text("hello\n")
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["--resume", str(text), "--output-dir", guarded_output,
                                                images], capsys)
    _check_refused(code, out, err, guarded_output, before, str(text), "not a readable PyTorch checkpoint")

    lincls = str(tmp_path / "lincls.pth.tar")  # a loadable checkpoint, but not of pre-training
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": {"module.fc.weight": torch.zeros(2, 2)}},
               lincls)
    code, out, err = run_cli_inprocess(SMALL + ["--resume", lincls, "--output-dir", guarded_output, images],
                                       capsys)
    _check_refused(code, out, err, guarded_output, before, lincls, "not a MoCo pre-training checkpoint")


def test_resume_checkpoint_of_another_arch(reference, images, guarded_output, capsys):
    ref, _ = reference
    path = os.path.join(ref, "checkpoint_0000.pth.tar")
    before = snapshot(guarded_output)
    argv = SMALL + ["-a", "resnet34", "--resume", path, "--output-dir", guarded_output, images]
    code, out, err = run_cli_inprocess(argv, capsys)
    _check_refused(code, out, err, guarded_output, before, path, "resnet18", "resnet34")


def test_output_dir_holding_another_arch_is_not_overwritten(images, guarded_output, capsys):
    other = os.path.join(guarded_output, "checkpoint_0000.pth.tar")
    torch.save({"epoch": 1, "arch": "resnet50",
                "state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, other)
    before = snapshot(guarded_output)
    code, out, err = run_cli_inprocess(SMALL + ["--output-dir", guarded_output, images], capsys)
    _check_refused(code, out, err, guarded_output, before, "resnet50", "--output-dir")


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, SCRIPT] + SMALL + [str(tmp_path / "missing")], cwd=str(tmp_path),
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("main_moco.py: error: ") and str(tmp_path / "missing") in lines[0]
    assert os.listdir(tmp_path) == []


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(reference, images, tmp_path, capsys):
    ref, _ = reference
    out = str(tmp_path)
    good = os.path.join(out, "checkpoint_0000.pth.tar")
    shutil.copyfile(os.path.join(ref, "checkpoint_0000.pth.tar"), good)  # a first good epoch
    before = snapshot(out)
    code, stdout, err = run_cli_inprocess(SMALL + ["--seed", "0", "--epochs", "2", "-j", "0", "--lr", "1e30",
                                                   "--output-dir", out, images], capsys)
    assert code == 2
    assert "resuming from" in stdout
    lines = err.strip().splitlines()
    message = [line for line in lines if line.startswith("main_moco.py: error:")]
    assert len(message) == 1 and "Traceback" not in err
    assert "loss" in message[0] and "epoch 1" in message[0] and good in message[0]
    assert snapshot(out) == before  # no new checkpoint, no log line, the good one untouched


# --------------------------------------------------------------------------------------------------
# torchrun: two CPU processes on gloo, the README's command
# --------------------------------------------------------------------------------------------------
def test_torchrun_two_processes(image_folder, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), SCRIPT, "-a", "resnet18", "--crop-size", "32", "-b", "16", "--moco-k", "64",
               "--epochs", "1", "-j", "0", image_folder]
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS")  # torchrun sets one thread per process
    env.pop("MKL_NUM_THREADS")
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes on gloo on any machine: 2 processes would share cuda:0
    started = time.time()
    result = subprocess.run(command, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.time() - started < 300
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_0000.pth.tar", "log.txt"]  # --output-dir '.'
    checkpoint = load(str(tmp_path / "checkpoint_0000.pth.tar"))
    assert checkpoint["epoch"] == 1 and checkpoint["arch"] == "resnet18"
    assert all(key.startswith("module.") for key in checkpoint["state_dict"])
    assert checkpoint["state_dict"]["module.queue"].shape == (128, 64)
    # 48 images, 24 per process: 3 steps of a global batch of 16 keys
    assert checkpoint["state_dict"]["module.queue_ptr"].item() == 48 % 64
    assert len(checkpoint["rng_states"]) == 2
    records = log_records(str(tmp_path))
    assert len(records) == 1 and records[0]["epoch"] == 0 and records[0]["steps"] == 3
    start = [line for line in result.stdout.splitlines() if "world size" in line]
    assert len(start) == 1  # only rank 0 prints
    assert "world size 2" in start[0] and "per-process batch 8" in start[0] and "global 16" in start[0]
