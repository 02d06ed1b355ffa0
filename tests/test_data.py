"""Image folders that survive bad files, per-sample seeding, and the resumable / sharded samplers."""
import os
import random
import re
import signal
import time

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from conftest import descendants, make_image_folder
from moco.data import (ImageReadError, ResumableSampler, RobustImageFolder, ShardSampler, fallback_sample,
                       make_loader, require_split, sample_seed)
from moco.errors import UserError


@pytest.fixture
def small_folder(tmp_path):
    """2 classes x 5 train images of 8 x 8 px (sorted: class0/img000..img004, class1/img000..img004)."""
    return make_image_folder(tmp_path / "images", classes=2, train_per_class=5, val_per_class=1, size=(8, 8))


def _lines_naming(text, path):
    return [line for line in text.splitlines() if path in line]


def _corrupt(root, relative):
    path = os.path.join(root, "train", relative)
    with open(path, "wb") as f:
        f.write(b"\x89PNG this is no image")
    return path


class RandomDraws:
    """A 'transform' that returns what it draws from python's and torch's RNG (and the image size)."""

    def __call__(self, image):
        return torch.tensor([random.random(), torch.rand(()).item(), float(image.size[0])],
                            dtype=torch.float64)


def test_corrupt_image_is_replaced_by_its_fallback_sample_and_reported_once(small_folder, capsys):
    bad = _corrupt(small_folder, os.path.join("class0", "img002.png"))
    dataset = RobustImageFolder(os.path.join(small_folder, "train"), transforms.PILToTensor())
    assert dataset.samples[2][0] == bad
    assert dataset.bad_images == 0
    image, target = dataset[2]
    stand_in = fallback_sample(2, 1, len(dataset))
    assert stand_in != 2  # this folder's draw; a repeat would be drawn again
    expected, expected_target = dataset[stand_in]
    assert torch.equal(image, expected) and target == expected_target
    dataset[2]
    dataset[2]
    assert dataset.bad_images == 1
    lines = _lines_naming(capsys.readouterr().err, bad)
    assert len(lines) == 1 and "warning" in lines[0]
    good, _ = dataset[1]
    assert good.shape == (3, 8, 8)
    assert dataset.bad_images == 1


class DecodesItself:
    """A transform that decodes the image itself (its loader only opened it) and finds one undecodable."""

    def __init__(self, bad_size):
        self.bad_size = bad_size

    def __call__(self, image):
        if image.size == self.bad_size:
            raise ImageReadError(OSError("image file is truncated"))
        return transforms.PILToTensor()(image)


