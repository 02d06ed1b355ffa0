"""Image folders that fail clearly, survive bad files, and sample reproducibly across resumptions."""
import os
import random
import signal
import stat
import sys

import torch
import torch.distributed  # noqa: F401  (DistributedSampler needs it imported)
from torch.utils.data import DataLoader, DistributedSampler, Sampler, get_worker_info
from PIL import Image
from torchvision import datasets

from moco.errors import UserError

# what PIL and the loader raise for unreadable, truncated, corrupt or too large (decompression bomb) images
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, IndexError, TypeError, Image.DecompressionBombError)
# the run stops when more than MAX_BAD_SHARE of the distinct images read so far are unreadable, judged
# once at least MIN_BAD_TO_JUDGE of them (or the whole folder, if smaller) have been found unreadable
MAX_BAD_SHARE = 0.5
MIN_BAD_TO_JUDGE = 50
READ_OK, READ_FAILED = 1, 2


def require_split(root, split):
    """`root/split` as a path, or UserError saying which folder is missing."""
    if not root:
        raise UserError("no data folder given")
    if not os.path.isdir(root):
        raise UserError(f"data folder '{root}' does not exist or is not a directory")
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise UserError(f"data folder '{root}' has no '{split}' subfolder (expected the ImageNet layout "
                        f"{root}/{split}/<class>/<image>)")
    return path


def sample_seed(data_seed, epoch, index):
    """A seed for the augmentation of one sample in one epoch: independent of workers and resumes."""
    return (data_seed * 1_000_003 + epoch * 10_000_019 + index) % (2**63 - 1)


class UnreadableImages(UserError, RuntimeError):
    """Most images read so far are unreadable: the folder, not one file, is the problem."""


class ImageReadError(Exception):
    """An image that cannot be read. RobustImageFolder raises it for its loader's errors; a transform
    that decodes the image itself (its loader having only opened the file) raises it for the decoding's
    errors. `error` is the original error."""

    def __init__(self, error):
        super().__init__(f"{type(error).__name__}: {error}")
        self.error = error


class NotARegularFile(OSError):
    """An image path that is a FIFO, socket or device: opening it could block forever (a FIFO waits for
    a writer, in an uninterruptible open), so it is skipped like an unreadable image without opening."""


def require_regular_file(path):
    """Raise NotARegularFile unless `path` (links followed) is a regular file; os.stat never blocks."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a directory" if stat.S_ISDIR(mode)
                else "not a regular file")
        raise NotARegularFile(f"{kind}, not an image file; not opened")


def fallback_sample(index, attempt, num_samples):
    """The sample that stands in for unreadable sample `index` at `attempt` (1, 2, ...): drawn
    pseudo-randomly from the whole folder, fixed for (index, attempt) so that runs and resumptions
    see the same data. Not the next index: images of one class lie together, and a broken class folder
    would otherwise be walked file by file and read as a broken data set."""
    return random.Random(index * 1_000_003 + attempt).randrange(num_samples)


class RobustImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder that (1) reports an unreadable image once and returns the next good
    sample instead of killing the run, counting them in shared memory, and (2) when indexed with
    `(epoch, index)` pairs, draws that sample's augmentation from a seed of (data_seed, epoch, index),
    so the data stream does not depend on the number of workers or on where a run was resumed.
    """

    def __init__(self, root, transform=None, data_seed=None, loader=None):
        try:
            super().__init__(root, transform=transform, **({"loader": loader} if loader else {}))
        except FileNotFoundError as err:
            raise UserError(f"image folder '{root}': {str(err).strip()}") from None
        if not self.samples:
            raise UserError(f"image folder '{root}' holds no images")
        self.data_seed = data_seed
        # one flag per sample in shared memory, so that all loader workers (and, merged after each
        # epoch by the training script, all processes) report and count each bad image once
        self.bad_flags = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        # what this process (any of its workers) met reading each sample; never merged across
        # processes, so that the share of unreadable images is judged over the reads of one process
        self.outcomes = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    @property
    def bad_images(self):
        """The number of distinct unreadable images met so far."""
        return int(self.bad_flags.sum())

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (None, key)
        sample = index
        for attempt in range(1, 1 + 10 * len(self.samples)):
            path, target = self.samples[sample]
            try:
                transformed = self._transform(self._load(path), epoch, index)
            except ImageReadError as unreadable:
                last_error = err = unreadable.error
                self._report_bad(sample, path, err)
                self.outcomes[sample] = READ_FAILED
                self._judge_folder(path, err)
                sample = fallback_sample(index, attempt, len(self.samples))
                continue
            self.outcomes[sample] = READ_OK
            return transformed, target
        self._judge_folder(path, last_error, give_up=True)

    def _load(self, path):
        """The loader's image of `path`; its errors (and a path that is no regular file) as ImageReadError."""
        try:
            require_regular_file(path)
            return self.loader(path)
        except IMAGE_ERRORS as err:
            raise ImageReadError(err) from err

    def _judge_folder(self, path, err, give_up=False):
        """Raise UnreadableImages when the folder, not a few files, is broken: more than MAX_BAD_SHARE of
        the distinct images this process has read so far (in any of its workers) are unreadable."""
        bad, good = int((self.outcomes == READ_FAILED).sum()), int((self.outcomes == READ_OK).sum())
        enough = bad >= min(MIN_BAD_TO_JUDGE, len(self.samples))
        if give_up or (enough and bad > MAX_BAD_SHARE * (bad + good)):
            raise UnreadableImages(
                f"{bad} of the {bad + good} images read so far in '{self.root}' are unreadable "
                f"({100 * bad / max(1, bad + good):.0f} %; the last: '{path}', {type(err).__name__}); are all "
                f"its images unreadable?")

    def report_unreadable(self, path, err):
        """Report an image found unreadable outside the loader (e.g. by the device's JPEG decoder)."""
        if not hasattr(self, "_sample_of_path"):
            self._sample_of_path = {p: i for i, (p, _) in enumerate(self.samples)}
        self._report_bad(self._sample_of_path[path], path, err)

    def _report_bad(self, sample, path, err):
        if self.bad_flags[sample]:
            return
        self.bad_flags[sample] = 1
        print(f"warning: skipping unreadable image '{path}' ({type(err).__name__}: {err})",
              file=sys.stderr, flush=True)

    def _transform(self, image, epoch, index):
        if self.transform is None:
            return image
        if epoch is None or self.data_seed is None:
            return self.transform(image)
        seed = sample_seed(self.data_seed, epoch, index)
        if get_worker_info() is not None:  # a worker's RNG belongs to the data alone
            seed_cpu_streams(seed)
            return self.transform(image)
        # in the main process, leave the training RNG streams as they were
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed_cpu_streams(seed)
            out = self.transform(image)
        random.setstate(python_state)
        return out


