"""Turning gathered results into the report's sections, then into HTML (one self-contained file) and Markdown.

Sections are built once as plain data (`Section`: title, intro, tables, images, details) and
rendered twice, so the HTML and the Markdown always say the same thing.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from pmc_unlearn.report.gather import ModelResult, ReportData

HEADLINE = [  # (summary key, column title, format)
    ("unlearn_quality", "Unlearn quality ↑", "pct"),
    ("utility", "Utility ↑", "pct"),
    ("forget_quality", "Forget quality ↑", "p"),
    ("model_utility", "Model utility ↑", "f3"),
    ("forget_rougeL_recall", "Forget ROUGE-L", "f3"),
    ("retain_rougeL_recall", "Retain ROUGE-L", "f3"),
]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    highlight: list[bool] = field(default_factory=list)  # per row: PMC


@dataclass
class Image:
    name: str  # file stem for the Markdown copy
    png: bytes
    alt: str


@dataclass
class Section:
    id: str
    title: str
    intro: list[str] = field(default_factory=list)
    blocks: list[Any] = field(default_factory=list)  # Table | Image | ("h3", text) | ("pre", text) | ("p", text)


# ----------------------------------------------------------------------------- formatting

def fmt(v: Any, kind: str = "f3") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not isinstance(v, (int, float)):
        return str(v)
    if kind == "pct":
        return f"{v:.1f}"
    if kind == "p":
        return f"{v:.3g}" if v >= 1e-3 or v == 0 else f"{v:.2e}"
    if kind == "s":
        s = int(round(v))
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{v:.1f}s"
    if kind == "int":
        return str(int(v))
    return f"{v:.3f}"


def _short(text: Any, n: int = 400) -> str:
    t = "" if text is None else str(text)
    return t if len(t) <= n else t[: n - 1] + "…"


# ----------------------------------------------------------------------------- sections

def _order_for_answers(models: list[ModelResult]) -> list[ModelResult]:
    rank = {"target": 0, "unlearned": 1, "retain": 3, "base": 4}
    return sorted([m for m in models if m.records],
                  key=lambda m: (rank.get(m.role, 2), 0 if m.is_pmc else 1, m.label))


def headline(data: ReportData) -> Section:
    sec = Section("headline", "Headline")
    sec.intro.append(
        "Unlearn quality and utility are the PMC paper's output-level numbers (0-100, from greedy ROUGE-L recall); "
        "forget quality (KS-test p-value against the retain model's truth ratios) and model utility are TOFU's. "
        "Training time is the fine-tuning or unlearning run's wall time; evaluation time is separate.")
    header = ["Model", "Role", "Method", *[t for _, t, _ in HEADLINE], "Train time", "Eval time"]
    rows, hl = [], []
    for m in data.models:
        rows.append([m.label + (" ★" if m.is_pmc else ""), m.role, m.method or "—",
                     *[fmt(m.metric(k), f) for k, _, f in HEADLINE], fmt(m.train_time_s, "s"), fmt(m.eval_time_s, "s")])
        hl.append(m.is_pmc)
    sec.blocks.append(Table(header, rows, hl))
    # did the target learn the facts? (the demo's sanity check)
    base = next((m for m in data.models if m.role == "base" and m.metric("forget_rougeL_recall") is not None), None)
    target = next((m for m in data.models if m.role == "target" and m.metric("forget_rougeL_recall") is not None), None)
    if base and target:
        b, t = base.metric("forget_rougeL_recall"), target.metric("forget_rougeL_recall")
        verdict = ("the target learned the forget authors' facts" if t >= b + 0.2 else
                   "WARNING: the target barely learned the forget authors' facts; unlearning numbers mean little")
        sec.blocks.append(("p", f"Target check: forget ROUGE-L recall {b:.3f} (base) → {t:.3f} (target): {verdict}."))
    retain_rows = {m.summary.get("n_examples_retain") for m in data.models if m.summary.get("retain_split_note")}
    notes = {m.summary.get("retain_split_note") for m in data.models if m.summary.get("retain_split_note")}
    for n in sorted(x for x in notes if x):
        sec.blocks.append(("p", f"Utility's retain split: {n} ({', '.join(str(r) for r in retain_rows if r)} questions)."))
    return sec


MUSE = [  # (summary key, column title); MUSE-News evaluations (`eval --benchmark muse-news`)
    ("verbmem_forget", "VerbMem forget ↓"),
    ("knowmem_forget", "KnowMem forget ↓"),
    ("knowmem_retain", "KnowMem retain ↑"),
    ("privleak", "PrivLeak (→ 0)"),
]


def _with_ci(m: ModelResult, key: str) -> str:
    v, ci = m.metric(key), m.summary.get(f"{key}_ci")
    if v is None:
        return "—"
    if isinstance(ci, list) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci):
        return f"{v:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"
    return f"{v:.1f}"


def muse_section(data: ReportData) -> Section | None:
    """The MUSE-News table, when some model's summary has MUSE keys (None otherwise)."""
    models = [m for m in data.models if any(k in m.summary for k, _ in MUSE)]
    if not models:
        return None
    sec = Section("muse", "MUSE-News")
    sec.intro.append(
        "MUSE's metrics (docs/muse.md), with 95% bootstrap intervals over examples: VerbMem (ROUGE-L F1 of 128-token "
        "continuations of forget text, 0-100) and KnowMem on forget (lower is better) and retain QA (higher is better; "
        "ROUGE-L recall, 0-100); PrivLeak (Min-K% AUC against the retain model's, percent; 0 is ideal, about -100 "
        "when the forget texts are still recognisable).")
    rows = [[m.label + (" ★" if m.is_pmc else ""), m.role, m.method or "—", *[_with_ci(m, k) for k, _ in MUSE],
             fmt(m.metric("privleak_min_k_auc"))] for m in models]
    sec.blocks.append(Table(["Model", "Role", "Method", *[t for _, t in MUSE], "Min-K AUC"], rows, [m.is_pmc for m in models]))
    for note in sorted({m.summary.get("privleak_note") for m in models if m.summary.get("privleak_note")}):
        sec.blocks.append(("p", note))
    return sec