def test_an_image_read_error_of_the_transform_counts_as_an_unreadable_image(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", classes=2, train_per_class=3, val_per_class=1, size=(8, 8))
    bad = os.path.join(folder, "train", "class0", "img001.png")
    Image.new("RGB", (9, 8)).save(bad)  # readable by the loader; the transform refuses it
    dataset = RobustImageFolder(os.path.join(folder, "train"), DecodesItself((9, 8)))
    for index in range(len(dataset)):
        image, _ = dataset[index]
        assert image.shape == (3, 8, 8)
    dataset[1]
    lines = _lines_naming(capsys.readouterr().err, bad)
    assert len(lines) == 1 and "OSError: image file is truncated" in lines[0]
    assert dataset.bad_images == 1


def test_other_errors_of_the_transform_are_not_taken_for_unreadable_images(small_folder):
    def broken(image):
        raise TypeError("a bug in the transform")

    dataset = RobustImageFolder(os.path.join(small_folder, "train"), broken)
    with pytest.raises(TypeError, match="a bug in the transform"):
        dataset[0]
    assert dataset.bad_images == 0


def test_fallback_samples_are_fixed_and_spread_over_the_folder():
    draws = [fallback_sample(7, attempt, 1000) for attempt in range(1, 201)]
    assert draws == [fallback_sample(7, attempt, 1000) for attempt in range(1, 201)]
    assert len(set(draws)) > 150 and max(draws) - min(draws) > 800  # not a walk through the neighbours


def test_corrupt_image_counted_once_across_workers_and_epochs(small_folder, capfd):
    bad = _corrupt(small_folder, os.path.join("class0", "img001.png"))
    dataset = RobustImageFolder(os.path.join(small_folder, "train"), transforms.PILToTensor(), data_seed=3)
    sampler = ResumableSampler(dataset, 1, 0, seed=3, batch_size=2)
    loader = make_loader(dataset, sampler, 2, 2, torch.device("cpu"), drop_last=True)
    for epoch in range(4):  # the bad image falls to different workers in different epochs
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == 5
        assert dataset.bad_images == 1
    assert len(_lines_naming(capfd.readouterr().err, bad)) == 1


def test_unrecoverable_folder_of_bad_images_raises(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=1, train_per_class=2, val_per_class=1, size=(4, 4))
    for name in ("img000.png", "img001.png"):
        _corrupt(root, os.path.join("class0", name))
    dataset = RobustImageFolder(os.path.join(root, "train"))
    with pytest.raises(RuntimeError, match="unreadable"):
        dataset[0]


def _folder_with_unreadable(tmp_path, good, bad):
    """One class of `good` readable images followed by `bad` unreadable ones, in the folder's order."""
    root = make_image_folder(tmp_path / "images", classes=1, train_per_class=good + bad, val_per_class=1,
                             size=(4, 4))
    for i in range(good, good + bad):
        _corrupt(root, os.path.join("class0", f"img{i:03d}.png"))
    return RobustImageFolder(os.path.join(root, "train"), transforms.PILToTensor())


def test_a_run_of_unreadable_images_in_a_mostly_readable_folder_is_read_around(tmp_path, capsys):
    dataset = _folder_with_unreadable(tmp_path, good=70, bad=60)  # 46 % unreadable, 60 in a row
    for index in range(len(dataset)):
        image, _ = dataset[index]
        assert image.shape == (3, 4, 4)
    assert dataset.bad_images == 60


def test_a_mostly_unreadable_folder_stops_saying_the_share(tmp_path, capsys):
    dataset = _folder_with_unreadable(tmp_path, good=20, bad=80)
    with pytest.raises(UserError, match=r"are unreadable \(\d+ %.*are all its images unreadable") as info:
        for index in range(len(dataset)):
            dataset[index]
    bad, seen = map(int, re.match(r"(\d+) of the (\d+) images read", str(info.value)).groups())
    assert bad >= 50 and bad > seen / 2


def test_loader_workers_leave_ctrl_c_to_the_trainer(small_folder):
    """A terminal's Ctrl-C reaches the loader workers too; they must keep serving (the trainer decides
    whether to save and stop), not exit and fail the trainer's next batch."""
    dataset = RobustImageFolder(os.path.join(small_folder, "train"), transforms.PILToTensor(), data_seed=1)
    sampler = ResumableSampler(dataset, 1, 0, seed=1, batch_size=2)
    loader = make_loader(dataset, sampler, 2, 2, torch.device("cpu"), drop_last=True)
    first = [images for images, _ in loader]  # the persistent workers are up
    workers = descendants(os.getpid())
    assert len(workers) >= 2
    for pid in workers:
        os.kill(pid, signal.SIGINT)
    time.sleep(1.0)
    again = [images for images, _ in loader]  # the same workers, the same epoch
    assert len(again) == len(first) and all(torch.equal(a, b) for a, b in zip(first, again))


def test_per_sample_seeding_is_independent_of_call_order(small_folder):
    dataset = RobustImageFolder(os.path.join(small_folder, "train"), RandomDraws(), data_seed=7)
    keys = [(0, i) for i in range(len(dataset))] + [(1, i) for i in range(len(dataset))]
    forward = {key: dataset[key][0] for key in keys}
    random.seed(123)
    torch.manual_seed(123)  # whatever the training RNG holds must not matter
    backward = {key: dataset[key][0] for key in reversed(keys)}
    for key in keys:
        assert torch.equal(forward[key], backward[key])
    for i in range(len(dataset)):
        assert not torch.equal(forward[(0, i)][:2], forward[(1, i)][:2])  # another epoch, other draws
    assert len({tuple(v[:2].tolist()) for v in forward.values()}) == len(keys)
    # another data seed gives another stream
    other = RobustImageFolder(os.path.join(small_folder, "train"), RandomDraws(), data_seed=8)
    assert not torch.equal(other[(0, 0)][0][:2], forward[(0, 0)][:2])


def test_per_sample_seeding_leaves_the_training_rng_alone(small_folder):
    dataset = RobustImageFolder(os.path.join(small_folder, "train"), RandomDraws(), data_seed=7)
    random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), torch.rand(3))
    random.seed(5)
    torch.manual_seed(5)
    dataset[(0, 1)]
    dataset[(2, 3)]
    assert random.random() == expected[0]
    assert torch.equal(torch.rand(3), expected[1])


