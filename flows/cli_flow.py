"""`synthgate release`, `synthgate approve` and `synthgate serve-flow`: the Prefect release flow from the shell."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from synth.errors import SynthgateError

console = Console(highlight=False, soft_wrap=True)  # paths and commands stay copy-pasteable


class _UserErrorsOnOneLine(logging.Filter):
    """Drops the traceback from console log records of user errors (`SynthgateError`) raised inside tasks and
    flows: the CLI prints the error's one line at the end; the Prefect API still records the full record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SynthgateError):
            record.exc_info, record.exc_text = None, None
        return True


def _one_line_user_errors() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _UserErrorsOnOneLine) for f in handler.filters):
            handler.addFilter(_UserErrorsOnOneLine())


def _quiet_prefect() -> None:
    # Offline by design: no analytics, and a generous ephemeral-server start on 2 busy cores.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def load_release_config(config: Path | None, **overrides: object):
    """ReleaseConfig from a YAML file (or defaults), with CLI overrides applied to top-level keys."""
    from flows.release_config import ReleaseConfig
    from synth.config import build

    if config is not None:
        return ReleaseConfig.from_yaml(config, **overrides)
    return build(ReleaseConfig, {k: v for k, v in overrides.items() if v is not None}, source="command line")


def with_scale_out(cfg, **flags: object):
    """The config with the command line's runner and training-launch flags applied over the file's sections."""
    from flows.release_config import LaunchSettings, RunnerSettings
    from synth.config import build

    runner = {k: v for k, v in flags.items() if k in ("kind", "address", "workers", "shards") and v is not None}
    launch = {"nproc": flags["nproc"]} if flags.get("nproc") is not None else {}
    if runner:
        runner = build(RunnerSettings, {**cfg.runner.model_dump(), **runner}, source="command line")
    if launch:
        launch = build(LaunchSettings, {**cfg.launch.model_dump(), **launch}, source="command line")
    return cfg.model_copy(update={k: v for k, v in (("runner", runner), ("launch", launch)) if v})


def release_cmd(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="release.yaml (config + policy).")] = None,
    auto_approve: Annotated[bool, typer.Option(help="Approve without a human (recorded in the datasheet).")] = False,
    workdir: Annotated[Path | None, typer.Option(help="Where stage artifacts go (cached by content hash).")] = None,
    releases_dir: Annotated[Path | None, typer.Option(help="Where approved bundles are published.")] = None,
    key: Annotated[Path | None, typer.Option(help="The steward's private signing key (release.key).")] = None,
    release_id: Annotated[str | None, typer.Option(help="Id of this release (default: derived).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    runner: Annotated[str | None, typer.Option(help="Task runner: threads | dask | ray.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Scheduler to run on, e.g. tcp://host:8786 (default: a local cluster).")] = None,
    workers: Annotated[int | None, typer.Option(help="Local cluster worker processes.")] = None,
    shards: Annotated[int | None, typer.Option(help="Shards per mapped stage (default: one per worker).")] = None,
    nproc: Annotated[int | None, typer.Option(help="Training processes (torchrun; one per GPU).")] = None,
) -> int:
    """Run the whole release flow. Exit 0 published, 1 blocked by the gate or rejected, 2 bad input."""
    _quiet_prefect()
    cfg = load_release_config(config, workdir=workdir, releases_dir=releases_dir, private_key=key,
                              release_id=release_id, device=device)
    cfg = with_scale_out(cfg, kind=runner, address=address, workers=workers, shards=shards, nproc=nproc)
    if auto_approve:
        cfg = cfg.model_copy(update={"approval": cfg.approval.model_copy(update={"auto_approve": True})})
    from flows.preflight import check_release_config

    # Before Prefect starts: a config error is one line and exit 2, not a failed flow run with tracebacks.
    check_release_config(cfg)
    from flows.release import release

    _one_line_user_errors()  # after Prefect set up its console handler (on import)
    from flows.termination import exit_after_sigterm

    exit_after_sigterm()

    result = release(config=cfg)
    if result.status != "published":
        console.print(f"[red]release {result.release_id} {result.status}[/]: {'; '.join(result.reasons)}")
        return 1
    public_key = cfg.private_key.with_name("release.pub")
    console.print(f"[green]published[/] {result.bundle}")
    console.print(f"steward's report (stays on site): {result.report / 'report.html'}")
    console.print(f"verify: synthgate verify {result.bundle} --key {public_key}")
    return 0


def approve_cmd(
    flow_run_id: Annotated[str, typer.Argument(help="The paused release flow run's id (shown in the Prefect UI).")],
    reviewer: Annotated[str, typer.Option(help="Your name, recorded in the datasheet.")],
    reject: Annotated[bool, typer.Option(help="Reject instead of approving.")] = False,
    comment: Annotated[str, typer.Option(help="Recorded in the datasheet.")] = "",
) -> None:
    """Approve (or reject) a release flow that is waiting for a steward."""
    _quiet_prefect()
    from prefect.flow_runs import resume_flow_run

    if not reviewer.strip():
        from synth.errors import InputError

        raise InputError("--reviewer must name the person deciding")
    resume_flow_run(flow_run_id, run_input={"approve": not reject, "reviewer": reviewer, "comment": comment})
    console.print(f"{'rejected' if reject else 'approved'} flow run {flow_run_id} as {reviewer}")


def serve_cmd(
    name: Annotated[str, typer.Option(help="Deployment name shown in the Prefect UI.")] = "synthgate-release",
) -> None:
    """Serve the release flow so a steward can trigger runs (with a form) from the Prefect UI."""
    _quiet_prefect()
    from flows.release import release

    release.serve(name=name)


def register(app: typer.Typer) -> None:
    app.command("release")(release_cmd)
    app.command("approve")(approve_cmd)
    app.command("serve-flow")(serve_cmd)
