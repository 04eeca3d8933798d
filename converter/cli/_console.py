"""Rich consoles: results on stdout, diagnostics and progress on stderr."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
