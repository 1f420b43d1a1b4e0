"""The report from small hand-made run folders (no model): sections, embedded images, pairing, CLI.

The slow test renders report.html in headless Chromium and fails on a page that does not load
or shows no images.
"""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pmc_unlearn.cli import main
from pmc_unlearn.report import build_report, gather

VERSIONS = {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.23.0", "pmc_unlearn": "0.1.0"}
FORGET_Q = ["Who wrote the Blue Harbour?", "Where was Ana born?", "What genre does Ana write?"]
RETAIN_Q = ["Who is Jaime Vasquez?", "What did Jaime write?"]


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in obj))
    elif path.suffix == ".yaml":
        path.write_text(yaml.safe_dump(obj))
    else:
        path.write_text(json.dumps(obj, indent=2))


def make_eval(d: Path, model_name: str, fp: str, uq: float, u: float, fq, mu: float, answers: list[str],
              reference: str | None = None) -> None:
    recs = [{"split": "forget", "index": i, "question": q, "answer": f"true answer {i}", "generation": a,
             "rougeL_recall": 1.0 if a.startswith("true") else 0.1, "key": "k"} for i, (q, a) in enumerate(zip(FORGET_Q, answers))]
    recs += [{"split": "retain", "index": 10 + i, "question": q, "answer": f"retain answer {i}", "generation": f"retain answer {i}",
              "rougeL_recall": 1.0, "key": "k"} for i, q in enumerate(RETAIN_Q)]
    _write(d / "records.jsonl", recs)
    s = {"unlearn_quality": uq, "utility": u, "forget_quality": fq, "model_utility": mu,
         "forget_rougeL_recall": 1 - uq / 100, "retain_rougeL_recall": 0.9, "model_name": model_name,
         "model_fingerprint": fp, "forget_split": "forget01", "max_new_tokens": 48, "n_examples_forget": 3,
         "time_load_s": 1.0, "time_collect_s": 20.0, "version_torch": "2.13.0+cpu", "git_commit": "abc123"}
    if reference:
        s["retain_reference"] = reference
    _write(d / "summary.json", s)


def make_run(d: Path, method: str, fp: str, start: str, log: list[dict]) -> None:
    _write(d / "manifest.json", {"status": "completed", "method": method, "model_fingerprint": fp, "wall_time_s": 123.4,
                                 "phases_s": {"train": 120.0}, "versions": VERSIONS, "git": "abc123",
                                 "hardware": {"cpu_count": 2}})
    _write(d / "config.yaml", {"method": method, "model": {"name": start}, "train": {"lr": 1e-4, "epochs": 3}})
    _write(d / "log.jsonl", log)
    (d / "model").mkdir(parents=True, exist_ok=True)
    (d / "model" / "config.json").write_text("{}")


def pmc_log(n: int = 6) -> list[dict]:
    return [{"step": s, "train/loss": 3.0 - 0.2 * s, "train/collapse_nll": 2.0 - 0.1 * s, "train/retain_nll": 0.5 + 0.01 * s,
             "sample/score_mean": max(0.0, 0.6 - 0.12 * s), "sample/score_min": max(0.0, 0.4 - 0.12 * s),
             "sample/score_max": max(0.0, 0.8 - 0.1 * s), "sample/unresolved": max(0, 3 - s)} for s in range(1, n + 1)]


@pytest.fixture()
def by_hand(tmp_path):
    """What a user makes with finetune / unlearn / eval by hand: runs and evaluations in separate folders."""
    runs, evals = tmp_path / "runs", tmp_path / "evals"
    make_run(runs / "target", "sft", "fp_target", "smollm2-135m", [{"step": 1, "train/loss": 2.0}])
    make_run(runs / "retain", "sft", "fp_retain", "smollm2-135m", [{"step": 1, "train/loss": 2.1}])
    make_run(runs / "pmc", "pmc", "fp_pmc", str(runs / "target" / "model"), pmc_log())
    make_run(runs / "npo", "npo", "fp_npo", str(runs / "target" / "model"),
             [{"step": s, "train/loss": 1.0 - 0.1 * s} for s in range(1, 5)])
    ref = str(evals / "retain" / "records.jsonl")
    make_eval(evals / "base", "smollm2-135m", "fp_base", 90.0, 30.0, 0.5, 0.30, ["no idea"] * 3, ref)
    make_eval(evals / "target", str(runs / "target" / "model"), "fp_target", 5.0, 80.0, 1e-5, 0.45,
              [f"true answer {i}" for i in range(3)], ref)
    make_eval(evals / "retain", str(runs / "retain" / "model"), "fp_retain", 85.0, 78.0, 1.0, 0.44, ["a guess"] * 3)
    make_eval(evals / "pmc", "elsewhere/pmc-model", "fp_pmc", 92.0, 75.0, 0.6, 0.43, ["Something else entirely"] * 3, ref)
    make_eval(evals / "npo", str(runs / "npo" / "model"), "fp_npo", 70.0, 40.0, 0.01, 0.2, ["the the the"] * 3, ref)
    _write(runs / "pmc" / "attacks.json", {"attacks": {
        "prefill": {"headline": {"metric": "prefill_rougeL_recall", "value": 0.12, "reference": 0.08,
                                 "reference_name": "greedy forget ROUGE-L recall"}},
        "sampling": {"metrics": {"max_rougeL_recall": 0.3, "mean_rougeL_recall": 0.1}}}})
    return tmp_path


