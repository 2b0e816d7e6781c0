"""Multi-process training: `launch_training` starts torchrun, and this module is the worker torchrun runs.

    launch_training(dataset, out, config, nproc=2)          # from Python (the CLI's `train --nproc`, a Prefect task)
    torchrun --nproc-per-node 4 -m flows.distributed DATASET --out MODEL [--config FILE] [--dp-config JSON]

Every worker calls `synth.training.train` inside an initialised process group: each rank computes its slice of the
same global batch a single process would train on (see `synth.training`), rank 0 writes checkpoints and the model
directory (atomically, the same layout as a single-process run). With `--dp-config` every worker receives the
launcher's `privacy.dp_config.DPConfig` (as its JSON) and turns it into its strategy with `privacy.dp.build_strategy`,
as a single-process run does (one strategy per process: Opacus' wrapped objects cannot be shipped between
processes); the strategy switches to Opacus' distributed DP-SGD with one ledger, rank 0's. This module lives in
`flows` because it wires DP (privacy) into the trainer (synth), which never imports privacy.

Failures: a worker that raises writes a one-line JSON report (rank, exception type, message) to the launcher's
run folder; `launch_training` raises `WorkerFailed` (or the worker's own `SynthgateError` class) naming the rank
that failed first, with the path of the full log. Nothing is written to `out` unless rank 0 finished it.
Interrupts: Ctrl-C / SIGTERM on the launcher is forwarded once to torchrun, which forwards it to the workers; they
stop at the next step boundary together, rank 0 saves a checkpoint, and `--resume` continues from it (with any
number of processes: the checkpoint does not depend on the world size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from privacy.dp_config import DPConfig
from synth import errors
from synth.errors import ConfigError, InputError, SynthgateError, where
from synth.train_config import TrainConfig

BACKENDS = ("auto", "gloo", "nccl")
WORKER = "flows.distributed"
_LOG = "torchrun.log"
_CONSOLE = "console.txt"  # rank 0's stderr (progress bar, interrupt notices), echoed by the launcher
_ERRORS = "errors"  # one <rank>.json per worker that raised
_STOP_GRACE_S = 60.0  # after forwarding a stop: time for the workers to finish their step and save


class WorkerFailed(SynthgateError):
    """A training worker process failed (crashed, was killed, or did not finish in time)."""

    exit_code = 1


# -- launcher ----------------------------------------------------------------------------------------------------


def resolve_backend(backend: str, nproc: int, *, device: str = "auto") -> str:
    """"auto" → nccl when CUDA is available, the config does not ask for the CPU and every process gets a GPU of
    its own; gloo otherwise. An explicit "nccl" without enough GPUs is refused."""
    import torch

    if backend not in BACKENDS:
        raise ConfigError(where("train launcher", f"backend {backend!r} is not one of {', '.join(BACKENDS)}"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "auto":
        return "nccl" if device != "cpu" and 0 < nproc <= gpus else "gloo"
    if backend == "nccl" and nproc > gpus:
        raise ConfigError(where("train launcher", f"backend 'nccl' needs one GPU per process: {nproc} processes, "
                                                  f"{gpus} CUDA device(s)"))
    return backend


def launch_training(
    dataset: Path,
    out: Path,
    config: TrainConfig,
    *,
    nproc: int,
    dp: DPConfig | None = None,
    backend: str = "auto",
    resume: bool = False,
    checkpoint_dir: Path | None = None,
    progress: bool = False,
    timeout_s: float | None = None,
    threads: int | None = None,
    worker: str = WORKER,
) -> Path:
    """Train with `nproc` local processes (torchrun, standalone rendezvous) and return `out`, the model directory
    rank 0 wrote (same layout as `synth.training.train`).

    `dp`: train with DP-SGD to this config; every worker builds its strategy from it (`privacy.dp.build_strategy`,
    with `config.noise_multiplicity` and N counted in the dataset), and δ is checked against N here first.
    `backend`: see `resolve_backend`. `resume`/`checkpoint_dir` as in `train`. `progress` shows rank 0's progress
    bar on this process's stderr (rank 0's other messages, such as where a checkpoint went, are always shown).
    `timeout_s`: stop the workers (they checkpoint at the next step) and raise after this many seconds.
    `threads`: torch threads per process (default: torchrun's OMP_NUM_THREADS=1 for nproc > 1, else torch's own).
    `worker`: the module torchrun runs (tests substitute a wrapper around this one).
    Raises `WorkerFailed` (or the failing worker's own `SynthgateError` class) with one line naming the rank.
    """
    dataset, out = Path(dataset), Path(out)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(where("train launcher", f"nproc {nproc!r} must be an integer >= 1"))
    if nproc > config.batch_size:
        raise ConfigError(where("train launcher", f"nproc {nproc} exceeds batch_size {config.batch_size}: each "
                                                  "process needs examples of its own"))
    if timeout_s is not None and not (isinstance(timeout_s, int | float) and timeout_s > 0):
        raise ConfigError(where("train launcher", f"timeout_s {timeout_s!r} must be a number > 0"))
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(where("train launcher", f"threads {threads!r} must be an integer >= 1"))
    if dp is not None and not isinstance(dp, DPConfig):
        raise ConfigError(where("train launcher", f"dp must be a privacy.dp_config.DPConfig, not {type(dp).__name__}"))
    resolved = resolve_backend(backend, nproc, device=config.device)
    if not dataset.is_dir():
        raise InputError(where(dataset, "is not a directory (expected a canonical dataset)"))
    if out.exists():
        raise InputError(where(out, "already exists; choose another --out or remove it"))
    if not out.parent.is_dir():
        raise InputError(where(out.parent, "output's parent directory does not exist"))
    if dp is not None:
        from privacy.dp import resolve_delta, train_split_size

        resolve_delta(dp, dataset_size=train_split_size(dataset))  # a bad δ fails here, not in every worker
    from synth.checkpoint import default_checkpoint_dir, has_checkpoint

    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir(out)
    if has_checkpoint(ckpt) and not resume:
        raise InputError(
            where(ckpt, "holds a checkpoint of an interrupted run; pass --resume to continue it, or remove it")
        )

    run_dir = Path(tempfile.mkdtemp(prefix="synthgate-train-"))
    (run_dir / _ERRORS).mkdir()
    config_file = run_dir / "train_config.json"
    config_file.write_text(json.dumps(config.to_json()), encoding="utf-8")
    args = [str(dataset.resolve()), "--out", str(out.resolve()), "--config", str(config_file),
            "--backend", resolved, "--checkpoint-dir", str(ckpt.resolve()),
            "--error-dir", str(run_dir / _ERRORS), "--console-file", str(run_dir / _CONSOLE),
            "--progress" if progress else "--no-progress"]
    if dp is not None:
        args += ["--dp-config", dp.model_dump_json()]
    if resume:
        args.append("--resume")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--max-restarts", "0", "-m", worker, *args]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    # Workers import synth from the same place this process did, whatever their working directory.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])

    code, stop = _run_torchrun(cmd, env, run_dir, timeout_s=timeout_s)
    if code == 0 and out.is_dir():
        shutil.rmtree(run_dir, ignore_errors=True)
        return out
    if stop in ("SIGINT", "SIGTERM"):  # the workers saved a checkpoint (rank 0 said where) and stopped
        shutil.rmtree(run_dir, ignore_errors=True)
        raise KeyboardInterrupt if stop == "SIGINT" else SystemExit(128 + signal.SIGTERM)
    failure = _first_failure(run_dir / _ERRORS)
    log = run_dir / _LOG
    if stop == "timeout":
        raise WorkerFailed(f"training with {nproc} processes did not finish within {timeout_s:g} s; stopped it "
                           f"(a checkpoint, if any, is in {ckpt}; log: {log})")
    if failure is not None:
        raise _as_error(failure, nproc, log)
    if code == 0:
        raise WorkerFailed(f"torchrun exited 0 but {out} was not written (log: {log})")
    raise WorkerFailed(f"torchrun exited with code {code} and no worker reported an error "
                       f"({_last_line(log) or 'empty log'}; log: {log})")


def _run_torchrun(cmd: list[str], env: dict[str, str], run_dir: Path, *, timeout_s: float | None) -> tuple[int, str]:
    """Run torchrun to completion, echoing rank 0's console file; return (exit code, why it was stopped: "SIGINT",
    "SIGTERM", "timeout" or "")."""
    console = run_dir / _CONSOLE
    console.touch()
    stop = ""
    with open(run_dir / _LOG, "wb") as log, open(console, "rb") as echo:
        # Its own session: a terminal's Ctrl-C reaches only this process, which forwards exactly one signal (torchrun
        # relays it once to the workers, which then stop at a step boundary and save).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s if timeout_s is not None else math.inf
        forwarded_at: float | None = None
        grace = _STOP_GRACE_S
        with _forwarding_signals() as received:
            while proc.poll() is None:
                _echo(echo)
                if received and forwarded_at is None:
                    stop, forwarded_at = signal.Signals(received[0]).name, time.monotonic()
                    _signal(proc, received[0])
                elif forwarded_at is None and time.monotonic() > deadline:
                    stop, forwarded_at = "timeout", time.monotonic()
                    _signal(proc, signal.SIGTERM)
                elif forwarded_at is not None and (len(received) > 1 or time.monotonic() - forwarded_at > grace):
                    _signal(proc, signal.SIGKILL)  # a second Ctrl-C, or workers that do not stop (they follow it)
                    forwarded_at = math.inf
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.2)
            _echo(echo)
    return proc.returncode, stop


@contextlib.contextmanager
def _forwarding_signals() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM in a list instead of raising (main thread only; elsewhere the list stays empty)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)


def _echo(stream: Any) -> None:
    data = stream.read()
    if data:
        sys.stderr.write(data.decode("utf-8", errors="replace"))
        sys.stderr.flush()


def _first_failure(error_dir: Path) -> dict | None:
    """The report of the rank that failed first (the others usually fail because it left the process group)."""
    reports = []
    for path in error_dir.glob("*.json"):
        with contextlib.suppress(OSError, ValueError):
            reports.append(json.loads(path.read_text(encoding="utf-8")))
    reports.sort(key=lambda r: (r.get("interrupted", False), r.get("time", math.inf), r.get("rank", 0)))
    return reports[0] if reports else None


def _as_error(report: dict, nproc: int, log: Path) -> SynthgateError:
    rank, kind, message = report.get("rank"), report.get("type", "Error"), report.get("message", "")
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, SynthgateError):
        return cls(f"{message} (training worker rank {rank} of {nproc})")
    if report.get("interrupted"):
        return WorkerFailed(f"training worker rank {rank} of {nproc} was stopped ({kind}) (log: {log})")
    return WorkerFailed(f"training worker rank {rank} of {nproc} failed: {kind}: {message} (log: {log})")


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [x.strip() for x in path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        return lines[-1][:300] if lines else ""
    return ""


# -- worker ------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun [...] -m flows.distributed",
        description="One training worker of a multi-process run (start it with torchrun, or use `synthgate train "
                    "--nproc N`). Every rank gets the same arguments.",
    )
    p.add_argument("dataset", type=Path, help="canonical dataset directory (its train split is used)")
    p.add_argument("--out", type=Path, required=True, help="model directory to create (rank 0 writes it)")
    p.add_argument("--config", type=Path, help="YAML/JSON file of TrainConfig keys (default: the small preset)")
    p.add_argument("--preset", help="tiny | small | base (wins over the file's preset)")
    p.add_argument("--dp-config", help="DP-SGD: privacy.dp_config.DPConfig as JSON, or a path to a JSON/YAML file")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    p.add_argument("--checkpoint-dir", type=Path, help="checkpoint folder (default: MODEL.ckpt)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="rank 0's progress bar (default: when stderr is a terminal)")
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--error-dir", type=Path, help=argparse.SUPPRESS)  # launcher: failure reports
    p.add_argument("--console-file", type=Path, help=argparse.SUPPRESS)  # launcher: rank 0's stderr
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The worker: join the process group torchrun set up, train, leave. Returns the process exit code."""
    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    if args.console_file is not None and rank == 0:
        sys.stderr = open(args.console_file, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (process-long)
    try:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise InputError(where("flows.distributed", "is a torchrun worker: start it with `torchrun "
                                                        "--nproc-per-node N -m flows.distributed ...` or use "
                                                        "`synthgate train --nproc N`"))
        _exit_with_parent()
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        _train(args)
        return 0
    except BaseException as e:  # reported to the launcher, then the process exits
        return _report(e, rank, args.error_dir)


def _exit_with_parent() -> None:
    """torchrun starts each worker in a session of its own: if torchrun is killed, stop rather than train on."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(137)

    threading.Thread(target=watch, name="exit-with-torchrun", daemon=True).start()


@contextlib.contextmanager
def process_group(backend: str = "auto", *, device: str = "auto") -> Iterator[str]:
    """Join the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...), pin this
    rank's GPU for NCCL, and leave the group on exit. Yields the backend used."""
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    resolved = resolve_backend(backend, local_world, device=device)
    if resolved == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=resolved)
    try:
        yield resolved
    finally:
        with contextlib.suppress(Exception):  # a peer that already died must not mask the real error
            dist.destroy_process_group()


