"""The one-command demo (scripts/demo.py) and the scripts' built-in data set when DIR is omitted."""
import contextlib
import importlib.util
import io
import json
import os
import sys

import pytest
import torch

import main_lincls
import main_moco
from moco import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.filterwarnings("ignore:You have chosen to seed training")


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", os.path.join(REPO, "scripts", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MOCO_DATA_CACHE", str(folder))
    return folder


def test_demo_smoke_run_prints_the_comparison_table(cache, tmp_path):
    demo = load_demo()
    out = io.StringIO()
    args = demo.get_args_parser().parse_args(["--tiny", "--output-dir", str(tmp_path / "demo")])
    with contextlib.redirect_stdout(out):
        results = demo.main(args)
    text = out.getvalue()
    # progress is visible throughout: meter lines of both scripts and the three stage headers
    assert "== 1/3 pre-training" in text and "== 2/3 kNN" in text and "== 3/3 linear" in text
    assert "Epoch: [0][" in text and " * Acc@1 " in text
    assert "| random init |" in text and "| MoCo v2 |" in text
    for name in ("moco", "random"):
        for metric in ("knn_top1", "linear_top1"):
            assert 0.0 <= results[name][metric] <= 100.0
    with open(tmp_path / "demo" / "results.json") as f:
        assert json.load(f)["moco"] == results["moco"]
    assert os.path.isfile(tmp_path / "demo" / "pretrain" / "checkpoint_0000.pth.tar")
    assert os.path.isfile(tmp_path / "demo" / "linear_moco" / "model_best.pth.tar")
    # the data set was generated once, in the cache folder, and said where
    assert len(os.listdir(cache)) == 1 and str(cache) in text
    # the figures (matplotlib is optional): written and named, or one line saying how to get them
    figures = [str(tmp_path / "demo" / name) for name in ("curves.png", "results.png")]
    if importlib.util.find_spec("matplotlib") is None:
        assert "no figures: plotting needs matplotlib, which is not installed; install it with: " \
               "pip install matplotlib" in text
    else:
        assert f"figures: {figures[0]} (training curves" in text and f"{figures[1]} (random init vs MoCo)" in text
        assert all(os.path.getsize(path) > 10_000 for path in figures)


def test_demo_without_matplotlib_says_how_to_get_the_figures(tmp_path, monkeypatch, capsys):
    demo = load_demo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    args = demo.get_args_parser().parse_args(["--output-dir", str(tmp_path)])
    assert demo.draw_figures(args, {}, str(tmp_path)) == []
    assert capsys.readouterr().out == ("\nno figures: plotting needs matplotlib, which is not installed; "
                                       "install it with: pip install matplotlib\n")
    assert os.listdir(tmp_path) == []


def test_the_random_init_baseline_is_the_seeds_whatever_ran_before():
    demo = load_demo()
    args = demo.get_args_parser().parse_args(["--seed", "3"])
    first = demo.backbone(args, None).state_dict()
    torch.rand(10)  # training (or anything else) moved the global generator on
    again = demo.backbone(args, None).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    other = demo.backbone(demo.get_args_parser().parse_args(["--seed", "4"]), None).state_dict()
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])


def test_scripts_use_the_built_in_data_when_dir_is_omitted(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_SIZES", synthetic.TINY)
    out = io.StringIO()
    argv = ["-a", "resnet18", "--cifar-stem", "--crop-size", "16", "-b", "8", "--moco-k", "16",
            "--moco-dim", "8", "--epochs", "1", "-j", "0", "--output-dir", str(tmp_path / "pre")]
    with contextlib.redirect_stdout(out):
        main_moco.main(main_moco.get_args_parser().parse_args(argv))
    (dataset,) = os.listdir(cache)
    assert f"built-in data set: {cache / dataset}" in out.getvalue()
    checkpoint = str(tmp_path / "pre" / "checkpoint_0000.pth.tar")
    lin_argv = ["-a", "resnet18", "--cifar-stem", "--crop-size", "16", "-b", "8", "--epochs", "1",
                "-j", "0", "--pretrained", checkpoint, "--output-dir", str(tmp_path / "lin")]
    with contextlib.redirect_stdout(out):
        result = main_lincls.main(main_lincls.get_args_parser().parse_args(lin_argv))
    assert 0.0 <= result["best_acc1"] <= 100.0
    assert os.listdir(cache) == [dataset]  # reused, not generated again


def test_bench_demo_summarizes_seeds():
    spec = importlib.util.spec_from_file_location("bench_demo", os.path.join(REPO, "scripts", "bench_demo.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = {s: {"moco": {"knn_top1": 40.0 + s, "linear_top1": 50.0}, "random": {"knn_top1": 20.0,
                                                                               "linear_top1": 30.0 + 2 * s},
                "minutes": 8.0} for s in (0, 1, 2)}
    summary = bench.summarize(runs)
    assert summary["moco knn_top1"]["mean"] == pytest.approx(41.0)
    assert summary["moco knn_top1"]["std"] == pytest.approx(1.0)
    assert summary["knn margin"]["mean"] == pytest.approx(21.0)
    assert summary["random linear_top1"]["std"] == pytest.approx(2.0)
    line = bench.describe_machine({"cores": 2, "load_before": (0.5, 0.25, 0.125), "load_after": (2.0, 1.5, 1.0)})
    assert line == ("\nmachine: 2 CPU cores (os.cpu_count), no GPU used; load average (1 / 5 / 15 min) "
                    "0.50 / 0.25 / 0.12 before, 2.00 / 1.50 / 1.00 after")


def test_bench_demo_records_the_machine_beside_its_table(tmp_path, cache, capsys):
    """A real (tiny) bench run: the table, then the cores and load; both in summary.json too."""
    spec = importlib.util.spec_from_file_location("bench_demo", os.path.join(REPO, "scripts", "bench_demo.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--seeds", "0", "--tiny", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    table = out[out.index("| seed | random kNN"):]
    assert table.splitlines()[3].startswith("| mean ± std |")
    assert f"machine: {os.cpu_count()} CPU cores (os.cpu_count)" in table
    with open(tmp_path / "summary.json") as f:
        machine = json.load(f)["machine"]
    assert machine["cores"] == os.cpu_count()
    assert len(machine["load_before"]) == len(machine["load_after"]) == 3


def readme_command(title_words):
    """The command of the README's fenced bash block that follows the paragraph starting with
    `title_words` in the Quick start section."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Quick start"):readme.index("\n## ", readme.index("## Quick start") + 1)]
    after = section[section.index(title_words):]
    block = after[after.index("```bash\n") + len("```bash\n"):]
    return block[:block.index("\n```")]


def test_readme_main_command_installs_matplotlib_and_runs_the_demo():
    command = readme_command("On a fresh machine")
    install, run = command.split(" && ")[1:]
    assert install.split()[-1] == "matplotlib" and "-r requirements.txt" in install
    assert run == ".venv/bin/python scripts/demo.py"
    with open(os.path.join(REPO, "requirements.txt")) as f:
        packages = [line.split(">=")[0] for line in f.read().splitlines() if line and not line.startswith("#")]
    assert packages == ["torch", "torchvision", "numpy", "Pillow"]  # the core stays four packages


def test_ci_runs_the_readme_test_command_verbatim():
    command = readme_command("The tests")
    assert "pytest pytest-xdist submitit matplotlib" in command
    with open(os.path.join(REPO, ".ci", "run")) as f:
        ci = [line for line in f.read().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [command]
