"""A SIGTERM ends `synthgate release` within a bounded time even when a handler swallows it and threads linger."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil

SCRIPT = textwrap.dedent("""
    import signal, subprocess, sys, threading, time
    from flows.termination import exit_after_sigterm

    exit_after_sigterm(grace_s=0.5)
    # What the release flow looks like to a SIGTERM: a graceful handler that does not exit at once (the trainer's,
    # Prefect's), a non-daemon thread still working (a task beside the one that stopped), and a child process.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    worker = threading.Thread(target=time.sleep, args=(120,))
    worker.start()
    print(child.pid, flush=True)
    worker.join()
""")


def test_sigterm_is_obeyed_within_the_grace_period(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).resolve().parents[1], text=True)
    child_pid = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGTERM)
    # Without the watchdog this process would live 120 s; the limit only keeps a failing test from hanging.
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "SIGTERM" in proc.stderr.read()
    gone = not psutil.pid_exists(child_pid) or psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE
    assert gone, "the child process outlived its parent"
