"""The `tmconvert` command line: typer + rich at the edge, everything else in the library.

Each command lives in its own module here and is registered below. `main()` is the console script: it makes
`convert` the default command (``tmconvert deit-b.pt --to vim-s``) and turns the project's errors into one line on
stderr with exit code 1 (usage errors exit 2); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

import typer
from rich.markup import escape

try:  # typer >= 0.2x ships its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import ClickException
from tmconvert.converter import __version__
from tmconvert.converter.cli import check as check_cmd
from tmconvert.converter.cli import convert as convert_cmd
from tmconvert.converter.cli import distill as distill_cmd
from tmconvert.converter.cli import eval as eval_cmd
from tmconvert.converter.cli import inspect as inspect_cmd
from tmconvert.converter.cli import listing as list_cmd
from tmconvert.converter.cli import verify as verify_cmd
from tmconvert.converter.cli._console import err_console
from tmconvert.converter.errors import TmconvertError
from tmconvert.kernels import BackendError
from tmconvert.models import ModelConfigError

app = typer.Typer(
    name="tmconvert",
    help="Turn pretrained Vision Transformer checkpoints into Mamba models, and distil them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

app.command("inspect")(inspect_cmd.inspect)
app.command("convert")(convert_cmd.convert)
app.command("check")(check_cmd.check)
app.command("list")(list_cmd.list_)
app.command("distill")(distill_cmd.distill)
app.command("eval")(eval_cmd.eval_)
app.command("verify")(verify_cmd.verify)

_DEFAULT_COMMAND = "convert"

# What a user can cause, reported as one line: the converter's errors share one base class; the two libraries below
# it (models, kernels) import nothing of the converter and bring their own.
USER_ERRORS: tuple[type[Exception], ...] = (TmconvertError, ModelConfigError, BackendError)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tmconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
) -> None:
    """Turn pretrained Vision Transformer checkpoints into Mamba models, and distil them."""


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert the default command when the first word is not a command (``tmconvert SRC --to vim-s``)."""
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    i = 0
    while i < len(argv) and argv[i] in ("--debug",):
        i += 1
    if i < len(argv) and _DEFAULT_COMMAND in commands:
        word = argv[i]
        if not word.startswith("-") and word not in commands:
            return [*argv[:i], _DEFAULT_COMMAND, *argv[i:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    args = _with_default_command(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in args
    try:
        code = app(args=args, prog_name="tmconvert", standalone_mode=False)
        # not standalone, click returns (not raises) the code of `typer.Exit(n)` and 130 for Ctrl-C in a command
        if isinstance(code, int) and code:
            if code == 130:
                err_console.print("interrupted")
            return code
    except USER_ERRORS as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except ClickException as exc:  # usage errors carry their own exit code (2)
        exc.show(file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
