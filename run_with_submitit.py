#!/usr/bin/env python
"""Submit main_moco.py or main_lincls.py to SLURM through submitit, or run it on this machine (--local).

    python run_with_submitit.py [launcher flags] main_moco.py|main_lincls.py [that script's flags]
    python run_with_submitit.py --nodes 2 --ngpus 8 --timeout 4320 main_moco.py --mlp --aug-plus --cos \\
        --output-dir runs/v2 DIR

One task per GPU; every task calls the script's main(args) with the flags given here. The process group
is found from the job itself (submitit's JobEnvironment: rank, world size, first host; the port follows
from the job id), so nobody sets MASTER_ADDR. Before its time limit (submitit asks SLURM for SIGUSR2
--signal-delay seconds before it) or on a preemption that SLURM signals the same way, the job saves a
checkpoint through the scripts' own SIGTERM path and is requeued with the same flags; the requeued job
resumes from that checkpoint in --output-dir. submitit is an optional extra (pip install submitit).
"""
import argparse
import copy
import os
import re
import signal
import sys

REPO = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("main_moco.py", "main_lincls.py")
PREEMPTED_EXIT = 143  # moco.errors.PREEMPTED_EXIT; repeated here so that `-h` needs no torch import
USAGE = ("python run_with_submitit.py [launcher flags] main_moco.py|main_lincls.py [that script's flags]")


def get_args_parser():
    parser = argparse.ArgumentParser(
        usage=USAGE, description="Submit main_moco.py or main_lincls.py to SLURM with submitit (or run it "
                                 "here with --local); the script's own flags follow its name unchanged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nodes", default=1, type=int, help="number of nodes")
    parser.add_argument("--ngpus", default=8, type=int,
                        help="GPUs per node; one task per GPU (0: one CPU task per node)")
    parser.add_argument("--timeout", default=4320, type=int, metavar="MINUTES",
                        help="time limit of one job; at the limit it checkpoints and is requeued")
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--account", default=None, help="SLURM account")
    parser.add_argument("--qos", default=None, help="SLURM quality of service")
    parser.add_argument("--constraint", default=None, help="SLURM constraint, e.g. volta32gb")
    parser.add_argument("--comment", default=None, help="SLURM comment")
    parser.add_argument("--cpus-per-task", default=None, type=int,
                        help="CPUs of each task (loader workers); default: the cluster's")
    parser.add_argument("--job-name", default=None, help="default: the script's name")
    parser.add_argument("--job-dir", default=None, metavar="DIR",
                        help="submitit's folder of job logs and pickles (file names start with the job "
                             "id; %%j in DIR stands for it); default: OUTPUT_DIR/submitit under the "
                             "script's --output-dir")
    parser.add_argument("--max-requeues", default=3, type=int, metavar="N",
                        help="requeues after a time limit before the run is given up (preemptions are "
                             "not counted)")
    parser.add_argument("--signal-delay", default=120, type=int, metavar="SECONDS",
                        help="SIGUSR2 this long before the time limit: time to finish a step and save")
    parser.add_argument("--local", action="store_true",
                        help="run the job on this machine with submitit's local executor (one node), wait "
                             "for it and exit with its status")
    return parser


# --------------------------------------------------------------------------------------------------
# The command line: launcher flags, the script, the script's flags.
# --------------------------------------------------------------------------------------------------
def split_command(argv):
    """(launcher flags, script name, script flags); the script is the first argument naming one."""
    for index, arg in enumerate(argv):
        if os.path.basename(arg) in SCRIPTS:
            return argv[:index], os.path.basename(arg), argv[index + 1:]
    return argv, None, []


