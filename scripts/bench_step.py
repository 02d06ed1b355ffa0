#!/usr/bin/env python
"""Training-step speed of moco.builder.MoCo against the plain reference-style MoCo of tests/reference_moco.py.

One step = forward (query and key encoders, shuffle, logits) + cross-entropy + backward + SGD step, on
random images already on the device (no data loading). Both models start from the same weights and
queue and consume the same random numbers. Each round times `--steps` consecutive steps of one model
between two synchronisations, as main_moco.py's loop runs them (the host queues step after step and
waits only at its check points), with main_moco.py's own process settings (moco.distributed.setup_process:
cuDNN autotuning on, as in a run without --seed) and its precision (moco.precision.Precision: bf16
autocast, or fp16 with a GradScaler and fused SGD). Rounds are interleaved (A B, B A, A B, ...) so that
noise from other work on the machine hits both alike; the reported throughput uses the median round,
min and max give the spread.

    python scripts/bench_step.py                       # ResNet-18, batch 32, 64 x 64 crops, K 4096, CPU or GPU
    python scripts/bench_step.py --mlp --json out.json

`run(args)` returns the results as a dict (args: a Namespace, an argv list, or a dict of settings over
the defaults), for scripts that collect several benchmarks (bench_e2e.py, benchmark.py).
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/, where bench_common lives
import bench_common  # noqa: E402  (it puts the repository on sys.path)
from bench_common import UserError  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from moco.builder import MoCo, contrastive_loss  # noqa: E402
from moco.distributed import setup_process  # noqa: E402
from moco.precision import Precision  # noqa: E402


def main_moco_settings(args):
    """The process settings main_moco.py makes (moco.distributed.setup_process) for a run without --seed:
    --seed here only makes the contenders' weights equal, it is not main_moco's --seed."""
    run = argparse.Namespace(seed=None, batch_size=args.batch, workers=0)
    setup_process(run, argparse.Namespace(procs_per_node=1))


def load_reference():
    """tests/reference_moco.py, imported from its path (tests/ is not a package)."""
    path = os.path.join(bench_common.REPO, "tests", "reference_moco.py")
    spec = importlib.util.spec_from_file_location("reference_moco", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_args_parser():
    p = bench_common.new_parser(__doc__)
    p.add_argument("--arch", default="resnet18", help="torchvision model constructor")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--crop", type=int, default=64, help="image side")
    p.add_argument("--moco-dim", type=int, default=128)
    p.add_argument("--moco-k", type=int, default=4096, help="queue length")
    p.add_argument("--moco-m", type=float, default=0.999)
    p.add_argument("--moco-t", type=float, default=None, help="temperature (None: 0.07, 0.2 with --mlp)")
    p.add_argument("--mlp", action="store_true", help="MoCo v2 MLP head")
    p.add_argument("--symmetric", action="store_true", help="symmetric loss (CIFAR demo)")
    p.add_argument("--bn-splits", type=int, default=1, help="split BN groups (1: plain BN)")
    p.add_argument("--amp", action="store_true", help="ours only: bf16 autocast (fp16 where bf16 is missing)")
    p.add_argument("--channels-last", action="store_true", help="ours only: NHWC memory format")
    p.add_argument("--compile", action="store_true", help="ours only: torch.compile the encoders")
    p.add_argument("--supervised", action="store_true",
                   help="also time a plain supervised step of the backbone (one crop, same options as ours)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model and round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per model")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="time only this MoCo (and --supervised), not the reference-style one")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (None: torch's)")
    p.add_argument("--lr", type=float, default=0.03)
    bench_common.add_flags(p, device="auto", seed=0, json=None)
    return p


def _build(args, device, reference):
    """Our MoCo and the reference with identical initial state, with their optimizers."""
    base = getattr(torchvision.models, args.arch)
    T = args.moco_t if args.moco_t is not None else (0.2 if args.mlp else 0.07)
    torch.manual_seed(args.seed)
    ours = MoCo(base, dim=args.moco_dim, K=args.moco_k, m=args.moco_m, T=T, mlp=args.mlp,
                bn_splits=args.bn_splits, symmetric=args.symmetric)
    ref_base = reference.split_bn_encoder(base, args.bn_splits) if args.bn_splits > 1 else base
    ref = reference.ReferenceMoCo(ref_base, dim=args.moco_dim, K=args.moco_k, m=args.moco_m, T=T,
                                  mlp=args.mlp, symmetric=args.symmetric)
    ref.load_state_dict(ours.state_dict())
    ours.to(device).train()
    ref.to(device).train()

    precision = Precision(args.amp, device)

    def optimizer(model, fused=None):
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4, fused=fused)

    def step_ours(im_q, im_k):
        logits, labels = ours(im_q, im_k)
        return contrastive_loss(logits, labels, symmetric=args.symmetric)

    def step_ref(im_q, im_k):
        return ref.step_loss(im_q, im_k)[0]

    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
    if args.compile:
        ours.encoder_q.compile()
        ours.encoder_k.compile()
    contenders = {"ours": (with_fast_options(step_ours, args, precision),
                           optimizer(ours, precision.fused_sgd or None), precision)}
    if args.reference:
        contenders["reference"] = (step_ref, optimizer(ref), Precision(False, device))
    if args.supervised:
        contenders["supervised"] = supervised_contender(base, args, device, precision, optimizer)
    return contenders


def supervised_contender(base, args, device, precision, optimizer):
    """A plain supervised step of the backbone on the query crop, with our fast options and optimizer."""
    supervised = base(num_classes=1000).to(device).train()
    if args.channels_last:
        supervised.to(memory_format=torch.channels_last)
    if args.compile:
        supervised.compile()
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)

    def step_supervised(im_q, im_k):
        return F.cross_entropy(supervised(im_q), labels)

    return with_fast_options(step_supervised, args, precision), optimizer(supervised, precision.fused_sgd or None), \
        precision


def with_fast_options(step, args, precision):
    """Wrap a step in the fast options as main_moco.py applies them: its autocast (`precision`, from
    --amp: nothing on the CPU, where main_moco refuses --amp), NHWC inputs."""

    def fast_step(im_q, im_k):
        if args.channels_last:
            im_q = im_q.contiguous(memory_format=torch.channels_last)
            im_k = im_k.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            return step(im_q, im_k).float()

    return fast_step


def _steps(contender, batches, steps, device):
    """`steps` consecutive steps between two synchronisations: (seconds per step, losses as tensors)."""
    forward, opt, precision = contender
    bench_common.synchronize(device)
    start = time.perf_counter()
    losses = []
    for i in range(steps):
        im_q, im_k = batches[i % len(batches)]
        loss = forward(im_q, im_k)
        precision.backward_and_step(loss, opt)
        losses.append(loss.detach())
    bench_common.synchronize(device)
    return (time.perf_counter() - start) / steps, losses


def run(args=None):
    """The benchmark's results as a dict (see the module's docstring for `args`)."""
    args = bench_common.arguments(get_args_parser(), args)
    keys_per_step = args.batch * (2 if args.symmetric else 1)
    if args.moco_k % keys_per_step:
        raise UserError(f"--moco-k {args.moco_k} must be a multiple of the keys per step, {keys_per_step}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = bench_common.resolve_device(args.device)
    main_moco_settings(args)
    with bench_common.recording_machine(device) as machine:
        models = _build(args, device, load_reference())
        times, losses = time_contenders(models, random_batches(args, device), args, device)
    result = {"benchmark": "train_step", "config": {k: v for k, v in vars(args).items() if k != "json"},
              "device": str(device), "device_name": machine["device_name"], "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": machine}
    result.update(summarize_times(times, args))
    result.update(peak_memory(device))
    result.update(compare_losses(losses))
    return result


def random_batches(args, device):
    """Two (query, key) pairs of random images on `device`, used in turn."""
    g = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, 3, args.crop, args.crop)
    return [(torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device))
            for _ in range(2)]


def time_contenders(models, batches, args, device):
    """Warm-up steps of each model (their losses kept), then `--rounds` timed rounds of each, interleaved
    (A B, B A, A B, ...) so that noise from other work hits both alike: ({name: seconds per step of each
    round}, {name: warm-up losses})."""
    times = {name: [] for name in models}
    losses = {}
    # both models draw the same shuffle permutations: each starts every round from the same generator
    rng = torch.get_rng_state()
    for name in models:  # warm-up (cuDNN autotuning, compilation), with the losses of the first steps
        torch.set_rng_state(rng)
        losses[name] = [float(v) for v in _steps(models[name], batches, max(1, args.warmup), device)[1]]
    for r in range(args.rounds):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            torch.set_rng_state(rng)
            times[name].append(_steps(models[name], batches, args.steps, device)[0])
    return times, losses


def summarize_times(times, args):
    """Each contender's round times and throughput (of the median round), and the ratios between them."""
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = {"median_s": med, "mean_s": statistics.fmean(ts), "min_s": min(ts), "max_s": max(ts),
                        "images_per_s": args.batch / med,
                        "step_times_s": ts,  # per round: its time over its steps
                        "steps_per_round": args.steps}
    if "reference" in result:
        result["ratio_ours_over_reference"] = result["ours"]["images_per_s"] / result["reference"]["images_per_s"]
        # the fastest round of each: least disturbed by other work on a shared machine
        result["ratio_ours_over_reference_by_min"] = result["reference"]["min_s"] / result["ours"]["min_s"]
    if "supervised" in result:
        # an asymmetric MoCo step ideally costs 4/3 of a supervised one (one more forward pass)
        ceiling = 0.75 * result["supervised"]["images_per_s"]
        result["ratio_ours_over_ideal"] = result["ours"]["images_per_s"] / ceiling
    return result


