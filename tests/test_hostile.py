"""Hostile inputs and hostile clusters: one table of cases run through main_moco.py, main_lincls.py and
the detectron2 converter, each in a process of its own.

For every case the test asserts the exit status (2 for an error, 0 or 143 where the run goes on or is
preempted), that no traceback is printed, that one line names the offending flag, file or folder, and
that every file that existed before the run is byte-identical afterwards unless the case lets the run
replace it.

Speed: importing torch and torchvision costs a fresh interpreter several seconds, more than most cases
take. So a small server process imports them once and forks one child per case; the child is a real
process (own pid and process group, its exit status, its signals, its DataLoader workers) that runs the
script as `__main__`, as `python SCRIPT ARGS` would, with stdout and stderr in files.
"""
import atexit
import fnmatch
import hashlib
import json
import os
import re
import resource
import runpy
import shutil
import signal
import subprocess
import sys
import time
import traceback
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MOCO = os.path.join(ROOT, "main_moco.py")
LINCLS = os.path.join(ROOT, "main_lincls.py")
CONVERT = os.path.join(ROOT, "detection", "convert-pretrain-to-detectron2.py")
PROG = {MOCO: "main_moco.py", LINCLS: "main_lincls.py", CONVERT: "convert-pretrain-to-detectron2.py"}
# 16 training images of 8 x 8 px in batches of 4: 4 steps an epoch
SMALL = ["-a", "resnet18", "--cifar-stem", "--crop-size", "8", "-b", "4", "-p", "1", "-j", "0"]
MOCO_ARGS = SMALL + ["--moco-dim", "8", "--moco-k", "16", "--seed", "0"]
LINCLS_ARGS = SMALL + ["--lr", "0.1"]
NO_STEM = ["--crop-size", "8", "-b", "4", "-p", "1", "-j", "0", "--epochs", "1"]  # for models without conv1
TRUNCATED_SIZES = (0, 64, 5000, 1 << 20, -100)  # bytes kept; negative: all but that many
METER = re.compile(r"^Epoch: \[(\d+)\]\[\s*(\d+)/\d+\]")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# --------------------------------------------------------------------------------------------------
# The fork server (this file run as `python test_hostile.py --serve`).
# --------------------------------------------------------------------------------------------------
def serve():
    """Import the heavy modules once, then for each request line fork a child that runs one script."""
    sys.path.insert(0, ROOT)
    import torch  # noqa: F401
    import torchvision  # noqa: F401
    import main_lincls  # noqa: F401
    import main_moco  # noqa: F401
    requests, replies = sys.stdin, sys.stdout
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)  # never returns
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def run_child(request):
    """In the forked child: become `python SCRIPT ARGV` in `cwd`, output to files, and exit."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group, as a job step is: a killpg reaches it and its workers
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
        if request.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
        os.chdir(request["cwd"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(0)
        sys.stdout = open(1, "w", buffering=1)
        sys.stderr = open(2, "w", buffering=1)
        script = request["script"]
        sys.argv = [script] + request["argv"]
        sys.path[0] = os.path.dirname(script)
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


class Runner:
    """The test side of the fork server."""

    def __init__(self, folder):
        env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.folder = folder
        self.env = env
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.count = 0

    def run(self, script, argv, cwd, fsize=None, while_running=None):
        """Run `script argv` in a forked child; `while_running(pid, stdout_path)` may signal it.
        Returns (exit status, stdout, stderr)."""
        self.count += 1
        out, err = (os.path.join(self.folder, f"{self.count}.{name}") for name in ("out", "err"))
        request = {"script": script, "argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": out,
                   "stderr": err, "fsize": fsize}
        for path in (out, err):
            open(path, "w").close()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        try:
            if while_running is not None:
                while_running(pid, out)
        except BaseException:
            os.killpg(pid, signal.SIGKILL)
            raise
        finally:  # keep the server's replies in step, whatever happened here
            code = json.loads(self.proc.stdout.readline())["code"]
        with open(out) as f_out, open(err) as f_err:
            return code, f_out.read(), f_err.read()

    def run_python(self, script, argv, cwd, fsize=None, while_running=None):
        """`python SCRIPT ARGV` in a fresh interpreter and process group of its own: no fork server, no
        runpy, the script's own start-up. Same interface as `run`."""
        self.count += 1
        out, err = (os.path.join(self.folder, f"{self.count}.{name}") for name in ("out", "err"))

        def limit_file_size():
            if fsize:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        with open(out, "w") as f_out, open(err, "w") as f_err:
            proc = subprocess.Popen([sys.executable, script] + [str(a) for a in argv], cwd=str(cwd), env=self.env,
                                    stdin=subprocess.DEVNULL, stdout=f_out, stderr=f_err, start_new_session=True,
                                    preexec_fn=limit_file_size)
            try:
                if while_running is not None:
                    while_running(proc.pid, out)
                code = proc.wait(timeout=600)
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
        with open(out) as f_out, open(err) as f_err:
            return code, f_out.read(), f_err.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --------------------------------------------------------------------------------------------------
