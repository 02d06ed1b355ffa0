"""detection/: the checkpoint converter, the configs, and train_net.py."""
import argparse
import ast
import importlib.util
import math
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from moco.checkpoint import capture_rng_state

ROOT = Path(__file__).resolve().parents[1]
DETECTION = ROOT / "detection"
CONVERTER = DETECTION / "convert-pretrain-to-detectron2.py"
CONFIGS = DETECTION / "configs"
PROG = "convert-pretrain-to-detectron2.py"
QUEUE_K = 256  # the real queue is 65536 columns; its size does not matter to the converter


# ---------------------------------------------------------------------------------------------------
# helpers


def _load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _distinct(state, seed):
    """The same keys and shapes with values that differ from tensor to tensor (and from seed to seed)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (key, value) in enumerate(state.items()):
        if value.is_floating_point():
            out[key] = torch.randn(value.shape, generator=gen)
        else:  # num_batches_tracked
            out[key] = torch.full_like(value, 1000 * seed + i)
    return out


def _resnet50_encoder(seed, mlp):
    """A torchvision ResNet-50 state_dict as MoCo builds it: fc projects to 128 (v2: an MLP head)."""
    state = torchvision.models.resnet50(num_classes=128).state_dict()
    if mlp:
        del state["fc.weight"], state["fc.bias"]
        state["fc.0.weight"] = torch.empty(2048, 2048)
        state["fc.0.bias"] = torch.empty(2048)
        state["fc.2.weight"] = torch.empty(128, 2048)
        state["fc.2.bias"] = torch.empty(128)
    return _distinct(state, seed)


def _moco_checkpoint(encoder_q, encoder_k, prefix="module.", extra=None):
    state = {f"{prefix}encoder_q.{k}": v for k, v in encoder_q.items()}
    state.update({f"{prefix}encoder_k.{k}": v for k, v in encoder_k.items()})
    queue = torch.nn.functional.normalize(torch.randn(128, QUEUE_K), dim=0)
    state[f"{prefix}queue"] = queue
    state[f"{prefix}queue_ptr"] = torch.zeros(1, dtype=torch.long)
    checkpoint = {
        "epoch": 200,
        "arch": "resnet50",
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "momentum": 0.9, "params": [0, 1]}]},
    }
    checkpoint.update(extra or {})
    return checkpoint


def _spec_name(key):
    """The upstream renaming, written independently of the converter (plain string replacement)."""
    if "layer" not in key:
        key = "stem." + key
    for i in range(1, 5):
        key = key.replace(f"layer{i}", f"res{i + 1}")
    for i in range(1, 4):
        key = key.replace(f"bn{i}", f"conv{i}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _run_converter(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(CONVERTER), *map(str, args)], cwd=cwd, capture_output=True, text=True,
        timeout=120,
    )


def _read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _assert_refused(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{PROG}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "converted" not in result.stdout


# ---------------------------------------------------------------------------------------------------
# fixtures: each checkpoint is built and saved once


@pytest.fixture(scope="module")
def converter():
    return _load_script(CONVERTER, "convert_pretrain_to_detectron2")


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    q, k = _resnet50_encoder(1, mlp=False), _resnet50_encoder(2, mlp=False)
    path = tmp_path_factory.mktemp("v1") / "moco_v1_200ep_pretrain.pth.tar"
    torch.save(_moco_checkpoint(q, k), path)
    return path, q


@pytest.fixture(scope="module")
def v2_main_moco(tmp_path_factory):
    """A v2 (MLP head) checkpoint as main_moco.py writes it, with its resumption extras."""
    q, k = _resnet50_encoder(3, mlp=True), _resnet50_encoder(4, mlp=True)
    extra = {
        "args": {"arch": "resnet50", "mlp": True, "moco_t": 0.2, "aug_plus": True, "cos": True},
        "rng_states": [capture_rng_state()],
        "data_seed": 0,
        "step_in_epoch": 0,
        "scaler": None,
    }
    path = tmp_path_factory.mktemp("v2") / "checkpoint_0199.pth.tar"
    torch.save(_moco_checkpoint(q, k, extra=extra), path)
    return path, q


# ---------------------------------------------------------------------------------------------------
# the converter: successful conversions


EXPLICIT_NAMES = {
    "stem.conv1.weight": "conv1.weight",
    "stem.conv1.norm.weight": "bn1.weight",
    "stem.conv1.norm.running_var": "bn1.running_var",
    "res2.0.conv1.weight": "layer1.0.conv1.weight",
    "res2.0.conv2.norm.running_mean": "layer1.0.bn2.running_mean",
    "res2.0.shortcut.weight": "layer1.0.downsample.0.weight",
    "res2.0.shortcut.norm.bias": "layer1.0.downsample.1.bias",
    "res3.0.shortcut.norm.running_var": "layer2.0.downsample.1.running_var",
    "res3.3.conv3.weight": "layer2.3.conv3.weight",
    "res4.5.conv2.norm.num_batches_tracked": "layer3.5.bn2.num_batches_tracked",
    "res5.0.shortcut.weight": "layer4.0.downsample.0.weight",
    "res5.2.conv3.norm.weight": "layer4.2.bn3.weight",
}


def test_v1_released_checkpoint_converts(v1, tmp_path):
    src, q = v1
    out = tmp_path / "output.pkl"
    result = _run_converter(src, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"converted 320 tensors from {src} to {out}"

    data = _read_pickle(out)
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["__author__"] == "MOCO"
    assert data["matching_heuristics"] is True
    model = data["model"]
    assert len(model) == 320 == len(q)
    for new, old in {**EXPLICIT_NAMES, "stem.fc.weight": "fc.weight", "stem.fc.bias": "fc.bias"}.items():
        assert isinstance(model[new], np.ndarray), new
        assert model[new].shape == tuple(q[old].shape), new
        np.testing.assert_array_equal(model[new], q[old].numpy(), err_msg=new)
    # Every query-encoder tensor is there under its detectron2 name with its own value; nothing else is.
    assert set(model) == {_spec_name(k) for k in q}
    for key, value in q.items():
        converted = model[_spec_name(key)]
        assert converted.dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(converted, value.numpy(), err_msg=key)
    for name in model:
        for gone in ("module", "encoder", "queue", "layer", "bn", "downsample"):
            assert gone not in name, name
    assert os.listdir(tmp_path) == ["output.pkl"]  # no temporary file left behind


def test_v2_main_moco_checkpoint_converts(converter, v2_main_moco, tmp_path, capsys):
    """main_moco.py's extras (args, RNG states) are plain data that the safe loader reads."""
    src, q = v2_main_moco
    out = tmp_path / "output.pkl"
    assert converter.run_cli(converter.main, [str(src), str(out)], PROG) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"converted 322 tensors from {src} to {out}"
    assert captured.err == ""
    model = _read_pickle(out)["model"]
    assert set(model) == {_spec_name(k) for k in q}
    assert {"stem.fc.0.weight", "stem.fc.0.bias", "stem.fc.2.weight", "stem.fc.2.bias"} <= set(model)
    assert "stem.fc.weight" not in model
    mlp_names = {"stem.fc.0.weight": "fc.0.weight", "stem.fc.2.bias": "fc.2.bias"}
    for new, old in {**EXPLICIT_NAMES, **mlp_names}.items():
        np.testing.assert_array_equal(model[new], q[old].numpy(), err_msg=new)


