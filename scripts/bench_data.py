"""Data-pipeline throughput: the MoCo v1/v2 two-crop pipelines, torchvision reference vs the fast path.

Generates an ImageFolder of JPEG files with ImageNet-like sizes and file sizes (500 x 375 and 375 x 500,
smooth random colour fields with texture, quality 95: about 110 kB, like an average ImageNet file) in a
temporary folder, then measures images/s (one image = its two crops) of

* ``tv-v1`` / ``tv-v2``: ImageFolder + ``moco.loader.pretrain_transform(aug_plus)`` (PIL/torchvision,
  normalised float crops made in the workers) in a DataLoader with N workers;
* ``fast-v1`` / ``fast-v2``: ImageFolder + ``moco.fastaug.worker.TwoCropsUint8`` (uint8 crops and colour
  parameters drawn in the workers) in the same DataLoader, plus ``moco.fastaug.batch_augment.BatchAugment``
  applied to both crops of every batch in the main process on ``--device``; that work is inside the timing.
* ``dev-v1`` / ``dev-v2``: ``--device-decode``'s workers (``moco.fastaug.worker.EncodedTwoCrops``) and
  decoding, cropping and augmenting on ``--device``.

Pipelines run in interleaved rounds (tv-v1, fast-v1, tv-v2, fast-v2, then again) so that load from other
processes hits all of them alike; each round's ratio fast/tv is taken from the two runs of that round,
and the summary gives the medians. Each run times the batches after the first one (worker start-up
excluded) of one pass over the data set. Besides wall-clock images/s it reports the CPU time (main
process + workers) per image over the same span: on a machine shared with other jobs the wall-clock
ratio depends on how the scheduler shares the cores (the fast path has one more busy process), while
the CPU-time ratio is what the pipelines cost. ``--profile`` adds a single-process breakdown of where
each pipeline's time goes.

    python scripts/bench_data.py --workers 2 --images 1024 --rounds 3
"""
import os
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as transforms_module

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/, where bench_common lives
import bench_common  # noqa: E402  (it puts the repository on sys.path)
from bench_common import UserError  # noqa: E402

from moco import loader  # noqa: E402
from moco.fastaug import batch_augment  # noqa: E402
from moco.fastaug.batch_augment import BatchAugment  # noqa: E402
from moco.fastaug.device_decode import DeviceDecoder  # noqa: E402
from moco.fastaug.prepare import AugmentOnDevice, DecodeOnDevice  # noqa: E402
from moco.fastaug.worker import (EncodedTwoCrops, TwoCropsUint8, collate_encoded, open_lazily,  # noqa: E402
                                 read_encoded)

PIPELINES = ("tv-v1", "fast-v1", "dev-v1", "tv-v2", "fast-v2", "dev-v2")


def build(pipeline, root, args, device):
    """(DataLoader, per-batch function) of one pipeline."""
    aug_plus = pipeline.endswith("v2")
    image_loader, collate = datasets.folder.default_loader, None
    if pipeline.startswith("tv"):
        transform = loader.pretrain_transform(aug_plus=aug_plus, crop_size=args.crop_size)
        step = None
    elif pipeline.startswith("dev"):  # --device-decode: bytes from the workers, decoded on `device`
        recipe = loader.recipe(aug_plus)
        transform = EncodedTwoCrops(args.crop_size, recipe)
        image_loader, collate = read_encoded, collate_encoded
        step = DecodeOnDevice(DeviceDecoder(args.crop_size, device), BatchAugment(recipe), device)
    else:
        recipe = loader.recipe(aug_plus)
        transform = TwoCropsUint8(args.crop_size, recipe)
        image_loader = open_lazily  # the transform decodes, in JPEG draft mode where the crops allow
        step = AugmentOnDevice(BatchAugment(recipe), device)
    dataset = datasets.ImageFolder(root, transform, loader=image_loader)
    data_loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                             pin_memory=device.type == "cuda", drop_last=True, collate_fn=collate)
    return data_loader, step


