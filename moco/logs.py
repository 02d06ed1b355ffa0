"""Rank-0 output: console lines and one JSON line per epoch in OUTPUT_DIR/log.txt."""
import json
import os
import sys


class RunLog:
    """Prints and records only on the main process; other processes stay silent."""

    def __init__(self, output_dir, is_main):
        self.output_dir = output_dir
        self.is_main = is_main
        self.path = os.path.join(output_dir, "log.txt")

    def info(self, message):
        if self.is_main:
            print(message, flush=True)

    def warn(self, message):
        if self.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def record(self, entry):
        """Append `entry` as one JSON line to log.txt."""
        if not self.is_main:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(entry, sort_keys=False) + "\n")
