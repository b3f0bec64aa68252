"""Time vs tokens per shape (log-log): moegen, its floor and every baseline (matplotlib).

matplotlib is optional (``pip install moegen[plot]``); without it `plot` raises
`PlotUnavailable` with that instruction, and the CLI prints it and goes on.
"""

from __future__ import annotations

import math


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def series(points: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """shape -> line name -> [(T, ms)] over measured points (T = 0 and missing values left
    out, since the axes are logarithmic)."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for p in points:
        T = p["tokens"]
        if T <= 0:
            continue
        lines = out.setdefault(p["shape"], {})
        vals = {"floor": p.get("floor_ms")}
        if p.get("moegen"):
            vals["moegen"] = p["moegen"]["total_ms"]
        for name, b in (p.get("baselines") or {}).items():
            vals[name] = b.get("ms")
        for name, v in vals.items():
            if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
                lines.setdefault(name, []).append((T, v))
    return out


def plot(points: list[dict], path: str, title: str = "") -> str:
    """Draw one panel per shape into ``path`` (PNG); returns the path.

    Raises PlotUnavailable without matplotlib, ValueError when nothing was measured.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed: pip install matplotlib "
                              "(or moegen[plot]) to draw --plot") from None
    data = series(points)
    if not data:
        raise ValueError("no measured points to plot")
    n = len(data)
    cols = min(2, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    style = {"floor": dict(color="black", linestyle="--"), "moegen": dict(color="C3", linewidth=2.2),
             "naive": dict(color="C2"), "grouped_mm": dict(color="C0"), "numpy": dict(color="C4"),
             "triton": dict(color="C1")}
    for ax, (shape, lines) in zip(axes.flat, data.items()):
        for i, (name, pts) in enumerate(sorted(lines.items(), key=lambda kv: kv[0] != "moegen")):
            pts.sort()
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", markersize=3,
                    label=name, **style.get(name, dict(color=f"C{5 + i % 5}")))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("ms per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
