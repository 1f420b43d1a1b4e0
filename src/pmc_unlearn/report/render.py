"""Turning gathered results into the report's sections, then into HTML (one self-contained file) and Markdown.

Sections are built once as plain data (`Section`: title, intro, tables, images, details) and
rendered twice, so the HTML and the Markdown always say the same thing.
"""

from __future__ import annotations

import base64
import html
import math
import re
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


def with_ci(m, key: str, kind: str) -> str:
    """A summary number and, where the summary has one, its 95% interval: `84.0 [78.1, 89.2]`."""
    ci = m.summary.get(f"{key}_ci")
    text = fmt(m.metric(key), kind)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) and x == x for x in ci):
        text += f" [{fmt(ci[0], kind)}, {fmt(ci[1], kind)}]"
    return text


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
        "Training time is the fine-tuning or unlearning run's wall time; evaluation time is separate. "
        "Brackets: 95% bootstrap intervals over the evaluated questions (where the evaluation wrote them); "
        "forget quality is a p-value and has none.")
    # TOFU columns no model has (a MUSE-News-only report) are left out rather than shown as dashes
    cols = [c for c in HEADLINE if any(m.metric(c[0]) is not None for m in data.models)]
    header = ["Model", "Role", "Method", *[t for _, t, _ in cols], "Train time", "Eval time"]
    rows, hl = [], []
    for m in data.models:
        rows.append([m.label + (" ★" if m.is_pmc else ""), m.role, m.method or "—",
                     *[with_ci(m, k, f) for k, _, f in cols], fmt(m.train_time_s, "s"), fmt(m.eval_time_s, "s")])
        hl.append(m.is_pmc)
    sec.blocks.append(Table(header, rows, hl))
    # did the target learn the facts? (the demo's sanity check) Against the base model, or, where
    # the base model was not evaluated, the retain model (the same recipe without the forget authors)
    def with_forget(role):
        return next((m for m in data.models if m.role == role and m.metric("forget_rougeL_recall") is not None), None)

    base, target = with_forget("base") or with_forget("retain"), with_forget("target")
    if base and target:
        b, t = base.metric("forget_rougeL_recall"), target.metric("forget_rougeL_recall")
        verdict = ("the target learned the forget authors' facts" if t >= b + 0.2 else
                   "WARNING: the target barely learned the forget authors' facts; unlearning numbers mean little")
        sec.blocks.append(("p", f"Target check: forget ROUGE-L recall {b:.3f} ({base.role}) → {t:.3f} (target): {verdict}."))
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


def sequence_section(data: ReportData, plots) -> Section | None:
    """Sequence folders (`pmc-unlearn sequence`): utility and forgetting after each request, figure and table."""
    if not data.sequences:
        return None
    from pmc_unlearn.sequence import table

    sec = Section("sequence", "Sequential requests")
    sec.intro.append(
        "Unlearning requests one after another, each starting from the model the previous one produced; request 0 is "
        "the starting model. In the figure (x: requests unlearned) the black line is utility U; each request's forget "
        "ROUGE-L recall (x 100) is dotted while it waits and solid from the step before its turn, so the solid segment "
        "into step j is request j's own unlearning, a drop on the dotted part is forgetting spilling over from earlier "
        "requests, and a rise after its turn is knowledge coming back; "
        "the red line covers every request unlearned so far. Lower ROUGE-L is more forgotten. "
        "UQ, U, FQ and MU are the evaluation's own (its forget split may hold requests not unlearned yet).")
    for i, seq in enumerate(data.sequences):
        if len(data.sequences) > 1:
            sec.blocks.append(("h3", f"Sequence {seq['_path']}"))
        png = plots.sequence_curves(seq["lines"])
        if png:
            sec.blocks.append(Image(f"sequence_{i}", png, "utility and forget ROUGE-L after each request"))
        header, rows = table(seq["lines"])
        sec.blocks.append(Table(header, rows))
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


