"""moco.logs.RunLog (log.txt records, optional TensorBoard scalars) and moco.curves' log reading.

None of these tests needs matplotlib or tensorboard; tests/test_plot_log.py draws and reads event files.
"""
import json
import math
import os

import pytest

from moco import curves
from moco.errors import UserError
from moco.logs import RunLog, numeric_items
from moco.meters import TrainingMeters


def write_log(folder, records, tail=""):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.txt"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + tail)
    return str(folder)


# --------------------------------------------------------------------------------------------------
# RunLog
# --------------------------------------------------------------------------------------------------
def test_record_appends_one_json_line_per_call_on_the_main_process_only(tmp_path, capsys):
    main, other = RunLog(str(tmp_path / "main"), is_main=True), RunLog(str(tmp_path / "other"), is_main=False)
    for log in (main, other):
        log.record({"epoch": 0, "loss": 1.5, "checkpoint": "a"})
        log.record({"epoch": 1, "loss": 1.25, "checkpoint": "b"})
        log.info("hello")
        log.warn("careful")
    with open(tmp_path / "main" / "log.txt") as f:
        assert [json.loads(line) for line in f] == [{"epoch": 0, "loss": 1.5, "checkpoint": "a"},
                                                   {"epoch": 1, "loss": 1.25, "checkpoint": "b"}]
    assert not os.path.exists(tmp_path / "other")
    captured = capsys.readouterr()
    assert captured.out == "hello\n" and captured.err == "warning: careful\n"


def test_without_tensorboard_scalars_write_nothing(tmp_path):
    meters = TrainingMeters(4, prefix="")
    with RunLog(str(tmp_path), is_main=True) as log:
        assert log.writer is None
        log.scalars(3, meters, lr=0.1)
        log.record({"epoch": 0, "loss": 1.0})
    assert sorted(os.listdir(tmp_path)) == ["log.txt"]
    # other processes never open a writer, even when asked to, so they need no tensorboard at all
    quiet = RunLog(str(tmp_path / "rank1"), is_main=False, tensorboard=True)
    assert quiet.writer is None
    quiet.close()
    assert not os.path.exists(tmp_path / "rank1")


def test_numeric_items_keep_numbers_only():
    entry = {"epoch": 2, "loss": 1.5, "flag": True, "path": "x", "nan": math.nan, "inf": math.inf, "none": None}
    assert dict(numeric_items(entry)) == {"epoch": 2, "loss": 1.5, "inf": math.inf}


# --------------------------------------------------------------------------------------------------
# Reading logs (moco.curves)
# --------------------------------------------------------------------------------------------------
def test_read_records_keeps_the_last_record_of_each_epoch_in_order(tmp_path):
    run = write_log(tmp_path / "run", [{"epoch": 0, "loss": 9.0}, {"epoch": 1, "loss": 8.0},
                                       {"epoch": 1, "loss": 7.5}, {"epoch": 2, "loss": 7.0}],
                    tail='{"epoch": 3, "lo')  # a record being written right now
    records = curves.read_records(curves.log_path(run))
    assert [(r["epoch"], r["loss"]) for r in records] == [(0, 9.0), (1, 7.5), (2, 7.0)]
    # RUN_DIR or the log file itself
    assert curves.log_path(os.path.join(run, "log.txt")) == curves.log_path(run)


def test_run_kind_chance_level_and_best(tmp_path):
    pre = write_log(tmp_path / "pre", [{"epoch": e, "loss": 7.0 - e, "acc1": 10.0 * e, "lr": 0.03,
                                        "moco_k": 1024, "symmetric": False} for e in range(3)])
    sym = write_log(tmp_path / "sym", [{"epoch": 0, "loss": 15.0, "acc1": 1.0, "moco_k": 4096,
                                        "symmetric": True}])
    old = write_log(tmp_path / "old", [{"epoch": 0, "loss": 5.0, "acc1": 1.0}])  # logged before moco_k was
    lin = write_log(tmp_path / "lin", [{"epoch": e, "train_loss": 2.0, "val_acc1": v, "val_acc5": v + 20}
                                       for e, v in enumerate([30.0, 45.5, 41.0])])
    runs = curves.read_runs([pre, sym, old, lin])
    assert [run.label for run in runs] == ["pre", "sym", "old", "lin"]
    assert [run.kind for run in runs] == [curves.PRETRAIN] * 3 + [curves.LINEAR]
    assert runs[0].chance_loss() == pytest.approx(math.log(1025))
    assert runs[1].chance_loss() == pytest.approx(2 * math.log(4097))  # --symmetric sums two losses
    assert runs[2].chance_loss() is None
    assert runs[3].best() == (1, 45.5)
    assert runs[0].series("loss") == ([0, 1, 2], [7.0, 6.0, 5.0])
    assert runs[0].has("lr") and not runs[0].has("knn_top1")


def test_labels_are_relative_to_the_shared_folder(tmp_path):
    a = write_log(tmp_path / "exp" / "a" / "pretrain", [{"epoch": 0, "loss": 1.0}])
    b = write_log(tmp_path / "exp" / "b" / "pretrain", [{"epoch": 0, "loss": 1.0}])
    assert curves.run_labels([a, b]) == [os.path.join("a", "pretrain"), os.path.join("b", "pretrain")]
    assert curves.run_labels([a]) == ["pretrain"]


@pytest.mark.parametrize("content, expected", [
    ('{"epoch": 0, "loss": 1.0}\nnot json\n', "line 2 is not a JSON record"),
    ('{"epoch": 0, "loss": 1.0}\n[1, 2]\n', "line 2 is not an epoch record"),
    ('{"loss": 1.0}\n', "line 1 is not an epoch record"),
    ("\n", "holds no epoch records yet"),
    ('{"epoch": 0, "top1": 3.0}\n', "neither main_moco.py (loss) nor main_lincls.py (val_acc1)"),
    ('{"epoch": 0, "loss": 1.0}\n{"epoch": 1, "train_loss": 1.0, "val_acc1": 2.0}\n',
     "mixes main_moco.py and main_lincls.py records"),
])
def test_bad_logs_are_named_in_one_line(tmp_path, content, expected):
    (tmp_path / "log.txt").write_text(content)
    with pytest.raises(UserError) as err:
        curves.read_runs([str(tmp_path)])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_missing_runs_are_named(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        curves.read_runs([str(tmp_path / "nowhere")])
    with pytest.raises(UserError, match="no log.txt in it"):
        curves.read_runs([str(tmp_path)])


def test_a_failed_append_is_one_error_naming_the_kept_checkpoint(tmp_path):
    log = RunLog(str(tmp_path), is_main=True)
    os.chmod(tmp_path, 0o755)
    (tmp_path / "log.txt").mkdir()  # any OSError of the append: here, log.txt made a folder meanwhile
    with pytest.raises(UserError, match=r"cannot append to .*log\.txt.*'ck\.pth\.tar' is written and kept"):
        log.record({"epoch": 0, "loss": 1.0}, saved="ck.pth.tar")
    with pytest.raises(UserError, match="'c0.pth.tar' is written and kept"):  # main_moco's entries name it
        log.record({"epoch": 0, "checkpoint": "c0.pth.tar"})
