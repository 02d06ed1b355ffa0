"""Rank-0 output: console lines, one JSON line per epoch in OUTPUT_DIR/log.txt and, with
--tensorboard, TensorBoard scalars in OUTPUT_DIR/tensorboard/ (per print step and per epoch)."""
import json
import math
import os
import sys

from moco.errors import UserError

TENSORBOARD_DIR = "tensorboard"


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, or a UserError saying how to install what it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        reason = " ".join(str(err).split())
        raise UserError(f"--tensorboard needs the 'tensorboard' package, which cannot be imported ({reason}); "
                        f"install it with: pip install tensorboard") from None
    return SummaryWriter


def require_tensorboard(enabled):
    """Fail at start-up, before any work, when --tensorboard is given but cannot work."""
    if enabled:
        summary_writer_class()


def numeric_items(entry):
    """The (name, value) pairs of `entry` that are finite or infinite numbers (not bools, not text)."""
    for name, value in entry.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            yield name, value


class RunLog:
    """Prints and records only on the main process; other processes stay silent.

    With `tensorboard`, the main process also writes TensorBoard scalars under
    OUTPUT_DIR/tensorboard/: `scalars()` as `step/<name>` at the global step, and every numeric field of
    `record()` as `epoch/<name>` at the epoch. The event file is opened at the first scalar (so a run
    that writes none, like `main_lincls.py -e`, leaves no file). Use it as a context manager (or call
    `close()`) so the event file is complete when the run ends.
    """

    def __init__(self, output_dir, is_main, tensorboard=False):
        self.output_dir = output_dir
        self.is_main = is_main
        self.path = os.path.join(output_dir, "log.txt")
        self.writer = None
        self.writer_class = summary_writer_class() if tensorboard and is_main else None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def info(self, message):
        if self.is_main:
            print(message, flush=True)

    def warn(self, message):
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def scalars(self, step, meters=None, **values):
        """TensorBoard scalars `step/<name>` at global step `step`: the latest values of `meters` (a
        moco.meters.TrainingMeters: loss, acc1, acc5, batch_time_s, data_time_s) and `values`.
        Nothing without --tensorboard."""
        if not self.open_writer():
            return
        if meters is not None:
            values = {"loss": meters.loss.val, "acc1": meters.top1.val, "acc5": meters.top5.val,
                      "batch_time_s": meters.batch_time.val, "data_time_s": meters.data_time.val, **values}
        for name, value in numeric_items(values):
            self.writer.add_scalar(f"step/{name}", value, step)

    def record(self, entry, saved=None):
        """Append `entry` as one JSON line to log.txt; with --tensorboard, its numbers as epoch scalars.

        A failed append (a full disk) raises UserError, which names `saved` (default: the entry's
        `checkpoint`), the checkpoint written just before, as kept: the run resumes from it."""
        if not self.is_main:
            return
        line = json.dumps(entry, sort_keys=False) + "\n"
        try:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as err:  # a full disk, a quota, a log.txt made a folder meanwhile
            saved = saved or entry.get("checkpoint")
            kept = f"; the checkpoint '{saved}' is written and kept" if saved else ""
            raise UserError(f"cannot append to '{self.path}': {err.strerror or err}{kept}; make room (or fix "
                            f"the file) and run the same command again to continue") from None
        if "epoch" in entry and self.open_writer():
            for name, value in numeric_items(entry):
                if name != "epoch":
                    self.writer.add_scalar(f"epoch/{name}", value, entry["epoch"])
            self.writer.flush()

    def open_writer(self):
        """Whether TensorBoard scalars are written; opens the event file on first use."""
        if self.writer is None and self.writer_class is not None:
            folder = os.path.join(self.output_dir, TENSORBOARD_DIR)
            self.writer = self.writer_class(log_dir=folder, flush_secs=10)
        return self.writer is not None

    def close(self):
        """Flush and close the TensorBoard event file (if any); safe to call more than once."""
        if self.writer is not None:
            self.writer.close()
        self.writer = self.writer_class = None