def test_query_encoder_not_key_encoder(converter, v1):
    """The converted values are encoder_q's, even though encoder_k has the same names and shapes."""
    src, q = v1
    checkpoint = torch.load(src, map_location="cpu", weights_only=True)
    model = converter.convert(checkpoint)["model"]
    k_value = checkpoint["state_dict"]["module.encoder_k.conv1.weight"]
    assert not np.array_equal(model["stem.conv1.weight"], k_value.numpy())
    np.testing.assert_array_equal(model["stem.conv1.weight"], q["conv1.weight"].numpy())


def test_checkpoint_without_module_prefix(converter):
    q = _resnet50_encoder(5, mlp=False)
    checkpoint = _moco_checkpoint(q, q, prefix="")
    model = converter.convert(checkpoint)["model"]
    assert set(model) == {_spec_name(k) for k in q}
    np.testing.assert_array_equal(model["res5.2.conv3.norm.weight"], q["layer4.2.bn3.weight"].numpy())


def test_name_mapping_function(converter):
    for new, old in EXPLICIT_NAMES.items():
        assert converter.detectron2_name(old) == new
    assert converter.detectron2_name("fc.0.weight") == "stem.fc.0.weight"
    assert converter.detectron2_name("fc.2.bias") == "stem.fc.2.bias"
    assert converter.detectron2_name("layer3.1.bn1.bias") == "res4.1.conv1.norm.bias"


def test_existing_output_is_replaced_on_success(converter, v1, tmp_path, capsys):
    src, _ = v1
    out = tmp_path / "output.pkl"
    out.write_bytes(b"old content")
    assert converter.run_cli(converter.main, [str(src), str(out)], PROG) == 0
    assert capsys.readouterr().out.startswith("converted 320 tensors")
    assert len(_read_pickle(out)["model"]) == 320
    assert os.listdir(tmp_path) == ["output.pkl"]


# ---------------------------------------------------------------------------------------------------
# the converter: refusals (one line on stderr, status 2, OUTPUT untouched). A few run the script as a
# command; the rest call its main through run_cli in this process, which is what the command does.


def _mobilenet_checkpoint():
    state = torchvision.models.mobilenet_v3_small(num_classes=128).state_dict()
    return {"epoch": 1, "arch": "mobilenet_v3_small",
            "state_dict": {f"module.encoder_q.{k}": v for k, v in state.items()}}


def _vit_checkpoint_without_arch():
    from torchvision.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                            mlp_dim=16, num_classes=128)
    return {"state_dict": {f"module.encoder_q.{k}": v for k, v in vit.state_dict().items()}}


def _resnet_keys_with_wrong_arch():
    q = torchvision.models.resnet18(num_classes=128).state_dict()
    checkpoint = _moco_checkpoint(q, q)
    checkpoint["arch"] = "vit_b_16"
    return checkpoint


def _lincls_checkpoint():
    state = torchvision.models.resnet18().state_dict()
    return {"epoch": 100, "arch": "resnet18", "best_acc1": 60.0,
            "state_dict": {f"module.{k}": v for k, v in state.items()}, "optimizer": {}}


REFUSED_CHECKPOINTS = {
    "supervised_state_dict": (lambda: torchvision.models.resnet18().state_dict(), ["state_dict"]),
    "linear_classification": (_lincls_checkpoint, ["not a MoCo", "encoder_q"]),
    "mobilenet_encoder": (_mobilenet_checkpoint, ["mobilenet_v3_small", "ResNet"]),
    "vit_encoder_no_arch": (_vit_checkpoint_without_arch, ["not a torchvision ResNet"]),
    "resnet_keys_vit_arch": (_resnet_keys_with_wrong_arch, ["vit_b_16", "ResNet"]),
    "state_dict_not_a_dict": (lambda: {"state_dict": [torch.zeros(3)]}, ["not a dict"]),
    "not_a_dict": (lambda: [torch.zeros(3)], ["not a checkpoint dict"]),
}
AS_COMMAND = {"linear_classification", "mobilenet_encoder"}


