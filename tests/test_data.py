"""Data sources: bundled TOFU, local files in every format, errors."""

import json

import pytest

from pmc_unlearn.data import TOFU_SPLITS, load_qa, load_rows, overlap_report
from pmc_unlearn.errors import UserError

EXPECTED = {"full": 4000, "retain90": 3600, "retain95": 3800, "retain99": 3960, "forget01": 40, "forget05": 200,
            "forget10": 400, "forget01_perturbed": 40, "retain_perturbed": 400, "real_authors": 100,
            "world_facts": 117, "holdout01": 40, "idontknow": 100}


@pytest.mark.parametrize("split", TOFU_SPLITS)
def test_every_bundled_split_loads(split):
    rows = load_rows(f"tofu:{split}")
    if split in EXPECTED:
        assert len(rows) == EXPECTED[split]
    if split != "idontknow":
        assert "question" in rows[0] and "answer" in rows[0]  # prompt/response renamed


def test_forget_is_tail_of_full():
    full = load_qa("tofu:full")
    f01 = load_qa("tofu:forget01")
    assert [r["question"] for r in full[-40:]] == [r["question"] for r in f01]
    assert load_qa("locuslab/TOFU:forget01")[0] == f01[0]


def test_local_formats(tmp_path):
    rows = [{"q": "a?", "a": "x"}, {"q": "b?", "a": "y"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps(rows[:1]) + "\n" + json.dumps(rows[1:]) + "\n")  # chunked
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("q,a\na?,x\nb?,y\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "c.json", "d.jsonl", "d.csv", "d.parquet"):
        got = load_qa(str(tmp_path / name), question_key="q", answer_key="a")
        assert [(r["question"], r["answer"]) for r in got] == [("a?", "x"), ("b?", "y")], name


def test_questions_only_forget_set(tmp_path):
    (tmp_path / "f.jsonl").write_text('{"question": "who?"}\n')
    assert load_qa(str(tmp_path / "f.jsonl"), require_answers=False) == [{"question": "who?"}]
    with pytest.raises(UserError, match="no column 'answer'"):
        load_qa(str(tmp_path / "f.jsonl"), require_answers=True)


def test_errors(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        load_qa(str(tmp_path / "missing.json"))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_qa(str(tmp_path / "e.jsonl"))
    (tmp_path / "w.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="no column 'question'.*data.question_key"):
        load_qa(str(tmp_path / "w.jsonl"))
    with pytest.raises(UserError, match="unknown TOFU split"):
        load_qa("tofu:forget02")
    with pytest.raises(UserError, match="unknown data format"):
        (tmp_path / "x.txt").write_text("hi")
        load_qa(str(tmp_path / "x.txt"))


def test_overlap_report():
    f = [{"question": "a"}, {"question": "a"}, {"question": "b"}]
    r = [{"question": "b", "answer": "z"}]
    assert overlap_report(f, r) == (1, 1)
