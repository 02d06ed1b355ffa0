"""Tests of main_lincls.py: flags, the frozen-feature protocol, loading MoCo checkpoints, resumption,
evaluation, distributed validation and the one-line errors on bad input.

Runs are real and tiny: resnet18 on 32 px crops of the generated folders of tests/conftest.py, on the
CPU, called in-process where possible. Subprocesses are used only where the command line itself is
under test (the exit status, stderr) and for the two-process torchrun runs (gloo on the CPU).
"""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

import main_lincls
import main_moco
from moco.distributed import plan_launch
from moco.errors import UserError, run_cli
from tests.conftest import kill_tree, make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["-a", "resnet18", "--crop-size", "32", "-j", "0"]
FC_KEYS = {"fc.weight", "fc.bias"}
NUM_CLASSES = 3  # the image_folder fixture: 3 classes x 16 train and 5 val images
NUM_VAL = 15  # not divisible by 2 processes
SUMMARY = re.compile(r"^ \* Acc@1 (\S+) Acc@5 (\S+) \((\d+) images\)$", re.MULTILINE)
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "TORCHELASTIC_RUN_ID")


# --------------------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------------------
def parse(argv):
    return main_lincls.get_args_parser().parse_args([str(a) for a in argv])


def run_lincls(argv):
    """main_lincls.main in this process; returns (its result, what it printed)."""
    args = parse(argv)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = main_lincls.main(args)
    return result, out.getvalue()


def clean_env(threads=2):
    """This environment without launcher variables and GPUs: a subprocess is a plain CPU run (or, under
    torchrun, CPU processes with gloo)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_script(argv, launcher=(), threads=2, timeout=300):
    """Run main_lincls.py (under `launcher`, e.g. torchrun). On a timeout, kill it and every process it
    started (torchrun puts its workers in sessions of their own), then fail."""
    cmd = [sys.executable, *launcher, "main_lincls.py", *[str(a) for a in argv]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s (a hang?)")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def encoder_q_backbone(checkpoint):
    """The query encoder's non-fc tensors of a MoCo checkpoint, with plain torchvision names."""
    prefix = "module.encoder_q."
    return {key[len(prefix):]: value for key, value in checkpoint["state_dict"].items()
            if key.startswith(prefix) and not key.startswith(prefix + "fc")}


def assert_backbone_equals(state_dict, backbone, prefix="module."):
    """Every non-fc tensor of a classifier's state dict equals the MoCo backbone's, and nothing is left."""
    non_fc = {key[len(prefix):] for key in state_dict} - FC_KEYS
    assert non_fc == set(backbone)
    for key, value in backbone.items():
        assert torch.equal(state_dict[prefix + key], value), f"{key} differs from the pretrained tensor"


def make_encoder(arch, dim, mlp):
    """A torchvision encoder as MoCo builds it, with BN statistics that no fresh model has."""
    net = torchvision.models.__dict__[arch](num_classes=dim)
    if mlp:
        width = net.fc.weight.shape[1]
        net.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), net.fc)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.num_batches_tracked.fill_(5004)
    return net


def write_released_checkpoint(path, arch="resnet18", mlp=False, dim=16, queue=32, seed=0, with_arch=True):
    """A checkpoint in the format of the released MoCo v1 (plain fc) or v2 (MLP head fc.0/fc.2) models:
    query and key encoders, the queue and its pointer under `module.`; keys epoch, arch, state_dict,
    optimizer only."""
    with torch.random.fork_rng(devices=[]):  # leave the test process's RNG as it was
        torch.manual_seed(seed)
        encoder_q, encoder_k = make_encoder(arch, dim, mlp), make_encoder(arch, dim, mlp)
        queue_tensor = F.normalize(torch.randn(dim, queue), dim=0)
    state_dict = {}
    for name, net in (("encoder_q", encoder_q), ("encoder_k", encoder_k)):
        state_dict.update({f"module.{name}.{key}": value for key, value in net.state_dict().items()})
    state_dict["module.queue"] = queue_tensor
    state_dict["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = torch.optim.SGD(list(encoder_q.parameters()) + list(encoder_k.parameters()), lr=0.03,
                                momentum=0.9, weight_decay=1e-4)
    checkpoint = {"epoch": 200, "state_dict": state_dict, "optimizer": optimizer.state_dict()}
    if with_arch:
        checkpoint["arch"] = arch
    torch.save(checkpoint, path)
    return str(path)


