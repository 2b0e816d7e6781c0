"""Where a release's tasks run: Prefect's thread pool (default), a Dask cluster, or Ray.

synthgate never schedules work itself: the release flow maps its shardable stages (generation, the memorization
search, the utility classifiers) over shards as Prefect tasks, and the task runner chosen here places them. A Dask
runner either starts a `LocalCluster` of worker *processes* on this machine or connects to a running scheduler
(`dask scheduler` + `dask worker` on other machines that share the work directory and have synthgate installed).

Two things make a worker process behave like the flow's own process:
- it reports task states to the flow's Prefect API: the API URL (a configured server, or the ephemeral server the
  flow started) is put into the workers' environment, otherwise each worker would start a temporary server of
  its own and the flow run would not show its tasks;
- torch and faiss use `threads_per_worker` threads in every mapped task, so that N workers do not oversubscribe
  the cores and a shard computes exactly what it computes in a single-shard run with the same thread count
  (batched kernels and BLAS split float sums differently with another thread count).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from synth.errors import ConfigError

if TYPE_CHECKING:
    from flows.release_config import RunnerSettings


def prefect_api_url() -> str:
    """The API URL tasks must report to: the configured one, else this process's ephemeral server's."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if url:
        return str(url)
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the singleton Prefect's client started for this process
    server.start()  # no-op when running
    return str(server.api_url)


def worker_environment(settings: RunnerSettings) -> dict[str, str]:
    """Environment of local Dask worker processes: the flow's Prefect API and the per-worker thread count."""
    threads = str(settings.threads_per_worker)
    return {
        "PREFECT_API_URL": prefect_api_url(),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }


def make_task_runner(settings: RunnerSettings) -> Any:
    """The Prefect task runner for `settings` (imports the engine's integration only when it is used)."""
    if settings.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=settings.workers)
    if settings.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if settings.address:
            return DaskTaskRunner(address=settings.address)
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": settings.workers,
                "threads_per_worker": settings.threads_per_worker,
                "processes": True,
                "dashboard_address": ":0",  # a free port: two releases on one machine must not collide
                "env": worker_environment(settings),
            },
        )
    try:
        from prefect_ray import RayTaskRunner  # optional: pip install prefect-ray
    except ImportError:
        raise ConfigError("runner kind 'ray' needs the prefect-ray package: pip install prefect-ray") from None
    return RayTaskRunner(address=settings.address) if settings.address else RayTaskRunner()


@contextlib.contextmanager
def task_threads(settings: RunnerSettings) -> Iterator[None]:
    """torch's intra-op threads inside a mapped task: `threads_per_worker` on a cluster; unchanged for the thread
    pool (its tasks share this process, whose thread count the user chose)."""
    if settings.kind == "threads":
        yield
        return
    import faiss
    import torch

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    # faiss' BLAS splits float sums by thread count too: the memorization search pins it like torch.
    torch.set_num_threads(settings.threads_per_worker)
    faiss.omp_set_num_threads(settings.threads_per_worker)
    try:
        yield
    finally:
        # faiss first: where both use one OpenMP runtime, the last call sets both, and torch's count is the one
        # the rest of the process relies on.
        faiss.omp_set_num_threads(before[1])
        torch.set_num_threads(before[0])


def describe(settings: RunnerSettings) -> dict[str, Any]:
    """What ran the release, for the run's summary (no secrets: a scheduler address is an address)."""
    return {
        "kind": settings.kind,
        "address": settings.address or ("local cluster" if settings.kind != "threads" else "this process"),
        "workers": settings.workers if not settings.address else None,
        "threads_per_worker": settings.threads_per_worker,
        "shards": settings.shard_count(),
    }