def _refuse_in_process(converter, capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        converter.run_cli(converter.main, [str(a) for a in argv], PROG)
    captured = capsys.readouterr()
    _assert_refused(subprocess.CompletedProcess(argv, exit_info.value.code, captured.out, captured.err),
                    *fragments)


@pytest.mark.parametrize("case", sorted(REFUSED_CHECKPOINTS))
def test_refuses_non_moco_or_non_resnet_checkpoint(case, converter, tmp_path, capsys):
    make, fragments = REFUSED_CHECKPOINTS[case]
    src = tmp_path / "input.pth.tar"
    torch.save(make(), src)
    out = tmp_path / "output.pkl"
    out.write_bytes(b"keep me")
    if case in AS_COMMAND:
        _assert_refused(_run_converter(src, out), *fragments)
    else:
        _refuse_in_process(converter, capsys, [src, out], *fragments)
    assert out.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["input.pth.tar", "output.pkl"]


def test_refuses_unreadable_file_as_command(tmp_path):
    src = tmp_path / "input.pth.tar"
    src.write_bytes(b"this is not a checkpoint\n")
    out = tmp_path / "output.pkl"
    _assert_refused(_run_converter(src, out), "not a readable PyTorch checkpoint")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["empty", "zip_header_only", "plain_pickle", "truncated"])
def test_refuses_unreadable_file(kind, converter, v1, tmp_path, capsys):
    src = tmp_path / "input.pth.tar"
    if kind == "plain_pickle":
        src.write_bytes(pickle.dumps({"state_dict": {}}))
    else:
        src.write_bytes({"empty": b"", "zip_header_only": b"PK\x03\x04truncated zip",
                         "truncated": v1[0].read_bytes()[:100000]}[kind])
    out = tmp_path / "output.pkl"
    out.write_bytes(b"keep me")
    _refuse_in_process(converter, capsys, [src, out], "not a readable PyTorch checkpoint")
    assert out.read_bytes() == b"keep me"


def test_refuses_missing_input(converter, tmp_path, capsys):
    out = tmp_path / "output.pkl"
    out.write_bytes(b"keep me")
    _refuse_in_process(converter, capsys, [tmp_path / "nope.pth.tar", out], "does not exist")
    assert out.read_bytes() == b"keep me"


def test_refuses_wrong_number_of_arguments_as_command():
    _assert_refused(_run_converter(), "usage")


@pytest.mark.parametrize("argv", [["only-one.pth.tar"], ["a", "b", "c"]])
def test_refuses_wrong_number_of_arguments(argv, converter, capsys):
    _refuse_in_process(converter, capsys, argv, "expected 2 arguments", "usage")


def test_refuses_bad_output(converter, tmp_path, capsys):
    """Output folder missing, output = input, output a folder: refused, input untouched."""
    q = torchvision.models.resnet18(num_classes=128).state_dict()
    src = tmp_path / "in.pth.tar"
    torch.save(_moco_checkpoint(q, q), src)
    for out, fragment in [
        (tmp_path / "missing" / "out.pkl", "does not exist"),
        (src, "input checkpoint itself"),
        (tmp_path, "is a folder"),
    ]:
        _refuse_in_process(converter, capsys, [src, out], fragment)
    assert torch.load(src, weights_only=True)["arch"] == "resnet50"
    assert os.listdir(tmp_path) == ["in.pth.tar"]


def test_resnet18_converts(converter):
    """Any torchvision ResNet converts; ResNet-18 has no conv3/shortcut in every block."""
    q = _distinct(torchvision.models.resnet18(num_classes=128).state_dict(), 7)
    checkpoint = _moco_checkpoint(q, q)
    checkpoint["arch"] = "resnet18"
    model = converter.convert(checkpoint)["model"]
    assert set(model) == {_spec_name(k) for k in q}
    np.testing.assert_array_equal(model["res3.0.shortcut.norm.bias"], q["layer2.0.downsample.1.bias"].numpy())


def _resnet18_checkpoint_with(name, value, index=(0, 0, 0, 0)):
    """A ResNet-18 MoCo checkpoint whose query-encoder tensor `name` holds `value` at `index`."""
    q = _distinct(torchvision.models.resnet18(num_classes=128).state_dict(), 9)
    q[name][index] = value
    checkpoint = _moco_checkpoint(q, _distinct(q, 10))
    checkpoint["arch"] = "resnet18"
    return checkpoint


def test_refuses_nan_weights_as_command(tmp_path):
    """A diverged pre-training (NaN weights) is refused by name, not passed on to detectron2."""
    src = tmp_path / "input.pth.tar"
    torch.save(_resnet18_checkpoint_with("layer3.1.conv2.weight", float("nan")), src)
    out = tmp_path / "output.pkl"
    _assert_refused(_run_converter(src, out), "'layer3.1.conv2.weight'", "NaN or infinite", "1 ")
    assert sorted(os.listdir(tmp_path)) == ["input.pth.tar"]  # no output, no temporary file


@pytest.mark.parametrize("name,value,index", [
    ("bn1.running_var", float("inf"), (5,)),
    ("layer4.1.bn2.bias", -float("inf"), (0,)),
    ("fc.weight", float("nan"), (3, 7)),  # the projection head: unused, but its run diverged
])
def test_refuses_non_finite_weights(name, value, index, converter, tmp_path, capsys):
    src = tmp_path / "input.pth.tar"
    torch.save(_resnet18_checkpoint_with(name, value, index), src)
    out = tmp_path / "output.pkl"
    out.write_bytes(b"keep me")
    _refuse_in_process(converter, capsys, [src, out], f"encoder tensor {name!r}", "NaN or infinite")
    assert out.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["input.pth.tar", "output.pkl"]


def test_non_finite_key_encoder_is_not_refused(converter):
    """Only what is converted is checked: NaN in encoder_k (dropped) does not block a good encoder_q."""
    q = _distinct(torchvision.models.resnet18(num_classes=128).state_dict(), 11)
    k = _distinct(q, 12)
    k["conv1.weight"][0, 0, 0, 0] = float("nan")
    checkpoint = _moco_checkpoint(q, k)
    checkpoint["arch"] = "resnet18"
    model = converter.convert(checkpoint)["model"]
    np.testing.assert_array_equal(model["stem.conv1.weight"], q["conv1.weight"].numpy())


