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
from pmc_unlearn.report.gather import ModelResult, ReportData, gather

__all__ = ["ModelResult", "ReportData", "build_report", "gather"]


def build_report(paths: list[str | Path], output: str | Path = "report.html", examples: int | None = None,
                 title: str = "Unlearning report") -> dict[str, Any]:
    """Gather `paths`, write the HTML report to `output` and the Markdown beside it; returns paths and counts."""
    from pmc_unlearn.report import plots, render

    out = Path(output).expanduser()
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--output {output}: give a .html file name (report.md is written beside it)")
    if out.exists() and out.is_dir():
        raise UserError(f"--output {output}: is a folder; give a .html file name")
    data = gather(paths)
    if examples is None:
        examples = next((int(d.get("profile_settings", {}).get("report", {}).get("examples", 3)) for d in data.demos), 3)
    sections = render.build_sections(data, plots, examples)
    n_models = len(data.models)
    subtitle = (f"{n_models} model{'s' if n_models != 1 else ''} from {', '.join(data.sources)}; "
                f"built {time.strftime('%Y-%m-%d %H:%M')} by pmc-unlearn report.")
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render.to_html(sections, title, subtitle)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    md_path = out.with_suffix(".md")
    img_dir = f"{out.stem}_files"
    md, images = render.to_markdown(sections, title, subtitle, img_dir)
    for rel, png in images.items():
        p = out.parent / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(png)
    md_path.write_text(md, encoding="utf-8")
    return {"html": out, "md": md_path, "images": len(images), "models": [m.label for m in data.models],
            "sections": [s.id for s in sections]}
