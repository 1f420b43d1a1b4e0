"""The one training loop, shared by every method (PMC, the baselines, plain fine-tuning).

Built on `accelerate`: the same code runs on one CPU, one GPU, or several processes (DDP, FSDP,
DeepSpeed) configured by an accelerate config file and `accelerate launch`, with no change here.

What the loop owns (methods never do these):
- data order: epoch e visits the primary set in a permutation seeded by (seed, e); with W
  processes the permutation is dealt into W equal shards (padded by wrapping), so every process
  runs the same number of micro-batches and collective calls stay aligned;
- one random retain pair per primary question, drawn from a generator seeded by (seed, e, j, rank);
- gradient accumulation (optimizer steps never straddle an epoch, except with
  train.step_count=authors), AdamW, linear warm-up then
  linear decay, gradient clipping, bf16 autocast;
- logging (log.jsonl, one line per optimizer step), checkpoints (atomic), resume, NaN guard.

Because every random choice is derived from keys (seed, epoch, micro-batch, ...), a run resumed
from a checkpoint takes exactly the path the uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pmc_unlearn import rundir
from pmc_unlearn.config import RunConfig, dump_config
from pmc_unlearn.cpu import PeakMemory, adapt_threads
from pmc_unlearn.data import is_text_row, load_qa, overlap_report
from pmc_unlearn.errors import TrainingDiverged, UserError
from pmc_unlearn.formatting import PromptFormat, split_text_rows
from pmc_unlearn.lm import to_device
from pmc_unlearn.methods import METHODS
from pmc_unlearn.methods.base import Method, RunContext, derive_seed
from pmc_unlearn.models import apply_lora, fingerprint, load_model, save_model
from pmc_unlearn.precision import resolve_bf16, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """How many micro-batches and optimizer steps a run takes; a pure function of sizes and config.

    step_count "epochs" (the default): every epoch runs ceil(shard / batch) micro-batches and an
    optimizer step every `grad_accum` of them, the last group of an epoch stepping short (steps
    never straddle an epoch); warm-up = round(warmup_epochs x steps per epoch).
    step_count "authors" (the PMC authors' and TOFU's trainer settings): optimizer steps =
    int(epochs x N) // (batch x accumulation x processes), each of exactly `grad_accum` micro-batches
    taken from the epochs in order (a step may straddle an epoch boundary); warm-up =
    max(1, N // (batch x accumulation x processes)) steps per warm-up epoch. Phi-1.5 on forget10
    (N = 400, 40 epochs, 16 x 4): 250 steps, warm-up 6 (the "epochs" count gives 280 and 7).
    """

    n_primary: int
    world: int
    batch_size: int
    grad_accum: int
    epochs: float
    max_steps: int
    warmup_epochs: float
    step_count: str = "epochs"

    @property
    def shard_len(self) -> int:
        return math.ceil(self.n_primary / self.world)

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.shard_len / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        if self.step_count == "authors":
            return self.n_primary // (self.batch_size * self.grad_accum * self.world)
        return math.ceil(self.micro_per_epoch / self.grad_accum)

    def micro_schedule(self) -> list[tuple[int, int, bool]]:
        """(epoch, micro index in epoch, steps the optimizer after it) for the whole run."""
        if self.step_count == "authors":
            steps = int(self.epochs * self.n_primary) // (self.batch_size * self.grad_accum * self.world)
            if self.max_steps >= 0:
                steps = min(steps, self.max_steps)
            return [(*divmod(m, self.micro_per_epoch), (m + 1) % self.grad_accum == 0)
                    for m in range(steps * self.grad_accum)]
        total_micro = math.ceil(self.epochs * self.micro_per_epoch)
        out, steps = [], 0
        for m in range(total_micro):
            e, j = divmod(m, self.micro_per_epoch)
            last = (j + 1) % self.grad_accum == 0 or j == self.micro_per_epoch - 1 or m == total_micro - 1
            out.append((e, j, last))
            if last:
                steps += 1
                if 0 <= self.max_steps <= steps:
                    break
        return out

    @property
    def total_steps(self) -> int:
        return sum(1 for *_, last in self.micro_schedule() if last)

    @property
    def warmup_steps(self) -> int:
        if self.step_count == "authors":
            return round(self.warmup_epochs * max(1, self.steps_per_epoch)) if self.warmup_epochs > 0 else 0
        return round(self.warmup_epochs * self.steps_per_epoch)


def shard_indices(n: int, seed: int, epoch: int, world: int, rank: int) -> list[int]:
    """This process's share of epoch `epoch`'s permutation (all shards the same length)."""
    perm = np.random.default_rng(derive_seed(seed, "order", epoch)).permutation(n).tolist()
    length = math.ceil(n / world)
    padded = (perm * (1 + (length * world) // max(1, n)))[: length * world]
    return padded[rank::world]


def linear_schedule(warmup: int, total: int, time_used: Callable[[], float] | None = None):
    """LR factor per optimizer step: linear warm-up over `warmup` steps, then linear decay to 0 at `total`.

    With `time_used` (the share of a time budget spent, 0..1: `train.max_time_s` runs), the decay
    follows whichever ends first, the steps or the time, so a run the clock stops still ends
    at a learning rate near 0 (retain_ft matched to a PMC run's time).
    """
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return step / warmup
        left = (total - step) / max(1, total - warmup)
        if time_used is not None:
            left = min(left, 1.0 - time_used())
        return max(0.0, left)

    return f


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and norm weights (the usual transformer recipe)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in n.lower() or n.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def load_data(cfg: RunConfig, method: Method) -> tuple[list[dict], list[dict]]:
    d = cfg.data
    primary = load_qa(cfg.primary_data, d.question_key, d.answer_key, require_answers=method.uses_primary_answers, role="forget",
                      allow_text=True)
    if not method.uses_primary_answers:
        # The privacy promise: methods that need only the questions never hold the answers.
        # (Text rows are cut to their prefixes by `chunk_rows` once the tokenizer is loaded.)
        primary = [r if is_text_row(r) else {"question": r["question"]} for r in primary]
    if d.max_forget:
        primary = primary[: d.max_forget]
    retain: list[dict] = []
    if method.uses_retain:
        retain = load_qa(d.retain, d.question_key, d.answer_key, require_answers=True, role="retain", allow_text=True)
        dup, overlap = overlap_report(primary, retain)
        if dup:
            log.warning("forget set has %d repeated questions (copies beyond a question's first): every copy is a "
                        "question of its own (sampled, scored and trained on separately), so a question given k times "
                        "weighs k times; remove the copies to weigh every question once", dup)
        if overlap:
            log.warning("%d forget questions also appear in the retain set: the retain loss will pull them back", overlap)
    return primary, retain


def model_context(name: str) -> int | None:
    """The model's context length in tokens (max_position_embeddings), None when its config does not say."""
    from transformers import AutoConfig

    from pmc_unlearn.models import SMOLLM2_ALIAS, TINY_ALIAS, resolve_path, smollm2_folder, tiny_random_config

    if name == TINY_ALIAS:
        config = tiny_random_config()
    else:
        try:
            config = AutoConfig.from_pretrained(str(smollm2_folder()) if name == SMOLLM2_ALIAS else resolve_path(name))
        except UserError:
            raise
        except Exception:  # (check_causal_lm reports an unreadable config)
            return None
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_lengths(cfg: RunConfig, primary: list[dict], retain: list[dict]) -> None:
    """data.max_length fits the model's context, and every question leaves room for an answer in it.

    Called before any output exists: a question of thousands of tokens would otherwise run for
    minutes before failing (or be cut silently).
    """
    from pmc_unlearn.formatting import prompt_ids
    from pmc_unlearn.models import load_tokenizer

    limit = cfg.data.max_length
    context = model_context(cfg.model.name)
    if context and limit > context:
        raise UserError(f"data.max_length={limit}: over the context of model {cfg.model.name} ({context} tokens); "
                        f"give at most {context}")
    tok = load_tokenizer(cfg.model.name)
    fmt = PromptFormat(cfg.data.use_chat_template, cfg.data.system_prompt, limit)
    overhead = len(prompt_ids(tok, "x", fmt)) - len(tok("x", add_special_tokens=False)["input_ids"])
    for role, source, all_rows in (("forget", cfg.primary_data, primary), ("retain", cfg.data.retain, retain)):
        # text rows (documents) are cut into chunks that fit data.max_length (chunk_rows): nothing to check
        rows = {i: r for i, r in enumerate(all_rows) if not is_text_row(r)}
        if not rows:
            continue
        lengths = dict(zip(rows, (len(x) for x in tok([r["question"] for r in rows.values()], add_special_tokens=False)["input_ids"])))
        for i, n in lengths.items():
            if n + overhead < limit - 4:  # clearly fits (the exact prompt is built only near the limit)
                continue
            n_prompt = len(prompt_ids(tok, rows[i]["question"], fmt))
            if n_prompt >= limit:
                raise UserError(
                    f"{role} source {source}: row {i}'s question is {n_prompt} tokens as a prompt, leaving no room for "
                    f"an answer within data.max_length={limit}"
                    + (f" (the model's context: {context})" if context else "")
                    + "; shorten the question or raise data.max_length")


def chunk_rows(cfg: RunConfig, method: Method, tokenizer, primary: list[dict], retain: list[dict]):
    """Text rows (plain documents) cut into chunks of data.max_length tokens; QA rows unchanged.

    Methods that never read the forget answers (PMC) keep only each forget chunk's prefix.
    """
    d = cfg.data
    if not any(is_text_row(r) for r in primary + retain):
        return primary, retain
    n_docs = sum(map(is_text_row, primary))
    primary = split_text_rows(tokenizer, primary, d.max_length, d.text_prefix_tokens,
                              prefix_only=not method.uses_primary_answers)
    retain = split_text_rows(tokenizer, retain, d.max_length, d.text_prefix_tokens)
    if n_docs:
        log.info("forget texts: %d documents -> %d chunks of at most %d tokens (prefix %d tokens)",
                 n_docs, len(primary), d.max_length, d.text_prefix_tokens)
    if not primary:
        raise UserError(f"forget source {cfg.primary_data}: no text chunk of at least 2 tokens; check the data")
    return primary, retain


def make_accelerator():
    from accelerate import Accelerator

    # Without a GPU, tell accelerate so: it only sets up multi-process CPU training (gloo) when
    # asked to use the CPU. With a GPU, the accelerate config / launcher decides.
    # More processes than GPUs (e.g. two gloo processes on a one-GPU machine) also run on the CPU:
    # rank 1 would otherwise ask for a device that does not exist.
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has_gpu = n_gpu > 0 or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if n_gpu and world > n_gpu:
        log.warning("%d processes but %d GPU(s): every process runs on the CPU", world, n_gpu)
        has_gpu = False
    return Accelerator(cpu=not has_gpu)


def train(cfg: RunConfig, out: Path, resume: bool = False, command: list[str] | None = None,
          check_output: bool = False, *, sampler=None,
          callbacks: Sequence[Callable[[dict[str, Any]], None]] = ()) -> dict[str, Any]:
    """Run `cfg.method` on the shared loop, writing everything into `out`. Returns the final manifest.

    The main process holds `out/.lock` while it writes (a second run into `out` is refused);
    with `check_output`, `rundir.prepare_output` is checked again once the lock is held. A run
    that stops on an error leaves manifest.json saying so (failed, diverged, interrupted).
    `sampler`: a sampler object (`sampling.Sampler`) for methods that sample, instead of the one
    they build from train.sampler (benchmarks time or replace it). `callbacks`: called on the
    main process with each optimizer step's log row (the dict log.jsonl gets, every step).
    """
    acc = make_accelerator()
    main = acc.is_main_process
    method: Method = METHODS[cfg.method](cfg.method_cfg)
    primary, retain = load_data(cfg, method)  # validates data before anything is written
    plan = Plan(len(primary), acc.num_processes, cfg.train.batch_size, cfg.train.grad_accum,
                cfg.train.epochs, cfg.train.max_steps, cfg.train.warmup_epochs)
    if plan.total_steps == 0:
        raise UserError("the run has no optimizer steps: raise train.epochs or train.max_steps")
    check_lengths(cfg, primary, retain)
    if main:
        rundir.check_writable(out, "--resume" if resume else "--output")
        rundir.make_folder(out)
    lock = rundir.OutputLock(out, "--resume" if resume else "--output") if main else None
    if lock:
        lock.acquire()
    manifest = None
    try:
        if main and check_output:
            rundir.prepare_output(out, resume)
        if main:
            try:
                dump_config(cfg, out / "config.yaml")
            except OSError as e:
                raise rundir.write_failed(e, out) from None
        acc.wait_for_everyone()
        manifest = rundir.Manifest.start(out / "manifest.json", cfg.train.seed, command or rundir.command_line(),
                                         {"method": cfg.method, "processes": acc.num_processes}) if main else None
        return _train(cfg, out, resume, acc, method, primary, retain, plan, manifest, sampler, callbacks)
    except TrainingDiverged as e:
        if manifest and manifest.running:
            manifest.fail("diverged", str(e))
        raise
    except OSError as e:
        if e.errno not in rundir.WRITE_ERRNOS:
            if manifest and manifest.running:
                manifest.fail("failed", f"{type(e).__name__}: {e}")
            raise
        err = rundir.write_failed(e, out, "the checkpoints written before are intact")
        if manifest and manifest.running:
            manifest.fail("failed", str(err))
        raise err from None
    except BaseException as e:
        if manifest and manifest.running:
            interrupted = isinstance(e, KeyboardInterrupt)
            manifest.fail("interrupted" if interrupted else "failed",
                          "interrupted" if interrupted else f"{type(e).__name__}: {e}")
        raise
    finally:
        if lock:
            lock.release()


def _train(cfg: RunConfig, out: Path, resume: bool, acc, method: Method, primary: list[dict], retain: list[dict],
           plan: Plan, manifest: rundir.Manifest | None, sampler, callbacks) -> dict[str, Any]:
    main = acc.is_main_process
    timer = manifest.phase if manifest else (lambda name: contextlib.nullcontext())

    compute = resolve_bf16(cfg.train.bf16, acc.device, "train.bf16")
    weights = resolve_dtype(cfg.model.dtype, acc.device, "model.dtype", training=True)
    use_bf16 = compute.bf16 and acc.device.type in ("cpu", "cuda")
    if manifest:
        manifest.data["precision"] = {"compute": compute.as_dict(), "weights": weights.as_dict(),
                                      "device": str(acc.device)}
    if main:
        log.info("precision: %s compute (%s), %s weights", "bf16" if use_bf16 else "fp32", compute.reason, weights.dtype)
    with timer("load_model"):
        lm = load_model(cfg.model.name, weights.dtype, seed=cfg.train.seed)
        model, tok = lm.model, lm.tokenizer
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        if cfg.model.lora:
            targets = cfg.model.lora_target_modules
            model = apply_lora(model, cfg.model.lora_r, cfg.model.lora_alpha, cfg.model.lora_dropout,
                               targets if targets == "all-linear" else [t.strip() for t in targets.split(",")])
        model.train()

    primary, retain = chunk_rows(cfg, method, tok, primary, retain)
    plan = Plan(len(primary), acc.num_processes, cfg.train.batch_size, cfg.train.grad_accum,
                cfg.train.epochs, cfg.train.max_steps, cfg.train.warmup_epochs, cfg.train.step_count)
    schedule = plan.micro_schedule()
    total = plan.total_steps
    method.configure_model(model)  # e.g. RMU freezes weights: before AdamW and DDP see them
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                            **({"fused": True} if _fused_adamw_ok(model, acc.device) else {}))
    # Training time for the time limit: wall time in the loop less checkpoint writing (a resumed
    # run counts its earlier time). The limit is the method's (`time_limit`, train.max_time_s by
    # default), known once it is set up; the schedule reads it when called.
    clock: dict[str, float] = {"limit": 0.0}

    def train_seconds() -> float:
        return time.perf_counter() - clock["start"] - clock["ckpt"] if "start" in clock else 0.0

    def time_used() -> float:
        return train_seconds() / clock["limit"] if clock["limit"] else 0.0

    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(plan.warmup_steps, total, time_used))
    model, opt = acc.prepare(model, opt)

    fmt = PromptFormat(cfg.data.use_chat_template, cfg.data.system_prompt, cfg.data.max_length)
    samples_log = rundir.JsonlWriter(out / "samples.jsonl", enabled=main)
    step_log = rundir.JsonlWriter(out / "log.jsonl", enabled=main)
    ctx = RunContext(cfg, model, tok, fmt, primary, retain, acc, sampler, write_samples=samples_log.write,
                     bf16=use_bf16, weights_dtype=weights.dtype)

    step, micro_done = 0, 0
    if resume:
        found = rundir.load_resume_checkpoint(out, set_aside=main)  # verified, finite; damaged newer ones set aside
        if found:
            ck_path, tensors, state = found
            missing = set(trainable_state(acc.unwrap_model(model))) - set(tensors["model"])
            if missing:
                raise UserError(f"--resume {out}: checkpoint does not match the model ({len(missing)} weights missing)")
            with torch.no_grad():
                for n, p in trainable_state(acc.unwrap_model(model)).items():
                    p.copy_(tensors["model"][n])
            try:
                opt.load_state_dict(tensors["optimizer"])
                sched.load_state_dict(tensors["scheduler"])
                _set_rng_state(tensors["rng"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise UserError(f"--resume {out}: checkpoint {ck_path.name} does not fit this run "
                                f"({type(e).__name__}: {e})") from None
            method.load_state_dict(state["method"])
            step, micro_done = state["step"], state["micro_done"]
            log.info("resumed from %s (step %d of %d)", ck_path.name, step, total)
            if manifest:
                manifest.data["resumes"] += 1
        else:
            log.info("--resume: no checkpoint yet, starting from the beginning")
        step_log.truncate_after("step", step)
        samples_log.truncate_after("step", step - 1 if step else -1)

    with timer("setup"):
        method.setup(ctx)
    max_time_s = clock["limit"] = method.time_limit(ctx)
    if manifest:
        manifest.data.update({"plan": {"forget_questions": len(primary), "retain_pairs": len(retain),
                                        "micro_batches": len(schedule), "optimizer_steps": total,
                                        "steps_per_epoch": plan.steps_per_epoch, "warmup_steps": plan.warmup_steps},
                              "method_info": method.manifest_info()})
        manifest.save()

    epoch, j = -1, -1  # (where the loop is; set by it)

    def diverged(what: str) -> TrainingDiverged:
        """Record the divergence and name the newest checkpoint (written only with finite weights)."""
        bar.close()
        if manifest:
            manifest.finish("diverged", error=what)
        kept = rundir.checkpoint_dirs(out)
        where = f" (epoch {epoch}, micro-batch {j})" if epoch >= 0 else ""
        return TrainingDiverged(
            f"{what}{where}; "
            f"{'last good checkpoint (finite weights): ' + str(kept[-1]) if kept else 'no checkpoint was written yet'}; "
            "lower train.lr or check the data"
        )

    def weights_ok() -> None:
        if not rundir.all_finite([p for p in model.parameters() if p.requires_grad]):
            raise diverged(f"weights are non-finite after optimizer step {step}")

    def checkpoint() -> None:
        weights_ok()
        if main:
            rundir.save_checkpoint(
                out, step,
                {"model": trainable_state(acc.unwrap_model(model)), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "rng": _rng_state()},
                {"step": step, "micro_done": micro_done, "method": method.state_dict()},
                cfg.train.keep_checkpoints,
            )
        acc.wait_for_everyone()

    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc=f"{cfg.method} steps", disable=not main, dynamic_ncols=True)
    group: list[dict[str, float]] = []
    group_len = 0
    t_step = time.perf_counter()
    tokens = samples = 0
    cur_epoch = -1
    shard: list[int] = []
    autocast = torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    done_s = manifest.data["phases_s"] if manifest else {}
    clock["start"] = time.perf_counter() - done_s.get("train", 0.0)
    clock["ckpt"] = done_s.get("train/checkpoint", 0.0)
    stopped_early = False
    peak = PeakMemory()  # the run's peak memory, for cost tables (manifest: peak_rss_mb, peak_cuda_mb)
    with timer("train"), _close_on_error(bar), peak:
        for m, (epoch, j, last) in enumerate(schedule):
            if m < micro_done:
                continue
            if max_time_s and group_len == 0 and train_seconds() >= max_time_s:
                stopped_early = True  # only between optimizer steps, so the saved state is consistent
                break
            if epoch != cur_epoch:
                cur_epoch = epoch
                shard = shard_indices(len(primary), cfg.train.seed, epoch, acc.num_processes, acc.process_index)
                ctx.epoch = epoch
                method.on_epoch_start(ctx, epoch)
            ctx.micro, ctx.step = j, step
            adapt_threads()
            idx = shard[j * plan.batch_size : (j + 1) * plan.batch_size]
            rrng = np.random.default_rng(derive_seed(cfg.train.seed, "retain", epoch, j, acc.process_index))
            ridx = rrng.integers(0, len(retain), len(idx)).tolist() if retain else []
            if group_len == 0:  # size of this accumulation group: up to the next stepping micro-batch
                group_len = next(k for k in range(m, len(schedule)) if schedule[k][2]) - m + 1
            prep = method.prepare(ctx, idx, ridx)
            prep.batch = to_device(prep.batch, acc.device, non_blocking=True)
            sync = contextlib.nullcontext() if last else acc.no_sync(model)
            with sync:
                with autocast:
                    loss, logs = method.loss(ctx, model, prep)
                if not torch.isfinite(loss):
                    raise diverged(f"loss is {float(loss.detach())} at step {step}")
                acc.backward(loss / group_len)
            tokens += prep.tokens
            samples += prep.samples
            group.append({"train/loss": float(loss.detach()), **logs, **prep.stats})
            micro_done = m + 1
            if not last:
                continue
            # Gradients are checked before the step (a non-finite one would poison every weight); the
            # weights before every checkpoint and after the last step (checkpoint(), below), so a
            # checkpoint or a model is only ever written with finite weights. Weights that break
            # between checkpoints show at the next step's loss or gradients.
            # (clip at +inf: the norm without clipping; every gradient is multiplied by exactly 1.)
            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm or math.inf)
            if grad_norm is not None:
                group[-1]["train/grad_norm"] = float(grad_norm)
                if not math.isfinite(float(grad_norm)):
                    opt.zero_grad(set_to_none=True)
                    raise diverged(f"gradient norm is {float(grad_norm)} at step {step + 1} (weights not updated)")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t_step
            per_process = ctx.gather([(merge_stats(group, method.stat_merge), samples)])
            row = merge_stats([r for r, _ in per_process], method.stat_merge)
            row.update({"step": step, "epoch": round(epoch + (j + 1) / plan.micro_per_epoch, 4),
                        "train/lr": sched.get_last_lr()[0], "time/step_s": round(dt, 3),
                        "perf/samples_per_s": sum(n for _, n in per_process) / dt if dt else 0.0,
                        "perf/tokens_per_s": tokens * acc.num_processes / dt if dt else 0.0})
            if step % cfg.train.log_every == 0 or step == total:
                step_log.write(row)
            if main:
                for callback in callbacks:
                    callback(row)
            bar.set_postfix({k.split("/")[-1]: f"{row[k]:.3g}" for k in ("train/loss", *method.progress_stats) if k in row})
            bar.update(1)
            group, group_len, tokens, samples, t_step = [], 0, 0, 0, time.perf_counter()
            end_of_epoch = j == plan.micro_per_epoch - 1
            every = cfg.train.save_every
            if every >= 0 and ((every and step % every == 0) or (not every and end_of_epoch) or step == total):
                t_ck = time.perf_counter()
                with timer("train/checkpoint"):  # inside "train": a sub-phase, not added to wall time
                    checkpoint()
                clock["ckpt"] += time.perf_counter() - t_ck
    bar.close()
    if stopped_early:
        log.info("time limit of %s s reached after %d of %d optimizer steps", max_time_s, step, total)
        if cfg.train.save_every >= 0:
            with timer("checkpoint"):
                checkpoint()

    weights_ok()  # the last step's weights (checked above when it wrote a checkpoint; cheap either way)
    with timer("save"):
        if main:
            save_model(acc.unwrap_model(model), tok, out / "model", prompt_format=fmt)
    fps = ctx.gather([fingerprint(acc.unwrap_model(model))])
    if manifest:
        manifest.finish("completed", steps=step, planned_steps=total, stopped_by_time_limit=stopped_early,
                        model_fingerprint=fps[0], rank_fingerprints=fps, **peak.result())
        return manifest.data
    return {"rank_fingerprints": fps}