# ---------------------------------------------------------------------------------------------------
# configs: a small reader for the YAML subset they use, with yacs's value decoding


def _parse_yaml(path):
    """Nested block mappings of `KEY: value`; values decoded as detectron2's yacs does (literal_eval)."""
    root = {}
    stack = [(-1, root)]
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, sep, value = line.strip().partition(":")
        assert sep and key and " " not in key, f"{path}: cannot read {raw!r}"
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        assert key not in parent, f"{path}: {key} given twice"
        value = value.strip()
        if not value:
            parent[key] = {}
            stack.append((indent, parent[key]))
            continue
        try:
            parent[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parent[key] = value
    return root


def _merge(base, update):
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def _load_config(name):
    cfg = _parse_yaml(CONFIGS / name)
    base = cfg.pop("_BASE_", None)
    return _merge(_load_config(base), cfg) if base else cfg


def _flat(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


BASE_VALUES = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.NORM": "naiveSyncBN",
    "TEST.PRECISE_BN.ENABLED": True,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
}
VOC_VALUES = {
    **BASE_VALUES,
    "MODEL.MASK_ON": False,
    "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    "MODEL.ROI_HEADS.NUM_CLASSES": 20,
    "INPUT.MIN_SIZE_TRAIN": tuple(range(480, 801, 32)),
    "INPUT.MIN_SIZE_TEST": 800,
    "DATASETS.TRAIN": ("voc_2007_trainval", "voc_2012_trainval"),
    "DATASETS.TEST": ("voc_2007_test",),
    "SOLVER.STEPS": (18000, 22000),
    "SOLVER.MAX_ITER": 24000,
    "SOLVER.WARMUP_ITERS": 100,
}
COCO_VALUES = {
    **BASE_VALUES,
    "MODEL.MASK_ON": True,
    "MODEL.WEIGHTS": "detectron2://ImageNetPretrained/MSRA/R-50.pkl",
    "INPUT.MIN_SIZE_TRAIN": tuple(range(640, 801, 32)),
    "INPUT.MIN_SIZE_TEST": 800,
    "DATASETS.TRAIN": ("coco_2017_train",),
    "DATASETS.TEST": ("coco_2017_val",),
    "SOLVER.STEPS": (120000, 160000),
    "SOLVER.MAX_ITER": 180000,
}
MOCO_VALUES = {
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "MODEL.WEIGHTS": "See Instructions",
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "INPUT.FORMAT": "RGB",
}
EXPECTED_CONFIGS = {
    "Base-RCNN-C4-BN.yaml": (None, BASE_VALUES),
    "pascal_voc_R_50_C4_24k.yaml": ("Base-RCNN-C4-BN.yaml", VOC_VALUES),
    "pascal_voc_R_50_C4_24k_moco.yaml": ("pascal_voc_R_50_C4_24k.yaml", {**VOC_VALUES, **MOCO_VALUES}),
    "coco_R_50_C4_2x.yaml": ("Base-RCNN-C4-BN.yaml", COCO_VALUES),
    "coco_R_50_C4_2x_moco.yaml": ("coco_R_50_C4_2x.yaml", {**COCO_VALUES, **MOCO_VALUES}),
}


def test_exactly_the_five_configs():
    assert sorted(p.name for p in CONFIGS.iterdir()) == sorted(EXPECTED_CONFIGS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_config_values(name):
    base, expected = EXPECTED_CONFIGS[name]
    assert _parse_yaml(CONFIGS / name).get("_BASE_") == base
    # The merged config holds exactly the upstream values: none missing, none extra, none different.
    assert _flat(_load_config(name)) == expected


def test_config_reader(tmp_path):
    """The reader above decodes the forms the configs use the way yacs does."""
    path = tmp_path / "probe.yaml"
    path.write_text('A:\n  B: (1, 2)\n  C: "x"  # note\n  D: [1.5, 2]\nE: False\nF: naiveSyncBN\n')
    assert _parse_yaml(path) == {"A": {"B": (1, 2), "C": "x", "D": [1.5, 2]}, "E": False, "F": "naiveSyncBN"}


def test_configs_parse_with_pyyaml_when_available():
    yaml = pytest.importorskip(
        "yaml", reason="PyYAML is not installed; the hand-written reader covers the configs"
    )
    for name in EXPECTED_CONFIGS:
        loaded = yaml.safe_load((CONFIGS / name).read_text())
        assert _flat(loaded).keys() == _flat(_parse_yaml(CONFIGS / name)).keys()


# ---------------------------------------------------------------------------------------------------
# train_net.py without detectron2: its logic against a minimal stand-in for the detectron2 API


def test_detectron2_imported_only_by_train_net_and_smoke_test():
    """Only the scripts that need detectron2 import it (smoke_test.py inside functions: it loads without)."""
    importing = re.compile(r"^\s*(import|from)\s+detectron2\b", re.MULTILINE)
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for name in files:
            path = Path(folder, name)
            if name.endswith(".py") and importing.search(path.read_text(errors="replace")):
                found.append(path.relative_to(ROOT).as_posix())
    found = [f for f in found if f != "tests/test_detection.py"]  # this file names it only in strings
    assert sorted(found) == ["detection/smoke_test.py", "detection/train_net.py"]


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *call):
        self.calls.append(call)


def _fake_detectron2(record, plain_parent):
    """Modules with the names train_net.py imports, standing in for detectron2's."""
    class Registry:
        def __init__(self):
            self.entries = {}

        def register(self):
            def add(cls):
                self.entries[cls.__name__] = cls
                return cls
            return add

    def res5(cfg):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.Conv2d(16, 32, 1)), 32

    if plain_parent:  # detectron2 releases before Res5ROIHeads became configurable
        class Res5ROIHeads:
            def _build_res5_block(self, cfg):
                assert isinstance(self, Res5ROIHeads) or issubclass(self, Res5ROIHeads)
                return res5(cfg)
    else:
        class Res5ROIHeads:
            @classmethod
            def _build_res5_block(cls, cfg):
                return res5(cfg)

    def get_norm(kind, channels):
        record("get_norm", kind, channels)
        return torch.nn.BatchNorm2d(channels)

    class COCOEvaluator:
        def __init__(self, dataset_name, tasks=None, distributed=True, output_dir=None):
            self.dataset_name, self.output_dir = dataset_name, output_dir

    class PascalVOCDetectionEvaluator:
        def __init__(self, dataset_name):
            self.dataset_name = dataset_name

    class DefaultTrainer:
        def __init__(self, cfg):
            record("Trainer", cfg)

        @classmethod
        def build_model(cls, cfg):
            return "model"

        @classmethod
        def test(cls, cfg, model, evaluators=None):
            record("test", model)
            return {"bbox": {"AP50": 1.0}}

        def resume_or_load(self, resume=True):
            record("trainer.resume_or_load", resume)

        def train(self):
            record("train")
            return "trained"

    class DetectionCheckpointer:
        def __init__(self, model, save_dir=""):
            record("DetectionCheckpointer", model, save_dir)

        def resume_or_load(self, path, *, resume=True):
            record("checkpointer.resume_or_load", path, resume)

    class Cfg:
        def __init__(self):
            self.MODEL = types.SimpleNamespace(WEIGHTS="", RESNETS=types.SimpleNamespace(NORM="naiveSyncBN"))
            self.OUTPUT_DIR = "out"

        def merge_from_file(self, path):
            record("merge_from_file", path)
            if path.endswith("_moco.yaml"):
                self.MODEL.WEIGHTS = "See Instructions"

        def merge_from_list(self, opts):
            record("merge_from_list", list(opts))
            for key, value in zip(opts[::2], opts[1::2]):
                if key == "MODEL.WEIGHTS":
                    self.MODEL.WEIGHTS = value
                if key == "OUTPUT_DIR":
                    self.OUTPUT_DIR = value

        def freeze(self):
            record("freeze")

    modules = {
        "detectron2": {},
        "detectron2.checkpoint": {"DetectionCheckpointer": DetectionCheckpointer},
        "detectron2.config": {"get_cfg": Cfg},
        "detectron2.engine": {
            "DefaultTrainer": DefaultTrainer,
            "default_argument_parser": lambda: None,
            "default_setup": lambda cfg, args: record("default_setup"),
            "launch": lambda *a, **k: None,
        },
        "detectron2.evaluation": {
            "COCOEvaluator": COCOEvaluator, "PascalVOCDetectionEvaluator": PascalVOCDetectionEvaluator,
        },
        "detectron2.layers": {"get_norm": get_norm},
        "detectron2.modeling": {},
        "detectron2.modeling.roi_heads": {"ROI_HEADS_REGISTRY": Registry(), "Res5ROIHeads": Res5ROIHeads},
    }
    out = {}
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        out[name] = module
    return out