def tradeoff_section(data: ReportData, plots) -> Section:
    sec = Section("tradeoff", "Trade-off")
    sec.intro.append("One point per model; PMC is the red star. Ideal models sit at the upper right of both panels: "
                     "forgetting (x) without losing what should be kept (y).")
    png = plots.tradeoff(data.models)
    if png:
        sec.blocks.append(Image("tradeoff", png, "unlearn quality vs utility, forget quality vs model utility"))
    else:
        sec.blocks.append(("p", "No evaluated models: nothing to plot."))
    return sec


def curves_section(data: ReportData, plots) -> Section:
    sec = Section("curves", "PMC training curves")
    pmc = [m for m in data.models if m.is_pmc]
    png = plots.training_curves(pmc)
    if png:
        sec.intro.append("Per optimizer step, from log.jsonl. The score is ROUGE-L recall of the kept answer against the "
                         "model's own answer before unlearning (lower: less like the old answer); a question is resolved "
                         "at score 0. Retain NLL should stay low; collapse NLL is the NLL of the kept self-generated answers.")
        sec.blocks.append(Image("pmc_curves", png, "PMC training curves"))
    else:
        sec.blocks.append(("p", "No PMC run with a log.jsonl was given."))
    png = plots.baseline_losses([m for m in data.models if m.role == "unlearned"])
    if png:
        sec.blocks.append(Image("baseline_losses", png, "baselines' training loss"))
    return sec


def answers_section(data: ReportData, k: int) -> Section:
    sec = Section("answers", "Answers side by side")
    sec.intro.append("Greedy answers from the evaluation records, with their ROUGE-L recall against the ground truth.")
    models = _order_for_answers(data.models)
    if not models:
        sec.blocks.append(("p", "No evaluation records were given."))
        return sec
    for split, title in (("forget", "Forget questions"), ("retain", "Retain questions")):
        per = [{r["index"]: r for r in m.records if r.get("split") == split and "generation" in r} for m in models]
        common = sorted(set.intersection(*[set(p) for p in per if p])) if any(per) else []
        if not common:
            continue
        sec.blocks.append(("h3", title))
        for idx in common[:k]:
            first = next(p[idx] for p in per if idx in p)
            rows = [["ground truth", _short(first.get("answer")), ""]]
            hl = [False]
            for m, p in zip(models, per):
                r = p.get(idx)
                if r is None:
                    continue
                rows.append([m.label, _short(r.get("generation")), fmt(r.get("rougeL_recall"))])
                hl.append(m.is_pmc)
            sec.blocks.append(("p", f"Q: {first.get('question')}"))
            sec.blocks.append(Table(["Model", "Answer", "ROUGE-L"], rows, hl))
    return sec


def attack_headlines(obj: Any) -> list[tuple[str, str, Any, Any, Any]]:
    """(attack, metric, value, reference, reference name) from an attacks.json, whatever its nesting."""
    if not isinstance(obj, dict):
        return []
    res = obj.get("attacks", obj)
    if isinstance(res, list):
        items = [(r.get("name") or r.get("attack") or f"attack{i}", r) for i, r in enumerate(res) if isinstance(r, dict)]
    elif isinstance(res, dict):
        items = list(res.items())
    else:
        return []
    out = []
    for name, r in items:
        if not isinstance(r, dict):
            continue
        h = r.get("headline")
        if isinstance(h, dict) and "value" in h:
            out.append((str(name), str(h.get("metric", name)), h.get("value"), h.get("reference"), h.get("reference_name")))
            continue
        metrics = r.get("metrics", r)
        nums = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)][:3]
        out += [(str(name), k, v, None, None) for k, v in nums]
    return out


