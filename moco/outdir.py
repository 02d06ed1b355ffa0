"""The output folder: checked for writing at start-up, and held by one run at a time (a lock file).

The lock file `OUTPUT_DIR/run.lock` holds the owner's pid, host name and start time as JSON. A second
run on the folder is refused while the owner is alive; an owner that is gone (a dead pid on this host,
or a lock whose heartbeat stopped, as after a crash on another node) is taken over.
"""
import json
import os
import socket
import tempfile
import threading
import time

from moco.errors import UserError

LOCK_NAME = "run.lock"
HEARTBEAT_S = 60.0  # the owner touches the lock this often
STALE_S = 600.0  # a lock not touched for this long belongs to a run that is gone
RUN_FILES = ("log.txt", LOCK_NAME)  # files every run writes in its output folder


def check_output_dir(path, flag="--output-dir"):
    """Fail with one line unless `path` is a folder this process can write in, or can be created.

    Nothing is created: a folder that does not exist yet is made when the run takes its lock.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a file, not a folder; choose another {flag}")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{flag} '{path}' lies under '{existing}', which is a file, not a folder; choose "
                        f"another {flag}")
    if not _can_write_in(existing):
        what = "is not writable" if existing == os.path.abspath(path) else f"cannot be created in '{existing}'"
        raise UserError(f"{flag} '{path}' {what} (permission denied or a read-only file system); choose "
                        f"another {flag}")
    for name in RUN_FILES:  # the files a run appends to or creates there must be files, not folders
        inside = os.path.join(path, name)
        if os.path.isdir(inside):
            raise UserError(f"'{inside}' in {flag} is a folder, where the run writes its {name} file; move it "
                            f"away or choose another {flag}")


def _can_write_in(folder):
    """Try it: create and remove a file (os.access would say yes to root on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


def pid_alive(pid):
    """Whether process `pid` of this host lives (signal 0 tests without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def describe_owner(owner):
    return (f"{owner.get('prog', 'a run')} (pid {owner.get('pid')} on {owner.get('host')}, started "
            f"{owner.get('started', '?')})")


def read_owner(lock_path):
    """The owner recorded in a lock file, {} for an unreadable lock, None for no lock."""
    try:
        with open(lock_path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


class RunLock:
    """`with RunLock(output_dir, prog, log):` holds OUTPUT_DIR/run.lock for the run's lifetime.

    Creating the lock creates the folder. A live owner raises UserError; a gone one is taken over with
    a note through `log`. A daemon thread refreshes the lock's time stamp as the owner's heartbeat, and
    the lock is removed on leaving, unless another run has since taken it over.
    """

    def __init__(self, output_dir, prog, log=print, stale_s=STALE_S):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.output_dir = output_dir
        self.prog = prog
        self.log = log
        self.stale_s = stale_s
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "prog": prog,
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        self.created = not os.path.exists(self.output_dir)
        try:
            os.makedirs(self.output_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create --output-dir '{self.output_dir}': {err.strerror}") from None
        for _ in range(3):  # a lost race with another run taking over: look again
            if self._try_create():
                self._thread = threading.Thread(target=self._heartbeat, daemon=True)
                self._thread.start()
                return self
            self._check_owner()
        raise UserError(f"cannot take the lock '{self.path}' of --output-dir: another run keeps taking it")

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if read_owner(self.path) == self.owner:
            try:
                os.remove(self.path)
            except OSError:
                pass
        if self.created:  # a run that failed before writing anything leaves no empty folder behind
            try:
                os.rmdir(self.output_dir)
            except OSError:  # not empty (or not ours to remove): keep it
                pass
        return False

    def _try_create(self):
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise UserError(f"cannot write the lock '{self.path}' in --output-dir: {err.strerror}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self.owner, f)
        return True

    def _check_owner(self):
        """Refuse while the lock's owner is alive; remove the lock of an owner that is gone."""
        owner = read_owner(self.path)
        if owner is None:
            return
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return
        same_host = owner.get("host") == socket.gethostname()
        pid = owner.get("pid")
        if same_host and isinstance(pid, int) and not pid_alive(pid):
            why = f"pid {pid} is not running"
        elif age > self.stale_s:
            why = f"its lock was last refreshed {age:.0f} s ago"
        elif not owner:
            raise UserError(f"--output-dir '{self.output_dir}' is locked by '{self.path}', which is being "
                            f"written or unreadable; if no run uses the folder, delete that file")
        else:
            raise UserError(f"--output-dir '{self.output_dir}' is in use by {describe_owner(owner)}; wait for "
                            f"it to finish or choose another --output-dir (if that run is gone, delete "
                            f"'{self.path}')")
        if read_owner(self.path) != owner:  # another run took it over meanwhile: look again
            return
        self.log(f"=> taking over the lock of --output-dir from {describe_owner(owner)}: {why}")
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def _heartbeat(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
