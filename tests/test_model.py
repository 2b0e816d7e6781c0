

def test_diffusers_names_are_resolved_before_the_flow_runs_tasks_side_by_side() -> None:
    """diffusers' lazy names are not thread-safe on first use (a DP release's train task failed with "cannot
    import name 'UNet2DModel'"): the release flow resolves them all up front, in its own thread."""
    import inspect
    import subprocess
    import sys

    from flows.release import release_pipeline
    from synth.model import DIFFUSERS_NAMES

    code = ("import diffusers; from synth.model import DIFFUSERS_NAMES, resolve_diffusers_names; "
            "before = [n for n in DIFFUSERS_NAMES if n in vars(diffusers)]; resolve_diffusers_names(); "
            "print(before, all(n in vars(diffusers) for n in DIFFUSERS_NAMES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] True"  # lazy until resolved, then every name is a plain module attribute
    source = inspect.getsource(release_pipeline.fn)
    assert source.index("resolve_diffusers_names()") < source.index("ingest_task(cfg)")
    assert {"UNet2DModel", "AutoencoderKL", "DDPMScheduler"} <= set(DIFFUSERS_NAMES)