def test_gather_pairs_runs_and_evals_and_infers_roles(by_hand):
    d = by_hand
    data = gather([d / "runs", d / "evals"])
    by = {m.label: m for m in data.models}
    assert set(by) == {"base", "target", "retain", "pmc", "npo"}
    # pmc's evaluation names another path: paired by fingerprint; npo's by its model path
    assert by["pmc"].eval_dir == d / "evals" / "pmc" and by["pmc"].run_dir == d / "runs" / "pmc"
    assert by["npo"].eval_dir == d / "evals" / "npo"
    assert by["target"].role == "target"  # the model the unlearning runs started from
    assert by["retain"].role == "retain"  # the evaluation forget quality referred to
    assert by["base"].role == "base" and by["base"].run_dir is None
    assert by["pmc"].is_pmc and by["pmc"].attacks
    assert [m.label for m in data.models][:3] == ["base", "target", "retain"]


def test_gather_finds_an_evaluation_inside_a_run(tmp_path):
    run = tmp_path / "pmc"
    make_run(run, "pmc", "fp", "somewhere/target", pmc_log(2))
    make_eval(run / "eval", str(run / "model"), "fp", 80.0, 60.0, 0.2, 0.4, ["x"] * 3)
    (m,) = gather([run]).models
    assert m.run_dir == run and m.eval_dir == run / "eval" and m.metric("unlearn_quality") == 80.0


def test_report_sections_and_embedded_images(by_hand, tmp_path):
    d = by_hand
    out = build_report([d / "runs", d / "evals"], tmp_path / "out" / "report.html")
    page = out["html"].read_text()
    for sec in ("headline", "tradeoff", "curves", "answers", "attacks", "settings"):
        assert f'<section id="{sec}">' in page, sec
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) >= 3  # trade-off, PMC curves, baselines' losses
    for b in imgs:
        assert base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n"
    # self-contained: nothing is fetched
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<link" not in page and "<script" not in page
    # PMC highlighted; numbers, answers and attacks present
    assert re.search(r'<tr class="pmc"><td>pmc ★</td>', page)
    assert "92.0" in page and "1.00e-05" in page
    assert "Something else entirely" in page and "true answer 0" in page and "Who is Jaime Vasquez?" in page
    assert "prefill_rougeL_recall" in page and "0.120 (ref 0.080)" in page and "max_rougeL_recall" in page
    assert "Target check" in page and "learned the forget authors" in page
    assert "2.13.0+cpu" in page and "abc123" in page
    # the Markdown twin links PNG copies that exist
    md = out["md"].read_text()
    assert md.startswith("# Unlearning report") and "## Headline" in md and "| **pmc ★** |" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(imgs)
    for link in links:
        assert (out["md"].parent / link).read_bytes()[:4] == b"\x89PNG"


def test_report_from_a_demo_folder_shows_stage_times(tmp_path):
    root = tmp_path / "demo"
    make_run(root / "runs" / "target", "sft", "fp_t", "tiny-random", [{"step": 1, "train/loss": 2.0}])
    make_run(root / "runs" / "pmc", "pmc", "fp_p", str(root / "runs" / "target" / "model"), pmc_log(3))
    make_eval(root / "eval" / "base", "tiny-random", "fp_b", 90.0, 30.0, 0.5, 0.3, ["x"] * 3)
    make_eval(root / "eval" / "target", str(root / "runs/target/model"), "fp_t", 10.0, 80.0, 1e-4, 0.4, ["true answer"] * 3)
    make_eval(root / "eval" / "pmc", str(root / "runs/pmc/model"), "fp_p", 80.0, 70.0, 0.3, 0.4, ["y"] * 3)
    _write(root / "demo.json", {"profile": "test", "profile_settings": {"model": "tiny-random", "report": {"examples": 1}},
                                "wall_time_s": 61.0, "load_avg_start": [1.0, 1.0, 1.0], "versions": VERSIONS,
                                "notes": ["attacks: disabled by the profile (attacks.enabled: false)"],
                                "stages": [{"name": "finetune/target", "status": "done", "time_s": 30.5, "load_avg": [1.2, 1, 1]},
                                           {"name": "unlearn/pmc", "status": "cached", "time_s": 20.0},
                                           {"name": "unlearn/npo", "status": "skipped", "note": "npo: settings do not fit this method"},
                                           *[{"name": f"eval/{n}", "status": "done", "time_s": 9.0}
                                             for n in ("base", "target", "pmc")]]})
    # left over from an earlier profile: not a stage of this demo, so not reported
    make_eval(root / "eval" / "gd", "old", "fp_old", 1.0, 1.0, 0.1, 0.1, ["z"] * 3)
    out = build_report([root], root / "report.html")
    page = out["html"].read_text()
    assert '<section id="stages">' in page and "finetune/target" in page and "30.5s" in page and "1.20" in page
    assert "npo: settings do not fit this method" in page and "attacks: disabled by the profile" in page
    roles = {m.label: m.role for m in gather([root]).models}
    assert roles == {"base": "base", "target": "target", "pmc": "unlearned"}
    assert page.count('<p class="q">') == 2  # report.examples = 1: one forget and one retain question


