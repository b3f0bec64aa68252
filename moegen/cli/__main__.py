"""``python -m moegen.cli``: the same as the ``moegen`` console script."""

from . import main

main(prog_name="moegen")