def seed_cpu_streams(seed):
    """Seed the streams the transforms draw from: Python's and torch's CPU generator. Not
    `torch.manual_seed`, which also seeds every accelerator's generator: in the main process that would
    reseed the training's CUDA stream (which `fork_rng(devices=[])` does not restore), and per sample it
    costs about 0.25 ms of CPU (a stack trace per lazily queued accelerator seed) against 2 us."""
    random.seed(seed)
    torch.default_generator.manual_seed(seed)


def pass_sigterm_to_trainer(worker_id):
    """worker_init_fn: a SIGTERM to a loader worker (a cluster's preemption signals every process of the
    job) goes on to the training process, which saves an `_iter` checkpoint and stops, while the worker
    keeps serving batches until then. A worker whose trainer is not catching SIGTERM (it is shutting
    down, or never catches it) ends as SIGTERM would end it."""
    trainer = os.getppid()
    # Ctrl-C reaches every process of the terminal's foreground group, workers included: the trainer
    # alone decides (saves and stops, or stops at a second Ctrl-C) and then shuts its workers down
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def forward(signum, frame):
        if os.getppid() == trainer and _catches_sigterm(trainer):
            os.kill(trainer, signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)


def _catches_sigterm(pid):
    """Whether process `pid` has a SIGTERM handler (Linux /proc; False where that cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool((int(line.split()[1], 16) >> (signal.SIGTERM - 1)) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def make_loader(dataset, sampler, batch, workers, device, drop_last, collate_fn=None):
    """A DataLoader with persistent, prefetching workers and pinned memory on CUDA."""
    return DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        worker_init_fn=pass_sigterm_to_trainer,
        pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator())  # its own generator: the loader never draws from the training RNG


class ResumableSampler(Sampler):
    """DistributedSampler's order for one epoch (a world of one included), started after `start_step`
    batches, yielding `(epoch, index)` pairs for RobustImageFolder's per-sample seeding."""

    def __init__(self, dataset, num_replicas, rank, seed, batch_size):
        self.inner = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                                        seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch = epoch
        self.start_step = start_step
        self.inner.set_epoch(epoch)

    def steps_per_epoch(self):
        return len(self.inner) // self.batch_size

    def __iter__(self):
        indices = list(self.inner)[self.start_step * self.batch_size:]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self):
        return max(0, len(self.inner) - self.start_step * self.batch_size)


class ShardSampler(Sampler):
    """Every index exactly once over all processes (no padding): process r takes r, r+W, r+2W, ..."""

    def __init__(self, num_samples, num_replicas, rank):
        self.indices = list(range(rank, num_samples, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
