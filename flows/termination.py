"""A SIGTERM ends a long-running command within a bounded time, whoever handles the signal.

`synthgate release` runs Prefect flows: Prefect's engine turns SIGTERM into a crash of the flow run, the trainer
turns it into "stop after this step and save a checkpoint", and then the thread pool still waits for tasks running
beside the one that stopped (minutes, for the copy-detection encoder). An orphaned release (its shell gone) then
lives on long after it was told to stop. `exit_after_sigterm` arms a watchdog thread that sees every SIGTERM through
`signal.set_wakeup_fd` (written by the interpreter for any Python-level handler, Prefect's or the trainer's), gives
the graceful paths `grace_s` seconds, then terminates the process's children (the temporary Prefect server,
torchrun) and exits with 143.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

GRACE_S = 10.0
_armed = False


def exit_after_sigterm(grace_s: float = GRACE_S) -> bool:
    """Arm the watchdog (once per process, from the main thread); True when it is armed."""
    global _armed
    if _armed or threading.current_thread() is not threading.main_thread():
        return _armed
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        # The default action kills at once, writing nothing: a Python handler makes the wakeup byte appear.
        signal.signal(signal.SIGTERM, _raise_system_exit)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(reader, writer, grace_s), name="sigterm-deadline", daemon=True).start()
    _armed = True
    return True


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _watch(reader: socket.socket, writer: socket.socket, grace_s: float) -> None:
    # `writer` is held here so it stays open (the interpreter only has its number).
    while True:
        data = reader.recv(64)
        if not data:  # closed: nothing more can arrive
            return
        if signal.SIGTERM in data:
            break
    time.sleep(grace_s)
    sys.stderr.write(f"\nSIGTERM: still running {grace_s:g} s later; stopping child processes and exiting\n")
    sys.stderr.flush()
    _terminate_children()
    os._exit(128 + signal.SIGTERM)


def _terminate_children(timeout_s: float = 3.0) -> None:
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            continue