def attacks_section(data: ReportData) -> Section:
    sec = Section("attacks", "Attacks")
    rows_by_model = {m.label: attack_headlines(m.attacks) for m in data.models if m.attacks}
    rows_by_model = {k: v for k, v in rows_by_model.items() if v}
    if not rows_by_model:
        notes = [n for d in data.demos for n in d.get("notes", []) if "attack" in n]
        sec.blocks.append(("p", "No attack results in these runs." + (f" ({notes[0]})" if notes else "")))
        return sec
    sec.intro.append("Each attack's headline number per model (higher leakage = the knowledge is still reachable); "
                     "the reference column is what the attack compares against.")
    cols: list[tuple[str, str]] = []
    refs: dict[tuple[str, str], str] = {}
    for hs in rows_by_model.values():
        for a, metric, _, ref, ref_name in hs:
            if (a, metric) not in cols:
                cols.append((a, metric))
            if ref_name:
                refs[(a, metric)] = str(ref_name)
    header = ["Model"] + [f"{a}: {metric}" for a, metric in cols]
    rows, hl = [], []
    for m in data.models:
        hs = rows_by_model.get(m.label)
        if not hs:
            continue
        vals = {(a, metric): (v, ref) for a, metric, v, ref, _ in hs}
        row = [m.label]
        for c in cols:
            v, ref = vals.get(c, (None, None))
            row.append(fmt(v) + (f" (ref {fmt(ref)})" if ref is not None else ""))
        rows.append(row)
        hl.append(m.is_pmc)
    sec.blocks.append(Table(header, rows, hl))
    for (a, metric), name in refs.items():
        sec.blocks.append(("p", f"{a}: {metric} reference = {name}."))
    return sec


def stages_section(data: ReportData) -> Section | None:
    if not data.demos:
        return None
    sec = Section("stages", "Demo stages and times")
    for d in data.demos:
        sec.blocks.append(("p", f"Demo {d.get('_path')}: profile {d.get('profile')}, total {fmt(d.get('wall_time_s'), 's')} "
                                f"(this invocation; cached stages cost nothing), load average at start "
                                f"{', '.join(f'{x:.2f}' for x in d.get('load_avg_start') or [])}. "
                                "Times are wall-clock on a machine shared with other work: the load average says how shared."))
        rows = []
        for s in d.get("stages", []):
            la = s.get("load_avg")
            rows.append([s.get("name", "?"), s.get("status", "?"), fmt(s.get("time_s"), "s"),
                         f"{la[0]:.2f}" if isinstance(la, list) and la else "—", _short(s.get("note", ""), 160)])
        sec.blocks.append(Table(["Stage", "Status", "Time (when run)", "Load (1 min)", "Note"], rows))
        for n in d.get("notes", []):
            sec.blocks.append(("p", f"Note: {n}"))
    return sec


def settings_section(data: ReportData) -> Section:
    sec = Section("settings", "Settings and versions")
    for d in data.demos:
        sec.blocks.append(("h3", f"Demo profile ({d.get('profile')})"))
        sec.blocks.append(("pre", yaml.safe_dump(d.get("profile_settings", {}), sort_keys=False)))
        if d.get("data"):
            sec.blocks.append(("pre", yaml.safe_dump({"data": d["data"]}, sort_keys=False)))
    versions: dict[str, str] = {}
    hardware: dict[str, Any] = {}
    gits = set()
    for d in data.demos:
        versions.update({k: str(v) for k, v in (d.get("versions") or {}).items()})
        hardware.update(d.get("hardware") or {})
    for m in data.models:
        versions.update({k: str(v) for k, v in (m.manifest.get("versions") or {}).items()})
        hardware = hardware or m.manifest.get("hardware") or {}
        if m.manifest.get("git"):
            gits.add(m.manifest["git"])
        if m.summary.get("git_commit"):
            gits.add(m.summary["git_commit"])
        for k, v in m.summary.items():
            if k.startswith("version_") and v:
                versions.setdefault(k.removeprefix("version_"), str(v))
    rows = [[k, v] for k, v in sorted(versions.items())]
    rows += [[f"hardware.{k}", str(v)] for k, v in sorted(hardware.items())]
    rows += [["git", g] for g in sorted(gits)]
    if rows:
        sec.blocks.append(("h3", "Versions"))
        sec.blocks.append(Table(["What", "Value"], rows))
    ev_keys = ("forget_split", "max_new_tokens", "decoding", "batch_size", "n_examples_forget", "n_examples_forget_para",
               "n_examples_retain", "n_examples_real_authors", "n_examples_world_facts", "n_examples_holdout",
               "retain_sample", "prompt_chat_template", "model_fingerprint")
    ev_rows = [[m.label, *[fmt(m.summary.get(k)) if isinstance(m.summary.get(k), float) else str(m.summary.get(k, "—"))
                           for k in ev_keys]] for m in data.models if m.summary]
    if ev_rows:
        sec.blocks.append(("h3", "Evaluation settings"))
        sec.blocks.append(Table(["Model", *ev_keys], ev_rows))
    for m in data.models:
        if m.config:
            sec.blocks.append(("details", f"Config of {m.label} ({m.run_dir})", yaml.safe_dump(m.config, sort_keys=False)))
    return sec


