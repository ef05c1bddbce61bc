"""The `xent` command line: one module per command, and the group that loads them.

`main` is the click group (the console script ``xent`` and ``python -m cli`` run it).
"""

from engine.commands.group import main

__all__ = ["main"]