@pytest.fixture(params=["classmethod_parent", "plain_parent"])
def train_net(request, monkeypatch):
    record = _Recorder()
    for name, module in _fake_detectron2(record, request.param == "plain_parent").items():
        monkeypatch.setitem(sys.modules, name, module)
    module = _load_script(DETECTION / "train_net.py", "train_net_under_test")
    module.record = record
    return module


def _cfg(norm="naiveSyncBN"):
    return types.SimpleNamespace(MODEL=types.SimpleNamespace(RESNETS=types.SimpleNamespace(NORM=norm)),
                                 OUTPUT_DIR="out")


def test_train_net_registers_res5_head_with_extra_norm(train_net):
    registry = sys.modules["detectron2.modeling.roi_heads"].ROI_HEADS_REGISTRY
    head = registry.entries["Res5ROIHeadsExtraNorm"]
    assert head is train_net.Res5ROIHeadsExtraNorm
    assert issubclass(head, sys.modules["detectron2.modeling.roi_heads"].Res5ROIHeads)
    for build in (head._build_res5_block, head.__new__(head)._build_res5_block):
        train_net.record.calls.clear()
        res5, channels = build(_cfg("SyncBN"))
        assert channels == 32
        names = [name for name, _ in res5.named_children()]
        assert names == ["0", "1", "norm"]
        assert isinstance(res5.norm, torch.nn.BatchNorm2d) and res5.norm.num_features == 32
        assert train_net.record.calls == [("get_norm", "SyncBN", 32)]


def test_train_net_evaluator_follows_dataset_name(train_net):
    evaluation = sys.modules["detectron2.evaluation"]
    coco = train_net.Trainer.build_evaluator(_cfg(), "coco_2017_val")
    assert isinstance(coco, evaluation.COCOEvaluator)
    assert coco.output_dir == os.path.join("out", "inference")
    assert coco.dataset_name == "coco_2017_val"
    voc = train_net.Trainer.build_evaluator(_cfg(), "voc_2007_test")
    assert isinstance(voc, evaluation.PascalVOCDetectionEvaluator)
    assert voc.dataset_name == "voc_2007_test"
    assert train_net.Trainer.build_evaluator(_cfg(), "coco_2017_val", "elsewhere").output_dir == "elsewhere"
    with pytest.raises(ValueError, match="cityscapes"):
        train_net.Trainer.build_evaluator(_cfg(), "cityscapes_fine_instance_seg_val")
    assert issubclass(train_net.Trainer, sys.modules["detectron2.engine"].DefaultTrainer)


