"""The README's benchmark commands in their smallest forms: each runs to completion on the CPU and
writes its JSON and its table; the set-up they share (scripts/bench_common.py); every benchmark command
the README, the scripts' docstrings and scripts/gpu_checks*.sh show is accepted by its script's parser.

Elsewhere: bench_demo.py (tests/test_demo.py), gpu_checks*.sh without a GPU (tests/test_gpu_checks.py),
plot_log.py (tests/test_plot_log.py).
"""
import importlib
import json
import os
import re
import shlex
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, SCRIPTS)

import bench_common  # noqa: E402
import bench_data  # noqa: E402
import bench_e2e  # noqa: E402
import benchmark  # noqa: E402

TINY_STEP = ["--batch", "4", "--crop", "32", "--moco-k", "16", "--steps", "1", "--warmup", "1"]


@pytest.fixture
def process_settings():
    """bench_step changes process-wide settings as main_moco.py does (threads, cuDNN autotuning):
    put them back for the tests that follow in this process."""
    threads, autotune = torch.get_num_threads(), torch.backends.cudnn.benchmark
    yield
    torch.set_num_threads(threads)
    torch.backends.cudnn.benchmark = autotune


@pytest.fixture(scope="module")
def data_result(tmp_path_factory):
    """`python scripts/bench_data.py` at its smallest: every pipeline, one round, one worker."""
    path = tmp_path_factory.mktemp("bench_data") / "result.json"
    argv = ["--images", "8", "--batch-size", "4", "--rounds", "1", "--crop-size", "32", "--workers", "1",
            "--json", str(path)]
    returned = bench_data.main(argv)
    with open(path) as f:
        return returned, json.load(f)


def test_bench_data_writes_every_pipeline_and_ratio(data_result, capsys):
    returned, written = data_result
    assert set(written["median_images_per_s"]) == set(bench_data.PIPELINES)
    assert all(v > 0 for v in written["median_images_per_s"].values())
    assert set(written["ratio_fast_over_tv"]) == {"fast-v1", "fast-v2", "dev-v1", "dev-v2"}
    assert written["config"]["images"] == 8 and written["machine"]["cores"] == os.cpu_count()
    assert written["median_images_per_s"] == returned["median_images_per_s"]
    bench_data.print_summary(returned)
    table = capsys.readouterr().out
    assert "pipeline     images/s  CPU-ms/image  in workers" in table and "ratio dev-v2 / tv: images/s" in table


def test_bench_step_with_one_thread_writes_its_json(tmp_path, capsys, process_settings):
    path = tmp_path / "step.json"
    bench_step = importlib.import_module("bench_step")
    bench_step.main(["--threads", "1", "--moco-dim", "8", "--rounds", "1", "--json", str(path)] + TINY_STEP)
    with open(path) as f:
        result = json.load(f)
    assert result["threads"] == 1 and result["ours"]["images_per_s"] > 0 and result["reference"]["images_per_s"] > 0
    assert result["first_step_loss_difference"] < 1e-3  # same start, same inputs: the same first loss
    out = capsys.readouterr().out
    assert "ratio ours/reference (throughput)" in out and "first-step |loss difference|" in out


def test_benchmark_quick_writes_benchmark_json_here(tmp_path, monkeypatch, capsys, process_settings, data_result):
    """--quick's settings apply where no flag was given (--arch), the flags given win (--batch); the
    default JSON lands in the current folder; the table carries the data rows of a bench_data result."""
    monkeypatch.chdir(tmp_path)
    results = benchmark.main(["--quick", "--skip-data"] + TINY_STEP)
    with open(tmp_path / "benchmark.json") as f:
        written = json.load(f)
    assert written["args"]["arch"] == "resnet18" and written["args"]["batch"] == 4
    assert written["step"]["supervised"]["images_per_s"] > 0 and "ratio_ours_over_ideal" in written["step"]
    assert "| MoCo / (0.75 x supervised) |" in capsys.readouterr().out
    benchmark.print_table({**results, "data": data_result[0]})
    table = capsys.readouterr().out
    assert "| data: tv-v2 pipeline |" in table and "| data: fast-v2 / torchvision (wall" in table