def read_log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------
# Fixtures: checkpoints and runs shared by several tests.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def released_v1(tmp_path_factory):
    return write_released_checkpoint(tmp_path_factory.mktemp("v1") / "moco_v1_200ep_pretrain.pth.tar",
                                     mlp=False, seed=1)


@pytest.fixture(scope="module")
def released_v2(tmp_path_factory):
    return write_released_checkpoint(tmp_path_factory.mktemp("v2") / "moco_v2_200ep_pretrain.pth.tar",
                                     mlp=True, seed=2)


@pytest.fixture(scope="module")
def moco_checkpoint(tmp_path_factory, image_folder):
    """The checkpoint of a one-epoch main_moco.py run."""
    out = tmp_path_factory.mktemp("moco")
    args = main_moco.get_args_parser().parse_args([
        image_folder, "-a", "resnet18", "--crop-size", "32", "-b", "16", "--moco-k", "64", "--moco-dim", "16",
        "--epochs", "1", "-j", "0", "--output-dir", str(out)])
    with contextlib.redirect_stdout(io.StringIO()):
        main_moco.main(args)
    path = out / "checkpoint_0000.pth.tar"
    assert path.is_file()
    return str(path)


@pytest.fixture(scope="module")
def v2_run(tmp_path_factory, image_folder, released_v2):
    """Two epochs of linear classification on the released-format v2 checkpoint, lr dropping after one."""
    out = str(tmp_path_factory.mktemp("lincls_v2"))
    result, stdout = run_lincls([image_folder, *SMALL, "--pretrained", released_v2, "-b", "16",
                                 "--epochs", "2", "--schedule", "1", "--lr", "0.1", "--output-dir", out])
    return {"result": result, "stdout": stdout, "out": out}


@pytest.fixture(scope="module")
def evaluated_one_process(tmp_path_factory, image_folder, v2_run):
    """`-e --resume` of the v2 run's checkpoint in one process, on a copy of the val split alone."""
    root = tmp_path_factory.mktemp("val_only")
    shutil.copytree(os.path.join(image_folder, "val"), root / "val")
    out = root / "out"
    resume_from = os.path.join(v2_run["out"], "checkpoint.pth.tar")
    result, stdout = run_lincls([root, *SMALL, "-e", "--resume", resume_from,
                                 "-b", "16", "--output-dir", out])
    return {"result": result, "stdout": stdout, "out": str(out), "data": str(root)}


# --------------------------------------------------------------------------------------------------
# Flags.
# --------------------------------------------------------------------------------------------------
def _actions(parser):
    return {action.dest: action for action in parser._actions if action.dest != "help"}


def test_flags_follow_spec():
    actions = _actions(main_lincls.get_args_parser())
    expected = {  # dest: (option strings, default, type)
        "arch": (["-a", "--arch"], "resnet50", None),
        "workers": (["-j", "--workers"], 32, int),
        "epochs": (["--epochs"], 100, int),
        "start_epoch": (["--start-epoch"], 0, int),
        "batch_size": (["-b", "--batch-size"], 256, int),
        "lr": (["--lr", "--learning-rate"], 30.0, float),
        "schedule": (["--schedule"], [60, 80], int),
        "momentum": (["--momentum"], 0.9, float),
        "weight_decay": (["--wd", "--weight-decay"], 0.0, float),
        "print_freq": (["-p", "--print-freq"], 10, int),
        "resume": (["--resume"], "", str),
        "world_size": (["--world-size"], -1, int),
        "rank": (["--rank"], -1, int),
        "dist_backend": (["--dist-backend"], "nccl", str),
        "seed": (["--seed"], None, int),
        "gpu": (["--gpu"], None, int),
        "multiprocessing_distributed": (["--multiprocessing-distributed"], False, None),
        "evaluate": (["-e", "--evaluate"], False, None),
        "pretrained": (["--pretrained"], "", str),
        "crop_size": (["--crop-size"], 224, int),
        "amp": (["--amp"], False, None),
        "channels_last": (["--channels-last"], False, None),
    }
    for dest, (options, default, kind) in expected.items():
        action = actions[dest]
        assert action.option_strings == options, dest
        assert action.default == default, dest
        assert action.type is kind, dest
    assert actions["schedule"].nargs == "*"
    for dest in ("multiprocessing_distributed", "evaluate", "amp", "channels_last"):
        assert actions[dest].nargs == 0 and actions[dest].const is True  # store_true
    assert "resnet18" in actions["arch"].choices and "resnet50" in actions["arch"].choices
    assert actions["output_dir"].option_strings == ["--output-dir"]
    assert actions["dist_url"].option_strings == ["--dist-url"]

    args = parse(["DIR", "--learning-rate", "1.5", "--weight-decay", "1e-5", "--schedule", "3", "7", "-e",
                  "--pretrained", "p.pth", "--crop-size", "32", "--output-dir", "o", "--amp",
                  "--channels-last"])
    assert (args.data, args.lr, args.weight_decay, args.schedule) == ("DIR", 1.5, 1e-5, [3, 7])
    assert (args.evaluate, args.pretrained, args.crop_size, args.output_dir) == (True, "p.pth", 32, "o")
    assert args.amp and args.channels_last
    assert parse(["DIR", "--schedule"]).schedule == []


