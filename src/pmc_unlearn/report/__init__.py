"""The unlearning report: `report.html` (one self-contained file) and `report.md` from run folders.

- `gather`: reads demo folders, training runs and evaluations into `ModelResult`s (no model).
- `plots`: the figures, as PNG bytes (matplotlib, Agg).
- `render`: the sections (headline table, trade-off, PMC curves, answers side by side, attacks,
  stage times, settings and versions) and their HTML / Markdown forms.

The HTML embeds its images as base64 PNG and loads nothing from the network; the Markdown links
PNG copies written to `<name>_files/` beside it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pmc_unlearn.errors import UserError
from pmc_unlearn.provenance import write_text_atomic
from pmc_unlearn.report.gather import ModelResult, ReportData, gather

__all__ = ["ModelResult", "ReportData", "build_report", "gather"]


REPORT_MARKER = ".pmc-unlearn-report"  # in the <name>_files/ folder of images the report wrote


def _written_by_us(path: Path, marker: str) -> bool:
    try:
        return marker in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def check_report_output(out: Path, flag: str, force: bool = False) -> None:
    """The report writes `out` (.html), the .md beside it and `<stem>_files/`: refuse to overwrite
    any of them that `pmc-unlearn report` did not write, unless `force`."""
    from pmc_unlearn import rundir
    from pmc_unlearn.report.render import GENERATOR_HTML, GENERATOR_MD

    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"{flag} {out}: give a .html file name (report.md is written beside it)")
    md, img = out.with_suffix(".md"), out.parent / f"{out.stem}_files"
    for p in (out, md):
        if p.is_dir():
            raise UserError(f"{flag} {out}: {p} is a folder; give another .html file name")
    if img.exists() and not img.is_dir():
        raise UserError(f"{flag} {out}: {img} is a file, and the report's images go in a folder of that name; "
                        "give another .html file name")
    rundir.check_writable(out.parent, flag)
    if force:
        return
    for p, marker in ((out, GENERATOR_HTML), (md, GENERATOR_MD)):
        if p.exists() and not _written_by_us(p, marker):
            raise UserError(f"{flag} {out}: {p} exists and was not written by pmc-unlearn report; "
                            "choose another file name, or pass --force to overwrite it")
    if img.is_dir() and any(img.iterdir()) and not (img / REPORT_MARKER).exists():
        raise UserError(f"{flag} {out}: {img} exists and was not written by pmc-unlearn report; "
                        "choose another file name, or pass --force to write into it")


def build_report(paths: list[str | Path], output: str | Path = "report.html", examples: int | None = None,
                 title: str = "Unlearning report", force: bool = False) -> dict[str, Any]:
    """Gather `paths`, write the HTML report to `output` and the Markdown beside it; returns paths and counts.

    Existing files are overwritten only when an earlier report wrote them, or with `force`.
    """
    from pmc_unlearn import rundir
    from pmc_unlearn.report import plots, render

    out = Path(output).expanduser()
    check_report_output(out, "--output", force)
    data = gather(paths)
    if examples is None:
        examples = next((int(d.get("profile_settings", {}).get("report", {}).get("examples", 3)) for d in data.demos), 3)
    sections = render.build_sections(data, plots, examples)
    n_models = len(data.models)
    subtitle = (f"{n_models} model{'s' if n_models != 1 else ''} from {', '.join(data.sources)}; "
                f"built {time.strftime('%Y-%m-%d %H:%M')} by pmc-unlearn report.")
    page = render.to_html(sections, title, subtitle)
    md_path = out.with_suffix(".md")
    img_dir = f"{out.stem}_files"
    md, images = render.to_markdown(sections, title, subtitle, img_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, page)
        if images:
            (out.parent / img_dir).mkdir(parents=True, exist_ok=True)
            (out.parent / img_dir / REPORT_MARKER).write_text("images of a report written by pmc-unlearn report\n")
        for rel, png in images.items():
            p = out.parent / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(png)
        write_text_atomic(md_path, md)
    except OSError as e:
        raise rundir.write_failed(e, out.parent) from None
    return {"html": out, "md": md_path, "images": len(images), "models": [m.label for m in data.models],
            "sections": [s.id for s in sections]}
