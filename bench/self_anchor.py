"""Self-distilled retain anchors: a model's own greedy answers to general questions, as retain pairs.

    python bench/self_anchor.py --model demo_out/runs/target/model --questions muse-news:knowmem_retain \
        --retain demo_out/data/retain.jsonl --output anchor/retain_anchor.jsonl

Writes the retain rows of --retain followed by one pair per question of --questions whose answer
is the model's greedy answer (the demo's prompt format: chat template, empty system turn, 40 new
tokens). Used by configs/results/r3-anchor-retain.yaml (docs/results.md: it did not help).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--questions", required=True, help="a data source with questions (e.g. muse-news:knowmem_retain)")
    ap.add_argument("--retain", required=True, help="retain pairs (jsonl) written first")
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmc_unlearn.data import load_rows
    from pmc_unlearn.formatting import PromptFormat, row_prompt_ids
    from pmc_unlearn.sampling import HFSampler

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    fmt = PromptFormat(use_chat_template=True, system_prompt="", max_length=200)
    rows = load_rows(args.questions)
    prompts = [row_prompt_ids(tok, r, fmt) for r in rows]
    answers = HFSampler(tok, batch_rows=50).sample(model, prompts, 1, max_new_tokens=args.max_new_tokens, greedy=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = Path(args.retain).read_text().splitlines()
    lines += [json.dumps({"question": r["question"], "answer": a[0].text.strip()}) for r, a in zip(rows, answers)]
    out.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} rows -> {out}")


if __name__ == "__main__":
    main()
