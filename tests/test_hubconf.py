"""hubconf.py through torch.hub.load itself (source="local"): the local-checkpoint entry, and the
released-checkpoint entries downloading a file:// URL into a private TORCH_HOME (real download, cache
and hash check)."""
import hashlib
import os
import shutil

import pytest
import torch

from moco import builder
from moco.models import model_constructor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """torch.hub's cache in this test's folder, never the user's."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # let TORCH_HOME decide, as in a fresh process
    return home


def moco_model(arch, cifar_stem=False, mlp=False):
    torch.manual_seed(0)
    model = builder.MoCo(model_constructor(arch, cifar_stem), dim=16, K=32, m=0.99, T=0.2, mlp=mlp)
    with torch.no_grad():  # distinct values everywhere, BN statistics included
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and "encoder_q" in name:
                tensor.copy_(torch.randn_like(tensor))
    return model


def save_moco_checkpoint(model, path, arch, **extra):
    """A checkpoint as main_moco.py and the reference write it: DDP's 'module.' keys."""
    state_dict = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"epoch": 200, "arch": arch, "state_dict": state_dict, **extra}, path)
    return str(path)


def assert_is_query_encoder(net, moco):
    expected = {k: v for k, v in moco.encoder_q.state_dict().items() if not k.startswith("fc")}
    got = net.state_dict()
    assert set(got) - set(expected) == {"fc.weight", "fc.bias"}
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # the classifier is new, as main_lincls.py makes it: std 0.01, zero bias, 1000 classes by default
    assert got["fc.weight"].shape[0] == 1000 and torch.all(got["fc.bias"] == 0)
    assert 0.005 < got["fc.weight"].std().item() < 0.02


def test_local_checkpoint_entry_gives_the_query_encoder(tmp_path):
    moco = moco_model("resnet18", cifar_stem=True, mlp=True)
    path = save_moco_checkpoint(moco, tmp_path / "checkpoint_0001.pth.tar", "resnet18",
                                args={"arch": "resnet18", "cifar_stem": True})
    net = torch.hub.load(ROOT, "moco_checkpoint", path=path, source="local")
    assert type(net).__name__ == "ResNet" and net.conv1.kernel_size == (3, 3)  # the file's --cifar-stem
    assert_is_query_encoder(net, moco)
    net.eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_local_checkpoint_entry_refuses_a_file_without_moco_weights(tmp_path):
    path = tmp_path / "supervised.pth"
    torch.save({"state_dict": model_constructor("resnet18")().state_dict(), "arch": "resnet18"}, path)
    with pytest.raises(Exception, match="not a MoCo pre-training checkpoint"):
        torch.hub.load(ROOT, "moco_checkpoint", path=str(path), source="local")


@pytest.mark.parametrize("entry", ["moco_v1_200ep", "moco_v2_200ep", "moco_v2_800ep"])
def test_released_entry_downloads_caches_and_maps_the_weights(entry, tmp_path, torch_home):
    """A file in the released format (epoch, arch, state_dict with module.encoder_q/k, queue, optimizer)
    served from a file:// URL whose name carries its SHA-256 prefix, as torch.hub expects."""
    moco = moco_model("resnet18", mlp=entry.startswith("moco_v2"))
    served = tmp_path / "served"
    served.mkdir()
    staged = save_moco_checkpoint(moco, served / "staged.pth.tar", "resnet18", optimizer={})
    with open(staged, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    name = f"{entry}_pretrain-{digest[:10]}.pth.tar"
    os.replace(staged, served / name)
    url = (served / name).as_uri()

    net = torch.hub.load(ROOT, entry, url=url, progress=False, source="local")
    assert_is_query_encoder(net, moco)
    cached = torch_home / "hub" / "checkpoints" / name
    assert cached.is_file()

    # the second load reads the cache: the served file may be gone
    os.remove(served / name)
    again = torch.hub.load(ROOT, entry, url=url, progress=False, source="local")
    assert all(torch.equal(a, b) for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items())
               if not k.startswith("fc"))


def test_released_entry_checks_the_hash_in_the_file_name(tmp_path, torch_home):
    moco = moco_model("resnet18")
    served = tmp_path / "served"
    served.mkdir()
    path = save_moco_checkpoint(moco, served / "moco_v1_200ep_pretrain-0123456789.pth.tar", "resnet18")
    with pytest.raises(RuntimeError, match="invalid hash value"):
        torch.hub.load(ROOT, "moco_v1_200ep", url=f"file://{path}", progress=False, source="local")
    assert not (torch_home / "hub" / "checkpoints" / os.path.basename(path)).exists()
    # without the check the same file loads
    net = torch.hub.load(ROOT, "moco_v1_200ep", url=f"file://{path}", check_hash=False, progress=False,
                         source="local")
    assert_is_query_encoder(net, moco)
    shutil.rmtree(torch_home)


def test_released_urls_are_the_official_ones():
    import importlib.util
    spec = importlib.util.spec_from_file_location("hubconf_under_test", os.path.join(ROOT, "hubconf.py"))
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert sorted(hubconf.RELEASES) == ["moco_v1_200ep", "moco_v2_200ep", "moco_v2_800ep"]
    for name, url in hubconf.RELEASES.items():
        assert url == f"https://dl.fbaipublicfiles.com/moco/moco_checkpoints/{name}/{name}_pretrain.pth.tar"
    # what torch.hub.list shows: the public callables (it only lists GitHub repositories)
    entries = sorted(n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_"))
    assert entries == ["moco_checkpoint", "moco_v1_200ep", "moco_v2_200ep", "moco_v2_800ep"]