def build_sections(data: ReportData, plots, examples: int = 3) -> list[Section]:
    muse = muse_section(data)
    secs = [headline(data), *([muse] if muse else []), tradeoff_section(data, plots), curves_section(data, plots), answers_section(data, examples),
            attacks_section(data)]
    st = stages_section(data)
    if st:
        secs.append(st)
    secs.append(settings_section(data))
    return secs


# ----------------------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1180px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}h3{margin-top:1.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f3f3f3;white-space:nowrap}tr.pmc td{background:#fdecea;font-weight:600}img{max-width:100%;border:1px solid #eee}
pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:.85em}nav a{margin-right:1em}div.tw{overflow-x:auto}p.q{font-weight:600;margin-bottom:.2em}
"""


def _html_table(t: Table) -> str:
    out = ["<div class=\"tw\"><table><thead><tr>", *[f"<th>{html.escape(h)}</th>" for h in t.header], "</tr></thead><tbody>"]
    for i, row in enumerate(t.rows):
        cls = ' class="pmc"' if i < len(t.highlight) and t.highlight[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def to_html(sections: list[Section], title: str, subtitle: str) -> str:
    parts = ["<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>",
             *[f"<a href=\"#{s.id}\">{html.escape(s.title)}</a>" for s in sections], "</nav>"]
    for s in sections:
        parts.append(f"<section id=\"{s.id}\"><h2>{html.escape(s.title)}</h2>")
        parts += [f"<p>{html.escape(t)}</p>" for t in s.intro]
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(_html_table(b))
            elif isinstance(b, Image):
                data = base64.b64encode(b.png).decode("ascii")
                parts.append(f"<figure><img id=\"img-{b.name}\" src=\"data:image/png;base64,{data}\" alt=\"{html.escape(b.alt)}\">"
                             f"<figcaption>{html.escape(b.alt)}</figcaption></figure>")
            elif b[0] == "h3":
                parts.append(f"<h3>{html.escape(b[1])}</h3>")
            elif b[0] == "pre":
                parts.append(f"<pre>{html.escape(b[1])}</pre>")
            elif b[0] == "details":
                parts.append(f"<details><summary>{html.escape(b[1])}</summary><pre>{html.escape(b[2])}</pre></details>")
            else:
                cls = ' class="q"' if b[1].startswith("Q: ") else ""
                parts.append(f"<p{cls}>{html.escape(b[1])}</p>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- Markdown

def _md_cell(c: str) -> str:
    return c.replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    for i, row in enumerate(t.rows):
        pmc = i < len(t.highlight) and t.highlight[i]
        cells = [f"**{_md_cell(c)}**" if pmc and c else _md_cell(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(sections: list[Section], title: str, subtitle: str, image_dir: str) -> tuple[str, dict[str, bytes]]:
    """The Markdown text and the images it links ({relative path: png bytes})."""
    parts = [f"# {title}", "", subtitle, ""]
    images: dict[str, bytes] = {}
    for s in sections:
        parts += [f"## {s.title}", ""]
        for t in s.intro:
            parts += [t, ""]
        for b in s.blocks:
            if isinstance(b, Table):
                parts += [_md_table(b), ""]
            elif isinstance(b, Image):
                rel = f"{image_dir}/{b.name}.png"
                images[rel] = b.png
                parts += [f"![{b.alt}]({rel})", ""]
            elif b[0] == "h3":
                parts += [f"### {b[1]}", ""]
            elif b[0] == "pre":
                parts += ["```yaml", b[1].rstrip(), "```", ""]
            elif b[0] == "details":
                parts += [f"<details><summary>{b[1]}</summary>", "", "```yaml", b[2].rstrip(), "```", "", "</details>", ""]
            else:
                parts += [f"**{b[1]}**" if b[1].startswith("Q: ") else b[1], ""]
    return "\n".join(parts), images