# Files for the cases, made once.
# --------------------------------------------------------------------------------------------------
def write_images(folder, count, size=8, seed=0):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(
            os.path.join(folder, f"img{i:02d}.png"))


def image_folder(root, train=8, val=2):
    for c in range(2):
        write_images(os.path.join(root, "train", f"class{c}"), train, seed=c)
        write_images(os.path.join(root, "val", f"class{c}"), val, seed=10 + c)
    return root


def png_header_only(path, width, height):
    """A PNG whose header claims width x height pixels (a decompression bomb's size) with no pixel data:
    Pillow refuses it on opening, from the header alone."""
    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                + chunk(b"IEND", b""))


def write_altered_pretrained(src, dst, alter):
    """`src`'s arch and query-encoder weights (a MoCo checkpoint as --pretrained reads it) with the first
    convolution changed in place by `alter`."""
    import torch
    checkpoint = torch.load(src, weights_only=True)
    state_dict = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("module.encoder_q.")}
    alter(state_dict["module.encoder_q.conv1.weight"])
    torch.save({"arch": checkpoint["arch"], "state_dict": state_dict}, dst)


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(folder, pid):
    import socket
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "run.lock"), "w") as f:
        json.dump({"pid": pid, "host": socket.gethostname(), "prog": "main_moco.py", "started": "earlier"}, f)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data folders and checkpoints shared by the cases (read-only for them), and the fork server."""
    root = str(tmp_path_factory.mktemp("hostile"))
    runner = Runner(str(tmp_path_factory.mktemp("hostile_logs")))
    w = {"root": root, "runner": runner}
    w["data"] = image_folder(os.path.join(root, "data"))
    w["bomb_data"] = image_folder(os.path.join(root, "bomb_data"))
    os.remove(os.path.join(w["bomb_data"], "train", "class0", "img00.png"))  # 16 images: every one is drawn
    png_header_only(os.path.join(w["bomb_data"], "train", "class0", "bomb.png"), 20000, 20000)
    w["bad_data"] = image_folder(os.path.join(root, "bad_data"))
    for folder, _, names in os.walk(os.path.join(w["bad_data"], "train")):
        for name in names:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"not an image\n")
    # one epoch of pre-training, and one of linear classification on it
    code, out, err = runner.run(MOCO, MOCO_ARGS + ["--epochs", "1", "--output-dir", "pre", w["data"]], cwd=root)
    assert code == 0, out + err
    w["ckpt"] = os.path.join(root, "pre", "checkpoint_0000.pth.tar")
    lin_argv = LINCLS_ARGS + ["--epochs", "1", "--pretrained", w["ckpt"], w["data"]]
    code, out, err = runner.run(LINCLS, lin_argv + ["--output-dir", "lin"], cwd=root)
    assert code == 0, out + err
    w["lin_argv"] = lin_argv
    w["lin_dir"] = os.path.join(root, "lin")
    w["lin_ckpt"] = os.path.join(root, "lin", "checkpoint.pth.tar")
    w["truncated"] = os.path.join(root, "truncated.pth.tar")
    with open(w["ckpt"], "rb") as src, open(w["truncated"], "wb") as dst:
        dst.write(src.read(5000))  # `head -c 5000 ckpt`
    full = os.path.getsize(w["ckpt"])
    for size in TRUNCATED_SIZES:  # `head -c SIZE ckpt`, from an empty file to all but the last bytes
        w[f"truncated_{size}"] = os.path.join(root, f"truncated_{size}.pth.tar")
        with open(w["ckpt"], "rb") as src, open(w[f"truncated_{size}"], "wb") as dst:
            dst.write(src.read(size if size >= 0 else full + size))
    # class folders of val/ that differ from train/'s: one missing, one extra
    w["val_lacks_class"] = image_folder(os.path.join(root, "val_lacks_class"))
    shutil.rmtree(os.path.join(w["val_lacks_class"], "val", "class1"))
    w["val_extra_class"] = image_folder(os.path.join(root, "val_extra_class"))
    write_images(os.path.join(w["val_extra_class"], "val", "class2"), 2, seed=20)
    w["val_empty"] = image_folder(os.path.join(root, "val_empty"))
    for c in range(2):  # the class folders are there, the images are not
        shutil.rmtree(os.path.join(w["val_empty"], "val", f"class{c}"))
        os.makedirs(os.path.join(w["val_empty"], "val", f"class{c}"))
    # pre-trained weights that differ from w["ckpt"]: other values, and one NaN
    w["ckpt_other"], w["ckpt_nan"] = (os.path.join(root, name) for name in ("other.pth.tar", "nan.pth.tar"))
    write_altered_pretrained(w["ckpt"], w["ckpt_other"], lambda t: t.mul_(0.5))
    write_altered_pretrained(w["ckpt"], w["ckpt_nan"], lambda t: t.view(-1)[0].fill_(float("nan")))
    w["before"] = snapshot(root, skip=("hostile_logs",))
    w["table"] = []
    yield w
    runner.close()
    # the table of cases, exit statuses and messages, for reading after a run
    with open(os.path.join(runner.folder, "table.md"), "w") as f:
        f.write("| case | exit | message |\n|---|---|---|\n")
        for name, code, lines in w["table"]:
            f.write(f"| {name} | {code} | {' / '.join(lines)} |\n")
    assert snapshot(root) == w["before"], "a case changed the shared files"


def snapshot(folder, skip=()):
    """{relative path: sha256} of every file under `folder`."""
    found = {}
    for directory, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            path = os.path.join(directory, name)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            found[os.path.relpath(path, folder)] = digest.hexdigest()
    return found


# --------------------------------------------------------------------------------------------------
# Signals for the preemption cases.
# --------------------------------------------------------------------------------------------------
def wait_for_step(stdout_path, step, timeout=120):
    """Block until the run's meter line of `step` (or a later one) is in its stdout."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(stdout_path) as f:
            for line in f:
                match = METER.match(line)
                if match and int(match.group(2)) >= step:
                    return
        time.sleep(0.05)
    raise AssertionError(f"no meter line of step {step} within {timeout} s")


