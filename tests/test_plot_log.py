"""scripts/plot_log.py and moco.curves' figures; --tensorboard in both scripts.

matplotlib and tensorboard are optional: the tests that draw or read event files skip without them, and
the one-line messages for their absence are tested in every environment, by running the scripts in a
subprocess whose imports of the package are refused by a finder placed first on sys.meta_path.
"""
import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import pytest

import main_lincls
import main_moco
from moco import curves
from moco.errors import run_cli
from moco.logs import RunLog
from conftest import make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT_LOG = os.path.join(REPO, "scripts", "plot_log.py")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
needs_matplotlib = pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (optional)")
needs_tensorboard = pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (optional)")

pytestmark = pytest.mark.filterwarnings("ignore:You have chosen to seed training")

# Runs `script` as __main__ with `argv`, every import of the `blocked` top-level packages refused.
WITHOUT = """
import importlib.abc, runpy, sys
blocked, script, argv = sys.argv[1].split(","), sys.argv[2], sys.argv[3:]
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Refuse())
sys.argv = [script] + argv
runpy.run_path(script, run_name="__main__")
"""


def run_without(packages, script, argv, **kwargs):
    return subprocess.run([sys.executable, "-c", WITHOUT, ",".join(packages), script] + argv, cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kwargs)


def write_log(folder, records):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.txt"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


@pytest.fixture
def logs(tmp_path):
    """Two pre-training runs (one with a kNN monitor, one --symmetric with a larger K) and a linear run."""
    v2 = write_log(tmp_path / "v2", [
        {"epoch": e, "loss": 6.5 - 0.4 * e, "acc1": 5.0 * e, "acc5": 9.0 * e, "lr": 0.03 * math.cos(e / 9),
         "images_per_s": 300.0 + e, "moco_k": 1024, "symmetric": False, "checkpoint": f"c{e}",
         **({"knn_top1": 20.0 + 4 * e} if e % 2 else {})} for e in range(6)])
    sym = write_log(tmp_path / "sym", [
        {"epoch": e, "loss": 16.0 - e, "acc1": 2.0 * e, "lr": 0.06, "images_per_s": 150.0, "moco_k": 4096,
         "symmetric": True} for e in range(4)])
    lin = write_log(tmp_path / "linear", [
        {"epoch": e, "train_loss": 2.0 / (e + 1), "lr": 10.0 if e < 3 else 1.0, "val_acc1": acc,
         "val_acc5": acc + 30.0, "best_acc1": acc} for e, acc in enumerate([20.0, 35.0, 48.5, 47.0, 46.0])])
    return [v2, sym, lin]


def panels(figure):
    return {axes.get_title(): axes for axes in figure.axes}


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
@needs_matplotlib
def test_figure_has_a_panel_per_curve_a_line_per_run_and_the_reference_marks(logs):
    figure = curves.plot_runs(curves.read_runs(logs))
    found = panels(figure)
    assert sorted(found) == sorted(title for title, _, _ in curves.PRETRAIN_PANELS + curves.LINEAR_PANELS)
    loss = found["pre-training loss"]
    # two runs' curves, then one chance line per K: log(1025) and, for the symmetric loss, 2 log(4097)
    assert len(loss.lines) == 4
    assert list(loss.lines[0].get_ydata()) == pytest.approx([6.5 - 0.4 * e for e in range(6)])
    chance = sorted(line.get_ydata()[0] for line in loss.lines[2:])
    assert chance == pytest.approx([math.log(1025), 2 * math.log(4097)])
    assert sorted(text.get_text() for text in loss.texts) == ["chance 2 log(K+1), K=4096 = 16.64",
                                                              "chance log(K+1), K=1024 = 6.93"]
    assert len(found["kNN monitor"].lines) == 1  # only the v2 run has a kNN monitor
    assert list(found["kNN monitor"].lines[0].get_xdata()) == [1, 3, 5]
    assert len(found["pre-training throughput"].lines) == 2
    # the linear run: acc@1 and acc@5, and its best acc@1 starred at epoch 2
    val = found["linear: val accuracy"]
    assert len(val.lines) == 2 and len(val.collections) == 1
    assert val.collections[0].get_offsets().tolist() == [[2.0, 48.5]]
    assert found["linear: learning rate"].get_yscale() == "linear"  # 10x drop only: < 50x
    assert found["linear: train loss"].get_yscale() == "linear"  # 2.0 to 0.4
    # every panel is labelled, and the figure's legend names every run once, in order
    assert all(axes.get_xlabel() == "epoch" and axes.get_ylabel() for axes in figure.axes)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["v2", "sym", "linear"]


