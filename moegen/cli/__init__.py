"""The ``moegen`` command line: a thin click layer over the library, one module per command group.

    moegen build  --experts 8 --topk 2 --hidden 512 [...]   (build.py: build, render)
    moegen verify [spec options] [--tokens 1,7,64]           (verify.py)
    moegen bench  ...                                        (bench.py)
    moegen tune   [spec options]                             (tune.py)
    moegen cache  ls|info|explain|verify|clear|prune|export|import   (cache.py)
    moegen env                                               (env.py)

Shared pieces (spec options, list parsers, the error wrapper) are in `options`; the command
modules import only it, never this package, so there is no import cycle.  Every command exits
non-zero on failure; ``-v``/``-vv`` work before or after the subcommand.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

from .. import __version__, settings
from . import bench, build, cache, env, tune, verify
from .errors import one_line

_FORMAT = "%(levelname)s %(name)s: %(message)s"


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is now (click's test runner swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Once(logging.Filter):
    """Drops a record whose text was already printed (a warning both logged and warned)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def _configure_logging(verbose: int) -> None:
    """The ``moegen`` logger at MOEGEN_LOG_LEVEL (lowered by -v/-vv), one stderr handler that
    prints each message once; Python warnings go through it too."""
    level = settings.log_level()
    if verbose:
        level = min(level, logging.INFO if verbose == 1 else logging.DEBUG)
    root = logging.getLogger("moegen")
    root.setLevel(level)
    handler = next((h for h in root.handlers if isinstance(h, _Stderr)), None)
    if handler is None:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter(_FORMAT))
        root.addHandler(handler)
        root.propagate = False
    handler.filters = [_Once()]           # once per command, not per process

    def show(message, category, filename, lineno, file=None, line=None):
        logging.getLogger("moegen.warnings").warning("%s", message)

    warnings.showwarning = show


def _verbosity(ctx: click.Context, param, value: int) -> None:
    # -v given after the subcommand: add it to the count given before it.
    root = ctx.find_root()
    total = (root.meta.get("moegen.verbose", 0) or 0) + (value or 0)
    root.meta["moegen.verbose"] = total
    if value:
        _configure_logging(total)


def _add_verbose(cmd: click.Command) -> None:
    if not any(p.name == "verbose" for p in cmd.params):
        cmd.params.append(click.Option(["-v", "--verbose"], count=True, expose_value=False,
                                       callback=_verbosity, is_eager=True,
                                       help="more logging (-v info, -vv debug)"))
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _add_verbose(sub)


class MoegenGroup(click.Group):
    """Every subcommand (and every subcommand of a subgroup) takes ``-v``; moegen's errors, a
    missing optional package and a missing GPU become one ``error:`` line and exit status 1."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _add_verbose(cmd)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort,
                SystemExit, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            # the reader went away (`moegen env | head`): stop quietly, as a shell tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(141) from None
        except Exception as exc:  # noqa: BLE001 - classified below, else re-raised
            text = one_line(exc)
            if text is None:
                raise
            click.secho(f"error: {text}", fg="red", err=True)
            dump = getattr(exc, "dump", None)
            if callable(dump) and logging.getLogger("moegen").isEnabledFor(logging.DEBUG):
                click.echo(dump(), err=True)
            raise SystemExit(1) from None


@click.group(cls=MoegenGroup)
@click.version_option(__version__, prog_name="moegen")
@click.option("-v", "--verbose", count=True, help="more logging (-v info, -vv debug)")
@click.pass_context
def main(ctx, verbose):
    """moegen: compile Mixture-of-Experts layers for your exact shape."""
    ctx.find_root().meta["moegen.verbose"] = verbose
    _configure_logging(verbose)


# The package's attributes stay the command modules (moegen.cli.build is the module).
for _cmd in (build.build, build.render, build.plan, verify.verify, tune.tune, bench.bench,
             cache.cache, cache.keygen, env.env):
    main.add_command(_cmd)