def peak_memory(device):
    """The peak memory of the run: the GPU's max allocated, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda max_memory_allocated"}
    return {"peak_memory_mib": round(peak_rss_bytes() / 2**20, 1), "peak_memory_kind": "process peak RSS"}


def compare_losses(losses):
    """The warm-up losses, and with the reference how far ours are from its.

    Same start, same inputs, same permutations: the first step's losses must agree to float rounding,
    a check that both did the same work. Later steps drift apart: training on noise images is chaotic,
    a 1e-7 relative change of one weight grows to differences of 0.1 in ten steps."""
    if "reference" not in losses:
        return {"losses": losses}
    diffs = [abs(a - b) for a, b in zip(losses["ours"], losses["reference"])]
    return {"first_step_loss_difference": diffs[0], "loss_difference_per_step": diffs, "losses": losses}


def run_moco_v2(args, **settings):
    """run() with main_moco.py's MoCo v2 head and temperature (--mlp --moco-t 0.2) and the model, batch,
    crop and queue length of `args` (the flags of bench_e2e.py and benchmark.py), plus `settings`."""
    return run({"arch": args.arch, "batch": args.batch, "crop": args.crop, "moco_k": args.moco_k, "mlp": True,
                "moco_t": 0.2, **settings})


def peak_rss_bytes():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def report(result):
    cfg = result["config"]
    print(f"train step: {cfg['arch']} batch {cfg['batch']} crop {cfg['crop']} K {cfg['moco_k']} "
          f"mlp {cfg['mlp']} symmetric {cfg['symmetric']} bn_splits {cfg['bn_splits']} | "
          f"{result['device']} ({result['device_name']}), {result['threads']} threads, torch {result['torch']}")
    for name in [n for n in ("ours", "reference", "supervised") if n in result]:
        r = result[name]
        print(f"  {name:9s} {r['images_per_s']:9.1f} images/s   median {1000 * r['median_s']:8.1f} ms/step "
              f"(rounds min {1000 * r['min_s']:.1f}, max {1000 * r['max_s']:.1f}; {len(r['step_times_s'])} rounds "
              f"of {r['steps_per_round']} steps between two synchronisations)")
    if "ratio_ours_over_reference" in result:
        print(f"  ratio ours/reference (throughput): {result['ratio_ours_over_reference']:.3f}")
        print(f"  ratio by fastest round:            {result['ratio_ours_over_reference_by_min']:.3f}")
    if "ratio_ours_over_ideal" in result:
        print(f"  ratio ours / (0.75 x supervised):  {result['ratio_ours_over_ideal']:.3f}")
    print(f"  peak memory ({result['peak_memory_kind']}): {result['peak_memory_mib']:.0f} MiB")
    if "first_step_loss_difference" in result:
        print(f"  first-step |loss difference| (same start): {result['first_step_loss_difference']:.2e}")


def main(args=None):
    args = bench_common.arguments(get_args_parser(), args)
    result = run(args)
    report(result)
    bench_common.write_json(result, args.json)
    return result


if __name__ == "__main__":
    bench_common.run_script(main, get_args_parser)
