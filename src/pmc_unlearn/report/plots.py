"""The report's figures as PNG bytes (matplotlib, Agg backend: no display, no network)."""

from __future__ import annotations

import io
import math
from typing import Any

from pmc_unlearn.report.gather import ModelResult

PMC_COLOR = "#d62728"
STYLE = {  # role -> (marker, colour)
    "base": ("s", "#7f7f7f"),
    "target": ("^", "#111111"),
    "retain": ("D", "#2ca02c"),
    "finetuned": ("v", "#555555"),
    "unlearned": ("o", "#1f77b4"),
    "model": ("o", "#9467bd"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _style(m: ModelResult) -> dict[str, Any]:
    if m.is_pmc:
        return {"marker": "*", "color": PMC_COLOR, "s": 260, "zorder": 5, "edgecolors": "black", "linewidths": 0.6}
    marker, color = STYLE.get(m.role, STYLE["model"])
    return {"marker": marker, "color": color, "s": 70, "zorder": 3}


def _clusters(pts: list[tuple[ModelResult, float, float]], logx: bool, tol: float = 0.06) -> list[list[ModelResult]]:
    """Greedy grouping of points closer than `tol` of the plotted range (PMC first, so it names its group)."""
    if not pts:
        return []
    xs = [math.log10(x) if logx else x for _, x, _ in pts]
    ys = [y for _, _, y in pts]
    sx, sy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    order = sorted(range(len(pts)), key=lambda i: 0 if pts[i][0].is_pmc else 1)
    groups: list[list[int]] = []
    for i in order:
        for g in groups:
            j = g[0]
            if abs(xs[i] - xs[j]) / sx < tol and abs(ys[i] - ys[j]) / sy < tol:
                g.append(i)
                break
        else:
            groups.append([i])
    return [[pts[i][0] for i in g] for g in groups]


def tradeoff(models: list[ModelResult]) -> bytes | None:
    """Two panels, a point per model: unlearn quality vs utility, and forget quality (log) vs model utility."""
    panels = [("unlearn_quality", "utility", "Unlearn quality (PMC paper) →", "Utility (PMC paper) →", False),
              ("forget_quality", "model_utility", "Forget quality (TOFU, KS p-value, log) →", "Model utility (TOFU) →", True)]
    if not any(m.metric(x) is not None and m.metric(y) is not None for m in models for x, y, *_ in panels):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for ax, (xk, yk, xl, yl, logx) in zip(axes, panels):
        pts = [(m, m.metric(xk), m.metric(yk)) for m in models]
        pts = [(m, x, y) for m, x, y in pts if x is not None and y is not None]
        if logx:
            pos = [x for _, x, _ in pts if x > 0]
            floor = min(pos) / 10 if pos else 1e-10
            pts = [(m, max(x, floor), y) for m, x, y in pts]
            ax.set_xscale("log")
        for m, x, y in pts:
            ax.scatter([x], [y], label=m.label, **_style(m))
        for ms in _clusters(pts, logx):  # models close together share one label, so labels never overlap
            m0 = next((m for m in ms if m.is_pmc), ms[0])
            x, y = next((x, y) for m, x, y in pts if m is m0)
            ax.annotate(", ".join(m.label for m in ms), (x, y), textcoords="offset points", xytext=(7, 6), fontsize=8,
                        color=PMC_COLOR if m0.is_pmc else "#333333", fontweight="bold" if m0.is_pmc else "normal")
        if not pts:
            ax.text(0.5, 0.5, "no models with both numbers", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
    axes[0].set_title("Output level: forget vs keep (upper right is better)", fontsize=10)
    axes[1].set_title("TOFU: indistinguishable from retain model vs utility", fontsize=10)
    fig.tight_layout()
    return _png(fig)


CURVES = [
    ("sample/score_mean", "Selected samples' score (ROUGE-L recall vs own reference)", ("sample/score_min", "sample/score_max")),
    ("sample/unresolved", "Unresolved forget questions (best score > 0)", None),
    ("train/retain_nll", "Retain NLL", None),
    ("train/collapse_nll", "Collapse NLL (own selected answers)", None),
]


def training_curves(runs: list[ModelResult]) -> bytes | None:
    """PMC's dynamics per optimizer step, from log.jsonl: score, unresolved, retain NLL, collapse NLL."""
    runs = [m for m in runs if m.log and any(k in m.log[0] for k, *_ in CURVES)]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    palette = [PMC_COLOR, "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    for ax, (key, title, band) in zip(axes.flat, CURVES):
        for i, m in enumerate(runs):
            rows = [r for r in m.log if key in r and r[key] is not None and not (isinstance(r[key], float) and math.isnan(r[key]))]
            if not rows:
                continue
            steps = [r.get("step", n + 1) for n, r in enumerate(rows)]
            color = palette[i % len(palette)]
            ax.plot(steps, [r[key] for r in rows], color=color, marker="o", markersize=3, linewidth=1.5,
                    label=m.label if len(runs) > 1 else None)
            if band and all(b in rows[0] for b in band):
                ax.fill_between(steps, [r[band[0]] for r in rows], [r[band[1]] for r in rows], color=color, alpha=0.15,
                                label="min-max over the micro-batch" if i == 0 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def baseline_losses(runs: list[ModelResult]) -> bytes | None:
    """train/loss per step of the non-PMC unlearning runs (their only common signal)."""
    runs = [m for m in runs if m.log and not m.is_pmc and any("train/loss" in r for r in m.log)]
    if not runs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for m in runs:
        rows = [r for r in m.log if "train/loss" in r]
        ax.plot([r.get("step", n + 1) for n, r in enumerate(rows)], [r["train/loss"] for r in rows], marker="o",
                markersize=3, label=m.label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train/loss")
    ax.set_title("Baselines' training loss", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def sequence_curves(lines: list[dict[str, Any]]) -> bytes | None:
    """The figure of `pmc-unlearn sequence` (utility and forget ROUGE-L after each request) from its lines."""
    if not lines:
        return None
    _plt()
    from pmc_unlearn.sequence import sequence_figure

    return _png(sequence_figure(lines))
