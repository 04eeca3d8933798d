"""The `tmconvert` command line: typer + rich at the edge, everything else in the library.

Each command lives in its own module here and is registered in `_app`. `main()` is the console script: it makes
`convert` the default command (``tmconvert deit-b.pt --to vim-s``) and turns the project's errors into one line on
stderr with exit code 1 (usage errors exit 2); ``--debug`` shows the traceback instead.

Importing this module imports nothing heavy: typer, the commands and torch are imported inside `main`, so that Ctrl-C
during those seconds of start-up ends like Ctrl-C anywhere else ("interrupted", exit 130), not in a traceback. `app`
and `USER_ERRORS` are built on first use.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import typer

_DEFAULT_COMMAND = "convert"
_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # also while the commands are being imported, before rich is there to print
        print("interrupted", file=sys.stderr)
        return _INTERRUPTED


def _main(argv: list[str]) -> int:
    import typer
    from rich.markup import escape

    try:  # typer >= 0.2x ships its own copy of click
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import ClickException
    from tmconvert.converter.cli._console import err_console

    app, user_errors = _app(), _user_errors()
    args = _with_default_command(argv)
    debug = "--debug" in args
    try:
        code = app(args=args, prog_name="tmconvert", standalone_mode=False)
        # not standalone, click returns (not raises) the code of `typer.Exit(n)` and 130 for Ctrl-C in a command
        if isinstance(code, int) and code:
            if code == _INTERRUPTED:
                err_console.print("interrupted")
            return code
    except user_errors as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err_console.print("aborted")
        return _INTERRUPTED
    except ClickException as exc:  # usage errors carry their own exit code (2)
        exc.show(file=sys.stderr)
        return exc.exit_code
    return 0


def __getattr__(name: str) -> Any:
    """`app` and `USER_ERRORS`, built on first use (see the module docstring)."""
    if name == "app":
        return _app()
    if name == "USER_ERRORS":
        return _user_errors()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _user_errors() -> tuple[type[Exception], ...]:
    """What a user can cause, reported as one line: the converter's errors share one base class; the two libraries
    below it (models, kernels) import nothing of the converter and bring their own."""
    from tmconvert.converter.errors import TmconvertError
    from tmconvert.kernels import BackendError
    from tmconvert.models import ModelConfigError

    return (TmconvertError, ModelConfigError, BackendError)


@functools.cache
def _app() -> typer.Typer:
    """The typer app with every command; its help shows flags without a type (`_flags_as_flags`)."""
    import typer
    from typer.core import TyperCommand, TyperGroup

    from tmconvert.converter import __version__
    from tmconvert.converter.cli import check as check_cmd
    from tmconvert.converter.cli import convert as convert_cmd
    from tmconvert.converter.cli import distill as distill_cmd
    from tmconvert.converter.cli import eval as eval_cmd
    from tmconvert.converter.cli import inspect as inspect_cmd
    from tmconvert.converter.cli import listing as list_cmd
    from tmconvert.converter.cli import verify as verify_cmd

    class Command(TyperCommand):
        def get_params(self, ctx: Any) -> list[Any]:
            return _flags_as_flags(super().get_params(ctx))

    class Group(TyperGroup):
        def get_params(self, ctx: Any) -> list[Any]:
            return _flags_as_flags(super().get_params(ctx))

    app = typer.Typer(
        name="tmconvert",
        help="Turn pretrained Vision Transformer checkpoints into Mamba models, and distil them.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
        cls=Group,
    )
    app.command("inspect", cls=Command)(inspect_cmd.inspect)
    app.command("convert", cls=Command)(convert_cmd.convert)
    app.command("check", cls=Command)(check_cmd.check)
    app.command("list", cls=Command)(list_cmd.list_)
    app.command("distill", cls=Command)(distill_cmd.distill)
    app.command("eval", cls=Command)(eval_cmd.eval_)
    app.command("verify", cls=Command)(verify_cmd.verify)

    def version_option(value: bool) -> None:
        if value:
            typer.echo(f"tmconvert {__version__}")
            raise typer.Exit()

    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=version_option, is_eager=True, help="Print the version."
        ),
        debug: bool = typer.Option(False, "--debug", help="Show tracebacks instead of one-line errors."),
    ) -> None:
        """Turn pretrained Vision Transformer checkpoints into Mamba models, and distil them."""

    return app


def _flags_as_flags(params: list[Any]) -> list[Any]:
    """typer's rich help prints every option's type beside it, flags included (`--json <bool>`, typer 0.2x); an empty
    metavar leaves a flag bare, as click's own help shows it."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _with_default_command(argv: list[str]) -> list[str]:
    """Insert the default command when the first word is not a command (``tmconvert SRC --to vim-s``)."""
    commands = {c.name or c.callback.__name__ for c in _app().registered_commands}
    i = 0
    while i < len(argv) and argv[i] in ("--debug",):
        i += 1
    if i < len(argv) and _DEFAULT_COMMAND in commands:
        word = argv[i]
        if not word.startswith("-") and word not in commands:
            return [*argv[:i], _DEFAULT_COMMAND, *argv[i:]]
    return argv


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