def _args(eval_only=False, resume=False, opts=("MODEL.WEIGHTS", "./output.pkl")):
    return argparse.Namespace(config_file="configs/pascal_voc_R_50_C4_24k_moco.yaml", eval_only=eval_only,
                              resume=resume, opts=list(opts), num_gpus=1)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder holding ./output.pkl (the converted weights the commands name)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output.pkl").write_bytes(b"weights")
    return tmp_path


def test_train_net_main_trains(train_net, in_tmp):
    for resume in (False, True):
        train_net.record.calls.clear()
        assert train_net.main(_args(resume=resume)) == "trained"
        names = [call[0] for call in train_net.record.calls]
        assert names == ["merge_from_file", "merge_from_list", "freeze", "default_setup", "Trainer",
                         "trainer.resume_or_load", "train"]
        assert train_net.record.calls[0] == ("merge_from_file", "configs/pascal_voc_R_50_C4_24k_moco.yaml")
        assert train_net.record.calls[1] == ("merge_from_list", ["MODEL.WEIGHTS", "./output.pkl"])
        assert ("trainer.resume_or_load", resume) in train_net.record.calls


def test_train_net_main_eval_only(train_net, in_tmp):
    for resume in (False, True):
        train_net.record.calls.clear()
        assert train_net.main(_args(eval_only=True, resume=resume)) == {"bbox": {"AP50": 1.0}}
        calls = train_net.record.calls
        assert ("checkpointer.resume_or_load", "./output.pkl", resume) in calls
        assert ("DetectionCheckpointer", "model", "out") in calls
        assert calls[-1] == ("test", "model")
        assert "train" not in [call[0] for call in calls]


def _refused(train_net, args, *fragments):
    """main(args) stops with one UserError line naming `fragments`, before any setup or model."""
    train_net.record.calls.clear()
    with pytest.raises(train_net.UserError) as error:
        train_net.main(args)
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    names = [call[0] for call in train_net.record.calls]
    assert names == ["merge_from_file", "merge_from_list", "freeze"], names  # nothing set up or built
    return message


def test_train_net_requires_weights_for_moco_configs(train_net, in_tmp):
    _refused(train_net, _args(opts=()), "MODEL.WEIGHTS is not set", "convert-pretrain-to-detectron2.py")
    _refused(train_net, _args(eval_only=True, opts=()), "MODEL.WEIGHTS is not set")


def test_train_net_resume_in_fresh_output_dir(train_net, in_tmp):
    """--resume with nothing to resume: detectron2 would assert 'Checkpoint See Instructions not found!'."""
    for eval_only in (False, True):
        message = _refused(train_net, _args(eval_only=eval_only, resume=True, opts=("OUTPUT_DIR", "fresh")),
                           "--resume", "'fresh'", "no checkpoint to resume", "MODEL.WEIGHTS")
        assert "See Instructions" not in message
        assert not (in_tmp / "fresh").exists()
    # With weights given, a fresh OUTPUT_DIR starts a new run from them (detectron2's behaviour).
    train_net.record.calls.clear()
    assert train_net.main(_args(resume=True)) == "trained"


def test_train_net_resume_from_last_checkpoint(train_net, in_tmp):
    (in_tmp / "out").mkdir()
    (in_tmp / "out" / "model_0000019.pth").write_bytes(b"checkpoint")
    (in_tmp / "out" / "last_checkpoint").write_text("model_0000019.pth")
    cfg = types.SimpleNamespace(OUTPUT_DIR="out", MODEL=types.SimpleNamespace(WEIGHTS="See Instructions"))
    assert train_net.weights_to_load(cfg, resume=True) == os.path.join("out", "model_0000019.pth")
    train_net.record.calls.clear()
    assert train_net.main(_args(resume=True, opts=())) == "trained"
    # The checkpoint that last_checkpoint names is gone: say which, instead of an assertion.
    (in_tmp / "out" / "model_0000019.pth").unlink()
    _refused(train_net, _args(resume=True, opts=()), "last_checkpoint", "'model_0000019.pth'", "not in 'out'")


def test_train_net_refuses_missing_weights_file(train_net, in_tmp):
    _refused(train_net, _args(opts=("MODEL.WEIGHTS", "./nope.pkl")), "MODEL.WEIGHTS './nope.pkl' does not exist")
    _refused(train_net, _args(opts=("MODEL.WEIGHTS", str(in_tmp))), "is not a file")
    cfg = types.SimpleNamespace(OUTPUT_DIR="out", MODEL=types.SimpleNamespace(WEIGHTS=""))
    assert train_net.weights_to_load(cfg, resume=False) == ""  # no weights: detectron2's initialisation
    cfg.MODEL.WEIGHTS = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"  # fetched by detectron2
    assert train_net.weights_to_load(cfg, resume=True) == cfg.MODEL.WEIGHTS


# ---------------------------------------------------------------------------------------------------
# with detectron2 (built from source as in detection/README.md): smoke_test.py's runs of the five configs
# on the CPU. Without detectron2 (CI) they skip at once.


def _detectron2_missing():
    """Why the detectron2 tests skip, or None when detectron2 is installed.

    Only a missing package skips: an installed detectron2 that fails to import is a failure to see.
    """
    try:
        import detectron2  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name != "detectron2":
            raise
        return "detectron2 is not installed (not on PyPI; build it from source as in detection/README.md)"
    return None


DETECTRON2_MISSING = _detectron2_missing()
needs_detectron2 = pytest.mark.skipif(DETECTRON2_MISSING is not None, reason=str(DETECTRON2_MISSING))
SMOKE = DETECTION / "smoke_test.py"
SMOKE_ITERS = 20
# --eval-only of the trained model is checked on one config (it costs a minute on a CPU).
EVAL_ONLY = {"pascal_voc_R_50_C4_24k_moco.yaml"}
# Converted tensors the detector holds: all but the projection head (stem.fc.*).
LOADED = {"main_moco": 322 - 4, "released": 320 - 2}
# The evaluations each config's test set gives: VOC boxes, COCO boxes (and masks where MASK_ON).
TASKS = {
    "pascal_voc_R_50_C4_24k_moco.yaml": {"bbox"},
    "pascal_voc_R_50_C4_24k.yaml": {"bbox"},
    "coco_R_50_C4_2x_moco.yaml": {"bbox", "segm"},
    "coco_R_50_C4_2x.yaml": {"bbox", "segm"},
    "Base-RCNN-C4-BN.yaml": {"bbox"},
}


