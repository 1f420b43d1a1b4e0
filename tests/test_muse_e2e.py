"""MUSE-News on tiny-random: text forget sets through PMC and NPO, `eval --benchmark muse-news`, the muse demo."""

import io
import json

import pytest

from eval_fixtures import eval_cache  # noqa: F401  (session fixture: a private eval cache)
from pmc_unlearn.cli import main

TEXTS = [
    "The council approved the new bridge on Monday after a long debate about its cost and the river traffic below.",
    "Fans queued overnight for tickets to the final concert of the tour, which sold out within minutes of release.",
]
FAST_TEXT = ["data.max_length=12", "data.text_prefix_tokens=4", "train.batch_size=2", "train.grad_accum=1",
             "train.epochs=1", "train.max_steps=2", "train.lr=1e-3", "train.save_every=-1", "train.warmup_epochs=0"]


@pytest.fixture()
def text_files(tmp_path):
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    retain.write_text(json.dumps({"text": "Rain is expected in the north tomorrow, with sunny spells later."}) + "\n")
    return forget, retain


def test_pmc_on_a_text_forget_set(tmp_path, text_files, tokenizer):
    from pmc_unlearn.formatting import chunk_spans

    forget, retain = text_files
    out = tmp_path / "pmc"
    assert main(["unlearn", "--method", "pmc", "--model", "tiny-random", "--forget", str(forget), "--retain", str(retain),
                 "--output", str(out), *FAST_TEXT, "pmc.n_samples=2", "pmc.max_new_tokens=5"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    # each article cut into chunks of 12 tokens (SmolLM2 adds no BOS): the questions are the chunks
    n_chunks = sum(len(chunk_spans(len(tokenizer(t, add_special_tokens=False).input_ids), 12)) for t in TEXTS)
    assert man["status"] == "completed" and man["plan"]["forget_questions"] == n_chunks >= 4
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {s["index"] for s in samples} <= set(range(n_chunks))
    assert all(s["tokens"] <= 5 for s in samples)  # continuations of the 4-token prefixes
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert "train/collapse_nll" in log[-1] and "train/retain_nll" in log[-1]


def test_npo_on_a_text_forget_set(tmp_path, text_files):
    forget, retain = text_files
    out = tmp_path / "npo"
    assert main(["unlearn", "--method", "npo", "--model", "tiny-random", "--forget", str(forget), "--retain", str(retain),
                 "--output", str(out), *FAST_TEXT]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["train/loss"] == log[-1]["train/loss"]  # finite
    # the dry run counts chunks too
    assert main(["unlearn", "--method", "npo", "--model", "tiny-random", "--forget", "muse-news:forget",
                 "--retain", "muse-news:retain", "--dry-run", "data.max_forget=1", "data.max_length=64"]) == 0


def test_eval_muse_news_end_to_end(tmp_path, eval_cache, capsys):  # noqa: F811
    out = tmp_path / "e"
    base = ["eval", "--benchmark", "muse-news", "--model", "tiny-random", "--max-examples", "2", "--no-progress"]
    # PrivLeak needs the retain model: refused without a choice, nothing written
    assert main([*base, "--output", str(out)]) == 2
    assert not out.exists()
    assert main([*base, "--output", str(out), "--forget-split", "forget01", "--no-forget-quality"]) == 2  # a TOFU flag
    assert main([*base, "--output", str(out), "--no-forget-quality"]) == 0
    s = json.loads((out / "summary.json").read_text())
    for k in ("verbmem_forget", "knowmem_forget", "knowmem_retain"):
        assert 0.0 <= s[k] <= 100.0 and len(s[f"{k}_ci"]) == 2 and s[f"{k}_ci"][0] <= s[k] <= s[f"{k}_ci"][1], k
    assert s["privleak"] is None and s["privleak_ci"] is None and s["privleak_note"]
    assert 0.0 <= s["privleak_min_k_auc"] <= 1.0
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    by = {}
    for r in recs:
        by.setdefault(r["split"], []).append(r)
    assert {k: len(v) for k, v in by.items()} == {"verbmem": 2, "knowmem_forget": 2, "knowmem_retain": 2,
                                                  "privleak_forget": 2, "privleak_holdout": 2}
    assert all(r["max_new_tokens"] == 128 for r in by["verbmem"]) and all(r["max_new_tokens"] == 32 for r in by["knowmem_forget"])
    assert by["knowmem_forget"][0]["question"].startswith("Question: ") and "\n" not in by["knowmem_forget"][0]["generation"]
    assert all("mia_min_k" in r and "generation" not in r for r in by["privleak_holdout"])
    # the retain model's records give PrivLeak; the same model as its own reference: 0
    out2 = tmp_path / "e2"
    assert main([*base, "--output", str(out2), "--retain-records", str(out)]) == 0
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s2["privleak"] == pytest.approx(0.0) and s2["verbmem_forget"] == pytest.approx(s["verbmem_forget"])
    assert "privleak=0" in capsys.readouterr().out
    # TOFU stays the default and still needs its split
    assert main(["eval", "--model", "tiny-random", "--output", str(tmp_path / "t"), "--no-forget-quality"]) == 2


def test_muse_demo_on_tiny_random(tmp_path, eval_cache):  # noqa: F811
    from pmc_unlearn import demo as D

    p = D.load_profile("muse-quick")
    assert p["benchmark"] == "muse-news" and set(p["unlearn"]) == {"pmc", "npo"}
    buf = io.StringIO()
    info = D.run_demo("muse-test", tmp_path / "demo", progress=False, stream=buf)
    done = {s["name"]: s["status"] for s in info["stages"]}
    assert done == {n: "done" for n in ("finetune/target", "finetune/retain", "unlearn/pmc", "unlearn/npo",
                                        "eval/retain", "eval/target", "eval/base", "eval/pmc", "eval/npo")}
    assert info["data"]["benchmark"] == "muse-news" and len(info["data"]["forget_articles"]) == 2
    s = json.loads((tmp_path / "demo" / "eval" / "pmc" / "summary.json").read_text())
    assert s["privleak"] is not None and s["forget_texts"].endswith("forget.jsonl")
    assert json.loads((tmp_path / "demo" / "eval" / "retain" / "summary.json").read_text())["privleak"] == 0.0
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "## MUSE-News" in md and "KnowMem forget" in md
    # a MUSE-only report leaves out the TOFU columns and the TOFU trade-off plot instead of showing dashes
    head = md.split("## Headline", 1)[1].split("\n## ", 1)[0]
    assert "Unlearn quality" not in head.split("|", 1)[1] and "## Trade-off" not in md


def test_text_scores_match_one_forward_pass_and_ignore_batching(tiny):
    import torch

    from pmc_unlearn.evaluation.scoring import text_scores
    from pmc_unlearn.evaluation.scores import min_k_score

    tok, model = tiny.tokenizer, tiny.model
    a = text_scores(model, tok, TEXTS + ["Short one."], max_length=16, batch_size=1)
    b = text_scores(model, tok, TEXTS + ["Short one."], max_length=16, batch_size=8)
    for x, y in zip(a, b):
        assert x["nll"] == pytest.approx(y["nll"], abs=1e-5) and x["mia_min_k"] == pytest.approx(y["mia_min_k"], abs=1e-5)
    # by hand for the first text: tokens cut to 16, one forward pass, log p of tokens 1..15
    ids = tok(TEXTS[0], add_special_tokens=False).input_ids[:16]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    tok_lp = lp[torch.arange(15), torch.tensor(ids[1:])]
    assert a[0]["n_tokens"] == 15 and a[0]["truncated"]
    assert a[0]["nll"] == pytest.approx(float(-tok_lp.mean()), abs=1e-5)
    assert a[0]["mia_min_k"] == pytest.approx(min_k_score(tok_lp), abs=1e-5)