def _train(args: argparse.Namespace) -> None:
    from synth.train_config import load_train_config
    from synth.training import train

    config = load_train_config(preset=args.preset, config_file=args.config)
    if config.threads is None:  # one process per core (torchrun's OMP_NUM_THREADS, or --threads): keep it
        import torch

        config = config.model_copy(update={"threads": torch.get_num_threads()})
    progress = args.progress if args.progress is not None else sys.stderr.isatty()
    with process_group(args.backend, device=config.device):
        privacy = _privacy_strategy(args.dp_config, args.dataset, config) if args.dp_config else None
        train(args.dataset, args.out, config, privacy=privacy, progress=progress, resume=args.resume,
              checkpoint_dir=args.checkpoint_dir)


def _privacy_strategy(spec: str, dataset: Path, config: TrainConfig) -> Any:
    """This process's DP-SGD strategy, from `--dp-config` (JSON text or a file) and the run's K."""
    text = spec.strip()
    if not text.startswith("{"):
        from synth.config import load_yaml

        data = load_yaml(Path(text))
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(where("--dp-config", f"is not valid JSON ({e})")) from None
    if not isinstance(data, dict):
        raise ConfigError(where("--dp-config", f"must be a JSON object, not {type(data).__name__}"))
    from privacy.dp import build_strategy

    return build_strategy(DPConfig.from_dict(data), dataset=dataset, noise_multiplicity=config.noise_multiplicity)