def _cpu_seconds(pids):
    """user + system CPU seconds used so far by the processes `pids` (Linux /proc), None if unavailable."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(parts[11]) + int(parts[12])) / tick  # utime, stime
    return total


def measure(pipeline, root, args, device):
    """(images/s, CPU seconds per image, worker CPU seconds per image) of one pass over the data, from
    the first batch to the last.

    The CPU time is that of the main process and the loader's worker processes over the same span;
    2 cores / (CPU seconds per image) is the throughput the pipeline would reach with the cores to itself.
    The workers' share is what a GPU machine pays on its CPUs when the batch side runs on the GPU.
    """
    data_loader, step = build(pipeline, root, args, device)
    iterator = iter(data_loader)
    workers = [w.pid for w in getattr(iterator, "_workers", [])]
    pids = [os.getpid()] + workers
    last = len(data_loader) - 1
    count, start, cpu_start, worker_start = 0, None, None, None
    for index, (images, _) in enumerate(iterator):
        if step is not None:
            images = step(images)
        bench_common.synchronize(device)
        assert images[0].dtype == torch.float32 and images[0].shape[-1] == args.crop_size
        if index == 0:
            start, cpu_start, worker_start = time.perf_counter(), _cpu_seconds(pids), _cpu_seconds(workers)
            continue
        count += images[0].shape[0]
        if index == last:  # before the loader shuts its workers down
            elapsed, cpu_end, worker_end = time.perf_counter() - start, _cpu_seconds(pids), _cpu_seconds(workers)
    cpu_per_image = None if cpu_start is None or cpu_end is None else (cpu_end - cpu_start) / count
    worker_per_image = None if not workers or worker_start is None or worker_end is None else \
        (worker_end - worker_start) / count
    return count / elapsed, cpu_per_image, worker_per_image


class _Timed:
    """Wraps a callable and adds its CPU time (time.process_time) to `totals[name]`."""

    def __init__(self, fn, name, totals):
        self.fn, self.name, self.totals = fn, name, totals

    def __call__(self, *a, **k):
        t = time.process_time()
        out = self.fn(*a, **k)
        self.totals[self.name] = self.totals.get(self.name, 0.0) + time.process_time() - t
        return out


def profile_pipelines(root, args, n_images=256):
    """Single-process CPU time per image of every stage of each pipeline: {pipeline: {stage: ms}}.

    Runs the same per-image work as the DataLoader workers (decode, transforms, collate) and the
    main-process BatchAugment in this process, one thread, timing each stage with time.process_time.
    """
    samples = datasets.ImageFolder(root).samples[:n_images]
    n = len(samples) - len(samples) % args.batch_size
    samples = samples[:n]
    result = {}
    for aug_plus in (False, True):
        v = "v2" if aug_plus else "v1"
        # reference: decode + torchvision/PIL recipe twice + collate
        totals = {}
        recipe = (loader.moco_v2_augmentation if aug_plus else loader.moco_v1_augmentation)(args.crop_size)
        recipe.transforms = [_Timed(t, type(t).__name__ if not isinstance(t, transforms_module.RandomApply)
                                    else f"RandomApply({type(t.transforms[0]).__name__})", totals)
                             for t in recipe.transforms]
        decode = _Timed(datasets.folder.default_loader, "decode", totals)
        collate = _Timed(torch.utils.data.default_collate, "collate", totals)
        for start in range(0, n, args.batch_size):
            batch = []
            for path, target in samples[start:start + args.batch_size]:
                image = decode(path)
                batch.append(([recipe(image), recipe(image)], target))
            collate(batch)
        result[f"tv-{v}"] = totals
        # fast path: decode + crop/flip twice + collate in the worker, BatchAugment in the main process
        totals = {}
        worker = TwoCropsUint8(args.crop_size, loader.recipe(aug_plus))
        crop = _Timed(worker, "crop+flip+params, both crops (worker)", totals)
        decode = _Timed(datasets.folder.default_loader, "decode", totals)
        collate = _Timed(torch.utils.data.default_collate, "collate", totals)
        # the per-image operations BatchAugment calls, timed where it looks them up
        tables = [(batch_augment._SCALAR_OPS, name) for name in batch_augment._SCALAR_OPS]
        tables += [(batch_augment._SCALAR_OPS_WS, name) for name in batch_augment._SCALAR_OPS_WS]
        originals = [table[name] for table, name in tables]
        original_gray = batch_augment.grayscale_
        try:
            for (table, name), fn in zip(tables, originals):
                table[name] = _Timed(fn, f"batch: {name}", totals)
            batch_augment.grayscale_ = _Timed(original_gray, "batch: gray", totals)
            run_augment = _Timed(AugmentOnDevice(BatchAugment(loader.recipe(aug_plus)), "cpu"), "batch: total", totals)
            for start in range(0, n, args.batch_size):
                batch = []
                for path, target in samples[start:start + args.batch_size]:
                    batch.append((crop(decode(path)), target))
                images, _ = collate(batch)
                run_augment(images)
        finally:
            for (table, name), fn in zip(tables, originals):
                table[name] = fn
            batch_augment.grayscale_ = original_gray
        parts = sum(v for k, v in totals.items() if k.startswith("batch: ") and k != "batch: total")
        totals["batch: convert+normalise+loop"] = totals["batch: total"] - parts
        result[f"fast-{v}"] = totals
    return {p: {k: v / n * 1e3 for k, v in totals.items()} for p, totals in result.items()}


def print_profile(profile):
    for p, stages in profile.items():
        total = sum(v for k, v in stages.items() if not k.startswith("batch: ")) + stages.get("batch: total", 0.0)
        print(f"{p}: {total:.2f} CPU-ms/image (one process, one thread)")
        for k, v in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"    {k:34s} {v:7.3f} ms")


def run(args=None):
    """Run the benchmark; returns a dict with per-round images/s, ratios and their medians. `args`: a
    Namespace, an argv list, or a dict of settings over the defaults (bench_common.arguments)."""
    args = bench_common.arguments(get_args_parser(), args)
    device = bench_common.resolve_device(args.device)
    torch.set_num_threads(args.main_threads)
    torch.manual_seed(args.seed)
    with bench_common.recording_machine(device) as machine, bench_common.scratch_folder("bench_data_") as tmp:
        root = args.data or tmp
        if not bench_common.holds_files(root):
            bench_common.generate_jpegs(root, args.images, seed=args.seed)
        n_files = sum(len(files) for _, _, files in os.walk(root))
        if n_files < 2 * args.batch_size:
            raise UserError(f"{n_files} images: need at least two batches of {args.batch_size} (--images, --batch-size)")
        profile = profile_pipelines(root, args) if args.profile else None
        if profile:
            print_profile(profile)
        rounds = [measure_round(r, root, args, device) for r in range(args.rounds)]
    config = {"workers": args.workers, "images": n_files, "batch_size": args.batch_size, "crop_size": args.crop_size,
              "rounds": args.rounds, "device": str(device), "main_threads": args.main_threads,
              "cpus": os.cpu_count(), "torch": torch.__version__}
    return {"config": config, "machine": machine, **summarize(rounds, args.pipelines),
            "profile_cpu_ms_per_image": profile}


def measure_round(index, root, args, device):
    """One pass of every pipeline, in the order given: {pipeline: images/s, CPU-ms per image (all, workers)}."""
    result = {}
    for pipeline in args.pipelines:
        speed, cpu, worker = measure(pipeline, root, args, device)
        result[pipeline] = {"images_per_s": speed, "cpu_ms_per_image": None if cpu is None else cpu * 1e3,
                            "worker_cpu_ms_per_image": None if worker is None else worker * 1e3}
        cpu_text = "" if cpu is None else f", {cpu * 1e3:6.2f} CPU-ms/image"
        cpu_text += "" if worker is None else f" ({worker * 1e3:5.2f} in workers)"
        print(f"round {index}: {pipeline:8s} {speed:8.1f} images/s{cpu_text}", flush=True)
    return result


def summarize(rounds, pipelines):
    """Each pipeline's medians over the rounds, and the fast and device-decode pipelines against
    torchvision's (of the same recipe) round by round; nothing without rounds."""
    if not rounds:
        return {}

    def medians(key):  # None for a figure this platform does not measure
        values = {p: [r[p][key] for r in rounds] for p in pipelines}
        return {p: None if None in v else statistics.median(v) for p, v in values.items()}

    pairs = [(f"{kind}-{v}", f"tv-{v}") for kind in ("fast", "dev") for v in ("v1", "v2")]
    return {"rounds": rounds, "median_images_per_s": medians("images_per_s"),
            "median_cpu_ms_per_image": medians("cpu_ms_per_image"),
            "median_worker_cpu_ms_per_image": medians("worker_cpu_ms_per_image"),
            "ratio_fast_over_tv": {fast: ratio(rounds, fast, tv) for fast, tv in pairs
                                   if fast in pipelines and tv in pipelines}}


