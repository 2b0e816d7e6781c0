"""`synthgate generate` and `synthgate generate-merge`: sample a synthetic dataset from a trained model, in shards.

torch and diffusers are imported inside the commands so `synthgate --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from synth.errors import InputError


def parse_per_class(text: str) -> dict[str, int]:
    """'normal=100,pneumonia=200' → {'normal': 100, 'pneumonia': 200} (InputError naming the bad part)."""
    counts: dict[str, int] = {}
    for part in text.split(","):
        item = part.strip()
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise InputError(f"--per-class: {item!r} is not NAME=COUNT (e.g. normal=100,pneumonia=200)")
        try:
            count = int(value)
        except ValueError:
            raise InputError(f"--per-class: count {value!r} for {name!r} is not an integer") from None
        if count < 0:
            raise InputError(f"--per-class: count for {name!r} is negative ({count})")
        if name in counts:
            raise InputError(f"--per-class: class {name!r} given twice")
        counts[name] = count
    return counts


def register(app: typer.Typer) -> None:
    """Add the generation commands to the synthgate app."""

    @app.command("generate")
    def generate_cmd(
        model: Path = typer.Argument(..., help="Trained model directory (from `synthgate train`)."),
        out: Path = typer.Option(..., "--out", help="Output dataset directory (must not exist)."),
        n: int | None = typer.Option(None, "--n", help="Number of images, split over the classes by --balance."),
        balance: str = typer.Option(
            "uniform", "--balance",
            help="How --n is split over the classes: uniform (equal counts, the default) or prior (like the "
            "training set's class prevalence).",
        ),
        per_class: str | None = typer.Option(
            None, "--per-class", help="Explicit counts per class, e.g. normal=100,pneumonia=200."
        ),
        sampler: str | None = typer.Option(
            None,
            "--sampler",
            help="sde-dpmsolver++-karras-12 (default), sde-dpmsolver++-20, ddim-25, ddim-50, ddpm-1000, or "
            "ALGORITHM[-karras|-lu][-STEPS] with ALGORITHM one of ddpm, ddim, dpmsolver++, sde-dpmsolver++.",
        ),
        steps: int | None = typer.Option(None, "--steps", help="Override the sampler's number of steps."),
        guidance_scale: float | None = typer.Option(
            None, "--guidance-scale", help="Classifier-free guidance weight (1.0 = none)."
        ),
        batch_size: int = typer.Option(64, "--batch-size", help="Images per UNet call (affects bits, not quality)."),
        seed: int = typer.Option(0, "--seed", help="Run seed; image i gets a seed derived from (seed, i)."),
        shard_index: int = typer.Option(0, "--shard-index", help="Which shard this run generates (0-based)."),
        shard_count: int = typer.Option(1, "--shard-count", help="How many shards the run is split into."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:0, mps."),
        weights: str = typer.Option(
            "ema", "--weights", help="ema (default), raw, or ema@STEP (an EMA snapshot the model kept)."
        ),
        progress: bool = typer.Option(
            True, "--progress/--no-progress", help="Show progress: a bar on a terminal, else throttled lines on stderr."
        ),
    ) -> None:
        """Sample a synthetic canonical dataset (split 'synthetic') from a trained model."""
        if n is None and per_class is None:
            raise InputError("give --n N or --per-class NAME=COUNT,...")
        if n is not None and n <= 0:
            raise InputError(f"--n must be a positive integer, got {n}")
        if shard_count < 1:
            raise InputError(f"--shard-count must be >= 1, got {shard_count}")
        if not 0 <= shard_index < shard_count:
            raise InputError(f"--shard-index {shard_index} is outside 0..{shard_count - 1}")
        if batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {batch_size}")
        if weights not in ("ema", "raw") and not (weights.startswith("ema@") and weights[4:].isdigit()):
            raise InputError(f"--weights must be ema, raw or ema@STEP, got {weights!r}")
        if balance not in ("prior", "uniform"):
            raise InputError(f"--balance must be uniform or prior, got {balance!r}")
        counts = parse_per_class(per_class) if per_class is not None else None

        from flows.cli_progress import cli_progress
        from synth.generate import generate
        from synth.sampling import DEFAULT_SAMPLER

        with cli_progress(progress) as bar:  # a bar on a terminal, throttled lines on stderr otherwise
            result = generate(
                model,
                out,
                n=n,
                per_class=counts,
                balance=balance,
                sampler=sampler or DEFAULT_SAMPLER,
                steps=steps,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                seed=seed,
                shard_index=shard_index,
                shard_count=shard_count,
                device=device,
                weights=weights,
                progress=bar,
            )
        typer.echo(str(result))

    @app.command("generate-merge")
    def merge_cmd(
        shards: list[Path] = typer.Argument(..., help="Shard directories of one sharded `generate` run."),
        out: Path = typer.Option(..., "--out", help="Merged dataset directory (must not exist)."),
    ) -> None:
        """Merge the shards of one `generate` run into one dataset (same content hash as an unsharded run)."""
        from synth.generate import merge_shards

        typer.echo(str(merge_shards(shards, out)))