def test_launch_flags_match_main_moco_and_no_moco_flags(capsys):
    """The shared flags are main_moco.py's, with only the reference's four linear-classification defaults differing."""
    moco_actions = _actions(main_moco.get_args_parser())
    lincls_actions = _actions(main_lincls.get_args_parser())
    moco_only = {"moco_dim", "moco_k", "moco_m", "moco_t", "mlp", "aug_plus", "cos",
                 "bn_splits", "symmetric", "fast_aug", "device_decode", "knn_freq", "knn_k", "knn_t"}
    lincls_defaults = {"epochs": 100, "lr": 30.0, "schedule": [60, 80], "weight_decay": 0.0}
    assert set(lincls_actions) == (set(moco_actions) - moco_only) | {"evaluate", "pretrained", "fresh"}
    for dest, theirs in moco_actions.items():
        if dest in moco_only:
            continue
        ours = lincls_actions[dest]
        assert (ours.option_strings, ours.type, ours.nargs, ours.choices) == \
            (theirs.option_strings, theirs.type, theirs.nargs, theirs.choices), dest
        assert ours.default == lincls_defaults.get(dest, theirs.default), dest
    for flag in (["--moco-dim", "16"], ["--moco-k", "64"], ["--moco-m", "0.9"], ["--moco-t", "0.2"],
                 ["--mlp"], ["--aug-plus"], ["--cos"]):
        with pytest.raises(SystemExit) as exc:
            parse(["DIR", *flag])
        assert exc.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_launch_modes(monkeypatch):
    """Plain runs, torchrun and SLURM are planned from main_lincls's flags as for main_moco.py."""
    for key in list(os.environ):
        if key in LAUNCH_ENV or key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    args = parse(["DIR"])
    if not torch.cuda.is_available():  # no GPU: one process here; spawning one per GPU is refused
        assert plan_launch(args).mode == "single"
        with pytest.raises(UserError, match="--multiprocessing-distributed"):
            plan_launch(parse(["DIR", "--multiprocessing-distributed"]))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "localhost")  # torchrun sets these beside RANK and WORLD_SIZE
    monkeypatch.setenv("MASTER_PORT", "29500")
    plan = plan_launch(args)
    assert (plan.mode, plan.world_size, plan.procs_per_node, plan.rank, plan.init_method) == \
        ("torchrun", 2, 2, 1, "env://")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # a task started by srun
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    monkeypatch.setenv("MASTER_PORT", "29555")
    plan = plan_launch(args)
    assert (plan.mode, plan.world_size, plan.procs_per_node, plan.rank, plan.local_rank) == \
        ("slurm", 4, 2, 3, 1)
    assert plan.init_method == "tcp://gpu07:29555"