def test_report_cli(by_hand, tmp_path, capsys):
    d = by_hand
    out = tmp_path / "r.html"
    assert main(["report", str(d / "runs" / "pmc"), str(d / "evals" / "pmc"), str(d / "evals" / "target"),
                 "--output", str(out)]) == 0
    assert out.exists() and out.with_suffix(".md").exists()
    assert "wrote" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--output", str(out)]) == 2
    assert main(["report", str(d / "evals"), "--output", str(tmp_path / "r.txt")]) == 2


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(by_hand, tmp_path):
    """The page loads in a real browser and its images decode (naturalWidth > 0); a screenshot is not blank."""
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the report's browser check needs it")
    out = build_report([by_hand / "runs", by_hand / "evals"], tmp_path / "report.html")
    # A copy with a probe script: after load it writes how many images decoded into the DOM.
    probe = out["html"].read_text().replace(
        "</body>", "<script>window.addEventListener('load',()=>{document.body.setAttribute('data-images-ok',"
                   "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length)});</script></body>")
    (tmp_path / "probe.html").write_text(probe)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    dom = subprocess.run([exe, *flags, "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "probe.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-images-ok="(\d+)"', dom.stdout)
    assert m, "the page did not finish loading in chromium"
    n_img = len(re.findall(r"<img ", out["html"].read_text()))
    assert n_img >= 3 and int(m.group(1)) == n_img, f"{m.group(1)} of {n_img} images decoded"
    shot = tmp_path / "shot.png"
    r = subprocess.run([exe, *flags, f"--screenshot={shot}", "--window-size=1280,2400", out["html"].as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    import matplotlib.image as mpimg

    px = mpimg.imread(str(shot))
    assert px.shape[0] >= 1000 and px.std() > 0.05, "the screenshot is blank"


def test_target_check_uses_the_retain_model_without_a_base_row(by_hand, tmp_path):
    """Base forget ROUGE-L 0.10 (UQ 90) -> target 0.95 (UQ 5); without the base row: retain 0.15 (UQ 85) -> 0.95."""
    d = by_hand
    page = build_report([d / "runs", d / "evals"], tmp_path / "a" / "report.html")["html"].read_text()
    assert "0.100 (base) → 0.950 (target)" in page
    shutil.rmtree(d / "evals" / "base")
    page = build_report([d / "runs", d / "evals"], tmp_path / "b" / "report.html")["html"].read_text()
    assert "0.150 (retain) → 0.950 (target)" in page and "learned the forget authors" in page


def test_headline_shows_intervals_where_the_summary_has_them(by_hand, tmp_path):
    d = by_hand
    s = json.loads((d / "evals" / "pmc" / "summary.json").read_text())
    s["unlearn_quality_ci"] = [88.25, 95.5]
    s["model_utility_ci"] = [0.4, 0.45]
    (d / "evals" / "pmc" / "summary.json").write_text(json.dumps(s))
    page = build_report([d / "runs", d / "evals"], tmp_path / "r" / "report.html")["html"].read_text()
    assert "92.0 [88.2, 95.5]" in page and "0.430 [0.400, 0.450]" in page
    assert "70.0 [" not in page  # npo's summary has no intervals: the number alone


def test_cost_section_lists_time_memory_and_sampled_tokens(by_hand, tmp_path):
    d = by_hand
    man = json.loads((d / "runs" / "pmc" / "manifest.json").read_text())
    man.update(peak_rss_mb=1234.4, steps=6, precision={"compute": {"bf16": False, "reason": "auto: CPU AVX2, oneDNN bf16 emulated"}})
    man["hardware"].update(cpu="Test CPU", cpu_capability="AVX2", cpu_native_bf16=False)
    (d / "runs" / "pmc" / "manifest.json").write_text(json.dumps(man))
    _write(d / "runs" / "pmc" / "samples.jsonl", [{"step": 1, "index": 0, "tokens": 30}, {"step": 1, "index": 0, "tokens": 12}])
    page = build_report([d / "runs", d / "evals"], tmp_path / "c" / "report.html")["html"].read_text()
    assert '<section id="cost">' in page
    row = re.search(r'<tr class="pmc">(.*?)</tr>', page.split('<section id="cost">')[1]).group(1)
    assert "1234 MB" in row and ">42<" in row and ">6<" in row and "92.0" in row  # 30 + 12 tokens sampled
    assert "Test CPU, 2 cores, AVX2, no native bf16" in page and "fp32 compute" in page
