"""Progress meters and top-k accuracy shared by both scripts."""
import torch


class AverageMeter:
    """Keeps the latest value and the running average of a quantity."""

    def __init__(self, name, fmt=":f"):
        self.name = name
        self.fmt = fmt
        self.reset()

    def reset(self):
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val, n=1):
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / self.count

    def __str__(self):
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


class ProgressMeter:
    """Formats the familiar per-iteration line: `Epoch: [e][ i/n]  Time ...  Loss ...`."""

    def __init__(self, num_batches, meters, prefix=""):
        digits = len(str(num_batches))
        self.batch_fmt = "[{:" + str(digits) + "d}/" + str(num_batches) + "]"
        self.meters = meters
        self.prefix = prefix

    def line(self, batch, extra=()):
        parts = [self.prefix + self.batch_fmt.format(batch)]
        parts += [str(meter) for meter in self.meters]
        parts += list(extra)
        return "\t".join(parts)


class DeviceAverageMeter(AverageMeter):
    """An AverageMeter whose values stay on the training device until they are read.

    `add(values, n)` accumulates without waiting for the device; `val`, `avg` (and printing) fetch them,
    one transfer for all the meters of a `DeviceMeterGroup`. Reading the loss every step would stop
    the host until the GPU finishes the step, so that the next step is not queued in time.
    """

    def __init__(self, name, fmt, group):
        self.group = group
        super().__init__(name, fmt)

    def __getattribute__(self, name):
        if name in ("val", "sum", "avg", "count"):
            object.__getattribute__(self, "group").fetch()
        return object.__getattribute__(self, name)

    def __str__(self):
        self.group.fetch()
        return super().__str__()


class DeviceMeterGroup:
    """Latest values and weighted sums of several scalars, kept on their device (one vector)."""

    def __init__(self, meters):
        self.meters = meters
        self.last = None
        self.total = None
        self.count = 0
        self.stale = False

    @torch.no_grad()
    def add(self, values, n):
        """Record the latest `values` (a 1-D tensor, one entry per meter) as the average of `n` items."""
        self.last = values.detach().float()
        self.total = self.last * n if self.total is None else self.total.add_(self.last, alpha=n)
        self.count += n
        self.stale = True

    def fetch(self):
        if not self.stale:
            return
        self.stale = False
        last, total = torch.stack([self.last, self.total]).tolist()  # the one host-device wait
        for meter, value, summed in zip(self.meters, last, total):
            object.__setattr__(meter, "val", value)
            object.__setattr__(meter, "sum", summed)
            object.__setattr__(meter, "count", self.count)
            object.__setattr__(meter, "avg", summed / self.count)


class TrainingMeters:
    """The per-iteration meters of both scripts: batch time, data time, loss, top-1 and top-5.

    Loss and accuracies stay on the device until a line is printed or a value is read."""

    def __init__(self, steps, prefix):
        self.batch_time = AverageMeter("Time", ":6.3f")
        self.data_time = AverageMeter("Data", ":6.3f")
        self.device_values = DeviceMeterGroup([])
        self.loss = DeviceAverageMeter("Loss", ":.4e", self.device_values)
        self.top1 = DeviceAverageMeter("Acc@1", ":6.2f", self.device_values)
        self.top5 = DeviceAverageMeter("Acc@5", ":6.2f", self.device_values)
        self.device_values.meters = [self.loss, self.top1, self.top5]
        self.progress = ProgressMeter(
            steps, [self.batch_time, self.data_time, self.loss, self.top1, self.top5], prefix=prefix)

    def update(self, loss, output, target):
        """Record a step's loss and the top-1/top-5 accuracy of `output` (N x C) against `target`."""
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        self.device_values.add(torch.stack([loss.detach().float(), acc1, acc5]), target.shape[0])

    def line(self, step, extra=()):
        return self.progress.line(step, extra)


@torch.no_grad()
def topk_correct(output, target, topk=(1,)):
    """How many of the N rows of `output` (N x C logits) have `target` among their top k, for each k.

    Uses `reshape`, not `view`, so it works on the non-contiguous tensors that newer PyTorch returns.
    """
    maxk = min(max(topk), output.shape[1])
    _, pred = output.topk(maxk, dim=1, largest=True, sorted=True)  # pred: N x maxk
    correct = pred.t().eq(target.reshape(1, -1).expand(maxk, -1))  # correct: maxk x N
    return [correct[:min(k, maxk)].reshape(-1).float().sum() for k in topk]


@torch.no_grad()
def accuracy(output, target, topk=(1,)):
    """Top-k accuracy in percent for each k, from logits `output` (N x C) and labels `target` (N)."""
    return [count * (100.0 / target.shape[0]) for count in topk_correct(output, target, topk)]


class ThroughputWindow:
    """Steady-state images per second of an epoch, measured between synchronised points.

    `mark(step, now, data_seconds)` is called where the host has just waited for the device (the
    StepGuard checks), so the times are the device's progress, not how far ahead the host has queued
    work. The window runs from the first mark at or after `skip` steps into the epoch (the loader's
    workers start each epoch with an empty queue; the first steps pay their start-up) to the last mark.
    `data_seconds` is the running total of time spent waiting for batches, for the Data/Time split.
    """

    def __init__(self, skip):
        self.skip = skip
        self.first = None
        self.last = None

    def mark(self, step, now, data_seconds):
        point = (step, now, data_seconds)
        if self.first is None and step >= self.skip:
            self.first = point
        elif self.first is not None:
            self.last = point

    def summary(self, images_per_step):
        """{"steady_images_per_s", "steady_data_fraction", "steady_steps"}, or {} without a window."""
        if self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return {}
        steps = self.last[0] - self.first[0]
        seconds = self.last[1] - self.first[1]
        return {"steady_images_per_s": round(steps * images_per_step / seconds, 1),
                "steady_data_fraction": round((self.last[2] - self.first[2]) / seconds, 3),
                "steady_steps": steps}
