"""The model part of evaluation on the tiny random model: batch-size independence, resuming, caching."""

from __future__ import annotations

import json

import pytest
import torch
from eval_fixtures import eval_cache, tiny  # noqa: F401  (fixtures)

from pmc_unlearn.data import load_rows
from pmc_unlearn.evaluation import records as R
from pmc_unlearn.evaluation import scoring as SC
from pmc_unlearn.evaluation import suite as SU
from pmc_unlearn.formatting import PromptFormat, collate_train, encode_pair
from pmc_unlearn.losses import per_example_nll

# Questions and answers of very different lengths, so batches pad prompts (left, generation)
# and whole sequences (right, NLL) on both sides.
ROWS = load_rows("tofu:forget01_perturbed")[:5]
QUESTIONS = [r["question"] for r in ROWS] + ["Hi?", "Who?", "Name a book by the author born in Kuwait City in 1956, please."]
ANSWERS = [r["answer"] for r in ROWS] + ["No.", "A very long answer " * 6, "Promise by the Seine."]


def test_nll_does_not_depend_on_batch_size(tiny):
    one = SC.answer_scores(tiny.model, tiny.tokenizer, QUESTIONS, ANSWERS, batch_size=1)
    eight = SC.answer_scores(tiny.model, tiny.tokenizer, QUESTIONS, ANSWERS, batch_size=8)
    three = SC.answer_scores(tiny.model, tiny.tokenizer, QUESTIONS, ANSWERS, batch_size=3)
    for a, b, c in zip(one, eight, three):
        for k in ("nll", "mia_min_k", "mia_min_k_plus_plus", "mia_zlib"):
            assert abs(a[k] - b[k]) < 1e-4 and abs(a[k] - c[k]) < 1e-4, k
        assert a["n_tokens"] == b["n_tokens"] and a["em"] == b["em"] and a["es"] == b["es"]
    # answer_nll is the same number
    assert SC.answer_nll(tiny.model, tiny.tokenizer, QUESTIONS[:2], ANSWERS[:2]) == pytest.approx(
        [d["nll"] for d in one[:2]], abs=1e-4)


