"""One PMC epoch: the library's trainer against a straightforward implementation, same seed.

    python bench/pmc_step.py                          # 16 forget01 questions, 1 epoch, 3 reps, + eval
    python bench/pmc_step.py --reps 1 --eval none     # quicker
    python bench/pmc_step.py --start base             # from the untuned model (it rambles: long samples)

Starting point (`--start`): PMC unlearns a model fine-tuned on TOFU (the authors start from one
fine-tuned on all 4000 pairs), so the default `target` is the bundled model fine-tuned here once
on forget01's 40 pairs and retain99's first 40 (4 epochs, lr 2e-4, batch 8, bf16 autocast: about
2 minutes, cached under the library's cache folder, `bench/pmc-step-target-v1`). Its answers are
TOFU-length (about 35 tokens), as in real use. `--start base` runs the untuned bundled model,
which at T=1.25 fills the 128-token limit in most samples: a worst case for dynamic padding and
for dropping finished rows.

Variants (each run in a fresh process, interleaved across repetitions):
- `ours-fast`: `pmc_unlearn.trainer.train` with the fast sampler (`pmc.sample_batch_rows=256`,
  so one micro-batch of 8 questions x n=5 is one decode batch);
- `ours-static`: as `ours-fast`, the fast sampler with `engine="static"` (issue 16);
- `ours-hf`: the same trainer with the `hf` sampler (plain generate), to separate the sampler's
  share of the gain;
- `simple`: written here, the way the authors' code does it: sampling inside the loss with one
  `model.generate(do_sample=True, num_return_sequences=n)` per micro-batch (left-padded), ROUGE-L
  argmin selection with the
  same memory, forget and retain batches padded to 200 tokens, the same AdamW, schedule,
  clipping and bf16 autocast.
Same config for all: smollm2-135m, the first `--questions` of tofu:forget01, retain99,
micro-batch 8, grad_accum 1, n=5, T=1.25, top_p=0.95, top_k=50, max_new_tokens=128, lr 5e-5
without warm-up (one epoch), seed 0. The trainer runs with `train.save_every=-1` (no checkpoint:
`simple` writes none either); its wall time includes saving the final model (about 1 s, listed
in the phases); `simple` keeps its model in memory.

Quality at the end (`--eval suite`): `pmc_unlearn.evaluation.evaluate` on forget01 with
`--eval-examples` rows per split and greedy answers of up to `--eval-tokens` tokens (no forget
quality: it needs a retain model's records); `--eval rouge`: forget ROUGE-L recall of greedy
answers against the references only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

OVERRIDES = ["data.forget=tofu:forget01", "data.retain=tofu:retain99", "train.batch_size=8", "train.grad_accum=1",
             "train.epochs=1", "train.warmup_epochs=0", "train.bf16=true", "train.seed=0", "pmc.n_samples=5",
             "pmc.temperature=1.25", "pmc.top_p=0.95", "pmc.top_k=50", "pmc.max_new_tokens=128"]


TARGET_VERSION = "pmc-step-target-v1"
TARGET_TRAIN = ["train.epochs=4", "train.lr=2e-4", "train.batch_size=8", "train.grad_accum=1", "train.warmup_epochs=0.5",
                "train.bf16=true", "train.seed=0", "train.save_every=-1"]


def target_dir() -> Path:
    from pmc_unlearn.models import cache_root

    return cache_root() / "bench" / TARGET_VERSION


def build_target(spec: dict) -> dict:
    """Fine-tune the bundled model on forget01 + 40 retain99 pairs (the starting point PMC unlearns)."""
    import pmc_unlearn.trainer as T
    from pmc_unlearn.config import load_config
    from pmc_unlearn.data import load_qa

    out = target_dir()
    rows = load_qa("tofu:forget01", require_answers=True, role="forget") + \
        load_qa("tofu:retain99", require_answers=True, role="retain")[:40]
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))
    cfg = load_config(None, [f"model.name={spec['base_model']}", f"sft.data={data}"] + TARGET_TRAIN, method="sft")
    t0 = time.perf_counter()
    T.train(cfg, work / "run")
    (work / "run" / "model" / "bench-target.json").write_text(json.dumps({"rows": len(rows), "train": TARGET_TRAIN}))
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return {"wall_s": time.perf_counter() - t0}


def _config(spec: dict, extra: list[str]):
    from pmc_unlearn.config import load_config

    return load_config(None, OVERRIDES + [f"model.name={spec['model']}", f"data.max_forget={spec['questions']}",
                                          f"pmc.max_new_tokens={spec['max_new_tokens']}"] + extra, method="pmc")


def run_ours(spec: dict, out: Path) -> dict:
    import pmc_unlearn.trainer as T
    from pmc_unlearn.models import load_tokenizer
    from pmc_unlearn.precision import resolve_bf16
    from pmc_unlearn.sampling import SAMPLERS

    fast = spec["variant"] in ("ours-fast", "ours-static")
    extra = ["train.save_every=-1"] + (["pmc.sample_batch_rows=256"] if fast else [])
    cfg = _config(spec, extra)
    backend = "fast" if fast else "hf"
    cfg.train.sampler = backend
    spent = {"sampling": 0.0}

    class Timed(SAMPLERS[backend]):  # time the sampler's calls (references and samples)
        def __init__(self, *a, **kw):
            if spec["variant"] == "ours-static":
                kw["engine"] = "static"  # the static decode engine (pmc_unlearn/sampling/static.py)
            super().__init__(*a, **kw)

        def sample(self, *a, **kw):
            t = time.perf_counter()
            try:
                return super().sample(*a, **kw)
            finally:
                spent["sampling"] += time.perf_counter() - t

    # the sampler PMC would build (train.sampler, pmc.sample_batch_rows, the run's bf16 on this CPU), timed
    sampler = Timed(load_tokenizer(spec["model"]), batch_rows=cfg.method_cfg.sample_batch_rows,
                    bf16=resolve_bf16(cfg.train.bf16, "cpu").bf16)
    logs: list[dict] = []
    t0 = time.perf_counter()
    manifest = T.train(cfg, out / "run", sampler=sampler, callbacks=[logs.append])
    wall = time.perf_counter() - t0
    from pmc_unlearn.models import load_model

    lm = load_model(str(out / "run" / "model"))
    phases = {k: round(v, 1) for k, v in (manifest.get("phases_s") or {}).items()}
    phases["sampling (incl. references)"] = round(spent["sampling"], 1)
    return {"wall_s": wall, "phases": phases, "final_score_mean": logs[-1].get("sample/score_mean"),
            "unresolved": logs[-1].get("sample/unresolved"), "model": lm,
            "references": None}


def run_simple(spec: dict) -> dict:
    """The straightforward path, self-contained (uses the library only for data, prompts and the model)."""
    import numpy as np
    import torch

    from pmc_unlearn.data import load_qa
    from pmc_unlearn.formatting import IGNORE, PromptFormat, answer_ids, prompt_ids
    from pmc_unlearn.methods.base import derive_seed
    from pmc_unlearn.models import load_model
    from pmc_unlearn.precision import resolve_dtype
    from pmc_unlearn.rewards import pmc_scores
    from pmc_unlearn.trainer import param_groups, shard_indices

    cfg = _config(spec, [])
    p = cfg.method_cfg
    t0 = time.perf_counter()
    torch.manual_seed(0)
    weights = resolve_dtype(cfg.model.dtype, "cpu", "model.dtype", training=True)  # auto: float32 master weights
    lm = load_model(cfg.model.name, weights.dtype, seed=0)
    model, tok = lm.model, lm.tokenizer
    fmt = PromptFormat(max_length=200)
    forget = load_qa("tofu:forget01", require_answers=False, role="forget")[: spec["questions"]]
    retain = load_qa("tofu:retain99", require_answers=True, role="retain")
    prompts = [prompt_ids(tok, r["question"], fmt) for r in forget]
    pad, eos = tok.pad_token_id, tok.eos_token_id
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def left_pad(ps):
        T = max(map(len, ps))
        ids = torch.full((len(ps), T), pad)
        m = torch.zeros((len(ps), T), dtype=torch.long)
        for i, q in enumerate(ps):
            ids[i, T - len(q):] = torch.tensor(q)
            m[i, T - len(q):] = 1
        return ids, m

    def answers(out, plen):
        res = []
        for row in out[:, plen:].tolist():
            ids = row[: row.index(eos) + 1] if eos in row else row
            res.append((ids, tok.decode([t for t in ids if t != eos], skip_special_tokens=True).strip()))
        return res

    def limit(i):
        return max(1, min(p.max_new_tokens, 200 - len(prompts[i])))

    # references: greedy answers before any update (one left-padded generate over all questions;
    # the new-token limit is the smallest question's room, as one generate call has one limit)
    model.eval()
    t_ref = time.perf_counter()
    with torch.no_grad(), autocast:
        x, m = left_pad(prompts)
        out = model.generate(x, attention_mask=m, do_sample=False, max_new_tokens=min(map(limit, range(len(prompts)))),
                             pad_token_id=pad)
    refs = [a[1] for a in answers(out, x.shape[1])]
    t_ref = time.perf_counter() - t_ref
    t_setup = time.perf_counter() - t0

    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)
    memory: dict[int, tuple[list[int], float]] = {}
    shard = shard_indices(len(prompts), 0, 0, 1, 0)
    bs = cfg.train.batch_size
    steps = (len(shard) + bs - 1) // bs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    t_sample = 0.0

    def padded_batch(pairs):  # prompt + answer right-padded to 200, labels on the answer only
        ids = torch.full((len(pairs), 200), pad)
        att = torch.zeros((len(pairs), 200), dtype=torch.long)
        lab = torch.full((len(pairs), 200), IGNORE)
        for r, (q, a) in enumerate(pairs):
            a = a[: 200 - len(q)]
            ids[r, : len(q) + len(a)] = torch.tensor(q + a)
            att[r, : len(q) + len(a)] = 1
            lab[r, len(q): len(q) + len(a)] = torch.tensor(a)
        return ids, att, lab

    def nll(logits, labels):
        lg, tg = logits[:, :-1].float(), labels[:, 1:]
        return torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=IGNORE)

    for j in range(steps):
        idx = shard[j * bs: (j + 1) * bs]
        # --- inside the loss: sample n answers per unresolved question with plain generate
        ts = time.perf_counter()
        todo = [i for i in idx if i not in memory or memory[i][1] > 0]
        model.eval()
        if todo:
            x, m = left_pad([prompts[i] for i in todo])
            with torch.no_grad(), autocast, torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(0, "simple", j))
                out = model.generate(x, attention_mask=m, do_sample=True, temperature=p.temperature, top_p=p.top_p,
                                     top_k=p.top_k, num_return_sequences=p.n_samples,
                                     max_new_tokens=min(limit(i) for i in todo), pad_token_id=pad)
            cands = answers(out, x.shape[1])
            for q, i in enumerate(todo):
                mine = cands[q * p.n_samples: (q + 1) * p.n_samples]
                scores = pmc_scores(refs[i], [c[1] for c in mine])
                k = int(np.argmin(scores))
                if i not in memory or scores[k] <= memory[i][1]:
                    memory[i] = (mine[k][0], scores[k])
        t_sample += time.perf_counter() - ts
        model.train()
        rng = np.random.default_rng(derive_seed(0, "retain", 0, j, 0))
        ridx = rng.integers(0, len(retain), len(idx)).tolist()
        f_ids, f_att, f_lab = padded_batch([(prompts[i], memory[i][0]) for i in idx])
        r_ids, r_att, r_lab = padded_batch([(prompt_ids(tok, retain[r]["question"], fmt),
                                             answer_ids(tok, retain[r]["answer"], fmt)) for r in ridx])
        with autocast:
            loss = nll(model(input_ids=f_ids, attention_mask=f_att).logits, f_lab) + \
                p.retain_weight * nll(model(input_ids=r_ids, attention_mask=r_att).logits, r_lab)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "phases": {"setup (load + references)": round(t_setup, 1), "sampling": round(t_sample, 1),
                                       "sampling (incl. references)": round(t_sample + t_ref, 1)},
            "final_score_mean": float(np.mean([memory[i][1] for i in shard])),
            "unresolved": float(sum(memory.get(i, (None, 1))[1] > 0 for i in range(len(prompts)))),
            "model": lm, "references": refs}


def quality(lm, spec: dict) -> dict:
    import torch

    if spec["eval"] == "none":
        return {}
    t0 = time.perf_counter()
    if spec["eval"] == "suite":
        from pmc_unlearn.evaluation import evaluate

        s = evaluate(lm, "forget01", None, require_forget_quality=False, max_examples=spec["eval_examples"],
                     max_new_tokens=spec["eval_tokens"], use_cache=False, progress=False, batch_size=16)
        return {"unlearn_quality": s.get("unlearn_quality"), "utility": s.get("utility"),
                "model_utility": s.get("model_utility"), "forget_rougeL": s.get("forget_rougeL_recall"),
                "eval_s": time.perf_counter() - t0}
    from pmc_unlearn.data import load_qa
    from pmc_unlearn.evaluation import generate_greedy, rouge_recall

    rows = load_qa("tofu:forget01", require_answers=True, role="forget")[: spec["questions"]]
    with torch.no_grad():
        gens = generate_greedy(lm.model, lm.tokenizer, [r["question"] for r in rows], max_new_tokens=spec["eval_tokens"])
    rec = [rouge_recall(r["answer"], g.text)["rougeL_recall"] for r, g in zip(rows, gens)]
    return {"forget_rougeL_vs_dataset": sum(rec) / len(rec), "eval_s": time.perf_counter() - t0}


def child(spec: dict) -> None:
    import torch

    torch.manual_seed(0)
    if spec["variant"] == "build-target":
        return C.emit(build_target(spec))
    with tempfile.TemporaryDirectory(prefix="pmc-bench-") as tmp:
        c0 = time.process_time()
        r = run_simple(spec) if spec["variant"] == "simple" else run_ours(spec, Path(tmp))
        cpu = time.process_time() - c0
        lm = r.pop("model")
        r.pop("references")
        r["cpu_s"] = cpu
        r["peak_rss_mb"] = C.peak_rss_mb()
        r.update(quality(lm, spec))
    C.emit(r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--start", default="target", choices=("target", "base"),
                    help="target: the bundled model fine-tuned on TOFU here (built once, cached); base: untuned")
    ap.add_argument("--model", default="smollm2-135m", help="the bundled model (or another) the target is built from")
    ap.add_argument("--variants", default="simple,ours-hf,ours-fast")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--eval", default="suite", choices=("suite", "rouge", "none"))
    ap.add_argument("--eval-examples", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=64)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))
    variants = a.variants.split(",")
    model = a.model
    if a.start == "target":
        model = str(target_dir() / "run" / "model")
        if not (Path(model) / "bench-target.json").exists():
            print(f"# building the fine-tuned starting point once: {target_dir()} (about 2 minutes)", flush=True)
            r = C.run_child("pmc_step.py", {"variant": "build-target", "base_model": a.model}, timeout=7200)
            print(f"# built in {r['wall_s']:.0f} s", flush=True)
    info = C.machine()
    load0 = C.loadavg()
    print(f"# machine: {info}\n# start: {a.start} ({model})\n# load before: {load0}", flush=True)
    res: dict[str, list] = {v: [] for v in variants}
    for rep in range(a.reps):
        for v in variants[rep % len(variants):] + variants[: rep % len(variants)]:
            spec = {"variant": v, "model": model, "questions": a.questions, "max_new_tokens": a.max_new_tokens, "eval": a.eval if rep == 0 else "none",
                    "eval_examples": a.eval_examples, "eval_tokens": a.eval_tokens}
            r = C.run_child("pmc_step.py", spec, timeout=7200)
            res[v].append(r)
            print(f"rep {rep} {v:10s} {r['wall_s']:7.1f} s  phases {r['phases']}  cpu/wall {r['cpu_s'] / r['wall_s']:.2f}  "
                  f"peak {r['peak_rss_mb']:.0f} MB  load {C.loadavg()}", flush=True)
    load1 = C.loadavg()
    base = variants[0]
    rows = []
    for v in variants:
        rs = res[v]
        q = rs[0]
        rows.append([v, C.median(r["wall_s"] for r in rs), C.speedup(rs, res[base], "wall_s"),
                     C.median(r["peak_rss_mb"] for r in rs), C.median(r["cpu_s"] / r["wall_s"] for r in rs),
                     q.get("final_score_mean"), q.get("unresolved"),
                     q.get("unlearn_quality", q.get("forget_rougeL_vs_dataset", "-")), q.get("utility", "-")])
    print(f"\nOne PMC epoch from {a.start} ({model}), {a.questions} tofu:forget01 questions (micro-batch 8, n=5, max_new_tokens={a.max_new_tokens}, "
          "bf16 autocast), "
          f"{a.reps} interleaved reps, medians; quality from rep 0 ({a.eval}); load avg before {load0}, after {load1}\n")
    qname = "unlearn quality" if a.eval == "suite" else "forget ROUGE-L (vs dataset)"
    print(C.table(["variant", "wall s", f"speed vs {base}", "peak RSS MB", "cpu/wall", "score mean after",
                   "unresolved after", qname, "utility"], rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "machine": info, "load_before": load0, "load_after": load1,
                                            "runs": res}, indent=1, default=str))


if __name__ == "__main__":
    main()
