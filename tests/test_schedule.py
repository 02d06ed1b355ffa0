"""The learning-rate schedules of the reference (step at --schedule, or cosine with --cos) against plain arithmetic."""
import argparse
import math

import pytest
import torch

from moco.schedule import adjust_learning_rate, learning_rate


@pytest.mark.parametrize("epoch, drops", [(0, 0), (1, 0), (119, 0), (120, 1), (121, 1), (159, 1), (160, 2),
                                          (199, 2)])
def test_step_schedule_drops_tenfold_at_each_milestone_reached(epoch, drops):
    expected = 0.03 * 0.1 ** drops
    assert learning_rate(0.03, epoch, 200, [120, 160]) == pytest.approx(expected, rel=1e-12)


def test_step_schedule_counts_milestones_in_any_order_and_none():
    assert learning_rate(1.0, 50, 100, [60, 20, 40]) == pytest.approx(1e-2)
    assert learning_rate(0.5, 99, 100, []) == 0.5


@pytest.mark.parametrize("epoch", [0, 1, 50, 100, 150, 199])
def test_cosine_schedule(epoch):
    expected = 0.03 * 0.5 * (1.0 + math.cos(math.pi * epoch / 200))
    assert learning_rate(0.03, epoch, 200, [120, 160], cos=True) == pytest.approx(expected, rel=1e-12)


def test_cosine_ignores_milestones_and_is_half_at_midpoint():
    assert learning_rate(0.2, 0, 10, [1, 2], cos=True) == pytest.approx(0.2)
    assert learning_rate(0.2, 5, 10, [1, 2], cos=True) == pytest.approx(0.1)
    values = [learning_rate(0.2, e, 10, cos=True) for e in range(10)]
    assert all(a > b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("cos", [False, True])
def test_adjust_learning_rate_sets_every_param_group(cos):
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 5.0}], lr=1.0)
    args = argparse.Namespace(lr=0.4, epochs=8, schedule=[2, 6])
    for epoch in range(8):
        lr = adjust_learning_rate(optimizer, epoch, args, cos=cos)
        if cos:
            expected = 0.4 * 0.5 * (1 + math.cos(math.pi * epoch / 8))
        else:
            expected = 0.4 * 0.1 ** ((epoch >= 2) + (epoch >= 6))
        assert lr == pytest.approx(expected, rel=1e-12)
        assert [group["lr"] for group in optimizer.param_groups] == [lr, lr]
