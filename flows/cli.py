"""The `synthgate` command line: a thin shell over the stage functions.

Heavy libraries (torch, diffusers, great-expectations, prefect) are imported inside commands so `--help` is instant.
User errors (`SynthgateError`) print one line and exit 2 (input) or 1 (blocked/failed check); anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from synth.config import describe
from synth.errors import SynthgateError

app = typer.Typer(
    name="synthgate",
    help="Release synthetic medical images safely: ingest, validate, train, generate, audit, release, verify.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # --install-completion / --show-completion (bash, zsh, fish, PowerShell): see the README.
    add_completion=True,
)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


_COMMAND_MODULES = (
    "flows.cli_data",
    "flows.cli_train",
    "flows.cli_generate",
    "flows.cli_audit",
    "flows.cli_utility",
    "flows.cli_report",
    "flows.cli_release",
    "flows.cli_flow",
    "flows.cli_catalog",
    "flows.cli_releases",
)


def version() -> str:
    """The installed synthgate version (the package metadata; pyproject.toml when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("synthgate")
    except PackageNotFoundError:  # a source checkout that was never installed
        import tomllib
        from pathlib import Path

        with (Path(__file__).resolve().parents[1] / "pyproject.toml").open("rb") as f:
            return str(tomllib.load(f)["project"]["version"])


def _show_version(value: bool) -> None:
    if value:
        print(f"synthgate {version()}")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                      callback=_show_version, is_eager=True),
) -> None:
    """Release synthetic medical images safely: ingest, validate, train, generate, audit, release, verify."""


def _register() -> None:
    # Each group of commands lives in its own module with a `register(app)`; importing one is cheap (heavy
    # libraries are imported inside the commands). A module that is missing is a packaging bug: fail loudly
    # rather than ship a CLI that silently lacks commands.
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register()


def run(argv: list[str] | None = None) -> int:
    """Run the app on `argv` and return the exit code; user errors become one line on stderr."""
    try:
        result = app(args=argv, standalone_mode=False, prog_name="synthgate")
    except SynthgateError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}")
        return e.exit_code
    except ValidationError as e:  # a config value a user gave, validated by pydantic
        err_console.print(f"[bold red]error:[/] {escape(describe(e))}")
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except typer.TyperException as e:  # usage errors: bad option, missing argument (typer vendors click)
        e.show()
        return int(getattr(e, "exit_code", 2))
    except SystemExit as e:  # shell completion (--show-completion, <TAB>) exits from inside click
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return result if isinstance(result, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":  # pragma: no cover
    main()
