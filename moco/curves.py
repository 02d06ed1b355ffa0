"""Training curves from the runs' log.txt files (one JSON record per epoch, see moco.logs.RunLog).

Reading needs only the standard library; drawing needs matplotlib, an optional dependency, imported only
when a figure is made (`require_matplotlib` says how to install it). Figures use the Agg canvas directly,
so nothing here touches pyplot's global state or needs a display.
"""
import json
import math
import os

from moco.errors import UserError

PRETRAIN = "pre-training"
LINEAR = "linear classification"
INSTALL_MATPLOTLIB = "pip install matplotlib"


# --------------------------------------------------------------------------------------------------
# Reading logs.
# --------------------------------------------------------------------------------------------------
class Run:
    """One run's epoch records (the last record of each epoch, in epoch order) and what kind it is."""

    def __init__(self, label, path, records):
        self.label = label
        self.path = path
        self.records = records
        self.kind = run_kind(records, path)

    def series(self, key):
        """(epochs, values) of the records holding a number under `key`."""
        points = [(r["epoch"], r[key]) for r in self.records if is_number(r.get(key))]
        return [e for e, _ in points], [v for _, v in points]

    def has(self, key):
        return any(is_number(r.get(key)) for r in self.records)

    def chance_loss(self):
        """The InfoNCE loss of uniform logits over K+1 classes, log(K+1) (twice that with --symmetric,
        whose loss sums both directions); None when the log does not say K."""
        last = self.records[-1]
        if not is_number(last.get("moco_k")):
            return None
        return (2.0 if last.get("symmetric") else 1.0) * math.log(last["moco_k"] + 1)

    def best(self):
        """(epoch, val acc@1) of the best validation top-1 of a linear run."""
        epochs, values = self.series("val_acc1")
        index = max(range(len(values)), key=values.__getitem__)
        return epochs[index], values[index]


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def log_path(run):
    """RUN_DIR/log.txt, or `run` itself when it names a file."""
    path = run if os.path.isfile(run) else os.path.join(run, "log.txt")
    if not os.path.isfile(path):
        what = "no such folder" if not os.path.exists(run) else "no log.txt in it"
        raise UserError(f"'{run}': {what}; give the --output-dir of a main_moco.py or main_lincls.py run")
    return path


def read_records(path):
    """The JSON records of a log.txt, the last one of each epoch kept, in epoch order.

    A resumed run appends to its log, so an epoch may appear twice; the later record wins. A last line
    without its newline (a record being written right now) is skipped; any other bad line is an error.
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    by_epoch = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip() or (number == len(lines) and line):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"'{path}' line {number} is not a JSON record ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise UserError(f"'{path}' line {number} is not an epoch record (no integer 'epoch')")
        by_epoch[record["epoch"]] = record
    if not by_epoch:
        raise UserError(f"'{path}' holds no epoch records yet")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def run_kind(records, path):
    """PRETRAIN (main_moco.py) or LINEAR (main_lincls.py), from the fields of the records."""
    kinds = {LINEAR if "val_acc1" in r else PRETRAIN if "loss" in r else None for r in records}
    if None in kinds:
        raise UserError(f"'{path}' has records of neither main_moco.py (loss) nor main_lincls.py (val_acc1)")
    if len(kinds) > 1:
        raise UserError(f"'{path}' mixes main_moco.py and main_lincls.py records; give each run its own "
                        f"--output-dir")
    return kinds.pop()


def run_labels(runs):
    """Short legend labels: each run's path relative to the folder all of them share."""
    folders = [os.path.dirname(os.path.abspath(log_path(run))) for run in runs]
    if len(folders) == 1:
        return [os.path.basename(folders[0]) or folders[0]]
    common = os.path.commonpath(folders)
    labels = [os.path.relpath(folder, common) for folder in folders]
    return [folder if label == "." else label for label, folder in zip(labels, folders)]


def read_runs(runs):
    """A Run for each RUN_DIR (or log.txt path) in `runs`."""
    paths = [log_path(run) for run in runs]
    return [Run(label, path, read_records(path)) for label, path in zip(run_labels(runs), paths)]


# --------------------------------------------------------------------------------------------------
# Drawing.
# --------------------------------------------------------------------------------------------------
def require_matplotlib():
    """Import matplotlib (Agg canvas, no display needed) or say in one line how to install it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise UserError(f"plotting needs matplotlib, which is not installed; install it with: "
                        f"{INSTALL_MATPLOTLIB}") from None
    return matplotlib


def new_figure(width, height):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


# (title, y label, record key) of each panel; a panel is drawn only when some run has its key.
PRETRAIN_PANELS = [
    ("pre-training loss", "InfoNCE loss", "loss"),
    ("instance discrimination", "(K+1)-way top-1 (%)", "acc1"),
    ("pre-training learning rate", "learning rate", "lr"),
    ("pre-training throughput", "images / s", "images_per_s"),
    ("kNN monitor", "kNN top-1 (%)", "knn_top1"),
]
LINEAR_PANELS = [
    ("linear: train loss", "cross-entropy", "train_loss"),
    ("linear: val accuracy", "accuracy (%)", "val_acc1"),
    ("linear: learning rate", "learning rate", "lr"),
]


# step schedules (10x drops) and the linear loss at lr 30 (huge at first) read better on a log scale
LOG_SCALE_KEYS = {"lr", "train_loss"}


def plot_runs(runs):
    """One figure of every run's curves: a row of panels for the pre-training runs, one for the linear
    runs; a colour per run, named in the figure's legend. Returns the matplotlib Figure."""
    rows = []
    for kind, panels in ((PRETRAIN, PRETRAIN_PANELS), (LINEAR, LINEAR_PANELS)):
        members = [(index, run) for index, run in enumerate(runs) if run.kind == kind]
        shown = [panel for panel in panels if any(run.has(panel[2]) for _, run in members)]
        if members:
            rows.append((members, shown))
    columns = max(len(shown) for _, shown in rows)
    legend_inches = 0.25 + 0.22 * math.ceil(len(runs) / 4)  # the figure legend: 4 runs a row, at the top
    figure = new_figure(3.4 * columns, 2.9 * len(rows) + legend_inches)
    grid = figure.add_gridspec(len(rows), columns)
    for row, (members, shown) in enumerate(rows):
        for column, (title, ylabel, key) in enumerate(shown):
            axes = figure.add_subplot(grid[row, column])
            draw_panel(axes, members, key)
            axes.set_title(title, fontsize=10)
            axes.set_xlabel("epoch")
            axes.set_ylabel(ylabel)
            axes.grid(alpha=0.3)
            axes.margins(x=0.08)  # room for the best-accuracy labels at the ends
            axes.xaxis.get_major_locator().set_params(integer=True)
    handles = [legend_line(f"C{i}", run.label) for i, run in enumerate(runs)]
    figure.legend(handles=handles, loc="upper center", ncol=min(len(runs), 4), frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 1 - legend_inches / figure.get_figheight()))
    return figure


