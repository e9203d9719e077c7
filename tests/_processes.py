"""Worker subprocesses for the crash tests: started with ``flowctl worker``, output to a log file
(never a pipe nobody reads), stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path


def spawn_worker(
    target: str, prefix: str, env: dict[str, str], log: Path, *options: str
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "flow_orchestrator.runtime._cli",
        "worker",
        target,
        "--prefix",
        prefix,
        "--log-level",
        "WARNING",
        *options,
    ]
    with log.open("ab") as output:  # the child keeps its own descriptor
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)


def stop_all(procs: Iterable[subprocess.Popen[bytes] | None]) -> None:
    """SIGTERM (a drain) to those still running, by PID, and wait for each."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
