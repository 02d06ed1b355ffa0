"""Top-k accuracy and the progress meters."""
import pytest
import torch

from moco.meters import AverageMeter, ProgressMeter, accuracy


def plain_topk_accuracy(logits, target, k):
    hits = 0
    for row, label in zip(logits.tolist(), target.tolist()):
        order = sorted(range(len(row)), key=lambda c: row[c], reverse=True)
        hits += label in order[:k]
    return 100.0 * hits / len(target)


@pytest.mark.parametrize("make", ["transposed", "sliced", "contiguous"])
def test_accuracy_matches_a_plain_computation(make):
    generator = torch.Generator().manual_seed(0)
    if make == "transposed":
        logits = torch.randn(10, 23, generator=generator).t()  # 23 x 10, not contiguous
    elif make == "sliced":
        logits = torch.randn(23, 30, generator=generator)[:, ::3]  # 23 x 10, strided
    else:
        logits = torch.randn(23, 10, generator=generator)
    assert logits.shape == (23, 10)
    assert make == "contiguous" or not logits.is_contiguous()
    target = torch.randint(0, 10, (23,), generator=generator)
    ks = (1, 2, 5, 10)
    results = accuracy(logits, target, topk=ks)
    assert len(results) == len(ks)
    for k, value in zip(ks, results):
        assert value.item() == pytest.approx(plain_topk_accuracy(logits, target, k))
    assert results[-1].item() == pytest.approx(100.0)


def test_accuracy_known_values_and_k_above_classes():
    logits = torch.tensor([[0.1, 0.9, 0.0],    # top1 1, top2 {1, 0}
                           [0.8, 0.1, 0.3],    # top1 0, top2 {0, 2}
                           [0.2, 0.3, 0.5],    # top1 2, top2 {2, 1}
                           [0.6, 0.3, 0.1]])   # top1 0, top2 {0, 1}
    target = torch.tensor([1, 2, 0, 1])
    top1, top2, top5 = accuracy(logits, target, topk=(1, 2, 5))
    assert top1.item() == pytest.approx(25.0)
    assert top2.item() == pytest.approx(75.0)
    assert top5.item() == pytest.approx(100.0)  # k above the number of classes counts every class


def test_accuracy_of_moco_logits_positives_in_column_zero():
    logits = torch.randn(6, 33)
    logits[:4, 0] = 100.0  # four rows rank their positive first
    labels = torch.zeros(6, dtype=torch.long)
    logits[4:, 0] = -100.0
    top1, = accuracy(logits, labels)
    assert top1.item() == pytest.approx(100.0 * 4 / 6)


def test_average_meter_weighted_average_and_latest_value():
    meter = AverageMeter("Loss", ":.3f")
    meter.update(2.0, n=1)
    meter.update(4.0, n=3)
    assert meter.val == 4.0
    assert meter.count == 4
    assert meter.sum == pytest.approx(14.0)
    assert meter.avg == pytest.approx(3.5)
    assert str(meter) == "Loss 4.000 (3.500)"
    meter.update(torch.tensor(1.0))
    assert meter.avg == pytest.approx(3.0)
    meter.reset()
    assert (meter.val, meter.sum, meter.count, meter.avg) == (0.0, 0.0, 0, 0.0)


def test_progress_meter_line_format():
    time_meter = AverageMeter("Time", ":6.3f")
    loss = AverageMeter("Loss", ":.4e")
    time_meter.update(0.5)
    time_meter.update(1.5)
    loss.update(2.0)
    progress = ProgressMeter(120, [time_meter, loss], prefix="Epoch: [3]")
    line = progress.line(7, ["LR 0.03", "Img/s 12.5"])
    assert line == ("Epoch: [3][  7/120]\tTime  1.500 ( 1.000)\tLoss 2.0000e+00 (2.0000e+00)"
                    "\tLR 0.03\tImg/s 12.5")
    assert progress.line(119).startswith("Epoch: [3][119/120]\t")


def test_training_meters_keep_values_on_the_device_until_read():
    from moco.meters import TrainingMeters
    meters = TrainingMeters(10, prefix="Epoch: [0]")
    logits = torch.tensor([[3.0, 1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 5.0, 1.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 0])
    meters.update(torch.tensor(2.0), logits, labels)
    meters.update(torch.tensor(4.0), logits, labels[:1])
    assert meters.device_values.stale  # nothing read yet
    assert meters.loss.val == 4.0 and meters.loss.avg == pytest.approx((2.0 * 2 + 4.0) / 3)
    assert meters.top1.val == 100.0 and meters.top1.avg == pytest.approx(100.0 * 2 / 3)
    assert meters.loss.count == 3 and not meters.device_values.stale
    assert "Loss 4.0000e+00 (2.6667e+00)" in meters.line(1)


def test_throughput_window_skips_the_start_and_splits_data_time():
    from moco.meters import ThroughputWindow
    window = ThroughputWindow(skip=10)
    for step, now, data in [(0, 0.0, 0.0), (5, 9.0, 4.0), (10, 10.0, 5.0), (20, 12.0, 5.5), (30, 14.0, 6.0)]:
        window.mark(step, now, data)
    summary = window.summary(images_per_step=8)
    assert summary == {"steady_images_per_s": 20 * 8 / 4.0, "steady_data_fraction": 0.25, "steady_steps": 20}
    assert ThroughputWindow(skip=50).summary(8) == {}