@contextlib.contextmanager
def _close_on_error(bar):
    """Close the progress bar when the loop stops on an error, so the error's line starts a line of its own."""
    try:
        yield
    except BaseException:
        bar.close()
        raise


def _fused_adamw_ok(model, device: torch.device) -> bool:
    """torch's fused AdamW (one kernel over all weights: 3x faster steps than the per-weight loop on CPU).

    Same update rule; it needs floating-point weights on CPU or CUDA.
    """
    if device.type not in ("cpu", "cuda"):
        return False
    return all(p.is_floating_point() and p.device.type == device.type for p in model.parameters() if p.requires_grad)


MERGES: dict[str, Callable[[list[float]], float]] = {
    "mean": lambda v: float(np.mean(v)),
    "sum": lambda v: float(sum(v)),
    "min": lambda v: float(min(v)),
    "max": lambda v: float(max(v)),
    "last": lambda v: float(v[-1]),
}


def merge_stats(rows: list[dict[str, float]], rules: dict[str, str]) -> dict[str, float]:
    """Each key over micro-batches (or processes), keys sorted: `rules[key]` (a key of MERGES), else the mean."""
    out: dict[str, float] = {}
    for k in sorted({k for r in rows for k in r}):
        out[k] = MERGES[rules.get(k, "mean")]([r[k] for r in rows if k in r])
    return out
