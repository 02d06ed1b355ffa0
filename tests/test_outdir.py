"""The output folder: start-up write checks and the one-run-at-a-time lock (moco.outdir)."""
import json
import os
import socket
import subprocess
import time

import pytest

from moco import outdir
from moco.errors import UserError
from moco.outdir import LOCK_NAME, RunLock, check_output_dir


def test_check_output_dir_accepts_existing_and_creatable_folders(tmp_path):
    check_output_dir(str(tmp_path))
    check_output_dir(str(tmp_path / "new" / "deeper"))
    assert os.listdir(tmp_path) == []  # nothing created, no probe left behind


def test_check_output_dir_refuses_a_file_and_a_path_under_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file") as err:
        check_output_dir(str(tmp_path / "afile"))
    assert "--output-dir" in str(err.value) and "afile" in str(err.value)
    with pytest.raises(UserError, match="lies under") as err:
        check_output_dir(str(tmp_path / "afile" / "out"))
    assert str(tmp_path / "afile") in str(err.value)


def test_check_output_dir_refuses_what_cannot_be_written(tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits; /proc is closed to everyone
        target = "/proc/self/out"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = str(tmp_path / "ro" / "out")
    with pytest.raises(UserError, match="cannot be created") as err:
        check_output_dir(target)
    assert target in str(err.value)


def _lock_of(folder, pid, host=None):
    folder.mkdir(exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "prog": "main_moco.py",
                                "started": "earlier"}))
    return path


def _dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_lock_is_held_while_the_run_lives_and_removed_after(tmp_path):
    out = tmp_path / "out"
    with RunLock(str(out), "main_moco.py", log=lambda _: None):
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(UserError, match="in use by main_moco.py") as err:  # a second run is kept out
            with RunLock(str(out), "main_lincls.py", log=lambda _: None):
                pass
        assert f"pid {os.getpid()}" in str(err.value)
        assert (out / LOCK_NAME).exists()  # the refused run left the owner's lock alone
    assert not out.exists()  # the lock made the folder, and the run left nothing in it: no empty folder stays


def test_a_folder_is_removed_only_when_the_lock_made_it_and_it_stayed_empty(tmp_path):
    existing, written = tmp_path / "existing", tmp_path / "written"
    existing.mkdir()
    with RunLock(str(existing), "main_moco.py", log=lambda _: None):
        pass
    with RunLock(str(written), "main_moco.py", log=lambda _: None):
        (written / "log.txt").write_text("{}\n")
    assert os.listdir(existing) == [] and os.listdir(written) == ["log.txt"]


def test_run_files_that_are_folders_are_refused(tmp_path):
    for name in ("log.txt", LOCK_NAME):
        out = tmp_path / name.replace(".", "_")
        (out / name).mkdir(parents=True)
        with pytest.raises(UserError, match=f"{name}' in --output-dir is a folder"):
            check_output_dir(str(out))


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = _dead_pid()
    path = _lock_of(tmp_path, dead)
    notes = []
    with RunLock(str(tmp_path), "main_moco.py", log=notes.append):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {dead} is not running" in notes[0]


def test_lock_of_another_host_is_kept_until_its_heartbeat_stops(tmp_path):
    path = _lock_of(tmp_path, 1, host="some-other-node")
    with pytest.raises(UserError, match="some-other-node"):
        with RunLock(str(tmp_path), "main_moco.py", log=lambda _: None):
            pass
    old = time.time() - outdir.STALE_S - 5
    os.utime(path, (old, old))
    notes = []
    with RunLock(str(tmp_path), "main_moco.py", log=notes.append):
        pass
    assert "last refreshed" in notes[0] and not path.exists()


def test_lock_heartbeat_refreshes_the_time_stamp(tmp_path, monkeypatch):
    monkeypatch.setattr(outdir, "HEARTBEAT_S", 0.05)
    with RunLock(str(tmp_path), "main_moco.py", log=lambda _: None):
        old = time.time() - 1000
        os.utime(tmp_path / LOCK_NAME, (old, old))
        time.sleep(0.5)
        assert time.time() - os.stat(tmp_path / LOCK_NAME).st_mtime < 100
