"""One process's set-up: its share of the node's batch and loader workers (moco.distributed), and the
reference's seeding with its cuDNN mode (moco.seeding)."""
import argparse

import pytest
import torch

from moco.distributed import per_process_batch, setup_process, workers_per_process
from moco.errors import UserError
from moco.seeding import seed_everything


def test_per_process_batch_is_the_node_batch_split():
    assert per_process_batch(256, 1) == 256
    assert per_process_batch(256, 8) == 32
    assert per_process_batch(16, 2) == 8
    assert per_process_batch(3, 3) == 1


@pytest.mark.parametrize("batch, procs", [(0, 1), (1, 2), (7, 8)])
def test_per_process_batch_smaller_than_processes_is_a_user_error(batch, procs):
    with pytest.raises(UserError) as err:
        per_process_batch(batch, procs)
    assert str(batch) in str(err.value) and str(procs) in str(err.value)


@pytest.mark.parametrize("workers, procs, expected", [(32, 1, 32), (32, 8, 4), (32, 3, 11), (5, 2, 3),
                                                      (1, 4, 1), (0, 2, 0)])
def test_workers_per_process_is_the_ceiling(workers, procs, expected):
    assert workers_per_process(workers, procs) == expected


def test_seed_everything_reproduces_python_and_torch_draws():
    import random
    with pytest.warns(UserWarning, match="deterministic"):
        seed_everything(3)
    first = (random.random(), torch.rand(3))
    with pytest.warns(UserWarning):
        seed_everything(3)
    second = (random.random(), torch.rand(3))
    assert first[0] == second[0]
    assert torch.equal(first[1], second[1])


def test_a_seeded_cpu_process_gives_no_cudnn_warning_and_a_cuda_one_does():
    import warnings
    args = argparse.Namespace(seed=5, batch_size=8, workers=3)
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert setup_process(args, argparse.Namespace(device=torch.device("cpu"), procs_per_node=2)) == (4, 2)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    with pytest.warns(UserWarning, match="CUDNN deterministic"):
        setup_process(args, argparse.Namespace(device=torch.device("cuda", 0), procs_per_node=1))
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
