"""Rich consoles: results on stdout, diagnostics and progress on stderr.

Emoji shortcodes are off: a `file:100:` location would otherwise print as an emoji.
"""

from rich.console import Console

console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)
