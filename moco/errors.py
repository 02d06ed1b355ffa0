"""One clear line for bad input: the scripts raise `UserError`, `run_cli` prints it and exits."""
import sys


class UserError(Exception):
    """A problem with what the user gave us (paths, flags, checkpoints, data), not a bug.

    The message must name the problem and, where it helps, the fix. `run_cli` prints it as one line
    without a traceback and exits with status 2.
    """


class Preempted(Exception):
    """Raised once a preemption (SIGTERM) checkpoint is saved; the process exits with status 143,
    the shell's code for SIGTERM, so job scripts do not mistake the stop for a finished run."""


PREEMPTED_EXIT = 143


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
    """Call `main(args)`; turn a `UserError` into `prog: error: message` on stderr and exit 2."""
    try:
        return main(args)
    except UserError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Preempted:
        sys.exit(PREEMPTED_EXIT)
