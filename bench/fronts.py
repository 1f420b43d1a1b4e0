"""Fronts across sweeps: one figure and one markdown table from several sweep folders.

    python bench/fronts.py --sweeps sweeps/pmc-r1 sweeps/r2 sweeps/r4 \
        --start target=evals/target --start retain=evals/retain --output docs/results_fronts

Every finished point (points/*/point.json with its eval/summary.json) becomes a row; the points of
one setting run with several seeds (the same resolved config but for `train.seed`, in one sweep or
across the sweeps given) are averaged, with a 95% t-interval
over the seeds; a setting run once gets the 95% bootstrap interval over questions that its
evaluation wrote (`<key>_ci`; docs/metrics.md), drawn as its half-width (the larger side). The
starting models (`--start NAME=EVAL_FOLDER`) are drawn as their own points. Writes
OUTPUT.png/.svg (both metric families, plots.save_pareto) and OUTPUT.md: the table, each method's
front in (unlearn quality, utility) and, for every point on the front of `--focus` (pmc), the
other methods' points that dominate it (higher or equal on both axes, means).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pmc_unlearn.plots import mean_interval, pareto_front, save_pareto

KEYS = ("unlearn_quality", "utility", "forget_quality", "model_utility")


def read_points(sweep: Path) -> list[dict]:
    out = []
    for pj in sorted(sweep.glob("points/*/point.json")):
        rec = json.loads(pj.read_text())
        summ = pj.parent / "eval" / "summary.json"
        if rec.get("status") != "done" or not summ.exists():
            continue
        s = json.loads(summ.read_text())
        out.append({"method": rec["method"], "group": f"{sweep.name}: {rec.get('group') or rec['label']}",
                    "setting": setting_key(rec.get("config") or {"label": rec["label"]}),
                    "seed": rec.get("seed"), "summary": s, "train_s": (rec.get("train") or {}).get("train_s")})
    return out


def setting_key(config: dict) -> str:
    """The resolved config without its seed: points that differ only in `train.seed` share it."""
    cfg = json.loads(json.dumps(config))
    cfg.get("train", {}).pop("seed", None)
    return json.dumps(cfg, sort_keys=True)


def half_width(summary: dict, key: str) -> float | None:
    ci, v = summary.get(f"{key}_ci"), summary.get(key)
    if not ci or v is None:
        return None
    return max(v - ci[0], ci[1] - v)


def combine(points: list[dict]) -> list[dict]:
    """Points of one (method, group) -> one row: means over seeds with t-interval half-widths, or the
    single run's values with its bootstrap half-widths."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["method"], p["setting"]), []).append(p)
    rows = []
    for (method, _), ps in groups.items():
        seeds = sorted({p["seed"] or 0 for p in ps})
        label = ps[0]["group"] + (f" (seeds {', '.join(map(str, seeds))})" if len(ps) > 1 else "")
        row = {"method": method, "label": label, "n_seeds": len(ps), "train_s": mean_interval([p["train_s"] for p in ps if p["train_s"] is not None])[0]}
        for k in KEYS:
            vals = [p["summary"].get(k) for p in ps if p["summary"].get(k) is not None]
            if not vals:
                continue
            if len(ps) > 1:
                row[k], row[f"{k}_err"] = mean_interval(vals)
            else:
                row[k] = vals[0]
                hw = half_width(ps[0]["summary"], k)
                if hw is not None:
                    row[f"{k}_err"] = hw
        rows.append(row)
    return rows


def start_row(name: str, folder: Path) -> dict:
    s = json.loads((folder / "summary.json").read_text())
    row = {"method": "base", "label": f"start: {name}", "n_seeds": 1}
    for k in KEYS:
        if s.get(k) is not None:
            row[k] = s[k]
            hw = half_width(s, k)
            if hw is not None:
                row[f"{k}_err"] = hw
    return row


def cell(row: dict, key: str, digits: int) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    if key == "forget_quality":
        return f"{v:.3g}" + (f" ± {row[key + '_err']:.2g}" if row.get("n_seeds", 1) > 1 and key + "_err" in row else "")
    err = row.get(f"{key}_err")
    return f"{v:.{digits}f}" + (f" ± {err:.{digits}f}" if err is not None else "")


def table(rows: list[dict]) -> str:
    lines = ["| setting | seeds | UQ | U | FQ | MU | train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ts = r.get("train_s")
        lines.append(f"| {r['label']} | {r['n_seeds']} | {cell(r, 'unlearn_quality', 1)} | {cell(r, 'utility', 1)} | "
                     f"{cell(r, 'forget_quality', 3)} | {cell(r, 'model_utility', 3)} | {'-' if ts is None or ts != ts else f'{ts:.0f}'} |")
    return "\n".join(lines) + "\n"


def short(label: str) -> str:
    """The setting's label without its sweep name."""
    return label.split(": ", 1)[-1]


def fronts(rows: list[dict], x: str = "unlearn_quality", y: str = "utility") -> dict[str, list[dict]]:
    """Each method's non-dominated rows in (x, y), sorted by x (starting models excluded)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "base" and r.get(x) is not None and r.get(y) is not None:
            by.setdefault(r["method"], []).append(r)
    return {m: [rs[i] for i in pareto_front([(r[x], r[y]) for r in rs])] for m, rs in by.items()}


def dominators(row: dict, rows: list[dict], x: str = "unlearn_quality", y: str = "utility") -> list[dict]:
    """Rows of other methods at least as good as `row` on both axes and better on one (means)."""
    return [r for r in rows if r["method"] not in ("base", row["method"]) and r.get(x) is not None and r.get(y) is not None
            and r[x] >= row[x] and r[y] >= row[y] and (r[x] > row[x] or r[y] > row[y])]


def front_report(rows: list[dict], focus: str = "pmc") -> str:
    out = ["| method | front in (UQ, U): setting -> UQ / U (seeds) |", "|---|---|"]
    fr = fronts(rows)
    for m in sorted(fr):
        pts = "; ".join(f"{short(r['label'])} -> {r['unlearn_quality']:.1f} / {r['utility']:.1f} ({r['n_seeds']})" for r in fr[m])
        out.append(f"| {m} | {pts} |")
    out += ["", f"| {focus} front point | UQ / U | dominated by (UQ / U, seeds) |", "|---|---|---|"]
    for r in fr.get(focus, []):
        dom = dominators(r, rows)
        cell = "; ".join(f"{short(d['label'])} ({d['unlearn_quality']:.1f} / {d['utility']:.1f}, {d['n_seeds']})"
                         for d in sorted(dom, key=lambda d: -d["utility"])) or "none"
        out.append(f"| {short(r['label'])} | {r['unlearn_quality']:.1f} / {r['utility']:.1f} | {cell} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", nargs="+", required=True, help="sweep folders")
    ap.add_argument("--start", action="append", default=[], help="NAME=EVAL_FOLDER of a starting model (repeatable)")
    ap.add_argument("--output", required=True, help="output stem: STEM.png, STEM.svg, STEM.md")
    ap.add_argument("--focus", default="pmc", help="the method whose front points are checked for dominance")
    args = ap.parse_args()
    rows = [start_row(*s.split("=", 1)[:1], Path(s.split("=", 1)[1])) for s in args.start]
    rows += combine([p for sw in args.sweeps for p in read_points(Path(sw))])
    stem = Path(args.output)
    save_pareto(rows, stem, suptitle="fronts: means over seeds (t-interval bars) or one run (bootstrap bars)")
    text = table(rows) + "\n" + front_report(rows, args.focus)
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