@needs_matplotlib
def test_only_the_panels_of_the_kinds_present(logs, tmp_path):
    figure = curves.plot_runs(curves.read_runs(logs[2:]))
    assert sorted(panels(figure)) == sorted(title for title, _, _ in curves.LINEAR_PANELS)
    # lr 30 with two 10x drops, and a loss from 1e4 down to 2: log scales
    steep = write_log(tmp_path / "steep", [{"epoch": e, "train_loss": loss, "lr": lr, "val_acc1": 1.0,
                                            "val_acc5": 5.0} for e, (loss, lr) in enumerate([(1e4, 30.0),
                                                                                           (10.0, 3.0),
                                                                                           (2.0, 0.3)])])
    found = panels(curves.plot_runs(curves.read_runs([steep])))
    assert found["linear: learning rate"].get_yscale() == "log"
    assert found["linear: train loss"].get_yscale() == "log"
    figure = curves.plot_runs(curves.read_runs(logs[1:2]))  # no kNN monitor in this run: no kNN panel
    assert sorted(panels(figure)) == sorted(title for title, _, _ in curves.PRETRAIN_PANELS[:4])


@needs_matplotlib
def test_comparison_bars():
    results = {"random": {"knn_top1": 27.4, "linear_top1": 25.2}, "moco": {"knn_top1": 43.5, "linear_top1": 49.2}}
    (axes,) = curves.plot_comparison(results, num_classes=8).axes
    heights = [patch.get_height() for patch in axes.patches]
    assert heights == pytest.approx([27.4, 25.2, 43.5, 49.2])
    (chance,) = axes.lines
    assert chance.get_ydata()[0] == pytest.approx(12.5)
    assert sorted(text.get_text() for text in axes.get_legend().get_texts()) == ["MoCo v2", "chance (8 classes)",
                                                                                "random init"]