def test_bench_e2e_quick_runs_main_moco_and_writes_its_table(tmp_path, monkeypatch, capsys):
    """main_moco.py (a CPU child) for two epochs of 4 steps; the second epoch's steady rate and the table."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "e2e.json"
    bench_e2e.main(["--quick", "--sets", "default", "--images", "16", "--batch", "4", "--crop", "32", "--moco-k",
                    "16", "--print-freq", "1", "--workers", "0", "--skip-step", "--json", str(path)])
    with open(path) as f:
        row = json.load(f)["results"]["default"]
    assert "error" not in row, row["error"]
    assert row["steady_images_per_s"] > 0 and 0 <= row["steady_data_fraction"] <= 1
    out = capsys.readouterr().out
    assert "| set | flags | end to end img/s |" in out and "| default | (none) |" in out


@pytest.mark.parametrize("script, argv, message", [
    ("bench_data.py", ["--images", "2", "--batch-size", "4"], "2 images: need at least two batches of 4"),
    ("bench_step.py", ["--moco-k", "10"], "--moco-k 10 must be a multiple of the keys per step, 32"),
    ("bench_step.py", ["--device", "tpu7"], "--device 'tpu7' is not a device"),
    ("bench_e2e.py", ["--data", "/no/such/folder"], "--data /no/such/folder: no train/ folder in it"),
])
def test_bad_input_is_one_line_and_exit_status_2(script, argv, message, monkeypatch, capsys):
    module = importlib.import_module(script[:-3])
    monkeypatch.setattr(sys, "argv", [script] + argv)
    with pytest.raises(SystemExit) as stop:
        bench_common.run_script(module.main, module.get_args_parser)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"{script}: error: {message}") and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
def test_a_cuda_device_without_a_gpu_is_refused():
    with pytest.raises(bench_common.UserError, match="torch sees no CUDA GPU"):
        bench_common.resolve_device("cuda")


def test_generated_folder_is_the_same_for_any_number_of_processes(tmp_path):
    one = bench_common.generate_jpegs(str(tmp_path / "one"), 4, classes=2, seed=3)
    two = bench_common.generate_jpegs(str(tmp_path / "two"), 4, classes=2, seed=3, processes=2)
    files = sorted(os.path.relpath(os.path.join(d, f), one) for d, _, fs in os.walk(one) for f in fs)
    assert files == ["class_0/000000.jpg", "class_0/000002.jpg", "class_1/000001.jpg", "class_1/000003.jpg"]
    for name in files:
        with open(os.path.join(one, name), "rb") as a, open(os.path.join(two, name), "rb") as b:
            assert a.read() == b.read()
        with Image.open(os.path.join(one, name)) as image:
            assert image.size in ((500, 375), (375, 500))
            assert np.asarray(image).std() > 10  # texture, not a flat colour


def test_arguments_from_a_dict_are_the_defaults_with_overrides_and_refuse_unknown_settings():
    parser = bench_data.get_args_parser()
    args = bench_common.arguments(parser, {"images": 16})
    assert args == bench_common.arguments(parser, ["--images", "16"])
    assert args.images == 16 and args.batch_size == 64
    with pytest.raises(TypeError, match="unknown settings \\['imagse'\\]"):
        bench_common.arguments(parser, {"imagse": 16})


def test_quick_settings_yield_to_the_flags_given():
    parser = bench_e2e.get_args_parser()
    args = bench_common.apply_quick(parser.parse_args(["--quick", "--batch", "8", "--workers", "0"]), parser,
                                    bench_e2e.QUICK)
    assert (args.arch, args.crop, args.batch, args.workers) == ("resnet18", 48, 8, 0)


def test_json_is_replaced_whole(tmp_path):
    path = str(tmp_path / "sub" / "result.json")
    bench_common.write_json({"load": (1.0, 2.0), "device": torch.device("cpu")}, path)
    bench_common.write_json({"load": (3.0, 4.0)}, path)
    with open(path) as f:
        assert json.load(f) == {"load": [3.0, 4.0]}
    assert os.listdir(tmp_path / "sub") == ["result.json"]


def shown_commands():
    """(script, argv) of every `python scripts/X.py ...` in the README and the scripts' docstrings, and
    of the bench_e2e.py runs of scripts/gpu_checks*.sh (their shell variables at their defaults)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        found = re.findall(r"`python scripts/(\w+\.py)([^`]*)`", f.read())
    for name in sorted(os.listdir(SCRIPTS)):
        with open(os.path.join(SCRIPTS, name)) as f:
            text = f.read().replace("\\\n", " ")
        if name.endswith(".py"):
            found += re.findall(r"^ +python scripts/(\w+\.py)([^#\n]*)", text, re.M)
        elif name.startswith("gpu_checks"):
            text = re.sub(r'"\$\{?IMAGES[^"]*"', "4096", re.sub(r'"\$OUT/([^"]*)"', r"\1", text))
            found += re.findall(r'"\$PY" scripts/(\w+\.py)([^|\n]*?)(?:2>&1|\n)', text)
    return [(script, shlex.split(rest.replace("\n", " "))) for script, rest in found]


def test_every_benchmark_command_shown_is_accepted_by_its_script():
    commands = shown_commands()
    shown = {script for script, _ in commands}
    assert {"bench_data.py", "bench_step.py", "benchmark.py", "bench_e2e.py", "bench_demo.py", "plot_log.py"} <= shown
    assert sum(script == "bench_e2e.py" and "--set-timeout" in argv for script, argv in commands) == 2  # the .sh
    for script, argv in commands:
        module = importlib.import_module(script[:-3])
        module.get_args_parser().parse_args(argv)  # exits (status 2) on a flag the script does not have
