"""What the benchmark scripts (bench_data, bench_step, bench_e2e, benchmark, bench_demo, gpu_facts) share:
the repository on sys.path; one way to take arguments (the command line, an argv list, or a dict of
settings when one benchmark runs another) and one entry that turns bad input into one line and exit
status 2; the device and the facts of the machine a figure was measured on; generated ImageNet-like
JPEG folders; JSON results and markdown tables.
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

from moco.errors import UserError, run_cli  # noqa: E402

COMMON_FLAGS = {
    "json": dict(metavar="PATH", help="also write the results here (JSON)"),
    "device": dict(help="auto (CUDA where torch sees a GPU), cpu, cuda or cuda:N"),
    "workers": dict(type=int, help="DataLoader worker processes (None: the cores this process may use)"),
    "images": dict(type=int, help="JPEG files to generate"),
    "seed": dict(type=int, help="seed of the generated images and of the initial weights"),
    "quick": dict(action="store_true", help="a small CPU configuration (flags given explicitly still apply)"),
}


def new_parser(doc):
    """A parser described by the first line of a script's docstring, with the defaults in --help."""
    return argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_flags(parser, **defaults):
    """The flags several benchmarks share, each with the script's own default: add_flags(p, json=None)."""
    for name, default in defaults.items():
        parser.add_argument("--" + name, default=default, **COMMON_FLAGS[name])


def arguments(parser, args=None):
    """`parser`'s Namespace for `args`: the command line (None), an argv list, a dict of settings over
    the defaults (how one benchmark runs another), or a Namespace, returned as it is."""
    if isinstance(args, argparse.Namespace):
        return args
    if not isinstance(args, dict):
        return parser.parse_args(args)
    defaults = vars(parser.parse_args([]))
    unknown = sorted(set(args) - set(defaults))
    if unknown:  # a misspelt setting would otherwise be ignored without a word
        raise TypeError(f"unknown settings {unknown}; known: {sorted(defaults)}")
    return argparse.Namespace(**{**defaults, **args})


def apply_quick(args, parser, settings):
    """`--quick`'s settings for every flag left at its default: a flag given explicitly wins."""
    for name, value in settings.items():
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    return args


def run_script(main, get_args_parser):
    """The command-line entry of a script: bad input (a UserError) is one line `prog: error: ...` on
    stderr and exit status 2, without a traceback."""
    return run_cli(main, get_args_parser().parse_args(), prog=os.path.basename(sys.argv[0]))


def usable_cores():
    """The cores this process may run on (a container or `taskset` may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def resolve_device(name="auto"):
    """The torch.device for --device: `auto` is CUDA where torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def synchronize(device):
    """Wait for the work queued on `device`, so that a clock read next covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device):
    """The GPU's name, or the CPU's usable cores and architecture."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU x {usable_cores()} ({platform.machine()})"


def gpus():
    """Each GPU torch sees: name, memory, compute capability and whether it computes in bf16."""
    found = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported()
        found.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30),
                      "capability": f"{props.major}.{props.minor}", "bf16": bf16})
    return found


def machine_facts(device=None):
    """What a timing means little without: the cores (all, and those this process may use), the load
    average before the run (os.getloadavg: processes running or waiting over the last 1, 5 and 15
    minutes), the versions, the GPUs, and the device measured."""
    facts = {"python": platform.python_version(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
             "load_before": os.getloadavg(), "torch": torch.__version__, "torchvision": torchvision.__version__,
             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "gpus": gpus()}
    if device is not None:
        facts.update(device=str(device), device_name=device_name(device))
    return facts


@contextlib.contextmanager
def recording_machine(device=None):
    """machine_facts(device), with the load average after the block added as `load_after`."""
    facts = machine_facts(device)
    yield facts
    facts["load_after"] = os.getloadavg()


def make_image(rng, width, height):
    """A natural-looking RGB image: a smooth random colour field, some edges and fine texture."""
    coarse = torch.from_numpy(rng.standard_normal((1, 3, height // 24 + 2, width // 24 + 2)).astype(np.float32))
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    medium = torch.from_numpy(rng.standard_normal((1, 3, height // 3 + 2, width // 3 + 2)).astype(np.float32))
    field += 0.3 * F.interpolate(medium, size=(height, width), mode="bilinear", align_corners=False)[0]
    field += 0.2 * torch.from_numpy(rng.standard_normal((3, height, width)).astype(np.float32))
    base = torch.from_numpy(rng.uniform(60, 190, size=(3, 1, 1)).astype(np.float32))
    pixels = (field * 45 + base).clamp(0, 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())


def _write_jpegs(job):
    root, indices, classes, seed = job
    for k in indices:
        rng = np.random.default_rng([seed, k])  # a stream per file: the same files for any number of processes
        width, height = (500, 375) if rng.random() < 0.7 else (375, 500)
        folder = os.path.join(root, f"class_{k % classes}")
        os.makedirs(folder, exist_ok=True)
        make_image(rng, width, height).save(os.path.join(folder, f"{k:06d}.jpg"), quality=95)


def generate_jpegs(root, images, classes=4, seed=0, processes=1):
    """`images` ImageNet-like JPEG files under root/class_<k>/: 500 x 375 or 375 x 500 px (ImageNet's
    typical sizes), quality 95, about 110 kB each like an average ImageNet file; written by `processes`
    processes."""
    start = time.perf_counter()
    processes = max(1, min(processes, images))
    jobs = [(root, range(p, images, processes), classes, seed) for p in range(processes)]
    if processes == 1:
        _write_jpegs(jobs[0])
    else:
        with multiprocessing.Pool(processes) as pool:
            pool.map(_write_jpegs, jobs)
    print(f"generated {images} JPEG files in {root} ({time.perf_counter() - start:.1f} s)", flush=True)
    return root


def holds_files(root):
    return os.path.isdir(root) and bool(os.listdir(root))


@contextlib.contextmanager
def scratch_folder(prefix):
    """A temporary folder, removed with everything in it when the block ends (also on an error)."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_json(result, path):
    """`result` as JSON at `path` (nothing without a path), replaced whole: a run killed while writing
    leaves the previous file, not half of one."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(path + ".tmp", path)


def print_markdown_table(header, rows):
    """A markdown table, to paste into the README as it is printed."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