def children(pid):
    """The pids whose parent is `pid` (DataLoader workers of a training process)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(name))
    return found


def sigterm_group(pid, stdout_path):
    """A cluster's preemption: SIGTERM to every process of the job (main and loader workers)."""
    wait_for_step(stdout_path, 1)
    assert len(children(pid)) == 2, "expected 2 loader workers"
    os.killpg(pid, signal.SIGTERM)


def sigterm_one_worker(pid, stdout_path):
    wait_for_step(stdout_path, 1)
    workers = children(pid)
    assert len(workers) == 2, "expected 2 loader workers"
    os.kill(workers[0], signal.SIGTERM)


# --------------------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------------------
def copy(w, src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copyfile(w[src] if src in w else src, dst)


def setup_out_with(*files):
    """A setup that fills OUT (the case's output folder) with copies: (name in OUT, source key)."""
    def setup(w, case_dir):
        for name, source in files:
            copy(w, source, os.path.join(case_dir, "out", name))
    return setup


def setup_file(name, content=b"a file\n"):
    def setup(w, case_dir):
        with open(os.path.join(case_dir, name), "wb") as f:
            f.write(content)
    return setup


def setup_lincls_results(w, case_dir):
    shutil.copytree(w["lin_dir"], os.path.join(case_dir, "out"))


def setup_unwritable(w, case_dir):
    os.makedirs(os.path.join(case_dir, "ro"))
    os.chmod(os.path.join(case_dir, "ro"), 0o555)


def setup_live_lock(w, case_dir):
    write_lock(os.path.join(case_dir, "out"), os.getpid())  # this test process: alive


def setup_stale_lock(w, case_dir):
    setup_out_with(("checkpoint_0000.pth.tar", "ckpt"))(w, case_dir)
    write_lock(os.path.join(case_dir, "out"), dead_pid())


UNWRITABLE = "/proc/self/moco-out" if os.geteuid() == 0 else "ro/out"  # root writes through chmod


class Case:
    """One hostile case: the script and its arguments ({data}, {ckpt}, ... from the `world` fixture; OUT is
    the case's output folder), what to set up, the exit status, and the words each expected line holds."""

    def __init__(self, script, argv, code, *lines, setup=None, fsize=None, while_running=None, replaced=(),
                 check=None):
        self.script, self.argv, self.code, self.lines = script, argv, code, lines
        self.setup, self.fsize, self.while_running = setup, fsize, while_running
        self.replaced, self.check = set(replaced), check


def moco(extra, code=2, *lines, data="{data}", **kwargs):
    return Case(MOCO, MOCO_ARGS + ["--epochs", "1", "--output-dir", "out"] + extra + [data], code, *lines,
                **kwargs)


def lincls(extra, code=2, *lines, data="{data}", **kwargs):
    return Case(LINCLS, LINCLS_ARGS + ["--epochs", "1", "--pretrained", "{ckpt}", "--output-dir", "out"] + extra
                + [data], code, *lines, **kwargs)


def convert(argv, code=2, *lines, **kwargs):
    return Case(CONVERT, argv, code, *lines, **kwargs)


def check_iter_checkpoint(case_dir, out, err, rerun):
    import torch
    saved = [n for n in os.listdir(os.path.join(case_dir, "out")) if "_iter" in n]
    assert len(saved) == 1, os.listdir(os.path.join(case_dir, "out"))
    checkpoint = torch.load(os.path.join(case_dir, "out", saved[0]), weights_only=True)
    # after the step whose meter line we waited for (step 1 of epoch 0), and at least one more
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) >= (0, 3)
    assert "SIGTERM" in out and saved[0] in out
    assert not os.path.exists(os.path.join(case_dir, "out", "run.lock"))