def legend_line(colour, label, **style):
    """A legend entry that is not drawn on any axes."""
    from matplotlib.lines import Line2D
    return Line2D([], [], color=colour, label=label, **style)


def draw_panel(axes, members, key):
    """The curves of `key` for each (colour index, run), with the panel's reference marks."""
    for index, run in members:
        epochs, values = run.series(key)
        if not epochs:
            continue
        axes.plot(epochs, values, color=f"C{index}", marker=".", linewidth=1.5)
        if key == "val_acc1":
            draw_linear_accuracy(axes, run, f"C{index}")
    if key == "loss":
        draw_chance_lines(axes, [run for _, run in members])
    if key in LOG_SCALE_KEYS:
        values = [v for _, run in members for v in run.series(key)[1]]
        if values and min(values) > 0 and max(values) / min(values) >= 50:
            axes.set_yscale("log")
    if key == "val_acc1":
        axes.legend(handles=[legend_line("0.3", "acc@1"), legend_line("0.3", "acc@5", linestyle="--"),
                             legend_line("0.3", "best acc@1", marker="*", markersize=10, linestyle="none")],
                    fontsize=8, loc="best")


def draw_linear_accuracy(axes, run, colour):
    """Val acc@5 (dashed) beside acc@1, and the best acc@1 as a star with its value."""
    epochs, values = run.series("val_acc5")
    axes.plot(epochs, values, color=colour, linestyle="--", linewidth=1.2)
    epoch, best = run.best()
    axes.scatter([epoch], [best], color=colour, marker="*", s=110, zorder=3)
    axes.annotate(f"{best:.1f}", (epoch, best), textcoords="offset points", xytext=(0, 6), ha="center",
                  fontsize=8, color=colour)


def draw_chance_lines(axes, runs):
    """A dashed grey line at the chance loss of each distinct K (and loss kind) among `runs`."""
    chances = {}
    for run in runs:
        chance = run.chance_loss()
        if chance is not None:
            last = run.records[-1]
            formula = "2 log(K+1)" if last.get("symmetric") else "log(K+1)"
            chances[round(chance, 9)] = f"chance {formula}, K={last['moco_k']}"
    if not chances:
        return
    low, high = axes.get_ylim()
    axes.set_ylim(low, max(high, max(chances) + 0.12 * (max(chances) - low)))  # room for the labels
    for chance, label in sorted(chances.items()):
        axes.axhline(chance, color="0.45", linestyle=":", linewidth=1.5)
        axes.annotate(f"{label} = {chance:.2f}", (0.98, chance), xycoords=("axes fraction", "data"),
                      xytext=(0, 2), textcoords="offset points", ha="right", va="bottom", fontsize=8,
                      color="0.3")


def plot_comparison(results, num_classes=None):
    """Bars of kNN and linear top-1 of random-init and MoCo features, side by side, with their values and
    the chance level. `results` is scripts/demo.py's: {"random": {"knn_top1", "linear_top1"}, "moco": ...}."""
    figure = new_figure(5.2, 3.4)
    axes = figure.add_subplot(1, 1, 1)
    metrics = [("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1")]
    width = 0.38
    for offset, (name, label, colour) in zip((-width / 2, width / 2), (("random", "random init", "0.6"),
                                                                       ("moco", "MoCo v2", "C0"))):
        values = [results[name][metric] for metric, _ in metrics]
        bars = axes.bar([i + offset for i in range(len(metrics))], values, width, label=label, color=colour)
        axes.bar_label(bars, fmt="%.1f", fontsize=9)
    if num_classes:
        axes.axhline(100.0 / num_classes, color="0.3", linestyle=":", label=f"chance ({num_classes} classes)")
    axes.set_xticks(range(len(metrics)), [label for _, label in metrics])
    axes.set_ylabel("val accuracy (%)")
    top = max(results[n][m] for n in ("random", "moco") for m, _ in metrics)
    axes.set_ylim(0, min(100.0, top) * 1.3 + 8)  # room for the values and the legend above the bars
    axes.set_title("frozen features: random init vs MoCo", fontsize=10)
    axes.legend(fontsize=8, loc="upper center", ncol=3)
    figure.tight_layout()
    return figure


def save_figure(figure, path):
    """Write `figure` to `path` (format from the extension), creating its folder; return the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    figure.savefig(path)
    return path