def load_plot_log():
    spec = importlib.util.spec_from_file_location("plot_log", PLOT_LOG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# scripts/plot_log.py
# --------------------------------------------------------------------------------------------------
@needs_matplotlib
def test_plot_log_writes_the_figure(logs, tmp_path):
    out = tmp_path / "figs" / "curves.png"
    result = subprocess.run([sys.executable, PLOT_LOG, *logs, "-o", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: v2 (pre-training, 6 epochs); sym (pre-training, 4 epochs)")
    with open(out, "rb") as f:
        data = f.read()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


@needs_matplotlib
def test_plot_log_names_a_bad_run_in_one_line(logs, tmp_path, capsys):
    plot_log = load_plot_log()
    argv = [logs[0], str(tmp_path / "missing"), "-o", str(tmp_path / "c.png")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(plot_log.main, plot_log.get_args_parser().parse_args(argv), prog="plot_log.py")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == f"plot_log.py: error: '{tmp_path / 'missing'}': no such folder; give the --output-dir of a " \
                  f"main_moco.py or main_lincls.py run\n"
    assert not os.path.exists(tmp_path / "c.png")


def test_plot_log_without_matplotlib_says_how_to_install_it(logs, tmp_path):
    result = run_without(["matplotlib"], PLOT_LOG, [*logs, "-o", str(tmp_path / "c.png")])
    assert result.returncode == 2
    assert result.stderr == ("plot_log.py: error: plotting needs matplotlib, which is not installed; "
                             "install it with: pip install matplotlib\n")
    assert result.stdout == "" and not os.path.exists(tmp_path / "c.png")


# --------------------------------------------------------------------------------------------------
# --tensorboard
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [main_moco, main_lincls])
def test_tensorboard_is_off_by_default_and_documented(module):
    parser = module.get_args_parser()
    assert parser.parse_args(["DIR"]).tensorboard is False
    assert parser.parse_args(["DIR", "--tensorboard"]).tensorboard is True
    assert "OUTPUT_DIR/tensorboard/" in " ".join(parser.format_help().split())


@pytest.mark.parametrize("script", ["main_moco.py", "main_lincls.py"])
def test_tensorboard_missing_is_one_line_before_any_work(script, tmp_path):
    """DIR omitted: even the built-in data set is not generated, and nothing is written."""
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = dict(os.environ, MOCO_DATA_CACHE=str(cache))
    result = run_without(["tensorboard"], os.path.join(REPO, script),
                         ["--tensorboard", "-a", "resnet18", "--output-dir", str(out)], env=env)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{script}: error: --tensorboard needs the 'tensorboard' package, which cannot be "
                           f"imported (")
    assert line.endswith("); install it with: pip install tensorboard")
    assert result.stdout == "" and not cache.exists() and not out.exists()


def event_scalars(folder):
    """{tag: [(step, value), ...]} of the one event file under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    (name,) = os.listdir(folder)
    assert name.startswith("events.out.tfevents.")
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


@needs_tensorboard
def test_the_event_file_is_opened_at_the_first_scalar(tmp_path):
    with RunLog(str(tmp_path / "quiet"), is_main=True, tensorboard=True):
        pass  # like main_lincls.py -e: nothing to write, so no file
    assert not (tmp_path / "quiet").exists()
    with RunLog(str(tmp_path / "run"), is_main=True, tensorboard=True) as log:
        log.scalars(7, lr=0.5, note="text", flag=True)
        log.record({"epoch": 3, "loss": 2.5, "checkpoint": "c.pth.tar"})
    assert event_scalars(tmp_path / "run" / "tensorboard") == {"step/lr": [(7, 0.5)], "epoch/loss": [(3, 2.5)]}


@needs_tensorboard
def test_tensorboard_scalars_of_a_pretraining_and_a_linear_run(tmp_path):
    images = make_image_folder(tmp_path / "images", classes=2, train_per_class=12, val_per_class=2, size=(20, 20))
    pre, lin = tmp_path / "pre", tmp_path / "lin"
    common = ["-a", "resnet18", "--cifar-stem", "--crop-size", "16", "-b", "8", "--epochs", "1", "-j", "0",
              "--seed", "0", "--tensorboard"]
    with contextlib.redirect_stdout(io.StringIO()):
        main_moco.main(main_moco.get_args_parser().parse_args(
            common + ["--moco-k", "16", "--moco-dim", "8", "-p", "2", "--output-dir", str(pre), images]))
        main_lincls.main(main_lincls.get_args_parser().parse_args(
            common + ["-p", "1", "--output-dir", str(lin), images]))
    (record,) = curves.read_records(os.path.join(pre, "log.txt"))
    scalars = event_scalars(pre / "tensorboard")
    # 24 images, batch 8: 3 steps, printed (and written) every 2nd
    for name in ("loss", "acc1", "acc5", "lr", "images_per_s", "batch_time_s", "data_time_s"):
        assert [step for step, _ in scalars[f"step/{name}"]] == [0, 2]
    assert scalars["step/lr"][0][1] == pytest.approx(0.03)
    for name in ("loss", "acc1", "acc5", "lr", "images_per_s", "epoch_time_s", "steps", "moco_k"):
        (point,) = scalars[f"epoch/{name}"]
        assert point == (0, pytest.approx(record[name], rel=1e-6))
    assert "epoch/checkpoint" not in scalars and "epoch/symmetric" not in scalars and "epoch/epoch" not in scalars
    scalars = event_scalars(lin / "tensorboard")
    assert [step for step, _ in scalars["step/loss"]] == [0, 1, 2]
    (record,) = curves.read_records(os.path.join(lin, "log.txt"))
    for name in ("train_loss", "val_acc1", "val_acc5", "best_acc1", "lr"):
        assert scalars[f"epoch/{name}"] == [(0, pytest.approx(record[name], rel=1e-6))]
