"""Checkpoint files: atomic saves, clear load errors, RNG states, and where to resume."""
import hashlib
import os
import random

import numpy as np
import pytest
import torch

from moco.checkpoint import (capture_rng_state, checkpoint_state_dict, find_resume_checkpoint, first_nonfinite,
                             load_checkpoint, load_checkpoint_and_sha256, optimizer_tensors, pretrain_checkpoint_name, pretrain_checkpoints,
                             restore_rng_state, save_checkpoint, scan_resume_checkpoints)
from moco.errors import UserError


def _checkpoint(arch="resnet18", epoch=1):
    return {"epoch": epoch, "arch": arch,
            "state_dict": {"module.encoder_q.conv1.weight": torch.full((2, 3), float(epoch))},
            "optimizer": {"state": {}, "param_groups": []}}


def _load_and_hash(path, what="checkpoint"):
    checkpoint, digest = load_checkpoint_and_sha256(path, what)
    assert digest == hashlib.sha256(open(path, "rb").read()).hexdigest()
    return checkpoint


@pytest.fixture(params=[load_checkpoint, _load_and_hash], ids=["load", "load_and_sha256"])
def load(request):
    """Both loaders: the same checkpoint and the same one-line errors."""
    return request.param


def test_save_then_load_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "checkpoint_0000.pth.tar")  # missing folders are created
    save_checkpoint(_checkpoint(), path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and loaded["arch"] == "resnet18"
    assert torch.equal(loaded["state_dict"]["module.encoder_q.conv1.weight"], torch.ones(2, 3))
    assert os.listdir(tmp_path / "sub") == ["checkpoint_0000.pth.tar"]  # no temporary file left


def test_failed_save_leaves_the_previous_file_intact(tmp_path):
    path = str(tmp_path / "checkpoint_0003.pth.tar")
    save_checkpoint(_checkpoint(epoch=4), path)
    before = open(path, "rb").read()
    with pytest.raises(Exception):
        save_checkpoint({"epoch": 5, "not picklable": lambda x: x}, path)
    assert open(path, "rb").read() == before
    assert load_checkpoint(path)["epoch"] == 4
    assert os.listdir(tmp_path) == ["checkpoint_0003.pth.tar"]


def test_load_missing_file_names_it(load, tmp_path):
    path = str(tmp_path / "nope.pth.tar")
    with pytest.raises(UserError, match="does not exist") as err:
        load(path, what="--resume checkpoint")
    assert path in str(err.value) and "--resume checkpoint" in str(err.value)


def test_load_directory_names_it(load, tmp_path):
    with pytest.raises(UserError, match="directory") as err:
        load(str(tmp_path))
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n", b"PK\x03\x04garbage"])
def test_load_corrupt_file_names_it(load, tmp_path, content):
    path = tmp_path / "bad.pth.tar"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint") as err:
        load(str(path))
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_load_truncated_checkpoint_names_it(load, tmp_path):
    path = tmp_path / "cut.pth.tar"
    torch.save(_checkpoint(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load(str(path))
    assert str(path) in str(err.value)


def test_load_non_dict_names_it(load, tmp_path):
    path = str(tmp_path / "tensor.pth.tar")
    torch.save(torch.zeros(3), path)
    with pytest.raises(UserError, match="Tensor, not a checkpoint dict") as err:
        load(path)
    assert path in str(err.value)


def test_checkpoint_state_dict_requires_weights(tmp_path):
    assert "module.encoder_q.conv1.weight" in checkpoint_state_dict(_checkpoint(), "x")
    for bad in ({"epoch": 1}, {"state_dict": {}}, {"state_dict": [1, 2]}):
        with pytest.raises(UserError, match="state_dict") as err:
            checkpoint_state_dict(bad, "some/file.pth.tar")
        assert "some/file.pth.tar" in str(err.value)


def _draws():
    return (random.random(), random.randint(0, 10**9), np.random.rand(3).tolist(), torch.rand(4),
            torch.randperm(10))


def test_rng_capture_and_restore_reproduce_the_next_draws(tmp_path):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    _draws()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = _draws()
    _draws()  # move every stream on
    # the state must survive a checkpoint (plain data, weights_only loading)
    path = str(tmp_path / "rng.pth.tar")
    save_checkpoint({"rng_states": [state]}, path)
    restore_rng_state(load_checkpoint(path)["rng_states"][0])
    again = _draws()
    assert again[0] == expected[0] and again[1] == expected[1] and again[2] == expected[2]
    assert torch.equal(again[3], expected[3]) and torch.equal(again[4], expected[4])


def test_pretrain_checkpoint_names():
    assert pretrain_checkpoint_name(0) == "checkpoint_0000.pth.tar"
    assert pretrain_checkpoint_name(12) == "checkpoint_0012.pth.tar"
    assert pretrain_checkpoint_name(3, 25) == "checkpoint_0003_iter000025.pth.tar"


def test_pretrain_checkpoints_newest_progress_first(tmp_path):
    names = ["checkpoint_0000.pth.tar", "checkpoint_0001_iter000005.pth.tar", "checkpoint_0001.pth.tar",
             "checkpoint_0002_iter000003.pth.tar", "checkpoint_0002_iter000010.pth.tar",
             "checkpoint_0000_iter000002.pth.tar"]
    ignored = ["checkpoint_0009.pth.tar.tmp", ".checkpoint_0009.pth.tar.tmp123", "checkpoint_9.pth.tar",
               "model_best.pth.tar", "checkpoint_0008_iter5.pth.tar"]
    for name in names + ignored:
        (tmp_path / name).write_bytes(b"")
    found = pretrain_checkpoints(str(tmp_path))
    assert [os.path.basename(path) for path, _ in found] == [
        "checkpoint_0002_iter000010.pth.tar",  # 2 epochs done + 10 steps
        "checkpoint_0002_iter000003.pth.tar",
        "checkpoint_0001.pth.tar",             # 2 epochs done
        "checkpoint_0001_iter000005.pth.tar",  # 1 epoch done + 5 steps
        "checkpoint_0000.pth.tar",
        "checkpoint_0000_iter000002.pth.tar",
    ]
    assert found[0][1] == (2, 10) and found[2][1] == (2, 0)
    assert pretrain_checkpoints(str(tmp_path / "missing")) == []


def test_find_resume_checkpoint_takes_the_newest_valid_one_and_skips_corrupt(tmp_path):
    assert find_resume_checkpoint(str(tmp_path), "resnet18", log=lambda _: None) is None
    save_checkpoint(_checkpoint(epoch=1), str(tmp_path / "checkpoint_0000.pth.tar"))
    save_checkpoint(_checkpoint(epoch=2), str(tmp_path / "checkpoint_0001.pth.tar"))
    corrupt = tmp_path / "checkpoint_0002.pth.tar"
    corrupt.write_bytes(b"truncated")
    messages = []
    found = find_resume_checkpoint(str(tmp_path), "resnet18", log=messages.append)
    assert found == str(tmp_path / "checkpoint_0001.pth.tar")
    assert len(messages) == 1 and str(corrupt) in messages[0]


def test_find_resume_checkpoint_prefers_a_later_mid_epoch_save(tmp_path):
    save_checkpoint(_checkpoint(epoch=1), str(tmp_path / "checkpoint_0000.pth.tar"))
    save_checkpoint(_checkpoint(epoch=1), str(tmp_path / "checkpoint_0001_iter000004.pth.tar"))
    assert find_resume_checkpoint(str(tmp_path), "resnet18") == str(
        tmp_path / "checkpoint_0001_iter000004.pth.tar")


def test_find_resume_checkpoint_rejects_another_arch(tmp_path):
    save_checkpoint(_checkpoint(arch="resnet50"), str(tmp_path / "checkpoint_0000.pth.tar"))
    with pytest.raises(UserError, match="resnet50") as err:
        find_resume_checkpoint(str(tmp_path), "resnet18")
    assert str(tmp_path) in str(err.value)


def test_load_checkpoint_cut_short_like_head_c_names_it(load, tmp_path):
    """`head -c 5000 ckpt`: torch.load raises OSError (Invalid argument); still one named UserError."""
    whole = tmp_path / "whole.pth.tar"
    torch.save({"state_dict": {"module.encoder_q.w": torch.zeros(4096)}}, str(whole))
    cut = tmp_path / "checkpoint_0001_iter000002.pth.tar"
    cut.write_bytes(whole.read_bytes()[:5000])
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint") as err:
        load(str(cut), what="--pretrained checkpoint")
    assert str(cut) in str(err.value) and "--pretrained checkpoint" in str(err.value)
    assert "\n" not in str(err.value)


def test_failed_write_is_one_user_error_and_leaves_no_partial_file(tmp_path):
    """A write that fails half-way (here: the target folder is a file) names the file, replaces nothing."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot write checkpoint") as err:
        save_checkpoint(_checkpoint(), str(tmp_path / "afile" / "checkpoint_0000.pth.tar"))
    assert "checkpoint_0000.pth.tar" in str(err.value)
    assert os.listdir(tmp_path) == ["afile"]


def test_find_resume_checkpoint_skips_and_names_a_lincls_checkpoint(tmp_path):
    save_checkpoint(_checkpoint(epoch=1), str(tmp_path / "checkpoint_0000.pth.tar"))
    lincls = tmp_path / "checkpoint_0005.pth.tar"
    torch.save({"epoch": 6, "arch": "resnet18", "best_acc1": 1.0,
                "state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, str(lincls))
    before = lincls.read_bytes()
    messages = []
    found = find_resume_checkpoint(str(tmp_path), "resnet18", log=messages.append)
    assert found == str(tmp_path / "checkpoint_0000.pth.tar")
    assert len(messages) == 1 and str(lincls) in messages[0] and "not a MoCo pre-training" in messages[0]
    assert lincls.read_bytes() == before  # skipped, never touched
    scan = scan_resume_checkpoints(str(tmp_path), "resnet18")
    assert scan.progress == (1, 0) and [(p, prog) for p, prog, _ in scan.skipped] == [(str(lincls), (6, 0))]


def test_first_nonfinite_names_the_tensor():
    tensors = [("a", torch.ones(3)), ("steps", torch.tensor([3])), ("b", torch.tensor([1.0, float("inf")]))]
    assert first_nonfinite(tensors) == "b"
    assert first_nonfinite(tensors[:2]) is None
    state = {"state": {0: {"momentum_buffer": torch.tensor([float("nan")])}}, "param_groups": []}
    assert first_nonfinite(optimizer_tensors(state)) == "optimizer state 0.momentum_buffer"


def test_partial_files_of_gone_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    from moco.checkpoint import remove_stale_partial_files
    gone = subprocess.Popen(["true"])
    gone.wait()
    names = [f".checkpoint_0003.pth.tar.tmp{gone.pid}", f".model_best.pth.tar.tmp{gone.pid}",
             f".checkpoint_0003.pth.tar.tmp{os.getpid()}", "checkpoint_0002.pth.tar", f".other.tmp{gone.pid}"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    said = []
    removed = remove_stale_partial_files(str(tmp_path), said.append)
    assert sorted(os.path.basename(p) for p in removed) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:]) and len(said) == 2