@pytest.fixture(scope="module")
def smoke():
    return _load_script(SMOKE, "detection_smoke_test")


@pytest.fixture(scope="module")
def d2_work(smoke, tmp_path_factory):
    """A one-epoch main_moco.py ResNet-50 checkpoint, a released-format one, both converted; VOC and COCO
    data sets in detectron2's layout."""
    return smoke.prepare(tmp_path_factory.mktemp("d2"))


def _run_smoke(*args):
    return subprocess.run([sys.executable, str(SMOKE), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_smoke_test_refuses_unknown_config():
    result = _run_smoke("--configs", "mask_rcnn_R_50_FPN_3x.yaml")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smoke_test.py: error: unknown config"), result.stderr
    assert "pascal_voc_R_50_C4_24k_moco.yaml" in lines[0]


@pytest.mark.skipif(DETECTRON2_MISSING is None, reason="detectron2 is installed")
def test_smoke_test_says_detectron2_is_missing():
    result = _run_smoke()
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "smoke_test.py: error: detectron2 is not importable (No module named 'detectron2'); "
        "build it as in detection/README.md"
    )


def test_smoke_test_configs_are_the_five():
    smoke = _load_script(SMOKE, "detection_smoke_test_configs")
    assert sorted(smoke.RUNS) == sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(TASKS)
    assert {kind for kind, _ in smoke.RUNS.values()} == {"main_moco", "released"}
    assert {data for _, data in smoke.RUNS.values()} == {"voc", "coco"}


def test_smoke_check_results_requires_finite_ap():
    """NaN (COCO's "nothing to evaluate"), a missing metric or an empty evaluation is not a result."""
    smoke = _load_script(SMOKE, "detection_smoke_test_checks")
    smoke.check_results({"bbox": {"AP": 0.0, "AP50": 0.0, "AP75": 0.0},
                         "segm": {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "APs": float("nan")}}, "ok")
    for results, fragment in [
        ({"bbox": {"AP": float("nan"), "AP50": 1.0, "AP75": 1.0}}, "bbox AP is nan"),
        ({"bbox": {"AP": 1.0, "AP50": float("inf"), "AP75": 1.0}}, "bbox AP50 is inf"),
        ({"bbox": {"AP": 1.0, "AP50": 1.0}}, "bbox AP75 is None"),
        ({"bbox": {"AP": 1.0, "AP50": 1.0, "AP75": 100.5}}, "bbox AP75 is 100.5"),
        ({"bbox": {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}, "segm": {"AP": -1.0, "AP50": 1.0, "AP75": 1.0}},
         "segm AP is -1.0"),
        ({}, "no results"),
    ]:
        with pytest.raises(smoke.UserError, match=re.escape(fragment)):
            smoke.check_results(results, "probe")


def test_smoke_checks_loaded_count():
    smoke = _load_script(SMOKE, "detection_smoke_test_checks")
    assert smoke.RESNET50_TENSORS == 318 == LOADED["main_moco"] == LOADED["released"]
    smoke.check_loaded_count(318, "ok")
    for count in (0, 317, 320):
        with pytest.raises(smoke.UserError, match=f"{count} converted tensors loaded, expected the 318"):
            smoke.check_loaded_count(count, "probe")


def test_smoke_checks_drift_bound():
    smoke = _load_script(SMOKE, "detection_smoke_test_checks")
    smoke.check_drift(1e-3, 20, "ok")
    smoke.check_drift(0.08, 40, "ok")  # the bound grows with the schedule
    for drift, iters in ((0.0, 20), (float("nan"), 20), (0.05, 20), (0.3, 20), (0.12, 40)):
        with pytest.raises(smoke.UserError, match="relative drift"):
            smoke.check_drift(drift, iters, "probe")


def _converted_file(tmp_path, v1, converter, smoke, drop=()):
    """v1 converted (in this process), less the tensors named in `drop`; returns its path and the model
    state_dict a detector would hold after loading all of v1."""
    data = converter.convert(torch.load(v1[0], weights_only=True))
    state = {smoke.model_tensor_name(k): torch.from_numpy(v) for k, v in data["model"].items()
             if not k.startswith("stem.fc.")}
    state["roi_heads.res5.norm.weight"] = torch.ones(2048)  # the extra norm: not from the file
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(21, 2048)
    for name in drop:
        del data["model"][name]
    path = tmp_path / "converted.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path, state


def test_count_converted_checks_both_directions(converter, v1, tmp_path):
    """Every converted tensor is in the model unchanged, and every backbone tensor got one."""
    smoke = _load_script(SMOKE, "detection_smoke_test_checks")
    path, state = _converted_file(tmp_path, v1, converter, smoke)
    assert len(smoke.backbone_tensor_names(state)) == 318
    assert smoke.count_converted(state, path, "probe") == 318
    path, state = _converted_file(tmp_path, v1, converter, smoke, drop=["res4.2.conv2.weight"])
    with pytest.raises(smoke.UserError, match=r"1 of the model's 318 backbone tensors got no converted "
                                              r"tensor .* the first backbone.res4.2.conv2.weight"):
        smoke.count_converted(state, path, "probe")
    path, state = _converted_file(tmp_path, v1, converter, smoke, drop=["res5.0.shortcut.norm.running_var"])
    with pytest.raises(smoke.UserError, match="the first roi_heads.res5.0.shortcut.norm.running_var"):
        smoke.count_converted(state, path, "probe")


@needs_detectron2
def test_detectron2_loads_the_converted_weights(smoke, d2_work):
    """Every converted backbone and res5 tensor lands unchanged in the detector, for both checkpoints and
    both kinds of config; a model left at its own initialisation fails the same comparison."""
    assert d2_work["lines"][0].startswith("converted 322 tensors from ")  # main_moco.py, v2 MLP head
    assert d2_work["lines"][1].startswith("converted 320 tensors from ")  # released layout, v1
    for kind, config in (("main_moco", "pascal_voc_R_50_C4_24k_moco.yaml"),
                         ("released", "coco_R_50_C4_2x.yaml")):
        state = smoke.loaded_state(config, d2_work[kind])
        assert smoke.count_converted(state, d2_work[kind], config) == LOADED[kind]
        assert "roi_heads.res5.norm.weight" in state  # the extra norm, newly initialised
        assert "roi_heads.res5.norm.weight" not in smoke.read_weights(d2_work[kind])
        with pytest.raises(smoke.UserError, match="is not the converted"):
            smoke.count_converted(smoke.loaded_state(config, None), d2_work[kind], config)
    other = "released" if kind == "main_moco" else "main_moco"
    with pytest.raises(smoke.UserError, match="is not the converted"):
        smoke.count_converted(state, d2_work[other], config)


@needs_detectron2
def test_detectron2_backbone_tensor_without_converted_one(smoke, d2_work, tmp_path):
    """The detector's own state: a converted file lacking one backbone tensor is caught, though every
    tensor it does hold is in the model unchanged."""
    config, weights = "pascal_voc_R_50_C4_24k_moco.yaml", d2_work["main_moco"]
    state = smoke.loaded_state(config, weights)
    assert len(smoke.backbone_tensor_names(state)) == LOADED["main_moco"]
    with open(weights, "rb") as f:
        data = pickle.load(f)
    del data["model"]["res3.1.conv1.norm.running_mean"]
    partial = tmp_path / "partial.pkl"
    with open(partial, "wb") as f:
        pickle.dump(data, f)
    with pytest.raises(smoke.UserError, match="the first backbone.res3.1.conv1.norm.running_mean"):
        smoke.count_converted(state, partial, config)


@needs_detectron2
def test_detectron2_evaluator_scores_known_detections(smoke, tmp_path):
    """train_net.py's evaluation (Trainer.test: its test loader, evaluator and inference loop), fed the
    ground truth, scores 100; boxes of the wrong class score 0; missing one class of 20 scores 95. VOC
    (07 11-point metric) and COCO (boxes and masks)."""
    scores = smoke.check_evaluator(tmp_path)
    expected = {"ground truth": 100.0, "wrong class": 0.0, "class 0 missed": 95.0}
    assert set(scores) == {"voc", "coco"}
    for dataset, tasks in (("voc", {"bbox"}), ("coco", {"bbox", "segm"})):
        assert set(scores[dataset]) == set(expected)
        for case, value in expected.items():
            results = scores[dataset][case]
            assert set(results) == tasks, (dataset, case, results)
            for metrics in results.values():
                for name in ("AP", "AP50", "AP75"):
                    assert math.isfinite(metrics[name]), (dataset, case, metrics)
                    assert metrics[name] == pytest.approx(value, abs=1e-6), (dataset, case, metrics)


@needs_detectron2
def test_detectron2_train_net_resume_in_fresh_output_dir(tmp_path):
    """The real script: --resume with no checkpoint and no weights is one line, exit 2, no folder made."""
    out = tmp_path / "fresh"
    result = subprocess.run(
        [sys.executable, str(DETECTION / "train_net.py"), "--config-file",
         "configs/pascal_voc_R_50_C4_24k_moco.yaml", "--resume", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(out)],
        cwd=DETECTION, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "AssertionError" not in result.stderr
    # detectron2 logs to stderr too (its config's missing VERSION, torch's deprecation warnings): the
    # refusal is the one error line, and the last.
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert errors[0].startswith(f"train_net.py: error: --resume: OUTPUT_DIR '{out}' holds no checkpoint")
    assert not out.exists()


@needs_detectron2
@pytest.mark.parametrize("config", sorted(TASKS))
def test_detectron2_trains_and_evaluates(config, smoke, d2_work, tmp_path):
    """train_net.py: SMOKE_ITERS CPU iterations from the converted weights, its evaluation, --eval-only."""
    kind, dataset = smoke.RUNS[config]
    out = tmp_path / "run"
    eval_only = config in EVAL_ONLY
    report = smoke.run_config(config, d2_work[kind], d2_work["datasets"], out, SMOKE_ITERS, eval_only)
    print(f"\n{config} ({kind} weights, {dataset} data, {SMOKE_ITERS} iterations, "
          f"{report['train_s']:.0f} s): {smoke.format_results(report['results'])}; "
          + (f"eval-only: {smoke.format_results(report['eval_only_results'])}; " if eval_only else "")
          + f"backbone drift {report['drift']:.1e}")
    assert report["loaded"] == LOADED[kind]
    for key in ("results", "eval_only_results")[:1 + eval_only]:
        assert set(report[key]) == TASKS[config], report[key]
        for metrics in report[key].values():
            assert {"AP", "AP50", "AP75"} <= set(metrics)
            # Not NaN: there were detections to evaluate. (COCO's APs/APm/APl are NaN for a size range
            # without objects: the generated boxes are never large.)
            for name in ("AP", "AP50", "AP75"):
                assert math.isfinite(metrics[name]) and 0.0 <= metrics[name] <= 100.0, metrics
    # Training moved the converted backbone, but only a little: a random or ImageNet start would be far.
    assert 0.0 < report["drift"] < 0.05
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert "roi_heads.res5.norm.weight" in final  # the extra norm after res5
    assert ("roi_heads.mask_head.predictor.weight" in final) == ("segm" in TASKS[config])