def usage_error(message):
    """argparse's form for a bad command line: usage, one line, exit status 2."""
    print(f"usage: {USAGE}\nrun_with_submitit.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def require_submitit():
    try:
        import submitit
    except ImportError:
        usage_error("submitting jobs needs submitit, which is not installed; install it with: pip install submitit")
    return submitit


def load_script(name):
    """The module of main_moco.py or main_lincls.py in this repository (they expose get_args_parser and
    main); imported under its own name so that pickles of its objects stay importable."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    import importlib
    return importlib.import_module(name[:-len(".py")])


def absolute_paths(args):
    """Paths made absolute, so that the job finds them from whatever folder it starts in."""
    for dest in ("data", "output_dir", "resume", "pretrained"):
        value = getattr(args, dest, None)
        if value:
            setattr(args, dest, os.path.abspath(value))
    return args


def check_launcher_flags(launcher):
    for flag, value, low in (("--nodes", launcher.nodes, 1), ("--ngpus", launcher.ngpus, 0),
                             ("--timeout", launcher.timeout, 1), ("--max-requeues", launcher.max_requeues, 0),
                             ("--signal-delay", launcher.signal_delay, 0)):
        if value < low:
            usage_error(f"{flag} {value} is out of range: it must be >= {low}")
    if launcher.local and launcher.nodes != 1:
        usage_error(f"--local runs on this machine, one node: drop --nodes {launcher.nodes}")
    if launcher.signal_delay >= 60 * launcher.timeout:
        usage_error(f"--signal-delay {launcher.signal_delay} s must be shorter than --timeout "
                    f"{launcher.timeout} min")


# --------------------------------------------------------------------------------------------------
# What runs in every task of the job.
# --------------------------------------------------------------------------------------------------
class JobFailed(Exception):
    """The script stopped with a non-zero status; submitit records the message as the job's error."""

    def __init__(self, status, line):
        super().__init__(f"exit status {status}: {line}")


class Job:
    """The submitted callable: runs `script`'s main on `args` in this task. submitit calls `checkpoint`
    when it requeues the job; the requeue runs a fresh copy with the same flags, which resumes from the
    newest checkpoint in --output-dir (the scripts' own auto-resume)."""

    def __init__(self, script, args):
        self.script = script
        self.args = args
        self._requeue_signal = False
        self._submitit_handler = None

    def __call__(self):
        import submitit
        from moco.errors import Preempted, UserError, one_line
        env = submitit.JobEnvironment()
        export_rendezvous(env)
        print(f"submitit job {env.job_id}, task {env.global_rank} of {env.num_tasks} on {env.hostname} "
              f"(pid {os.getpid()}): {self.script}; job folder {env.paths.folder}; logs {env.paths.stdout} "
              f"and {env.paths.stderr}", flush=True)
        self._route_requeue_signal()
        try:
            load_script(self.script).main(copy.deepcopy(self.args))  # main fills in args (data, resume)
        except UserError as err:
            line = f"{self.script}: error: {one_line(err)}"
            print(line, file=sys.stderr, flush=True)
            raise JobFailed(2, line) from None
        except Preempted as stop:
            if self._requeue_signal and env.global_rank == 0:
                # the checkpoint is written: now submitit's own handler dumps `checkpoint()` and requeues
                self._submitit_handler(submitit.JobEnvironment._usr_sig(), None)
            line = (f"{self.script}: stopped by SIGTERM after saving {stop}; the job is not requeued by this "
                    f"task: SLURM requeues preempted jobs itself where the partition's PreemptMode is REQUEUE, "
                    f"else submit the same command again to resume")
            if self._requeue_signal:
                line = f"{self.script}: saved {stop}; task 0 requeues the job"
            print(line, file=sys.stderr, flush=True)
            raise JobFailed(PREEMPTED_EXIT, line) from None
        return 0

    def checkpoint(self):
        import submitit
        return submitit.helpers.DelayedSubmission(Job(self.script, self.args))

    def _route_requeue_signal(self):
        """submitit's SIGUSR2 handler (time limit, signalled preemption) would requeue at once, losing
        the steps since the last checkpoint. Ours hands the signal to the scripts' SIGTERM path, which
        saves after the current step and raises Preempted; then submitit's handler requeues (above). Where
        no training loop listens for SIGTERM (start-up, evaluation), submitit's handler runs as before."""
        import submitit
        usr_sig = submitit.JobEnvironment._usr_sig()
        self._submitit_handler = signal.getsignal(usr_sig)
        submitit_sigterm = signal.getsignal(signal.SIGTERM)

        def on_requeue_signal(signum, frame):
            self._requeue_signal = True
            if signal.getsignal(signal.SIGTERM) is submitit_sigterm:  # no trainer is listening
                self._submitit_handler(signum, frame)
            else:
                signal.raise_signal(signal.SIGTERM)

        signal.signal(usr_sig, on_requeue_signal)


def export_rendezvous(env):
    """torchrun's variables from the job's environment, so that moco.distributed starts the process group
    by env:// on every task: the first host of the job, and a port that follows from the job id (every
    task computes the same one). A job of one task runs as a single process."""
    if env.num_tasks == 1:
        return
    digits = re.sub(r"\D", "", str(env.job_id)) or "0"
    os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.num_tasks // env.num_nodes), MASTER_ADDR=env.hostnames[0],
                      MASTER_PORT=str(20000 + int(digits) % 20000))


