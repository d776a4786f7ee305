"""The worker process of LocalExecutor: reads one job per line on stdin, answers one JSON line.

Everything else the job prints (libraries' chatter included) goes to stderr,
which the executor sends to a log file, so the answer channel stays clean.
"""

from __future__ import annotations

import json
import os
import sys


def main(run_dir: str) -> None:
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # fd 1 now points at the log: stray prints cannot corrupt the answers
    sys.stdout = sys.stderr
    from .executors import run_job

    for line in sys.stdin:
        job = json.loads(line)
        row = run_job(job["kind"], job["payload"], run_dir)
        answers.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