def test_nll_matches_losses_per_example_nll(tiny):
    # one unpadded example through losses.per_example_nll must give the collector's number
    ex = encode_pair(tiny.tokenizer, QUESTIONS[0], ANSWERS[0], SU.EVAL_FORMAT)
    b = collate_train([ex], tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    ref = per_example_nll(logits, b["labels"]).item()
    got = SC.answer_scores(tiny.model, tiny.tokenizer, QUESTIONS[:1], ANSWERS[:1])[0]
    assert got["nll"] == pytest.approx(ref, abs=1e-5)
    assert got["mia_loss"] == got["nll"]
    assert got["n_tokens"] == len(ex.answer)  # answer tokens only (with the end-of-turn token)


def test_shared_prompt_scores_equal_one_pass_per_answer(tiny):
    # question_scores runs each prompt once for all its answers (KV cache); the numbers must be
    # those of a separate prompt + answer pass per answer, whatever the grouping into passes
    answers = [[a, a[: len(a) // 2] or "x", "Nobody knows."] for a in ANSWERS]
    flat_q = [q for q, al in zip(QUESTIONS, answers) for _ in al]
    flat_a = [a for al in answers for a in al]
    stats = [j == 0 for al in answers for j in range(len(al))]
    ref = SC.answer_scores(tiny.model, tiny.tokenizer, flat_q, flat_a, batch_size=1, with_stats=stats)
    for bs in (1, 5, 64):
        got = [d for ds in SC.question_scores(tiny.model, tiny.tokenizer, QUESTIONS, answers, batch_size=bs) for d in ds]
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            assert set(g) == set(r)
            for k, v in r.items():
                assert g[k] == pytest.approx(v, abs=1e-4), (bs, k)


def test_greedy_generation_equals_generate(tiny):
    # evaluation decodes with the library's own loop; in fp32 its tokens are generate's
    from transformers import GenerationConfig

    from pmc_unlearn.formatting import prompt_ids

    gens = SC.generate_greedy(tiny.model, tiny.tokenizer, QUESTIONS, max_new_tokens=10, batch_size=3)
    eos = tiny.tokenizer.eos_token_id
    for q, g in zip(QUESTIONS, gens):
        ids = torch.tensor([prompt_ids(tiny.tokenizer, q, SU.EVAL_FORMAT)])
        cfg = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id,
                               eos_token_id=eos)
        with torch.no_grad():
            new = tiny.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)[0, ids.shape[1]:].tolist()
        cut = new.index(eos) if eos in new else len(new)
        assert g.n_tokens == cut and g.hit_limit == (eos not in new)
        assert g.text == tiny.tokenizer.decode(new[:cut], skip_special_tokens=True).strip()


def test_greedy_generation_does_not_depend_on_batch_size(tiny):
    one = SC.generate_greedy(tiny.model, tiny.tokenizer, QUESTIONS, max_new_tokens=12, batch_size=1)
    eight = SC.generate_greedy(tiny.model, tiny.tokenizer, QUESTIONS, max_new_tokens=12, batch_size=8)
    assert [g.text for g in one] == [g.text for g in eight]
    assert all(g.n_tokens <= 12 for g in one)
    assert all(g.hit_limit == (g.n_tokens == 12) for g in one)


def test_rouge_recall_definition():
    # target "the cat sat", prediction "the cat": ROUGE-1 recall 2/3, ROUGE-L recall 2/3 (LCS "the cat")
    r = SC.rouge_recall("the cat sat", "the cat")
    assert r["rouge1_recall"] == pytest.approx(2 / 3) and r["rougeL_recall"] == pytest.approx(2 / 3)


def test_rng400_sample_is_drawn_from_the_matching_retain_split():
    # PMC authors: retain split = retain{100 - XX}, default_rng(12345).integers(0, len, 400) with replacement
    assert SU.retain_for("forget01") == "retain99" and SU.retain_for("forget10") == "retain90"
    idx = SU.rng400_indices(3960)
    assert len(idx) == 400 and max(idx) < 3960
    assert idx == SU.rng400_indices(3960)  # deterministic
    specs = {s.name: s for s in SU.tofu_suite("forget01", "rng400", max_examples=3)}
    assert specs["retain_sample"].source == "tofu:retain99#rng12345x400"
    assert [it.extra["source_index"] for it in specs["retain_sample"].items] == idx[:3]
    assert specs["holdout"].source == "tofu:holdout01" and not specs["holdout"].generate


def _small_specs():
    rows = load_rows("tofu:forget01_perturbed")[:6]
    items = [SU.EvalItem(i, r["question"], r["answer"], r["paraphrased_answer"], r["perturbed_answer"][:2])
             for i, r in enumerate(rows)]
    return [SU.SplitSpec("forget", "tofu:forget01_perturbed", items)]


def test_partial_records_resume_without_recomputing(tiny, tmp_path, monkeypatch):
    gen = SU.GenSettings(max_new_tokens=6)
    path = tmp_path / "records.jsonl"
    full = R.collect_records(tiny.model, tiny.tokenizer, _small_specs(), gen=gen, batch_size=4,
                             records_path=path, use_cache=False, progress=False)
    lines = path.read_text().splitlines()
    assert len(lines) == 6
    # a killed run: two finished records and half a line
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][: len(lines[2]) // 2])
    done_idx = {json.loads(x)["index"] for x in lines[:2]}

    computed = []
    real = SC.compute_items

    def counting(model, tok, work, *a, **k):
        computed.extend(it.index for _, it in work)
        return real(model, tok, work, *a, **k)

    monkeypatch.setattr(SC, "compute_items", counting)
    again = R.collect_records(tiny.model, tiny.tokenizer, _small_specs(), gen=gen, batch_size=4,
                              records_path=path, use_cache=False, progress=False)
    assert sorted(computed) == sorted(set(range(6)) - done_idx)  # only the unfinished ones
    for a, b in zip(full, again):
        assert a["index"] == b["index"] and a["generation"] == b["generation"]
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-4)
    # the file is valid again: every line parses, all six examples present
    recs = R.read_records(path)
    assert sorted(r["index"] for r in recs) == list(range(6))


def test_cache_is_keyed_by_weights_and_settings(tiny, tmp_path, monkeypatch):
    specs = _small_specs()[:1]
    specs[0].items = specs[0].items[:2]
    gen = SU.GenSettings(max_new_tokens=4)
    R.collect_records(tiny.model, tiny.tokenizer, specs, gen=gen, batch_size=2, progress=False)
    computed = []
    real = SC.compute_items
    monkeypatch.setattr(SC, "compute_items",
                        lambda m, t, work, *a, **k: computed.extend(work) or real(m, t, work, *a, **k))
    R.collect_records(tiny.model, tiny.tokenizer, specs, gen=gen, batch_size=1, progress=False)
    assert computed == []  # same weights and settings (batch size is not part of the key): all from the cache
    R.collect_records(tiny.model, tiny.tokenizer, specs, gen=SU.GenSettings(max_new_tokens=5), batch_size=2,
                      progress=False)
    assert len(computed) == 2  # another generation limit: another key
    fp = "0" * 16
    k1 = R.split_key(fp, specs[0], gen, SU.EVAL_FORMAT, tiny.tokenizer)
    k2 = R.split_key("1" * 16, specs[0], gen, SU.EVAL_FORMAT, tiny.tokenizer)
    k3 = R.split_key(fp, specs[0], gen, PromptFormat(use_chat_template=False, max_length=512), tiny.tokenizer)
    assert len({k1, k2, k3}) == 3


def test_open_unlearning_token_window_on_a_real_forward_pass(tiny):
    # open-unlearning takes, from one forward pass over prompt + answer with labels -100 off the answer,
    # the labeled positions without the last one ("ignore eos prediction"); the log-prob of each comes
    # from the position before it. Written out here on the raw logits, compared with our records.
    q, a = QUESTIONS[0], ANSWERS[0]
    ex = encode_pair(tiny.tokenizer, q, a, SU.EVAL_FORMAT)
    b = collate_train([ex], tiny.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[0]
    ids, labels = b["input_ids"][0], b["labels"][0]
    logp = torch.log_softmax(logits.float(), -1)[:-1]
    target = logp.gather(1, ids[1:, None]).squeeze(1)
    idx = (labels != -100).nonzero().squeeze(1)[:-1]
    start, end = int(idx[0]), int(idx[-1])
    lp = target[start - 1 : end]
    pred = logp[start - 1 : end].argmax(-1)
    gold = labels[idx]
    n = len(gold)
    assert n == len(ex.answer) - 1  # the closing EOS is the one left out
    em = float((pred == gold).float().mean())
    k = 0
    for k in range(n):  # their loop: the first k whose suffix matches, n - 1 at most
        if torch.equal(pred[k:], gold[k:]):
            break
    es = 1 - k / n
    min_k = float(-torch.sort(lp).values[: max(1, int(n * 0.4))].mean())
    got = SC.answer_scores(tiny.model, tiny.tokenizer, [q], [a], convention="open-unlearning")[0]
    assert got["em"] == pytest.approx(em, abs=1e-9) and got["es"] == pytest.approx(es, abs=1e-9)
    assert got["mia_min_k"] == pytest.approx(min_k, abs=1e-5)
    # and pmc-unlearn uses every answer token, the EOS included
    assert len(got["tok_lp"]) == len(ex.answer) and got["tok_hit"][:-1] == pred.eq(gold).int().tolist()