# --------------------------------------------------------------------------------------------------
# Submission.
# --------------------------------------------------------------------------------------------------
def make_executor(submitit, launcher, job_dir, name):
    tasks = max(1, launcher.ngpus)
    if launcher.local:
        executor = submitit.LocalExecutor(folder=job_dir, max_num_timeout=launcher.max_requeues)
        executor.update_parameters(timeout_min=launcher.timeout, tasks_per_node=tasks,
                                   gpus_per_node=launcher.ngpus, signal_delay_s=launcher.signal_delay)
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=job_dir, max_num_timeout=launcher.max_requeues)
    except RuntimeError:  # submitit looks for srun first
        usage_error("SLURM's srun is not found on this machine: submit from a login node of the cluster, or "
                    "run the job here with --local")
    slurm = {"partition": launcher.partition, "account": launcher.account, "qos": launcher.qos,
             "constraint": launcher.constraint, "comment": launcher.comment,
             "cpus_per_task": launcher.cpus_per_task}
    executor.update_parameters(job_name=name, time=launcher.timeout, nodes=launcher.nodes, ntasks_per_node=tasks,
                               gpus_per_node=launcher.ngpus or None, signal_delay_s=launcher.signal_delay,
                               **{key: value for key, value in slurm.items() if value is not None})
    return executor


def job_status(job, script):
    """(exit status, one line) of a finished local job."""
    error = job.exception()
    if error is None:
        return 0, f"{script} finished"
    text = str(error)
    found = re.findall(r"JobFailed: exit status (\d+): (.*)", text)
    if found:
        status, line = found[-1]
        return int(status), line
    last = [line for line in text.splitlines() if line.strip() and not line.startswith("-----")]
    return 1, f"{script} failed: {last[-1] if last else type(error).__name__}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    launcher_argv, script, script_argv = split_command(argv)
    launcher = get_args_parser().parse_args(launcher_argv)
    if script is None:
        usage_error(f"name the script to run, {' or '.join(SCRIPTS)}, after the launcher flags")
    check_launcher_flags(launcher)
    args = absolute_paths(load_script(script).get_args_parser().parse_args(script_argv))
    submitit = require_submitit()
    job_dir = os.path.abspath(launcher.job_dir or os.path.join(args.output_dir, "submitit"))
    # the job imports this repository's moco package from any working folder (sbatch and the local
    # executor pass the environment on)
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    executor = make_executor(submitit, launcher, job_dir, launcher.job_name or script[:-len(".py")])
    job = executor.submit(Job(script, args))
    where = "this machine" if launcher.local else f"SLURM, {launcher.nodes} node(s)"
    print(f"submitted {script} as job {job.job_id} ({where}, {max(1, launcher.ngpus)} task(s) per node, "
          f"{launcher.ngpus} GPU(s) per node)\n  job folder: {job.paths.folder}\n  log of task 0: "
          f"{job.paths.stdout} (errors: {job.paths.stderr})\n  checkpoints and log.txt: {args.output_dir}",
          flush=True)
    if not launcher.local:
        return 0
    try:
        job.wait()
    except KeyboardInterrupt:
        job.cancel()
        print(f"interrupted: job {job.job_id} cancelled", file=sys.stderr, flush=True)
        return 130
    status, line = job_status(job, script)
    print(f"job {job.job_id} ended with status {status}: {line}\n  log: {job.paths.stdout} "
          f"(errors: {job.paths.stderr})", file=sys.stderr if status else sys.stdout, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
