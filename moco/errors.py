"""One clear line for bad input: the scripts raise `UserError`, `run_cli` prints it and exits."""
import gc
import sys


class UserError(Exception):
    """A problem with what the user gave us (paths, flags, checkpoints, data), not a bug.

    The message must name the problem and, where it helps, the fix. `run_cli` prints it as one line
    without a traceback and exits with status 2.
    """


class Preempted(Exception):
    """Raised once a preemption (SIGTERM) or Ctrl-C (SIGINT) checkpoint is saved; the process exits with
    `exit_code`: 143 or 130, the shell's codes for those signals, so job scripts do not mistake the stop
    for a finished run."""

    def __init__(self, path=None, exit_code=None):
        super().__init__(path)
        self.exit_code = PREEMPTED_EXIT if exit_code is None else exit_code


PREEMPTED_EXIT = 143
INTERRUPTED_EXIT = 130


def one_line(err):
    """The message of a UserError as one line, also when a DataLoader worker raised it: the loader
    re-raises it in the main process as `UserError("Caught UserError in DataLoader worker process N.
    Original Traceback ... moco.errors.UserError: <message>")`; only <message> is the user's."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def run_cli(main, args, prog):
    """Call `main(args)`; turn a `UserError` into `prog: error: message` on stderr and exit 2, a
    preemption into its exit code, and a Ctrl-C that was not turned into a checkpoint (one before
    training starts, or a second one) into one line and exit 130."""
    try:
        return main(args)
    except UserError as err:
        message, code = f"{prog}: error: {one_line(err)}", 2
    except Preempted as err:
        message, code = None, err.exit_code
    except KeyboardInterrupt:
        message, code = f"{prog}: interrupted (Ctrl-C); stopped without saving", INTERRUPTED_EXIT
    release_training_state()
    if message:
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def release_training_state():
    """Free what the failed run still holds through its exception's traceback, now, while the
    interpreter is whole: a DataLoader iterator that is freed stops its workers cleanly (they finish
    their batch and exit). Left to the interpreter's exit, multiprocessing kills them first, and torch's
    SIGCHLD handler reports 'DataLoader worker ... killed by signal' after the one-line error."""
    gc.collect()