def test_val_transform_resizes_by_crop_ratio(tmp_path):
    """--crop-size N: validation resizes the short side to round(N / 0.875), then centre-crops N."""
    image = Image.new("RGB", (48, 40))
    image.putdata([((7 * i) % 256, (3 * i) % 256, (11 * i) % 256) for i in range(48 * 40)])
    expected = TF.normalize(TF.to_tensor(TF.center_crop(TF.resize(image, 37), 32)),
                            [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    got = main_lincls.linear_val_transform(32)(image)
    assert got.shape == (3, 32, 32)
    assert torch.allclose(got, expected)
    big = main_lincls.linear_val_transform(224)(image)
    assert big.shape == (3, 224, 224)


# --------------------------------------------------------------------------------------------------
# The model: loading MoCo weights, the frozen backbone, the fc initialisation.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["released_v1", "released_v2", "moco_checkpoint"])
def test_load_pretrained_takes_encoder_q(request, source):
    path = request.getfixturevalue(source)
    checkpoint = load(path)
    backbone = encoder_q_backbone(checkpoint)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    fc_before = model.fc.weight.clone()
    returned = main_lincls.load_pretrained(model, path, "resnet18")
    assert set(returned) == set(backbone)
    assert_backbone_equals(model.state_dict(), backbone, prefix="")
    assert torch.equal(model.fc.weight, fc_before)  # the MoCo head is not loaded into fc
    # the key encoder differs, so this also shows which encoder was taken
    key_encoder = {k[len("module.encoder_k."):]: v for k, v in checkpoint["state_dict"].items()
                   if k.startswith("module.encoder_k.") and ".fc" not in k and "weight" in k}
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in key_encoder.items())


def test_build_classifier_freezes_all_but_fc(released_v2, image_folder):
    args = parse([image_folder, "-a", "resnet18", "--pretrained", released_v2])
    model, backbone = main_lincls.build_classifier(args, 1000, torch.device("cpu"))
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == FC_KEYS
    assert torch.count_nonzero(model.fc.bias) == 0
    weight = model.fc.weight.detach()
    assert abs(weight.mean().item()) < 1e-3
    assert weight.std().item() == pytest.approx(0.01, rel=0.02)  # 512k draws of N(0, 0.01)
    assert_backbone_equals(model.state_dict(), encoder_q_backbone(load(released_v2)), prefix="")
    assert set(backbone) == set(model.state_dict()) - FC_KEYS


# --------------------------------------------------------------------------------------------------
# The sanity check.
# --------------------------------------------------------------------------------------------------
def _classifier_state(backbone, prefix="module."):
    state = {prefix + key: value.clone() for key, value in backbone.items()}
    state[prefix + "fc.weight"] = torch.randn(NUM_CLASSES, 512)
    state[prefix + "fc.bias"] = torch.randn(NUM_CLASSES)
    return state


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_sanity_check_passes_unchanged_backbone(released_v2, prefix):
    checkpoint = load(released_v2)
    backbone = main_lincls.backbone_from_moco(checkpoint, released_v2)
    state = _classifier_state(backbone, prefix)
    state[prefix + "fc.weight"] += 1.0  # fc is the trained part: its changes are expected
    main_lincls.sanity_check(state, backbone)


@pytest.mark.parametrize("changed", ["layer3.1.conv2.weight", "layer2.0.bn1.running_mean",
                                     "bn1.num_batches_tracked"])
def test_sanity_check_catches_changed_backbone(released_v2, changed):
    checkpoint = load(released_v2)
    backbone = main_lincls.backbone_from_moco(checkpoint, released_v2)
    state = _classifier_state(backbone)
    state["module." + changed] = state["module." + changed] + 1
    with pytest.raises(UserError, match=re.escape(f"'{changed}'")) as exc:
        main_lincls.sanity_check(state, backbone)
    assert "sanity check failed" in str(exc.value)


# --------------------------------------------------------------------------------------------------
# Linear runs.
# --------------------------------------------------------------------------------------------------
def test_linear_run_on_released_checkpoint(v2_run, released_v2):
    out, stdout, result = v2_run["out"], v2_run["stdout"], v2_run["result"]
    checkpoint = load(os.path.join(out, "checkpoint.pth.tar"))
    # the reference's entries, and `run`: the flags that tell a rerun of this run from another run
    assert set(checkpoint) == {"epoch", "arch", "state_dict", "best_acc1", "optimizer", "run"}
    assert checkpoint["run"]["pretrained"] == os.path.realpath(released_v2)
    assert (checkpoint["epoch"], checkpoint["arch"]) == (2, "resnet18")

    # frozen backbone, BN statistics and counters included: training ran in eval() mode
    assert_backbone_equals(checkpoint["state_dict"], encoder_q_backbone(load(released_v2)))
    assert checkpoint["state_dict"]["module.fc.weight"].shape == (NUM_CLASSES, 512)
    assert torch.count_nonzero(checkpoint["state_dict"]["module.fc.bias"]) > 0  # fc trained from 0

    # exactly fc.weight and fc.bias in the optimizer: SGD momentum 0.9, wd 0, step schedule
    optimizer = checkpoint["optimizer"]
    assert len(optimizer["param_groups"]) == 1
    group = optimizer["param_groups"][0]
    assert len(group["params"]) == 2
    assert (group["momentum"], group["weight_decay"]) == (0.9, 0.0)
    assert group["lr"] == pytest.approx(0.01)
    shapes = sorted(tuple(s["momentum_buffer"].shape) for s in optimizer["state"].values())
    assert shapes == [(NUM_CLASSES,), (NUM_CLASSES, 512)]

    log = read_log(out)
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert [entry["lr"] for entry in log] == pytest.approx([0.1, 0.01])
    for entry in log:
        for key in ("train_loss", "train_acc1", "val_acc1", "val_acc5", "best_acc1"):
            assert isinstance(entry[key], float), key
    assert [entry["best_acc1"] for entry in log] == [log[0]["val_acc1"], max(e["val_acc1"] for e in log)]
    best = log[-1]["best_acc1"]
    assert checkpoint["best_acc1"] == best == result["best_acc1"]
    best_path = os.path.join(out, "model_best.pth.tar")
    if best > 0:  # model_best.pth.tar is the checkpoint of the first epoch reaching the best top-1
        best_checkpoint = load(best_path)
        first_best = next(e["epoch"] for e in log if e["val_acc1"] == best)
        assert (best_checkpoint["epoch"], best_checkpoint["best_acc1"]) == (first_best + 1, best)

    # meter lines, one validation summary per epoch counting all 15 images, the final summary
    assert re.search(r"^Epoch: \[0\]\[0/3\]\tTime .*Loss .*Acc@1 .*Acc@5 .*LR 0\.1$", stdout, re.MULTILINE)
    assert re.search(r"^Epoch: \[1\]\[0/3\]\t.*LR 0\.01$", stdout, re.MULTILINE)
    summaries = SUMMARY.findall(stdout)
    assert [(float(a1), float(a5), int(n)) for a1, a5, n in summaries] == \
        [(round(e["val_acc1"], 3), round(e["val_acc5"], 3), NUM_VAL) for e in log]
    assert f"=> best top-1 {best:.3f}" in stdout.strip().splitlines()[-1]


def test_resume_restores_epoch_and_best_acc1(tmp_path, v2_run, released_v2, image_folder):
    """A best_acc1 of 100 that no epoch can beat must survive the resumed epoch."""
    checkpoint = load(os.path.join(v2_run["out"], "checkpoint.pth.tar"))
    checkpoint["best_acc1"] = 100.0
    resume_from = tmp_path / "resume_me.pth.tar"
    torch.save(checkpoint, resume_from)
    out = tmp_path / "resumed"
    result, stdout = run_lincls([image_folder, *SMALL, "--pretrained", released_v2, "--resume", resume_from,
                                 "-b", "16", "--epochs", "3", "--schedule", "1", "--lr", "0.1",
                                 "--channels-last", "--output-dir", out])
    assert result["best_acc1"] == 100.0
    log = read_log(out)
    assert len(log) == 1 and log[0]["epoch"] == 2  # epochs 0 and 1 were done
    assert log[0]["lr"] == pytest.approx(0.01) and log[0]["best_acc1"] == 100.0
    assert "Epoch: [2]" in stdout and "Epoch: [0]" not in stdout
    assert not (out / "model_best.pth.tar").exists()  # 100 was not beaten
    resumed = load(out / "checkpoint.pth.tar")
    assert (resumed["epoch"], resumed["best_acc1"]) == (3, 100.0)
    assert_backbone_equals(resumed["state_dict"], encoder_q_backbone(load(released_v2)))


def test_evaluate_only_validates(evaluated_one_process, v2_run):
    """-e --resume reproduces the last validation of the run that wrote the checkpoint, and writes nothing."""
    result, stdout = evaluated_one_process["result"], evaluated_one_process["stdout"]
    last = read_log(v2_run["out"])[-1]
    assert result == {"acc1": last["val_acc1"], "acc5": last["val_acc5"]}
    assert "Epoch:" not in stdout
    assert [int(n) for _, _, n in SUMMARY.findall(stdout)] == [NUM_VAL]
    assert not os.path.exists(evaluated_one_process["out"])  # no checkpoint, no log.txt


def test_two_process_validation_counts_each_image_once(evaluated_one_process, v2_run):
    """torchrun, 2 CPU processes, 15 val images: every image counted once, the same top-1/top-5."""
    proc = run_script([evaluated_one_process["data"], *SMALL, "-e", "-b", "8",
                       "--resume", os.path.join(v2_run["out"], "checkpoint.pth.tar"),
                       "--output-dir", evaluated_one_process["out"] + "_2proc"],
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
                      threads=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    one = evaluated_one_process["result"]
    assert SUMMARY.findall(proc.stdout) == [(f"{one['acc1']:.3f}", f"{one['acc5']:.3f}", str(NUM_VAL))]


def test_two_process_training_with_fewer_val_images_than_processes(tmp_path, released_v2):
    """torchrun, 2 CPU processes: a linear epoch, then validation of one image that only process 0 holds."""
    make_image_folder(tmp_path / "data", classes=1, train_per_class=4, val_per_class=1)
    out = tmp_path / "out"
    proc = run_script([tmp_path / "data", *SMALL, "--pretrained", released_v2, "-b", "4", "--epochs", "1",
                       "--output-dir", out],
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
                      threads=1, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world size 2" in proc.stdout
    assert re.search(r"^Epoch: \[0\]\[0/1\]\t", proc.stdout, re.MULTILINE)  # 4 images, 2 per process
    assert SUMMARY.findall(proc.stdout) == [("100.000", "100.000", "1")]
    checkpoint = load(out / "checkpoint.pth.tar")
    assert checkpoint["epoch"] == 1 and checkpoint["best_acc1"] == 100.0
    assert_backbone_equals(checkpoint["state_dict"], encoder_q_backbone(load(released_v2)))
    assert len(read_log(out)) == 1


def test_pretrained_file_is_read_once_and_hashed_from_the_bytes_loaded(tmp_path, released_v2):
    """--pretrained as a named pipe that yields the checkpoint once: a second read of the file (by a hash
    over it, or by a process loading it again) would wait forever for a writer, and the run time out."""
    import hashlib
    import threading
    make_image_folder(tmp_path / "data", classes=1, train_per_class=4, val_per_class=1)
    data = open(released_v2, "rb").read()
    pipe = tmp_path / "pre.pth.tar"
    os.mkfifo(pipe)

    def write_once():
        with open(pipe, "wb") as f:  # waits for the reader
            f.write(data)
    threading.Thread(target=write_once, daemon=True).start()
    out = tmp_path / "out"
    proc = run_script([tmp_path / "data", *SMALL, "--pretrained", pipe, "-b", "4", "--epochs", "1",
                       "--output-dir", out], threads=1, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = load(out / "checkpoint.pth.tar")
    assert checkpoint["run"]["pretrained_sha256"] == hashlib.sha256(data).hexdigest()
    assert_backbone_equals(checkpoint["state_dict"], encoder_q_backbone(load(released_v2)))
    assert read_log(out)[0]["args"]["pretrained_sha256"] == hashlib.sha256(data).hexdigest()


def test_cli_run_on_main_moco_checkpoint(tmp_path, image_folder, moco_checkpoint):
    """The command of the issue's 'done when', on a CPU machine, with only --output-dir added."""
    out = tmp_path / "out"
    proc = run_script(["-a", "resnet18", "--crop-size", "32", "--pretrained", moco_checkpoint, "-b", "16",
                       "--epochs", "1", "-j", "0", image_folder, "--output-dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    checkpoint = load(out / "checkpoint.pth.tar")
    assert checkpoint["epoch"] == 1
    assert_backbone_equals(checkpoint["state_dict"], encoder_q_backbone(load(moco_checkpoint)))
    log = read_log(out)
    assert len(log) == 1 and log[0]["best_acc1"] == checkpoint["best_acc1"]
    assert f"=> best top-1 {checkpoint['best_acc1']:.3f}" in proc.stdout.strip().splitlines()[-1]
    assert [int(n) for _, _, n in SUMMARY.findall(proc.stdout)] == [NUM_VAL]


# --------------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing written, before any training.
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, image_folder):
    root = tmp_path_factory.mktemp("bad")
    garbage = root / "garbage.pth.tar"
    garbage.write_bytes(b"\x00\x17 these bytes are no checkpoint " * 40)
    not_moco = root / "torchvision.pth.tar"
    torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, not_moco)
    no_val = root / "no_val"
    os.makedirs(no_val / "train" / "class0")
    return {
        "missing": str(root / "nope.pth.tar"),
        "garbage": str(garbage),
        "not_moco": str(not_moco),
        "resnet34": write_released_checkpoint(root / "r34.pth.tar", arch="resnet34"),
        "resnet34_no_arch": write_released_checkpoint(root / "r34_no_arch.pth.tar", arch="resnet34",
                                                      with_arch=False),
        "no_val": str(no_val),
        "no_dir": str(root / "no_such_dir"),
        "data": image_folder,
    }


BAD_CASES = {  # name: (data key, extra flags with {placeholders}, what the message must say)
    "pretrained-missing": ("data", ["--pretrained", "{missing}"], ["does not exist", "nope.pth.tar"]),
    "pretrained-garbage": ("data", ["--pretrained", "{garbage}"], ["not a readable PyTorch checkpoint"]),
    "pretrained-not-moco": ("data", ["--pretrained", "{not_moco}"], ["not a MoCo pre-training checkpoint"]),
    "pretrained-other-arch": ("data", ["--pretrained", "{resnet34}"],
                              ["--arch resnet34", "--arch resnet18"]),
    "pretrained-other-shape": ("data", ["--pretrained", "{resnet34_no_arch}"],
                               ["does not fit --arch resnet18"]),
    "no-val-split": ("no_val", [], ["no 'val' subfolder"]),
    "missing-dir": ("no_dir", [], ["does not exist", "no_such_dir"]),
    "resume-not-lincls": ("data", ["--resume", "{resnet34}"], ["not a linear-classification checkpoint"]),
}


def _bad_argv(bad_inputs, case, out):
    data_key, extra, _ = BAD_CASES[case]
    return [bad_inputs[data_key], *SMALL, "-b", "16", "--epochs", "1", "--output-dir", str(out),
            *[flag.format(**bad_inputs) for flag in extra]]


def _assert_one_error_line(stderr, words):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("main_lincls.py: error: ")
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_with_one_line(case, bad_inputs, tmp_path, capfd):
    """Through run_cli, the `__main__` path of the script, in this process."""
    out = tmp_path / "out"
    args = parse(_bad_argv(bad_inputs, case, out))
    with pytest.raises(SystemExit) as exc:
        run_cli(main_lincls.main, args, prog="main_lincls.py")
    assert exc.value.code == 2
    stdout, stderr = capfd.readouterr()
    _assert_one_error_line(stderr, BAD_CASES[case][2])
    assert stdout == ""
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="--amp is valid with a GPU")
def test_amp_without_gpu_fails_with_one_line(image_folder, tmp_path, capfd):
    args = parse([image_folder, *SMALL, "--amp", "--output-dir", tmp_path / "out"])
    with pytest.raises(SystemExit) as exc:
        run_cli(main_lincls.main, args, prog="main_lincls.py")
    assert exc.value.code == 2
    _assert_one_error_line(capfd.readouterr().err, ["--amp"])


@pytest.mark.parametrize("case", ["pretrained-other-arch"])
def test_bad_input_cli_exit_status(case, bad_inputs, tmp_path):
    """The script itself: exit status 2 and one stderr line, no traceback."""
    out = tmp_path / "out"
    proc = run_script(_bad_argv(bad_inputs, case, out))
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, BAD_CASES[case][2])
    assert proc.stdout == "" and not out.exists()
