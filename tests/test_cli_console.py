"""moegen.console: the one table renderer and the one progress bar (rich)."""

from __future__ import annotations

import sys

from moegen.console import Progress, table


def test_table_aligns_and_never_wraps():
    text = table(["name", "ms"], [("a" * 300, 1.5), ("b", None)], right=[1])
    head, rule, r1, r2 = text.splitlines()
    assert head.startswith("name") and set(rule) == {"-"}
    assert len(r1) == len(rule) == len(head)            # one line each, however wide
    assert r1.endswith("1.5") and r2.endswith("-")      # right-aligned; None prints as '-'
    assert "\x1b" not in text                           # plain text, no colour codes


def test_progress_without_a_terminal_prints_one_line_a_step(capsys):
    with Progress(2, "build", enabled=True) as p:
        p.advance("built a")
        p.write("result line")
        p.advance("cached b")
    out, err = capsys.readouterr()
    assert out == "result line\n"
    assert [ln.split(" (")[0] for ln in err.splitlines()] == ["[1/2] built a", "[2/2] cached b"]


def test_progress_disabled_prints_only_results(capsys):
    with Progress(3, "bench", enabled=False) as p:
        p.advance("x")
        p.write("row")
    assert capsys.readouterr() == ("row\n", "")


def test_progress_on_a_terminal_draws_a_bar_and_removes_it(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with Progress(2, "bench", enabled=True) as p:
        assert p._bar is not None
        p.advance("one")
        p.advance("two")
    assert p._bar is None
    assert "[1/2]" not in capsys.readouterr().err       # the bar, not the plain lines
