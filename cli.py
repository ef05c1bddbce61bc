"""`python cli.py` / `python -m cli` from a source checkout: the `xent` command line.

The commands live in engine/commands/; an installed xent runs them as the ``xent``
console script (engine.commands:main), and installs no top-level ``cli`` module.
"""

from engine.commands import main

if __name__ == "__main__":
    main(prog_name="xent")