def ratio(rounds, fast, tv):
    """`fast` against `tv`, per round and the median: images/s fast / tv, and CPU time (all processes,
    workers only) per image tv / fast where every round measured it."""
    out = {}
    for prefix, key, num, den in (("", "images_per_s", fast, tv), ("cpu_", "cpu_ms_per_image", tv, fast),
                                  ("worker_cpu_", "worker_cpu_ms_per_image", tv, fast)):
        values = [r[num][key] / r[den][key] if r[num][key] and r[den][key] else None for r in rounds]
        if None not in values:
            out[prefix + "per_round"], out[prefix + "median"] = values, statistics.median(values)
    return out


def get_args_parser():
    p = bench_common.new_parser(__doc__)
    bench_common.add_flags(p, workers=2, images=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--crop-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", help="device of BatchAugment: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--main-threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    p.add_argument("--data", default=None, help="existing ImageFolder root (else a generated temporary one)")
    bench_common.add_flags(p, seed=0, json=None)
    p.add_argument("--profile", action="store_true",
                   help="first print a single-process CPU-time breakdown of each pipeline's stages")
    return p


def main(args=None):
    args = bench_common.arguments(get_args_parser(), args)
    result = run(args)
    bench_common.write_json(result, args.json)
    if "median_images_per_s" in result:
        print_summary(result)
    return result


def print_summary(result):
    """The medians over the rounds, one pipeline a line, then the ratios to torchvision's pipelines."""
    print(f"\n{'pipeline':10s} {'images/s':>10s} {'CPU-ms/image':>13s} {'in workers':>11s}   (medians over rounds)")
    for p, v in result["median_images_per_s"].items():
        cpu, worker = result["median_cpu_ms_per_image"][p], result["median_worker_cpu_ms_per_image"][p]
        print(f"{p:10s} {v:10.1f} {'n/a' if cpu is None else f'{cpu:.2f}':>13s} "
              f"{'n/a' if worker is None else f'{worker:.2f}':>11s}")
    for name, r in result["ratio_fast_over_tv"].items():
        rounds = ", ".join(f"{x:.2f}" for x in r["per_round"])
        line = f"ratio {name} / tv: images/s {r['median']:.2f}x (rounds: {rounds})"
        if "cpu_median" in r:
            line += f"; by CPU time per image {r['cpu_median']:.2f}x"
        if "worker_cpu_median" in r:
            line += f"; by worker CPU time per image {r['worker_cpu_median']:.2f}x"
        print(line)


if __name__ == "__main__":
    bench_common.run_script(main, get_args_parser)