def check_sigterm_then_resume(case_dir, out, err, rerun):
    """The SIGTERM checkpoint, and the same command again: it resumes there and finishes the run."""
    import torch
    check_iter_checkpoint(case_dir, out, err, rerun)
    saved = [n for n in os.listdir(os.path.join(case_dir, "out")) if "_iter" in n][0]
    code, out, err = rerun()
    assert code == 0, out[-2000:] + err[-2000:]
    assert f"resuming from 'out/{saved}'" in out and "Traceback" not in out + err
    last = torch.load(os.path.join(case_dir, "out", "checkpoint_0001.pth.tar"), weights_only=True)
    assert (last["epoch"], last["step_in_epoch"]) == (2, 0)


def check_no_folder(case_dir, out, err, rerun):
    assert not os.path.exists(os.path.join(case_dir, "out")), os.listdir(case_dir)


def check_checkpoint_kept(case_dir, out, err, rerun):
    import torch
    checkpoint = torch.load(os.path.join(case_dir, "out", "checkpoint_0000.pth.tar"), weights_only=True)
    assert checkpoint["epoch"] == 1


def check_no_checkpoint(case_dir, out, err, rerun):
    out_dir = os.path.join(case_dir, "out")
    assert not os.path.isdir(out_dir) or not [n for n in os.listdir(out_dir) if n.startswith("checkpoint")]


def setup_partial_files(w, case_dir):
    """A finished run's checkpoint, the partial file of a save whose process is gone (kill -9), and one
    whose writer is alive (this test process)."""
    setup_out_with(("checkpoint_0000.pth.tar", "ckpt"))(w, case_dir)
    for pid in (dead_pid(), os.getpid()):
        with open(os.path.join(case_dir, "out", f".checkpoint_0001.pth.tar.tmp{pid}"), "wb") as f:
            f.write(b"the first bytes of a checkpoint")


def check_partial_files(case_dir, out, err, rerun):
    left = [n for n in os.listdir(os.path.join(case_dir, "out")) if ".tmp" in n]
    assert left == [f".checkpoint_0001.pth.tar.tmp{os.getpid()}"], left  # the live writer's file stays
    assert out.count("partial file") == 1, out


def setup_full_disk_for_log(w, case_dir):
    """log.txt exactly as large as the file size limit of the case: the checkpoint still fits, the next
    line of log.txt does not (as on a disk that fills up between the two)."""
    os.makedirs(os.path.join(case_dir, "out"))
    with open(os.path.join(case_dir, "out", "log.txt"), "wb") as f:
        f.truncate(LOG_LIMIT)  # sparse: no disk space used


def setup_replaced_pretrained(w, case_dir):
    """A linear run on the weights in OUT/../pre.pth.tar, whose file has since been replaced by other
    weights under the same path."""
    import torch
    setup_lincls_results(w, case_dir)
    path = os.path.join(case_dir, "out", "checkpoint.pth.tar")
    checkpoint = torch.load(path, weights_only=True)
    pretrained = os.path.realpath(os.path.join(case_dir, "pre.pth.tar"))
    checkpoint["run"]["pretrained"] = pretrained  # as if that run had been given this path
    torch.save(checkpoint, path)
    copy(w, "ckpt_other", pretrained)


def setup_log_folder(w, case_dir):
    os.makedirs(os.path.join(case_dir, "out", "log.txt"))


def check_no_partial_file(case_dir, out, err, rerun):
    names = os.listdir(os.path.join(case_dir, "out"))
    assert not [n for n in names if "tmp" in n or n == "checkpoint_0001.pth.tar"], names


def check_named_checkpoint_is_finite(case_dir, out, err, rerun):
    """Every checkpoint written holds finite weights, and the one the message names is the newest."""
    import torch
    named = re.search(r"Last good checkpoint: (\S+?)\.? ", err).group(1)
    out_dir = os.path.join(case_dir, "out")  # removed when the run wrote nothing in it
    written = sorted(n for n in os.listdir(out_dir) if n.startswith("checkpoint")) if os.path.isdir(out_dir) else []
    for name in written:
        checkpoint = torch.load(os.path.join(case_dir, "out", name), weights_only=True)
        assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert named == (os.path.join("out", written[-1]) if written else "none")


