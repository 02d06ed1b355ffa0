"""torch.hub entry points: backbones pre-trained by MoCo (He et al. 2019, arXiv:1911.05722; Chen et al.
2020, arXiv:2003.04297) as plain torchvision models.

    model = torch.hub.load("REPO_OWNER/REPO_NAME", "moco_v2_800ep")
    model = torch.hub.load(CLONE, "moco_checkpoint", path="runs/v2/checkpoint_0199.pth.tar", source="local")

Each entry returns the torchvision model of the checkpoint's architecture (ResNet-50 for the released
ones) holding the query encoder's weights, mapped exactly as main_lincls.py --pretrained maps them; the
classifier `fc` is new, initialised as main_lincls.py initialises it before training it (normal with std
0.01, zero bias). No weights are shipped here: a released file is downloaded once by
torch.hub.load_state_dict_from_url into torch.hub's cache ($TORCH_HOME/hub/checkpoints).
"""
import torch

dependencies = ["torch", "torchvision"]

# The official releases of the reference implementation (ResNet-50, 8 GPUs, ImageNet-1k).
RELEASES = {
    "moco_v1_200ep": "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v1_200ep/"
                     "moco_v1_200ep_pretrain.pth.tar",
    "moco_v2_200ep": "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_200ep/"
                     "moco_v2_200ep_pretrain.pth.tar",
    "moco_v2_800ep": "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/"
                     "moco_v2_800ep_pretrain.pth.tar",
}


def _classifier(checkpoint, where, arch=None, num_classes=1000):
    """The torchvision model of `checkpoint` (a loaded MoCo pre-training checkpoint) with the query
    encoder's backbone and a new fc; `where` names the file in messages."""
    from moco.pretrained import FC_KEYS, backbone_from_moco
    from moco.errors import UserError
    from moco.models import model_constructor
    trained_arch = checkpoint.get("arch")
    arch = arch or trained_arch or "resnet50"
    if trained_arch is not None and trained_arch != arch:
        raise UserError(f"'{where}' holds a {trained_arch}, not a {arch}")
    saved_args = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    model = model_constructor(arch, bool(saved_args.get("cifar_stem", False)))(num_classes=num_classes)
    torch.nn.init.normal_(model.fc.weight, mean=0.0, std=0.01)
    torch.nn.init.zeros_(model.fc.bias)
    missing, unexpected = model.load_state_dict(backbone_from_moco(checkpoint, where), strict=False)
    if set(missing) != FC_KEYS or unexpected:
        raise UserError(f"'{where}' does not fit {arch}: missing {sorted(set(missing) - FC_KEYS)[:5]}, "
                        f"unexpected {unexpected[:5]}")
    return model


def _released(name, url, progress, check_hash, num_classes):
    """Download (once; torch.hub caches the file) and map a released checkpoint. `url` replaces the
    official address, e.g. with a mirror. torch.hub checks the SHA-256 prefix that a file name carries
    after its last '-' (name-<sha256 prefix>.pth.tar); the official names carry none."""
    url = url or RELEASES[name]
    checkpoint = torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=progress,
                                                    check_hash=check_hash, weights_only=True)
    return _classifier(checkpoint, url, num_classes=num_classes)


def moco_v1_200ep(url=None, progress=True, check_hash=True, num_classes=1000):
    """ResNet-50 of MoCo v1, 200 epochs (released: 60.6 linear top-1 on ImageNet)."""
    return _released("moco_v1_200ep", url, progress, check_hash, num_classes)


def moco_v2_200ep(url=None, progress=True, check_hash=True, num_classes=1000):
    """ResNet-50 of MoCo v2, 200 epochs (released: 67.7 linear top-1 on ImageNet)."""
    return _released("moco_v2_200ep", url, progress, check_hash, num_classes)


def moco_v2_800ep(url=None, progress=True, check_hash=True, num_classes=1000):
    """ResNet-50 of MoCo v2, 800 epochs (released: 71.1 linear top-1 on ImageNet)."""
    return _released("moco_v2_800ep", url, progress, check_hash, num_classes)


def moco_checkpoint(path, num_classes=1000):
    """The backbone of any MoCo pre-training checkpoint of this project or of the reference (main_moco.py's
    checkpoint_*.pth.tar): its architecture and --cifar-stem come from the file."""
    from moco.checkpoint import load_checkpoint
    return _classifier(load_checkpoint(path, what="checkpoint"), path, num_classes=num_classes)
