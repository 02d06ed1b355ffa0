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


class TrainingMeters:
    """The per-iteration meters of both scripts: batch time, data time, loss, top-1 and top-5."""

    def __init__(self, steps, prefix):
        self.batch_time = AverageMeter("Time", ":6.3f")
        self.data_time = AverageMeter("Data", ":6.3f")
        self.loss = AverageMeter("Loss", ":.4e")
        self.top1 = AverageMeter("Acc@1", ":6.2f")
        self.top5 = AverageMeter("Acc@5", ":6.2f")
        self.progress = ProgressMeter(
            steps, [self.batch_time, self.data_time, self.loss, self.top1, self.top5], prefix=prefix)

    def update(self, loss, output, target):
        """Record a step's loss and the top-1/top-5 accuracy of `output` (N x C) against `target`."""
        acc1, acc5 = accuracy(output, target, topk=(1, 5))
        n = target.shape[0]
        self.loss.update(loss.item(), n)
        self.top1.update(acc1.item(), n)
        self.top5.update(acc5.item(), n)

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