def cost_section(data: ReportData) -> Section | None:
    """What each training run cost beside what it bought: the reviewers' cost-benefit question."""
    runs = [m for m in data.models if m.run_dir is not None and m.manifest]
    if not runs:
        return None
    sec = Section("cost", "Cost and benefit")
    hw = max((m.manifest.get("hardware") or {} for m in runs), key=len)  # the fullest record
    prec = next((m.manifest.get("precision") for m in runs if m.manifest.get("precision")), None)
    sec.intro.append(
        "Per training run, on the machine that ran it: wall time of the training stage, optimizer steps, the peak "
        "resident memory during training (sampled; CUDA's peak allocation too where a GPU ran), the new tokens it "
        "sampled (PMC's candidate answers; the baselines sample none), and what it bought."
        + (f" Machine: {hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} cores, {hw.get('cpu_capability', '?')}"
           f"{', native bf16' if hw.get('cpu_native_bf16') else ', no native bf16' if 'cpu_native_bf16' in hw else ''}." if hw else "")
        + (f" Precision: {'bf16' if prec.get('compute', {}).get('bf16') else 'fp32'} compute "
           f"({prec.get('compute', {}).get('reason', '')})." if isinstance(prec, dict) else ""))
    rows, hl = [], []
    for m in runs:
        mem = m.manifest.get("peak_rss_mb")
        cuda = m.manifest.get("peak_cuda_mb")
        rows.append([m.label, m.method or "—", fmt(m.train_time_s, "s"), fmt(m.manifest.get("steps"), "int"),
                     (f"{mem:.0f} MB" if isinstance(mem, (int, float)) else "—") + (f" (CUDA {cuda:.0f} MB)" if cuda else ""),
                     f"{m.tokens_sampled:,}" if m.tokens_sampled else "0" if m.role == "unlearned" else "—",
                     with_ci(m, "unlearn_quality", "pct"), with_ci(m, "utility", "pct"), fmt(m.metric("forget_quality"), "p")])
        hl.append(m.is_pmc)
    sec.blocks.append(Table(["Model", "Method", "Train time", "Steps", "Peak memory", "Tokens sampled",
                             "Unlearn quality ↑", "Utility ↑", "Forget quality ↑"], rows, hl))
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
    tofu = any(m.metric("unlearn_quality") is not None or m.metric("forget_quality") is not None for m in data.models)
    seq = sequence_section(data, plots)
    secs = [headline(data), *([muse] if muse else []), *([tradeoff_section(data, plots)] if tofu or not muse else []),
            *([seq] if seq else []), curves_section(data, plots), answers_section(data, examples), attacks_section(data)]
    for extra in (cost_section(data), stages_section(data)):
        if extra:
            secs.append(extra)
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


# Marks a file as written by `pmc-unlearn report` (which overwrites only such files unless --force).
GENERATOR_HTML = '<meta name="generator" content="pmc-unlearn report">'
GENERATOR_MD = "<!-- written by pmc-unlearn report -->"


def to_html(sections: list[Section], title: str, subtitle: str) -> str:
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">{GENERATOR_HTML}",
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

_MD_INLINE = set("\\`*_[]|~")  # emphasis, code, links and images, table cells, strikethrough
_MD_LINE_START = re.compile(r"^(\s*)([#+=-]|\d+[.)])")  # headings, lists, setext underlines


def md_escape(text: Any, line_start: bool = True) -> str:
    """Text (a model's answer, a question, a path) as literal Markdown: on one line, HTML and Markdown inert.

    `<`, `>` and `&` become entities (no raw HTML, no autolinks, no entity tricks); the characters
    Markdown gives a meaning inside a line (emphasis, code, links, images, table cells) are
    backslash-escaped, and so is a heading or list marker at the start of a line (`line_start`;
    a table cell has none), which CommonMark renders as the character itself.
    """
    s = html.escape(str(text), quote=False).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    s = "".join("\\" + ch if ch in _MD_INLINE else ch for ch in s)
    if not line_start:
        return s
    return _MD_LINE_START.sub(lambda m: m.group(1) + m.group(2)[:-1] + "\\" + m.group(2)[-1], s, count=1)


def _md_cell(c: str) -> str:
    return md_escape(c, line_start=False)


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text` (so the text cannot close it)."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _md_table(t: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in t.header) + " |", "|" + "---|" * len(t.header)]
    for i, row in enumerate(t.rows):
        pmc = i < len(t.highlight) and t.highlight[i]
        cells = [f"**{_md_cell(c)}**" if pmc and c else _md_cell(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_markdown(sections: list[Section], title: str, subtitle: str, image_dir: str) -> tuple[str, dict[str, bytes]]:
    """The Markdown text and the images it links ({relative path: png bytes}).

    Every text that comes from data (answers, questions, labels, paths, notes) is escaped with
    `md_escape`, as the HTML escapes it; the settings stay in code blocks.
    """
    parts = [f"# {md_escape(title)}", "", md_escape(subtitle), ""]
    images: dict[str, bytes] = {}
    for s in sections:
        parts += [f"## {md_escape(s.title)}", ""]
        for t in s.intro:
            parts += [md_escape(t), ""]
        for b in s.blocks:
            if isinstance(b, Table):
                parts += [_md_table(b), ""]
            elif isinstance(b, Image):
                rel = f"{image_dir}/{b.name}.png"
                images[rel] = b.png
                parts += [f"![{md_escape(b.alt)}]({rel.replace(' ', '%20').replace('(', '%28').replace(')', '%29')})", ""]
            elif b[0] == "h3":
                parts += [f"### {md_escape(b[1])}", ""]
            elif b[0] == "pre":
                f = _fence(b[1])
                parts += [f + "yaml", b[1].rstrip(), f, ""]
            elif b[0] == "details":
                f = _fence(b[2])
                parts += [f"<details><summary>{html.escape(str(b[1]))}</summary>", "", f + "yaml", b[2].rstrip(), f, "",
                          "</details>", ""]
            else:
                parts += [f"**{md_escape(b[1])}**" if b[1].startswith("Q: ") else md_escape(b[1]), ""]
    parts += [GENERATOR_MD, ""]
    return "\n".join(parts), images
