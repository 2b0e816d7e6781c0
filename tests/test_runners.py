"""Task runner choice (`flows/runners.py`, `runner:` in the release config and `synthgate release` flags)."""

from __future__ import annotations

import sys

import pytest

from flows.release_config import ReleaseConfig, RunnerSettings
from flows.runners import make_task_runner, task_threads, worker_environment
from synth.errors import ConfigError


def test_default_is_the_thread_pool_with_one_shard():
    cfg = ReleaseConfig()
    assert cfg.runner.kind == "threads" and cfg.runner.shard_count() == 1
    from prefect.task_runners import ThreadPoolTaskRunner

    assert isinstance(make_task_runner(cfg.runner), ThreadPoolTaskRunner)


def test_dask_shards_default_to_the_worker_count():
    assert RunnerSettings(kind="dask", workers=3).shard_count() == 3
    assert RunnerSettings(kind="dask", workers=3, shards=8).shard_count() == 8


def test_local_dask_cluster_runs_worker_processes_that_report_to_this_api(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_dask import DaskTaskRunner

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        runner = make_task_runner(RunnerSettings(kind="dask", workers=2, threads_per_worker=3))
    assert isinstance(runner, DaskTaskRunner)
    kwargs = runner.cluster_kwargs
    assert kwargs["n_workers"] == 2 and kwargs["processes"] is True and kwargs["threads_per_worker"] == 3
    # Workers report to the flow's API (not a temporary server of their own) and do not oversubscribe cores.
    assert kwargs["env"]["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert kwargs["env"]["OMP_NUM_THREADS"] == "3"


def test_dask_scheduler_address_is_used_as_given():
    runner = make_task_runner(RunnerSettings(kind="dask", address="tcp://10.0.0.5:8786"))
    assert runner.address == "tcp://10.0.0.5:8786" and not runner.cluster_kwargs


def test_ray_without_prefect_ray_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prefect_ray", None)  # an import of it fails
    with pytest.raises(ConfigError, match="pip install prefect-ray"):
        make_task_runner(RunnerSettings(kind="ray"))


def test_worker_environment_pins_threads():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://x:1/api"}):
        env = worker_environment(RunnerSettings(kind="dask", threads_per_worker=2))
    assert env["MKL_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "2"


def test_task_threads_pins_torch_on_a_cluster_only():
    import faiss
    import torch

    # torch and faiss share one OpenMP runtime here: set both, whatever an earlier test left behind.
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    try:
        with task_threads(RunnerSettings(kind="dask", threads_per_worker=1)):
            assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
        assert torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
        with task_threads(RunnerSettings(kind="threads")):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(outer)


def test_bad_runner_settings_are_rejected_with_the_value(tmp_path, capsys):
    from flows.cli import run

    bad = tmp_path / "release.yaml"
    bad.write_text("runner:\n  kind: spark\n")
    assert run(["release", "--config", str(bad), "--key", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert "runner" in err and "spark" in err and "Traceback" not in err
    assert run(["release", "--runner", "dask", "--workers", "0", "--key", str(tmp_path / "k")]) == 2
    assert "workers" in capsys.readouterr().err


def test_cli_flags_override_the_files_runner_section(tmp_path):
    from flows.cli_flow import load_release_config, with_scale_out

    path = tmp_path / "release.yaml"
    path.write_text("runner:\n  kind: dask\n  workers: 4\n  threads_per_worker: 2\n")
    cfg = with_scale_out(load_release_config(path), kind=None, address="tcp://h:8786", workers=None, shards=6,
                         nproc=2)
    assert cfg.runner == RunnerSettings(kind="dask", address="tcp://h:8786", workers=4, threads_per_worker=2,
                                        shards=6)
    assert cfg.launch.nproc == 2


def test_task_arguments_carry_absolute_paths(monkeypatch, tmp_path):
    """Mapped tasks may run in another process or machine: the flow hands them absolute paths."""
    from flows.stages import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(ReleaseConfig(workdir="w", releases_dir="r", private_key="k/release.key"))
    assert cfg.workdir == tmp_path / "w" and cfg.releases_dir == tmp_path / "r"
    assert cfg.private_key == tmp_path / "k" / "release.key"
