"""Pareto plots of unlearning trade-offs, from plain lists of points (no files read here).

A point is a mapping with a "method" and metric values, e.g. one row of a sweep's points.jsonl
flattened: {"method": "npo", "unlearn_quality": 71.0, "utility": 40.2, "forget_quality": 0.03, ...}.
Both axes of every panel are "higher is better", so a point is dominated when another point of
the same method is at least as good on both axes and better on one. Front points get a black edge.

    pareto_front(xy)                      indices of the non-dominated points, by increasing x
    mean_interval(values)                 mean and 95% t-interval half-width over seeds
    seed_means(points)                    one point per setting (`group`): means over its seeds, `<key>_err` bars
    plot_pareto(ax, points, panel)        one panel: a colour per method, each method's front as a line
    save_pareto(points, stem, panels)     a figure with one panel per Panel, written as stem.png and stem.svg
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Panel:
    x: str  # metric key on the x axis
    y: str  # metric key on the y axis
    xlabel: str
    ylabel: str
    logx: bool = False
    title: str = ""


# The two views of docs/metrics.md: the PMC paper's output-level numbers, and TOFU's.
PARETO_PANELS: tuple[Panel, ...] = (
    Panel("unlearn_quality", "utility", "unlearn quality UQ (higher: more forgotten)", "utility U",
          title="output level (PMC paper)"),
    Panel("forget_quality", "model_utility", "forget quality FQ (KS p-value, log scale)", "model utility MU",
          logx=True, title="TOFU"),
)

# Fixed colours for the methods we ship, so a method keeps its colour across plots.
METHOD_COLOURS = {
    "pmc": "#d62728", "ga": "#7f7f7f", "gd": "#8c564b", "npo": "#1f77b4", "simnpo": "#17becf",
    "idk": "#bcbd22", "idkdpo": "#9467bd", "rmu": "#ff7f0e", "retain_ft": "#2ca02c", "scrub": "#e377c2",
    "base": "#000000",
}
_EXTRA = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2")


def method_colour(method: str, order: Sequence[str] = ()) -> str:
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    others = [m for m in order if m not in METHOD_COLOURS]
    return _EXTRA[(others.index(method) if method in others else len(others)) % len(_EXTRA)]


def pareto_front(xy: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (maximising x and y), sorted by x.

    Duplicates are all kept. Example: [(1, 1), (2, 0), (0, 2), (0.5, 0.5)] -> [2, 0, 1]
    ((0.5, 0.5) is dominated by (1, 1)).
    """
    front = []
    for i, (x, y) in enumerate(xy):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y)
            for j, (x2, y2) in enumerate(xy) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (xy[i][0], -xy[i][1]))


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t interval for the mean) of the finite values; half-width 0 for one value.

    Example: [1, 2, 3] -> mean 2, sd 1, se 1/sqrt(3), t(0.975, 2 df) = 4.3027 -> (2.0, 2.4841).
    """
    v = [float(x) for x in values if _value(x) is not None]
    if not v:
        return (float("nan"), float("nan"))
    m = sum(v) / len(v)
    if len(v) == 1:
        return (m, 0.0)
    from scipy.stats import t

    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))
    return (m, float(t.ppf(0.5 + level / 2, len(v) - 1)) * sd / math.sqrt(len(v)))


def seed_means(points: Sequence[Mapping]) -> list[dict]:
    """Points of one setting (same method and `group`; a point without a group is its own) -> one point:
    every numeric metric's mean over the seeds, its interval half-width as `<key>_err`, and `n_seeds`."""
    groups: dict[tuple, list[Mapping]] = {}
    for i, p in enumerate(points):
        key = (str(p.get("method", "?")), p.get("group") if p.get("group") is not None else ("#", i))
        groups.setdefault(key, []).append(p)
    out = []
    for (method, _), ps in groups.items():
        row: dict = {"method": method, "label": ps[0].get("group") or ps[0].get("label"), "group": ps[0].get("group"),
                     "n_seeds": len(ps), "seeds": [p.get("seed") for p in ps]}
        keys = [k for k in ps[0] if k not in row and k not in ("seed", "label") and _value(ps[0][k]) is not None]
        for k in keys:
            m, h = mean_interval([p.get(k) for p in ps])
            row[k] = m
            if len(ps) > 1:
                row[f"{k}_err"] = h
        out.append(row)
    return out


def _value(v) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def plot_pareto(ax, points: Sequence[Mapping], panel: Panel) -> dict[str, int]:
    """Draw one panel; returns {method: points drawn}. Points lacking either value are left out
    (and counted in the panel's note); on a log axis, values <= 0 are left out too."""
    methods = list(dict.fromkeys(str(p.get("method", "?")) for p in points))
    drawn: dict[str, int] = {}
    skipped = 0
    for m in methods:
        xy, labels, errs = [], [], []
        for p in points:
            if str(p.get("method", "?")) != m:
                continue
            x, y = _value(p.get(panel.x)), _value(p.get(panel.y))
            if x is None or y is None or (panel.logx and x <= 0):
                skipped += 1
                continue
            xy.append((x, y))
            labels.append(p.get("label"))
            errs.append((_value(p.get(f"{panel.x}_err")) or 0.0, _value(p.get(f"{panel.y}_err")) or 0.0))
        if not xy:
            continue
        colour = method_colour(m, methods)
        has_bars = any(f"{panel.x}_err" in p or f"{panel.y}_err" in p for p in points if str(p.get("method", "?")) == m)
        if has_bars:  # means over seeds: 95% interval bars (clipped above 0 on a log axis; zero-length when the seeds agree)
            xs = [a for a, _ in xy]
            xerr = [[min(ex, a * 0.999) if panel.logx else ex for a, (ex, _) in zip(xs, errs)], [ex for ex, _ in errs]]
            ax.errorbar(xs, [b for _, b in xy], xerr=xerr, yerr=[ey for _, ey in errs], fmt="none",
                        ecolor=colour, elinewidth=0.9, capsize=2, alpha=0.7, zorder=2)
        ax.scatter([a for a, _ in xy], [b for _, b in xy], color=colour, s=24, alpha=0.6, label=m, zorder=3)
        front = pareto_front(xy)
        fx, fy = [xy[i][0] for i in front], [xy[i][1] for i in front]
        ax.plot(fx, fy, color=colour, lw=1.6, zorder=2)
        ax.scatter(fx, fy, color=colour, s=40, edgecolors="black", linewidths=0.8, zorder=4)  # the front
        drawn[m] = len(xy)
    if panel.logx:
        ax.set_xscale("log")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=10)
    if skipped:
        ax.text(0.99, 0.01, f"{skipped} point{'s' if skipped != 1 else ''} without {panel.x} / {panel.y} not shown",
                ha="right", va="bottom", transform=ax.transAxes, fontsize=7, color="#555555")
    if drawn:
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, f"no point has both {panel.x} and {panel.y}", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="#555555")
    ax.grid(True, alpha=0.3)
    return drawn


def save_pareto(points: Sequence[Mapping], stem: str | Path, panels: Sequence[Panel] = PARETO_PANELS,
                suptitle: str | None = None) -> list[Path]:
    """One figure, one panel per Panel side by side, written as <stem>.png and <stem>.svg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        plot_pareto(ax, points, panel)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    fig.tight_layout()
    out = []
    for ext in ("png", "svg"):
        path = stem.with_name(stem.name + "." + ext)
        fig.savefig(path, dpi=150)
        out.append(path)
    plt.close(fig)
    return out