def _report(e: BaseException, rank: int, error_dir: Path | None) -> int:
    """Write the failure report for the launcher and say it in one line; return the exit code."""
    interrupted = isinstance(e, KeyboardInterrupt | SystemExit)
    if isinstance(e, SystemExit) and e.code in (0, None):
        return 0
    code = (e.exit_code if isinstance(e, SynthgateError) else 130 if isinstance(e, KeyboardInterrupt)
            else int(e.code) if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
    message = str(e).splitlines()[0] if str(e) else ""
    report = {"rank": rank, "type": type(e).__name__, "message": message, "exit_code": code,
              "interrupted": interrupted, "time": time.time()}
    if error_dir is not None:
        with contextlib.suppress(OSError):
            tmp = error_dir / f".{rank}.json.tmp"
            tmp.write_text(json.dumps(report), encoding="utf-8")
            tmp.replace(error_dir / f"{rank}.json")
    line = f"rank {rank}: {type(e).__name__}: {message}" if message else f"rank {rank}: {type(e).__name__}"
    print(line, file=sys.__stderr__, flush=True)
    if not isinstance(e, SynthgateError) and not interrupted:
        traceback.print_exception(e, file=sys.__stderr__)  # a bug: keep the traceback, in the worker's log
    return code


if __name__ == "__main__":
    sys.exit(main())
