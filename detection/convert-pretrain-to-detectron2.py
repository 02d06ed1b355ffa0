#!/usr/bin/env python
"""Turn a MoCo pre-training checkpoint into detectron2 weights.

    python convert-pretrain-to-detectron2.py INPUT.pth.tar OUTPUT.pkl

INPUT is a checkpoint of a released MoCo v1/v2 model or one written by main_moco.py: a dict whose
`state_dict` holds the query encoder under `module.encoder_q.` (a checkpoint saved without the DDP
`module.` prefix, `encoder_q.`, is accepted too). Only the query encoder is kept. Its torchvision ResNet
names become detectron2 names:

    conv1.weight                  -> stem.conv1.weight
    bn1.running_var               -> stem.conv1.norm.running_var
    layer1.0.conv1.weight         -> res2.0.conv1.weight
    layer1.0.bn2.bias             -> res2.0.conv2.norm.bias
    layer1.0.downsample.0.weight  -> res2.0.shortcut.weight
    layer1.0.downsample.1.bias    -> res2.0.shortcut.norm.bias
    fc.weight (v1), fc.0/fc.2 (v2 MLP) -> stem.fc.*  (detectron2 ignores these)

OUTPUT is a pickle `{"model": {name: numpy array}, "__author__": "MOCO", "matching_heuristics": True}`
for detectron2's `MODEL.WEIGHTS`. Anything that is not a MoCo checkpoint of a ResNet, or whose encoder holds
a NaN or infinite value (a pre-training run that diverged), is refused with one line on stderr and exit
status 2; OUTPUT is then left as it was.
"""
import os
import pickle
import re
import sys
import tempfile

import torch

# The script lives in detection/; the shared error helpers live in the package at the repo root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moco.checkpoint import load_checkpoint  # noqa: E402
from moco.errors import UserError, run_cli  # noqa: E402

PROG = os.path.basename(__file__)
USAGE = f"usage: {PROG} INPUT.pth.tar OUTPUT.pkl"
ENCODER_PREFIXES = ("module.encoder_q.", "encoder_q.")
RESNET_GROUPS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
# torchvision constructors whose state_dict has the ResNet layout above.
RESNET_ARCH = re.compile(r"^(resnet|resnext|wide_resnet)")


def encoder_state(checkpoint, path):
    """Return the query encoder's tensors with the MoCo prefix removed, after checking they are a ResNet."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"{path!r} is not a MoCo checkpoint: it has no 'state_dict' entry "
            "(expected a file written by main_moco.py or a released MoCo model)"
        )
    state = checkpoint["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"{path!r} is not a MoCo checkpoint: its 'state_dict' is not a dict")
    for prefix in ENCODER_PREFIXES:
        encoder = {
            k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)
        }
        if encoder:
            break
    else:
        raise UserError(
            f"{path!r} is not a MoCo pre-training checkpoint: its state_dict has no 'module.encoder_q.*' "
            "weights (a linear-classification or supervised checkpoint?)"
        )

    arch = checkpoint.get("arch")
    if isinstance(arch, str) and not RESNET_ARCH.match(arch):
        raise UserError(f"{path!r} holds a {arch} encoder; only ResNet encoders convert to detectron2")
    groups = {k.split(".", 1)[0] for k in encoder}
    missing = [g for g in RESNET_GROUPS if g not in groups]
    foreign = sorted(groups - set(RESNET_GROUPS) - {"fc"})
    if missing or foreign:
        what = f" ({arch})" if isinstance(arch, str) else ""
        detail = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(foreign)}"
        raise UserError(
            f"the encoder in {path!r}{what} is not a torchvision ResNet ({detail}); "
            "only ResNet encoders convert to detectron2"
        )
    bad = [k for k, v in encoder.items() if not torch.is_tensor(v)]
    if bad:
        raise UserError(f"{path!r}: encoder entry {bad[0]!r} is not a tensor")
    check_finite(encoder, path)
    return encoder


def check_finite(encoder, path):
    """Refuse an encoder with a NaN or infinite value anywhere, naming the first such tensor.

    Such weights come from a pre-training run that diverged; detectron2 would load them without a word and
    fine-tune to a NaN loss or a meaningless AP hours later. The projection head (fc) is checked too: it is
    not used for detection, but a non-finite head means the whole run diverged.
    """
    for name, tensor in encoder.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue  # integer buffers (num_batches_tracked) cannot hold NaN or inf
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            count = int((~finite).sum())
            raise UserError(
                f"{path!r}: encoder tensor {name!r} holds {count} NaN or infinite value(s) of {tensor.numel()} "
                "(the pre-training diverged?); refusing to convert it"
            )


def detectron2_name(name):
    """Map one torchvision ResNet parameter name to detectron2's."""
    parts = name.split(".")
    if "layer" not in name:
        parts.insert(0, "stem")
    out = []
    i = 0
    while i < len(parts):
        part = parts[i]
        stage = re.fullmatch(r"layer(\d)", part)
        norm = re.fullmatch(r"bn(\d)", part)
        if stage:
            out.append(f"res{int(stage.group(1)) + 1}")
        elif norm:
            out += [f"conv{norm.group(1)}", "norm"]
        elif part == "downsample" and i + 1 < len(parts) and parts[i + 1] in ("0", "1"):
            out += ["shortcut"] if parts[i + 1] == "0" else ["shortcut", "norm"]
            i += 1
        else:
            out.append(part)
        i += 1
    return ".".join(out)


def convert(checkpoint, path="checkpoint"):
    """Return the detectron2 weight dict (the pickle's content) for a loaded MoCo checkpoint."""
    model = {}
    for name, tensor in encoder_state(checkpoint, path).items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
            tensor = tensor.float()
        model[detectron2_name(name)] = tensor.numpy()
    return {"model": model, "__author__": "MOCO", "matching_heuristics": True}


def write_pickle(obj, path):
    """Write atomically: a temporary file next to `path`, then a rename over it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"output folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UserError(f"output {path!r} is a folder; give a file name such as output.pkl")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".convert-", suffix=".pkl.tmp", dir=folder)
    except OSError as err:
        raise UserError(f"cannot write to {folder!r}: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(obj, f)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path!r}: {err.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv):
    if len(argv) == 1 and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if len(argv) != 2:
        raise UserError(f"expected 2 arguments, got {len(argv)}; {USAGE}")
    src, dst = argv
    if os.path.exists(dst) and os.path.realpath(dst) == os.path.realpath(src):
        raise UserError("OUTPUT is the input checkpoint itself; give another file name such as output.pkl")
    result = convert(load_checkpoint(src, what="input checkpoint"), src)
    write_pickle(result, dst)
    print(f"converted {len(result['model'])} tensors from {src} to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], PROG))