@pytest.mark.cuda
def test_per_sample_seeding_leaves_the_cuda_rng_alone(small_folder):
    """In the main process (-j 0) a sample's seed must not reach the training's CUDA generator:
    torch.manual_seed would reseed it, and fork_rng(devices=[]) restores only the CPU one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    dataset = RobustImageFolder(os.path.join(small_folder, "train"), RandomDraws(), data_seed=7)
    torch.cuda.manual_seed(5)
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(5)
    dataset[(0, 1)]
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_per_sample_seeding_is_the_same_in_loader_workers(small_folder):
    dataset = RobustImageFolder(os.path.join(small_folder, "train"), RandomDraws(), data_seed=11)
    sampler = ResumableSampler(dataset, 1, 0, seed=11, batch_size=2)
    sampler.set_epoch(4)
    in_main = torch.stack([dataset[key][0] for key in sampler])
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=2)
    in_workers = torch.cat([images for images, _ in loader])
    assert torch.equal(in_main, in_workers)


def test_unseeded_dataset_returns_plain_samples(small_folder):
    dataset = RobustImageFolder(os.path.join(small_folder, "train"), transforms.PILToTensor())
    image, target = dataset[(3, 6)]  # (epoch, index) works without a data seed too
    assert torch.equal(image, dataset[6][0]) and target == 1


def test_sample_seed_differs_by_epoch_index_and_seed():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50


def test_resumable_sampler_start_step_skips_exactly_the_finished_batches():
    data = list(range(23))
    sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=5, batch_size=4)
    sampler.set_epoch(2)
    full = list(sampler)
    assert all(epoch == 2 for epoch, _ in full)
    order = [index for _, index in full]
    assert sorted(order) == data
    assert order != data  # shuffled
    assert sampler.steps_per_epoch() == 5 and len(sampler) == 23
    for start in (1, 3, 5):
        sampler.set_epoch(2, start)
        rest = [index for _, index in sampler]
        assert rest == order[start * 4:]
        assert len(sampler) == len(rest)
    sampler.set_epoch(3)
    assert [index for _, index in sampler] != order  # a new order each epoch
    again = ResumableSampler(data, num_replicas=1, rank=0, seed=5, batch_size=4)
    again.set_epoch(2)
    assert [index for _, index in again] == order  # the order depends on seed and epoch only


def test_resumable_sampler_shards_over_replicas():
    data = list(range(20))
    shards = []
    for rank in range(2):
        sampler = ResumableSampler(data, num_replicas=2, rank=rank, seed=0, batch_size=3)
        sampler.set_epoch(1)
        shards.append([index for _, index in sampler])
        assert sampler.steps_per_epoch() == 3
    assert sorted(shards[0] + shards[1]) == data


@pytest.mark.parametrize("size", [1, 7, 10, 11])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_shard_sampler_covers_every_index_exactly_once(size, replicas):
    shards = [list(ShardSampler(size, replicas, rank)) for rank in range(replicas)]
    assert sorted(sum(shards, [])) == list(range(size))
    for rank, shard in enumerate(shards):
        assert len(ShardSampler(size, replicas, rank)) == len(shard)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_require_split_messages(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="does not exist") as err:
        require_split(missing, "train")
    assert missing in str(err.value)
    with pytest.raises(UserError, match="no data folder"):
        require_split("", "train")
    (tmp_path / "data" / "val").mkdir(parents=True)
    with pytest.raises(UserError, match="no 'train' subfolder") as err:
        require_split(str(tmp_path / "data"), "train")
    assert str(tmp_path / "data") in str(err.value)
    assert require_split(str(tmp_path / "data"), "val") == os.path.join(str(tmp_path / "data"), "val")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError):
        require_split(str(tmp_path / "file"), "train")


def test_empty_class_folders_are_a_user_error(tmp_path):
    for name in ("class0", "class1"):
        (tmp_path / "train" / name).mkdir(parents=True)
    with pytest.raises(UserError) as err:
        RobustImageFolder(str(tmp_path / "train"))
    assert str(tmp_path / "train") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        RobustImageFolder(str(tmp_path / "empty"))