def check_fresh_run(case_dir, out, err, rerun):
    import torch
    checkpoint = torch.load(os.path.join(case_dir, "out", "checkpoint.pth.tar"), weights_only=True)
    assert checkpoint["run"]["lr"] == 0.2 and checkpoint["epoch"] == 1


def check_resumed_lincls(case_dir, out, err, rerun):
    import torch
    checkpoint = torch.load(os.path.join(case_dir, "out", "checkpoint.pth.tar"), weights_only=True)
    assert checkpoint["epoch"] == 2 and "Epoch: [0]" not in out and "Epoch: [1]" in out


def check_converter_output_kept(case_dir, out, err, rerun):
    assert sorted(os.listdir(case_dir)) == ["in.pth.tar", "output.pkl"]


ERROR = 2
LOG_LIMIT = 400 << 20  # above a checkpoint of the cases' model (about 135 MB)
LINEAR_RESULTS = ["out/checkpoint.pth.tar", "out/model_best.pth.tar", "out/log.txt"]  # a linear run's files
CASES = {
    # argument ranges: refused before anything starts
    "moco-k-zero": moco(["--moco-k", "0"], ERROR, ["--moco-k 0"]),
    "moco-dim-zero": moco(["--moco-dim", "0"], ERROR, ["--moco-dim 0"]),
    "moco-t-zero": moco(["--moco-t", "0"], ERROR, ["--moco-t 0"]),
    "moco-t-negative": moco(["--moco-t", "-0.5"], ERROR, ["--moco-t -0.5"]),
    "moco-m-above-one": moco(["--moco-m", "1.5"], ERROR, ["--moco-m 1.5"]),
    "moco-m-negative": moco(["--moco-m", "-0.1"], ERROR, ["--moco-m -0.1"]),
    "moco-wd-negative": moco(["--wd", "-1"], ERROR, ["--wd -1"]),
    "moco-print-freq-zero": moco(["--print-freq", "0"], ERROR, ["--print-freq 0"]),
    "moco-lr-negative": moco(["--lr", "-1"], ERROR, ["--lr -1"]),
    "moco-lr-nan": moco(["--lr", "nan"], ERROR, ["--lr nan", "finite"]),
    "moco-epochs-negative": moco(["--epochs", "-1"], ERROR, ["--epochs -1"]),
    "moco-workers-negative": moco(["-j", "-1"], ERROR, ["--workers -1"]),
    "moco-crop-size-zero": moco(["--crop-size", "0"], ERROR, ["--crop-size 0"]),
    "lincls-lr-negative": lincls(["--lr", "-1"], ERROR, ["--lr -1"]),
    "lincls-epochs-negative": lincls(["--epochs", "-1"], ERROR, ["--epochs -1"]),
    # the output folder, checked at start-up
    "moco-output-dir-is-a-file": moco(["--output-dir", "afile"], ERROR, ["--output-dir", "afile", "is a file"],
                                      setup=setup_file("afile")),
    "moco-output-dir-under-a-file": moco(["--output-dir", "afile/out"], ERROR, ["--output-dir", "afile"],
                                         setup=setup_file("afile")),
    # the write probe's own words: as root the lock's later error names the folder too
    "moco-output-dir-not-writable": moco(["--output-dir", UNWRITABLE], ERROR,
                                         ["--output-dir", UNWRITABLE, "permission denied or a read-only"],
                                         setup=setup_unwritable),
    "lincls-output-dir-is-a-file": lincls(["--output-dir", "afile"], ERROR, ["--output-dir", "afile"],
                                          setup=setup_file("afile")),
    # truncated checkpoints, wherever one is loaded
    **{f"moco-resume-truncated-{size}": moco(["--resume", f"{{truncated_{size}}}"], ERROR,
                                              [f"{{truncated_{size}}}", "not a readable"], check=check_no_folder)
       for size in TRUNCATED_SIZES},
    "moco-auto-resume-skips-truncated": moco(
        ["--epochs", "2"], 0, ["skipping", "out/checkpoint_0001_iter000002.pth.tar"],
        ["resuming from 'out/checkpoint_0000.pth.tar'"],
        setup=setup_out_with(("checkpoint_0000.pth.tar", "ckpt"),
                             ("checkpoint_0001_iter000002.pth.tar", "truncated"))),
    "lincls-pretrained-truncated": lincls(["--pretrained", "{truncated}"], ERROR, ["{truncated}", "--pretrained"]),
    "lincls-resume-truncated": lincls(["--resume", "{truncated}"], ERROR, ["{truncated}", "--resume"]),
    "convert-truncated": convert(["{truncated}", "out.pkl"], ERROR, ["{truncated}", "not a readable"]),
    # a main_lincls checkpoint under a pre-training name
    "moco-auto-resume-skips-lincls-checkpoint": moco(
        ["--epochs", "2"], 0, ["skipping", "out/checkpoint_0005.pth.tar", "not a MoCo pre-training"],
        ["resuming from 'out/checkpoint_0000.pth.tar'"],
        setup=setup_out_with(("checkpoint_0000.pth.tar", "ckpt"), ("checkpoint_0005.pth.tar", "lin_ckpt"))),
    "moco-would-replace-lincls-checkpoint": moco(
        ["--epochs", "7"], ERROR, ["out/checkpoint_0005.pth.tar", "replace"],
        setup=setup_out_with(("checkpoint_0000.pth.tar", "ckpt"), ("checkpoint_0005.pth.tar", "lin_ckpt"))),
    "convert-lincls-checkpoint": convert(["{lin_ckpt}", "out.pkl"], ERROR, ["{lin_ckpt}", "not a MoCo"]),
    # --epochs against the progress already made
    "moco-epochs-below-done": moco(["--epochs", "0"], ERROR, ["--epochs 0", "out/checkpoint_0000.pth.tar"],
                                   setup=setup_out_with(("checkpoint_0000.pth.tar", "ckpt"))),
    # one run per output folder
    "moco-output-dir-in-use": moco([], ERROR, ["--output-dir", "in use", "pid {pid}"], setup=setup_live_lock),
    "lincls-output-dir-in-use": lincls([], ERROR, ["--output-dir", "in use", "pid {pid}"],
                                       setup=setup_live_lock),
    "moco-stale-lock-taken-over": moco([], 0, ["taking over the lock", "is not running"],
                                       ["nothing to do", "out/checkpoint_0000.pth.tar"],
                                       setup=setup_stale_lock, replaced=["out/run.lock"]),
    # main_lincls again in the same --output-dir
    "lincls-other-run-in-output-dir": lincls(["--lr", "0.2"], ERROR, ["another linear run", "--lr", "--fresh"],
                                             setup=setup_lincls_results),
    "lincls-same-run-is-resumed": Case(LINCLS, ["{lin_argv}", "--epochs", "2", "--output-dir", "out"], 0,
                                       ["resuming from 'out/checkpoint.pth.tar'", "epoch 1"],
                                       setup=setup_lincls_results, check=check_resumed_lincls,
                                       replaced=LINEAR_RESULTS),
    "lincls-fresh-replaces-other-run": lincls(["--lr", "0.2", "--fresh"], 0, ["--fresh", "replaces"],
                                              setup=setup_lincls_results, check=check_fresh_run,
                                              replaced=LINEAR_RESULTS),
    "lincls-unreadable-results-in-output-dir": lincls(
        [], ERROR, ["out/checkpoint.pth.tar", "not a readable"],
        setup=setup_out_with(("checkpoint.pth.tar", "truncated"))),
    # preemption: SIGTERM to the whole job, or to one loader worker only
    "moco-sigterm-main-and-workers": moco(["-j", "2", "--epochs", "2"], 143, ["SIGTERM", "_iter"],
                                          while_running=sigterm_group, check=check_sigterm_then_resume),
    "moco-sigterm-one-worker": moco(["-j", "2", "--epochs", "2"], 143, ["SIGTERM", "_iter"],
                                    while_running=sigterm_one_worker, check=check_iter_checkpoint),
    # the disk fills up while a checkpoint is written (a 1 MB file size limit)
    "moco-disk-full-during-save": moco(["--epochs", "2"], ERROR, ["cannot write checkpoint",
                                                                   "out/checkpoint_0001.pth.tar"],
                                       setup=setup_out_with(("checkpoint_0000.pth.tar", "ckpt")), fsize=1 << 20,
                                       check=check_no_partial_file),
    "convert-disk-full": convert(["in.pth.tar", "output.pkl"], ERROR, ["cannot write", "output.pkl"],
                                 setup=lambda w, d: (copy(w, "ckpt", os.path.join(d, "in.pth.tar")),
                                                     setup_file("output.pkl", b"earlier output\n")(w, d)),
                                 fsize=1 << 20, check=check_converter_output_kept),
    "convert-output-is-a-folder": convert(["{ckpt}", "."], ERROR, ["is a folder"]),
    # bad data
    "moco-decompression-bomb": moco([], 0, ["bomb.png", "DecompressionBombError"], data="{bomb_data}"),
    "moco-every-image-unreadable": moco(["-j", "1"], ERROR, ["unreadable", "bad_data/train"], data="{bad_data}"),
    # a non-finite loss: nothing non-finite is saved; the message names a checkpoint that resumes
    # (the loss check: the NaN loss comes before any save)
    "moco-nan-at-huge-lr": moco(["--lr", "1e8", "--epochs", "3"], ERROR,
                                ["the loss became NaN", "--lr", "Last good checkpoint"],
                                check=check_named_checkpoint_is_finite),
    # (the check in save(): one step per epoch, whose loss is finite, and an update that makes the
    # weights infinite; only the check before writing sees it)
    "moco-lr-above-float32": moco(["--lr", "1e300"], ERROR, ["--lr 1e+300", "float32"]),
    "moco-nonfinite-weights-before-save": moco(["-b", "16", "--lr", "1e38", "--wd", "1e38"], ERROR,
                                               ["became non-finite", "was not written", "none yet"],
                                               check=check_no_checkpoint),
    # issue 18: silent wrong results
    "moco-knn-val-lacks-class": moco(["--knn-freq", "1"], ERROR, ["val/ lacks ['class1']", "kNN monitor"],
                                     data="{val_lacks_class}", check=check_no_folder),
    "moco-knn-val-extra-class": moco(["--knn-freq", "1"], ERROR, ["val/ has extra ['class2']", "kNN monitor"],
                                     data="{val_extra_class}"),
    "lincls-val-extra-class": lincls([], ERROR, ["val/ has extra ['class2']", "linear classification"],
                                     data="{val_extra_class}"),
    "lincls-val-without-images": lincls([], ERROR, ["val_empty/val", "no valid file"], data="{val_empty}"),
    "lincls-pretrained-replaced": Case(LINCLS, ["{lin_argv}", "--pretrained", "pre.pth.tar", "--output-dir", "out"],
                                       ERROR, ["another linear run", "sha256", "--fresh"],
                                       setup=setup_replaced_pretrained),
    "lincls-resume-other-backbone": lincls(["--resume", "{lin_ckpt}", "--pretrained", "{ckpt_other}", "--epochs", "2"],
                                           ERROR, ["{lin_ckpt}", "{ckpt_other}", "other backbone weights"],
                                           check=check_no_checkpoint),
    "lincls-evaluate-without-resume": lincls(["-e"], ERROR, ["-e", "--resume", "trained linear classifier"]),
    "lincls-evaluate-other-class-count": lincls(["-e", "--resume", "{lin_ckpt}"], ERROR,
                                                ["{lin_ckpt}", "does not fit"], data="{val_extra_class}"),
    "lincls-pretrained-other-arch": lincls(["-a", "resnet34"], ERROR, ["--arch resnet18", "--arch resnet34"]),
    "moco-resume-lincls-checkpoint": moco(["--resume", "{lin_ckpt}"], ERROR,
                                          ["{lin_ckpt}", "not a MoCo pre-training"], check=check_no_folder),
    "moco-k-not-divisible": moco(["--moco-k", "18"], ERROR, ["K=18", "--moco-k", "divisible"]),
    "moco-batch-above-data": moco(["-b", "32", "--moco-k", "32"], ERROR, ["16 training images", "no full batch"],
                                  check=check_no_folder),
    "lincls-batch-above-data": lincls(["-b", "32"], ERROR, ["16 training images", "no full batch"]),
    # issue 18: tracebacks and lost work
    "moco-log-txt-is-a-folder": moco([], ERROR, ["out/log.txt", "is a folder"], setup=setup_log_folder,
                                     check=check_no_checkpoint),
    "moco-log-append-fails-after-checkpoint": moco([], ERROR, ["cannot append", "out/log.txt",
                                                               "out/checkpoint_0000.pth.tar", "kept"],
                                                   setup=setup_full_disk_for_log, fsize=LOG_LIMIT,
                                                   check=check_checkpoint_kept),
    "moco-mobilenet-mlp": Case(MOCO, NO_STEM + ["-a", "mobilenet_v2", "--mlp", "--moco-dim", "8", "--moco-k", "16",
                                                "--output-dir", "out", "{data}"], ERROR,
                               ["--arch mobilenet_v2", "'fc'", "--mlp"], check=check_no_folder),
    "lincls-mobilenet": Case(LINCLS, NO_STEM + ["-a", "mobilenet_v2", "--output-dir", "out", "{data}"], ERROR,
                             ["--arch mobilenet_v2", "'fc'", "main_lincls.py"]),
    "moco-vit-small-crop": Case(MOCO, NO_STEM + ["-a", "vit_b_16", "--moco-k", "16", "--output-dir", "out",
                                                 "{data}"], ERROR, ["--arch vit_b_16", "--crop-size 8"]),
    # issue 18, minor
    "moco-stale-partial-file-removed": moco([], 0, ["removed", "partial file"], ["nothing to do"],
                                            setup=setup_partial_files, check=check_partial_files,
                                            replaced=["out/run.lock", "out/.checkpoint_0001.pth.tar.tmp*"]),
    "moco-resume-missing-leaves-no-folder": moco(["--resume", "missing.pth.tar"], ERROR,
                                                 ["missing.pth.tar", "does not exist"], check=check_no_folder),
    "moco-start-epoch-at-epochs": moco(["--start-epoch", "1"], ERROR, ["--start-epoch 1", "no epoch to train"],
                                       check=check_no_folder),
    "lincls-start-epoch-at-epochs": lincls(["--start-epoch", "1"], ERROR, ["--start-epoch 1", "no epoch to train"]),
    "lincls-pretrained-nan": lincls(["--pretrained", "{ckpt_nan}"], ERROR, ["{ckpt_nan}", "non-finite"]),
    "lincls-evaluate-pretrained-nan": lincls(["-e", "--resume", "{lin_ckpt}", "--pretrained", "{ckpt_nan}"], ERROR,
                                             ["{ckpt_nan}", "non-finite"]),
}


