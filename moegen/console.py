"""Text output of the command line and the benchmarks: one table renderer and one progress bar,
both from `rich`.

``table(headers, rows)`` returns plain text (no colour codes, never wrapped), so it can be
printed, written to a log or compared in a test.  ``Progress`` draws a bar on stderr when stderr
is a terminal, and otherwise prints one short line per finished step, so a captured log stays
small and readable.
"""

from __future__ import annotations

import io
import sys
import time
from typing import Iterable, Sequence

import click
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as _RichProgress
from rich.table import Table

# Wide enough that no table of ours wraps: a table is as wide as its widest row.
_WIDTH = 1000
# A rule of ASCII dashes under the header, nothing else (readable in any log).
_RULED = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)


def table(headers: Sequence[str], rows: Iterable[Sequence], *, right: Iterable[int] = (),
          title: str | None = None) -> str:
    """Rows under a header line and a rule, columns separated by two spaces.

    ``right``: indices of the columns aligned right (numbers).  Cells are ``str()``-ed; None
    prints as ``-``.
    """
    right = set(right)
    t = Table(box=_RULED, show_edge=False, pad_edge=False, padding=(0, 1),
              header_style="", title=title, title_justify="left", title_style="")
    for i, h in enumerate(headers):
        t.add_column(str(h), justify="right" if i in right else "left", no_wrap=True)
    for r in rows:
        t.add_row(*("-" if c is None else str(c) for c in r))
    buf = io.StringIO()
    Console(file=buf, width=_WIDTH, color_system=None, force_terminal=False,
            highlight=False).print(t)
    lines = [ln.rstrip() for ln in buf.getvalue().splitlines()]
    return "\n".join(ln for ln in lines if ln.strip())


class Progress:
    """Progress of ``total`` steps on stderr: a rich bar on a terminal, else one line a step.

    ``advance(msg)`` marks one step done; ``write(line)`` prints a result line on stdout (above
    the bar); ``close()`` removes the bar.  Disabled, it prints only what ``write`` is given.
    """

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.done, self.label = total, 0, label
        self.enabled = enabled and total > 0
        self.t0 = time.perf_counter()
        self._bar = None
        if self.enabled and sys.stderr.isatty():
            self._bar = _RichProgress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      TextColumn("{task.fields[msg]}"),
                                      console=Console(stderr=True), transient=True,
                                      redirect_stdout=False, redirect_stderr=False)
            self._task = self._bar.add_task(label, total=total, msg="")
            self._bar.start()

    def advance(self, msg: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(self._task, advance=1, msg=msg)
        elif self.enabled:
            click.echo(f"[{self.done}/{self.total}] {msg} "
                       f"({time.perf_counter() - self.t0:.0f}s)", err=True)

    def write(self, line: str) -> None:
        if self._bar is not None and sys.stdout.isatty():
            self._bar.console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            click.echo(line)
            sys.stdout.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
