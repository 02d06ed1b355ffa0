"""Learning-rate schedules of the reference: step (x0.1 at each milestone) or half-cycle cosine.

The lr is set once per epoch, as in the reference.
"""
import math


def learning_rate(base_lr, epoch, epochs, schedule=(), cos=False):
    """The lr for `epoch` (0-based): cosine base*0.5*(1+cos(pi*epoch/epochs)), else
    base*0.1**(number of milestones <= epoch)."""
    if cos:
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    drops = sum(1 for milestone in schedule if epoch >= milestone)
    return base_lr * (0.1 ** drops)


def adjust_learning_rate(optimizer, epoch, args, cos=False):
    """Set every param group's lr for `epoch` from args.lr, args.epochs and args.schedule."""
    lr = learning_rate(args.lr, epoch, args.epochs, args.schedule, cos)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