def expand(argv, values):
    expanded = []
    for arg in argv:
        if arg == "{lin_argv}":
            expanded += values["lin_argv"]
        else:
            expanded.append(arg.format(**values))
    return expanded


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_case(name, world, tmp_path):
    run_case(name, world, tmp_path, world["runner"].run)


# a few cases once more as plain `python SCRIPT ARGS`, in case the fork server hides a start-up problem
AS_PYTHON_SCRIPT = ["lincls-evaluate-without-resume", "moco-sigterm-main-and-workers"]


@pytest.mark.parametrize("name", AS_PYTHON_SCRIPT)
def test_hostile_case_as_python_script(name, world, tmp_path):
    run_case(name, world, tmp_path, world["runner"].run_python)


def test_every_process_waits_for_the_checkpoint(world, tmp_path):
    """Two processes launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT). Process 0's save is
    held open: its partial file `.checkpoint_0000.pth.tar.tmp<pid>` is a FIFO, whose open blocks until a
    reader comes (and a partial file of a live process is never cleaned up). Process 1 must still be
    there while process 0 writes, so a job that ends with its last process never loses the checkpoint."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(world["runner"].env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2")
    argv = [sys.executable, MOCO] + MOCO_ARGS + ["-b", "8", "--epochs", "1", "--output-dir", "out", world["data"]]
    os.makedirs(os.path.join(str(tmp_path), "out"))
    logs = [os.path.join(str(tmp_path), f"rank{rank}.log") for rank in range(2)]
    procs = []
    try:
        for rank in range(2):
            with open(logs[rank], "w") as log:
                procs.append(subprocess.Popen(argv, cwd=str(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                              env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                              start_new_session=True))
            if rank == 0:
                os.mkfifo(os.path.join(str(tmp_path), "out", f".checkpoint_0000.pth.tar.tmp{procs[0].pid}"))
        wait_for_step(logs[0], 1, timeout=300)  # the last step of the epoch: the save comes next
        deadline = time.time() + 20  # process 1 needs a second or two to end, if nothing holds it
        while time.time() < deadline and procs[1].poll() is None and procs[0].poll() is None:
            time.sleep(0.2)
        report = "".join(open(log).read()[-2000:] for log in logs)
        assert procs[0].poll() is None, f"process 0 should be held in its save\n{report}"
        assert procs[1].poll() is None, f"process 1 exited while process 0 was writing the checkpoint\n{report}"
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_case(name, world, tmp_path, run):
    """Set up case `name` in `tmp_path`, run it through `run` (Runner.run or Runner.run_python), and check
    its exit status, its lines, the files it kept and the case's own check."""
    case = CASES[name]
    case_dir = str(tmp_path)
    if case.setup is not None:
        case.setup(world, case_dir)
    values = {key: value for key, value in world.items() if isinstance(value, (str, list))}
    values["pid"] = os.getpid()
    before = snapshot(case_dir)
    argv = expand(case.argv, values)
    code, out, err = run(case.script, argv, cwd=case_dir, fsize=case.fsize, while_running=case.while_running)

    def rerun():  # the same command again, in the same folder, as a user would after a fix or a stop
        return run(case.script, argv, cwd=case_dir)

    report = f"exit {code}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
    assert code == case.code, report
    assert "Traceback" not in out + err, report
    lines, said = (out + err).splitlines(), []
    world["table"].append((name, code, said))
    if case.code == ERROR:  # exactly one error line, and it says what is wrong
        lines = [line for line in err.splitlines() if line.startswith(f"{PROG[case.script]}: error: ")]
        assert len(lines) == 1, report
    for words in case.lines:
        words = [word.format(**values) for word in words]
        matching = [line for line in lines if all(word in line for word in words)]
        assert len(matching) == 1, f"no single line with {words}\n{report}"
        said.append(matching[0].replace(case_dir + os.sep, "").replace(world["root"] + os.sep, ""))
    after = snapshot(case_dir)
    for path, digest in before.items():
        if not any(fnmatch.fnmatch(path, pattern) for pattern in case.replaced):
            assert after.get(path) == digest, f"{path} changed or vanished\n{report}"
    if case.check is not None:
        case.check(case_dir, out, err, rerun)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
