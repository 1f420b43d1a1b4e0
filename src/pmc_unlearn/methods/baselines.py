"""Baseline unlearning methods, each a small object on the shared loop (`--method NAME`).

Notation: NLL(y) = token-mean answer NLL; S(y) = summed answer log-prob; ref = frozen copy of the
starting model; "retain" = lambda x NLL of one random retain pair per forget question (the loop
draws them). docs/methods.md gives the sources of every default and the sign conventions.

    ga         -NLL(y_f)
    gd         -NLL(y_f) + retain
    npo        -(2/beta) mean log sigmoid(-beta (S_theta(y_f) - S_ref(y_f))) + retain
    simnpo     w_f x -(2/beta) mean log sigmoid(-beta S_theta(y_f) / |y_f| - gamma) + retain   (no ref)
    idk        NLL(forget question -> random refusal) + retain                          (no forget answers)
    idkdpo     -(2/beta) mean log sigmoid(beta [(S_theta - S_ref)(y_idk) - (S_theta - S_ref)(y_f)]) + retain
    rmu        MSE(h_L(forget), c u) + alpha MSE(h_L(retain), h_L^ref(retain)); only a few MLP weights train
    retain_ft  NLL(retain) only, for the wall time of another run                       (no forget answers)
    scrub      max passes: -KL(ref || theta)(y_f); min passes: alpha KL(ref || theta)(y_r) + gamma NLL(y_r)

The loss formulas are pure tensor functions in `losses` (`npo_loss`, `simnpo_loss`, `dpo_loss`,
`masked_mse`, ...), tested against hand computations; the classes only build batches, score them
(`lm.score_batch`, on the batch the loop has put on the device) and call them.
"""

from __future__ import annotations

import gc
import json
import logging
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from pmc_unlearn.sections import opt
from pmc_unlearn.errors import UserError
from pmc_unlearn.formatting import IGNORE, Example, collate_train, encode_row
from pmc_unlearn.lm import score_batch, to_device
from pmc_unlearn.losses import (
    distill_kl, dpo_loss, masked_mse, mean_nll, npo_loss, scrub_max_loss, scrub_min_loss, scrub_phase, simnpo_loss,
    token_mean_nll,
)
from pmc_unlearn.methods.base import Method, Prepared, RunContext, derive_seed

log = logging.getLogger(__name__)


# ----- shared pieces ------------------------------------------------------------------------------

def _encode(ctx: RunContext, rows: list[dict], answers: list[str] | None = None) -> list[Example]:
    """Training examples of data rows (QA pairs or text chunks, formatting.encode_row); `answers` replace theirs."""
    if answers is None:
        return [encode_row(ctx.tokenizer, r, ctx.fmt) for r in rows]
    return [encode_row(ctx.tokenizer, r, ctx.fmt, answer=a) for r, a in zip(rows, answers)]


def _build(ctx: RunContext, primary: list[Example], retain: list[Example], stats: dict | None = None) -> Prepared:
    """Rows [0, len(primary)) first, retain rows after; one right-padded batch."""
    rows = primary + retain
    out = dict(stats or {})
    if primary:
        out["data/truncated_frac"] = sum(e.truncated for e in primary) / len(primary)
    return Prepared(collate_train(rows, ctx.tokenizer.pad_token_id), len(primary), out,
                    tokens=sum(len(e.answer) for e in rows))


def _token_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of every answer token, mask), [B, L-1] each: `lm.score_batch`."""
    s = score_batch(model, batch)
    return s.logprobs, s.mask


def _scored(model, prep: Prepared) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`_token_logprobs` of the prepared batch and its number of primary rows."""
    return (*_token_logprobs(model, prep.batch), prep.n_primary)


def _rows(batch: dict[str, torch.Tensor], a: int, b: int | None = None) -> dict[str, torch.Tensor]:
    return {k: batch[k][a:b] for k in ("input_ids", "attention_mask", "labels")}


def _autocast(ctx: RunContext):
    """The loop's autocast, for forward passes a method runs outside `loss` (setup)."""
    dev = ctx.device.type
    if ctx.bf16 and dev in ("cpu", "cuda"):
        return torch.autocast(device_type=dev, dtype=torch.bfloat16)
    return nullcontext()


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def load_reference(ctx: RunContext):
    """A frozen copy of the starting model: loaded again by name, because on --resume the live model
    already holds checkpoint weights. Eval mode, no gradients, the run's dtype and device."""
    from pmc_unlearn.models import load_model

    lm = load_model(ctx.cfg.model.name, ctx.weights_dtype, seed=ctx.cfg.train.seed)
    ref = lm.model
    ref.requires_grad_(False)
    ref.eval()
    return ref.to(ctx.device)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_refusals(source: str) -> list[str]:
    from pmc_unlearn.data import load_rows

    rows = load_rows(source)
    out = [r["answer"].strip() for r in rows if isinstance(r.get("answer"), str) and r["answer"].strip()]
    if not out:
        raise UserError(f"refusals source {source}: no rows with a non-empty 'answer'; use tofu:idontknow or such a file")
    return out


class _Baseline(Method):
    """Forget (question, answer) pairs, then retain pairs, in one batch; the retain term."""

    uses_primary_answers = True
    uses_retain = True

    def _retain_rows(self, ctx: RunContext, ridx: list[int]) -> list[Example]:
        if not self.uses_retain or getattr(self.cfg, "retain_weight", 0.0) == 0.0:
            return []  # lambda = 0: skip the retain rows' compute
        return _encode(ctx, [ctx.retain[j] for j in ridx])

    def _forget_rows(self, ctx: RunContext, idx: list[int]) -> list[Example]:
        return _encode(ctx, [ctx.primary[i] for i in idx])

    def prepare(self, ctx: RunContext, idx: list[int], ridx: list[int]) -> Prepared:
        return _build(ctx, self._forget_rows(ctx, idx), self._retain_rows(ctx, ridx))

    def _add_retain(self, loss: torch.Tensor, lp: torch.Tensor, mask: torch.Tensor, n: int, logs: dict) -> torch.Tensor:
        if lp.shape[0] == n:
            return loss
        r = mean_nll(lp[n:], mask[n:])
        logs["train/retain_nll"] = float(r.detach())
        return loss + self.cfg.retain_weight * r


# ----- gradient ascent / difference --------------------------------------------------------------

@dataclass
class GAConfig:
    """Gradient ascent has no options of its own (train.* holds the recipe)."""


class GradientAscent(_Baseline):
    name = "ga"
    uses_retain = False

    def loss(self, ctx, model, prep):
        lp, mask, _ = _scored(model, prep)
        nll = mean_nll(lp, mask)
        return -nll, {"train/forget_nll": float(nll.detach())}


@dataclass
class GDConfig:
    retain_weight: float = opt(1.0, "lambda: weight of the retain NLL (open-unlearning GradDiff alpha: 1.0)", min=0.0)


class GradientDifference(_Baseline):
    name = "gd"

    def loss(self, ctx, model, prep):
        lp, mask, n = _scored(model, prep)
        nll = mean_nll(lp[:n], mask[:n])
        logs = {"train/forget_nll": float(nll.detach())}
        return self._add_retain(-nll, lp, mask, n, logs), logs


# ----- NPO / SimNPO ------------------------------------------------------------------------------

@dataclass
class NPOConfig:
    beta: float = opt(0.1, "beta (NPO paper and open-unlearning: 0.1)", gt=0.0)
    retain_weight: float = opt(1.0, "lambda: weight of the retain NLL (open-unlearning alpha: 1.0)", min=0.0)
    cache_ref: bool = opt(True, "compute S_ref(y_f) of every forget pair once before training, then free the reference "
                                "model (exact: the reference is frozen and the pairs are fixed); false: keep it and "
                                "run it on every micro-batch")


class NPO(_Baseline):
    name = "npo"

    def __init__(self, cfg: NPOConfig):
        super().__init__(cfg)
        self.ref = None
        self.s_ref: torch.Tensor | None = None  # [N] S_ref(y_f) per forget index (cache_ref)
        self.info: dict = {}

    def setup(self, ctx: RunContext) -> None:
        ref = load_reference(ctx)
        self.info = {"reference_model_bytes": model_bytes(ref)}
        if not self.cfg.cache_ref:
            self.ref = ref
            self.info["reference_model"] = "kept on the device for the whole run"
            return
        n, bs = len(ctx.primary), max(1, ctx.cfg.train.batch_size)
        vals = []
        with torch.no_grad(), _autocast(ctx):
            for a in range(0, n, bs):
                b = to_device(collate_train(self._forget_rows(ctx, list(range(a, min(n, a + bs)))),
                                            ctx.tokenizer.pad_token_id), ctx.device)
                lp, _ = _token_logprobs(ref, b)
                vals.append(lp.sum(1).float().cpu())
        self.s_ref = torch.cat(vals)
        self.info["reference_model"] = f"freed after precomputing S_ref for {n} forget pairs (no memory while training)"
        del ref
        _release_memory()

    def prepare(self, ctx, idx, ridx):
        prep = super().prepare(ctx, idx, ridx)
        if self.s_ref is not None:
            prep.batch["ref_logp"] = self.s_ref[idx]  # [n]
        return prep

    def loss(self, ctx, model, prep):
        lp, mask, n = _scored(model, prep)
        s = lp[:n].sum(1)  # [n] S_theta(y_f)
        if "ref_logp" in prep.batch:
            s_ref = prep.batch["ref_logp"]
        else:
            with torch.no_grad():
                s_ref = _token_logprobs(self.ref, _rows(prep.batch, 0, n))[0].sum(1)
        forget = npo_loss(s, s_ref, self.cfg.beta)
        logs = {"train/forget_loss": float(forget.detach()), "train/forget_nll": float(mean_nll(lp[:n], mask[:n]).detach()),
                "train/log_ratio": float((s - s_ref).mean().detach())}
        return self._add_retain(forget, lp, mask, n, logs), logs

    def manifest_info(self) -> dict:
        return dict(self.info)


@dataclass
class SimNPOConfig:
    beta: float = opt(4.5, "beta (open-unlearning TOFU default: 4.5)", gt=0.0)
    gamma: float = opt(0.0, "reward margin gamma, outside beta as in the SimNPO paper (open-unlearning's delta = gamma / beta); default 0", min=0.0)
    forget_weight: float = opt(0.125, "weight of the forget term (open-unlearning gamma, the authors' npo_coeff: 0.125)", min=0.0)
    retain_weight: float = opt(1.0, "lambda: weight of the retain NLL (open-unlearning alpha: 1.0)", min=0.0)


class SimNPO(_Baseline):
    name = "simnpo"

    def loss(self, ctx, model, prep):
        lp, mask, n = _scored(model, prep)
        lengths = mask[:n].sum(1).clamp(min=1).to(lp.dtype)  # |y_f| in tokens
        forget = simnpo_loss(lp[:n].sum(1), lengths, self.cfg.beta, self.cfg.gamma)
        logs = {"train/forget_loss": float(forget.detach()), "train/forget_nll": float(mean_nll(lp[:n], mask[:n]).detach())}
        return self._add_retain(self.cfg.forget_weight * forget, lp, mask, n, logs), logs


# ----- refusal targets: IdkNLL, IdkDPO -----------------------------------------------------------

_REFUSALS_HELP = "refusal answers: a data source whose rows have an 'answer' (tofu:idontknow: TOFU's 100 refusals)"


def _refusal(ctx: RunContext, refusals: list[str], i: int) -> str:
    """A refusal for forget question i, drawn anew each epoch from keys (seed, epoch, i): resumable."""
    return refusals[random.Random(derive_seed(ctx.cfg.train.seed, "idk", ctx.epoch, i)).randrange(len(refusals))]


@dataclass
class IdkConfig:
    retain_weight: float = opt(1.0, "lambda: weight of the retain NLL (open-unlearning alpha: 1.0)", min=0.0)
    refusals: str = opt("tofu:idontknow", _REFUSALS_HELP)

    def validate(self) -> None:
        _load_refusals(self.refusals)  # fail before anything is written


class IdkNLL(_Baseline):
    name = "idk"
    uses_primary_answers = False  # the target is a refusal: the forget answers are never read

    def setup(self, ctx):
        self.refusals = _load_refusals(self.cfg.refusals)

    def prepare(self, ctx, idx, ridx):
        fe = _encode(ctx, [ctx.primary[i] for i in idx], [_refusal(ctx, self.refusals, i) for i in idx])
        return _build(ctx, fe, self._retain_rows(ctx, ridx))

    def loss(self, ctx, model, prep):
        lp, mask, n = _scored(model, prep)
        nll = mean_nll(lp[:n], mask[:n])
        logs = {"train/idk_nll": float(nll.detach())}
        return self._add_retain(nll, lp, mask, n, logs), logs


@dataclass
class IdkDPOConfig:
    beta: float = opt(0.1, "beta (open-unlearning DPO: 0.1)", gt=0.0)
    retain_weight: float = opt(1.0, "lambda: weight of the retain NLL (open-unlearning alpha: 1.0)", min=0.0)
    refusals: str = opt("tofu:idontknow", _REFUSALS_HELP)

    def validate(self) -> None:
        _load_refusals(self.refusals)


class IdkDPO(_Baseline):
    """Rows: n (question, refusal) = preferred, n (question, forget answer) = rejected, then retain."""

    name = "idkdpo"

    def __init__(self, cfg: IdkDPOConfig):
        super().__init__(cfg)
        self.ref = None
        self.info: dict = {}

    def setup(self, ctx):
        self.refusals = _load_refusals(self.cfg.refusals)
        self.ref = load_reference(ctx)
        self.info = {"reference_model_bytes": model_bytes(self.ref), "reference_model": "kept on the device for the whole run"}

    def prepare(self, ctx, idx, ridx):
        win = _encode(ctx, [ctx.primary[i] for i in idx], [_refusal(ctx, self.refusals, i) for i in idx])
        return _build(ctx, win + self._forget_rows(ctx, idx), self._retain_rows(ctx, ridx))

    def loss(self, ctx, model, prep):
        lp, mask, n2 = _scored(model, prep)
        n = n2 // 2
        s = lp[:n2].sum(1)  # [2n]: refusals, then forget answers
        with torch.no_grad():
            s_ref = _token_logprobs(self.ref, _rows(prep.batch, 0, n2))[0].sum(1)
        forget = dpo_loss(s[:n], s_ref[:n], s[n:], s_ref[n:], self.cfg.beta)
        logs = {"train/forget_loss": float(forget.detach()),
                "train/idk_nll": float(mean_nll(lp[:n], mask[:n]).detach()),
                "train/forget_nll": float(mean_nll(lp[n:n2], mask[n:n2]).detach())}
        return self._add_retain(forget, lp, mask, n2, logs), logs

    def manifest_info(self) -> dict:
        return dict(self.info)


# ----- RMU ---------------------------------------------------------------------------------------

def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama/Mistral/Qwen/Phi: model.layers; GPT-2: transformer.h)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "layers"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise UserError(f"rmu: cannot find the decoder layers of {type(base).__name__}; RMU supports models with "
                    "model.layers (Llama, Mistral, Qwen, Phi) or transformer.h (GPT-2)")


class _Stop(Exception):
    """Raised by the capture hook to skip the layers after the steered one."""


def layer_output(model, layer: torch.nn.Module, b: dict[str, torch.Tensor], stop: bool) -> torch.Tensor:
    """Output of `layer` (the residual stream after it) for batch b, [B, T, D]; stop=True skips later layers."""
    got: list[torch.Tensor] = []

    def hook(_mod, _args, out):
        if not got:
            got.append(out[0] if isinstance(out, tuple) else out)
            if stop:
                raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


@dataclass
class RMUConfig:
    layer: int = opt(-1, "decoder layer (0-based) whose output is steered; -1: the middle one, num_layers // 2", min=-1)
    update_layers: int = opt(3, "train weights in this many layers ending at `layer` (WMDP: 3, layers 5-7 for layer 7)", min=1)
    update_params: str = opt("mlp.down_proj", "comma-separated parts of the weight names trained in those layers (WMDP: the MLP down projection)")
    steering_coeff: float = opt(0.0, "c: forget activations are pushed toward c x u, u a fixed random unit vector "
                                     "(WMDP: 6.5 for Zephyr-7B); 0: auto, steering_scale x the starting model's mean "
                                     "activation norm on the forget answers at `layer`", min=0.0)
    steering_scale: float = opt(2.0, "with steering_coeff 0: c = steering_scale x that mean norm", gt=0.0)
    retain_weight: float = opt(100.0, "alpha: weight of the retain activation MSE (WMDP: 1200 for Zephyr-7B); "
                                      "100 is a starting point for 100M-1B models, see docs/methods.md", min=0.0)


class RMU(_Baseline):
    """Representation misdirection (Li et al. 2024, WMDP), on answer tokens as in open-unlearning."""

    name = "rmu"

    def __init__(self, cfg: RMUConfig):
        super().__init__(cfg)
        self.ref = None
        self.layer_idx: int | None = None
        self.trainable: list[str] = []
        self.c: float = 0.0
        self.u: torch.Tensor | None = None
        self.info: dict = {}

    def _resolve_layer(self, n_layers: int) -> int:
        L = n_layers // 2 if self.cfg.layer == -1 else self.cfg.layer
        if not 0 <= L < n_layers:
            raise UserError(f"rmu.layer={self.cfg.layer}: the model has {n_layers} decoder layers (0..{n_layers - 1})")
        return L

    def configure_model(self, model) -> None:
        """Freeze every weight but the chosen MLP weights. The loop calls this before it builds the
        optimizer and wraps the model, so AdamW, DDP and checkpoints see only these weights."""
        layers = decoder_layers(model)
        L = self._resolve_layer(len(layers))
        parts = [p.strip() for p in self.cfg.update_params.split(",") if p.strip()]
        keep: dict[int, str] = {}
        for i in range(max(0, L - self.cfg.update_layers + 1), L + 1):
            for name, p in layers[i].named_parameters():
                if p.requires_grad and any(part in name for part in parts):
                    keep[id(p)] = f"layers.{i}.{name}"
        if not keep:
            raise UserError(f"rmu.update_params={self.cfg.update_params!r}: no trainable weight of layers "
                            f"{max(0, L - self.cfg.update_layers + 1)}..{L} matches (with LoRA, the adapters must "
                            "target these modules)")
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        self.layer_idx, self.trainable = L, sorted(keep.values())

    def setup(self, ctx):
        raw = ctx.raw_model
        if self.layer_idx is None:
            # Without the loop's configure_model hook: freeze now. AdamW skips weights without
            # gradients, so the update is the same (one process only; DDP needs the hook).
            log.warning("rmu: configure_model was not called before the optimizer was built; freezing weights in setup")
            self.configure_model(raw)
        L = self.layer_idx
        ref = load_reference(ctx)
        layers = decoder_layers(ref)
        del layers[L + 1:]  # the reference is only ever run up to layer L: drop the rest (memory)
        self.ref, self.ref_layer = ref, layers[L]
        # c: explicit, or relative to the starting model's activation norm on the forget answers
        if self.cfg.steering_coeff > 0:
            self.c = float(self.cfg.steering_coeff)
            norm = None
        else:
            norm = self._mean_norm(ctx)
            self.c = self.cfg.steering_scale * norm
        d = raw.config.hidden_size
        g = torch.Generator().manual_seed(derive_seed(ctx.cfg.train.seed, "rmu"))
        u = torch.rand(d, generator=g)  # uniform in [0, 1)^d, then unit norm (as in WMDP / open-unlearning)
        self.u = (u / u.norm()).to(ctx.device)
        self.info = {"reference_model_bytes": model_bytes(ref),
                     "reference_model": f"layers 0..{L} kept on the device (the rest dropped)",
                     "rmu_layer": L, "rmu_trainable": self.trainable, "rmu_steering_coeff": self.c,
                     "rmu_mean_activation_norm": norm}
        log.info("rmu: steering layer %d with c=%.4g, training %d weights", L, self.c, len(self.trainable))

    def _mean_norm(self, ctx) -> float:
        total, count = 0.0, 0
        n, bs = len(ctx.primary), max(1, ctx.cfg.train.batch_size)
        with torch.no_grad(), _autocast(ctx):
            for a in range(0, min(n, 256), bs):
                b = to_device(collate_train(self._forget_rows(ctx, list(range(a, min(n, a + bs)))),
                                            ctx.tokenizer.pad_token_id), ctx.device)
                h = layer_output(self.ref, self.ref_layer, b, stop=True).float()
                m = b["labels"] != IGNORE
                total += float(h.norm(dim=-1)[m].sum())
                count += int(m.sum())
        return total / max(1, count)

    def loss(self, ctx, model, prep):
        b = prep.batch
        n = prep.n_primary
        mask = b["labels"] != IGNORE  # [B, T] answer positions
        raw = ctx.raw_model
        # Skipping the layers after L is safe with one process and no gradient checkpointing; under DDP
        # the full forward keeps the reducer's bookkeeping intact.
        stop = ctx.accelerator.num_processes == 1 and not ctx.cfg.model.gradient_checkpointing
        acts = layer_output(model, decoder_layers(raw)[self.layer_idx], b, stop=stop)  # [B, T, D]
        forget = masked_mse(acts[:n], self.c * self.u, mask[:n])
        logs = {"train/forget_loss": float(forget.detach()),
                "train/forget_act_norm": float(acts[:n].float().norm(dim=-1)[mask[:n]].mean().detach())}
        loss = forget
        if acts.shape[0] > n:
            with torch.no_grad():
                ref_acts = layer_output(self.ref, self.ref_layer, _rows(b, n), stop=True)
            retain = masked_mse(acts[n:], ref_acts, mask[n:])
            logs["train/retain_loss"] = float(retain.detach())
            loss = loss + self.cfg.retain_weight * retain
        return loss, logs

    def manifest_info(self) -> dict:
        return dict(self.info)


# ----- SCRUB -------------------------------------------------------------------------------------

@dataclass
class SCRUBConfig:
    max_epochs: int = opt(2, "SCRUB's msteps: how many of its epochs have a max pass over the forget set. Loop "
                             "epochs 2k (a min pass) and 2k+1 (a max pass) make SCRUB epoch k < max_epochs; every "
                             "later loop epoch is a min pass, so set train.epochs >= 2 x max_epochs + 1 "
                             "(reference code: 2-3)", min=0)
    alpha: float = opt(0.001, "alpha: weight of KL(teacher || student) on the retain answers in the min-steps "
                              "(SCRUB reference code: 0.001)", min=0.0)
    gamma: float = opt(0.99, "gamma: weight of the retain task NLL in the min-steps (SCRUB reference code: 0.99)", min=0.0)
    kl_temperature: float = opt(4.0, "T: both distributions are softmax(logits / T), the KL is scaled by T^2 "
                                     "(SCRUB reference code: kd_T 4)", gt=0.0)


class SCRUB(Method):
    """SCRUB (Kurmanji et al., NeurIPS 2023): the student starts as the teacher (the frozen starting model)
    and alternates max-steps away from it on the forget answers with min-steps toward it on retain pairs.

    On the shared loop a max pass is one loop epoch over the forget set (forget rows only) and a min
    pass one loop epoch of the retain pairs the loop draws (one per forget index, retain rows only):
    `losses.scrub_phase` says which (each SCRUB epoch starts with its min pass: see there why).
    Optimizer steps never straddle an epoch, so each step is a pure max or min step.
    """

    name = "scrub"
    uses_primary_answers = True  # the max-steps read the forget answers (KL on their tokens)
    uses_retain = True

    def __init__(self, cfg: SCRUBConfig):
        super().__init__(cfg)
        self.teacher = None
        self.info: dict = {}

    def setup(self, ctx):
        self.teacher = load_reference(ctx)
        self.info = {"reference_model_bytes": model_bytes(self.teacher),
                     "reference_model": "the teacher, kept on the device for the whole run"}
        if self.cfg.max_epochs and ctx.cfg.train.epochs < 2 * self.cfg.max_epochs + 1:
            log.warning("scrub: train.epochs=%s < 2 x scrub.max_epochs + 1 = %d: the run ends without a min pass "
                        "after its last max pass", ctx.cfg.train.epochs, 2 * self.cfg.max_epochs + 1)

    def prepare(self, ctx, idx, ridx):
        phase = scrub_phase(ctx.epoch, self.cfg.max_epochs)
        if phase == "max":
            prep = _build(ctx, self._forget_rows(ctx, idx), [])
        else:
            prep = _build(ctx, [], _encode(ctx, [ctx.retain[j] for j in ridx]))
        prep.stats["train/scrub_max_phase"] = float(phase == "max")
        return prep

    def _forget_rows(self, ctx, idx):
        return _encode(ctx, [ctx.primary[i] for i in idx])

    def loss(self, ctx, model, prep):
        student = score_batch(model, prep.batch)
        with torch.no_grad():
            teacher = score_batch(self.teacher, prep.batch)
        logits, labels, t_logits = student.logits, student.labels, teacher.logits
        L = min(logits.shape[1], t_logits.shape[1])  # both windows end at the last position
        logits, labels, t_logits = logits[:, -L:], labels[:, -L:], t_logits[:, -L:]
        kl = distill_kl(logits, t_logits, labels, self.cfg.kl_temperature)
        if prep.n_primary:  # a max pass: forget rows only
            return scrub_max_loss(kl), {"train/forget_kl": float(kl.detach())}
        nll = token_mean_nll(logits, labels)
        loss = scrub_min_loss(kl, nll, self.cfg.alpha, self.cfg.gamma)
        return loss, {"train/retain_kl": float(kl.detach()), "train/retain_nll": float(nll.detach())}

    def manifest_info(self) -> dict:
        return dict(self.info)


# ----- retain-only fine-tuning -------------------------------------------------------------------

def matched_train_seconds(run_dir: str | Path) -> float:
    """Training wall time of a finished run: manifest.json phases_s.train less its checkpoint writing."""
    p = Path(run_dir).expanduser() / "manifest.json"
    if not p.exists():
        raise UserError(f"retain_ft.match_run={run_dir}: no manifest.json there; pass the output folder of a finished run")
    try:
        man = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"retain_ft.match_run={run_dir}: manifest.json is not valid JSON ({e.msg})") from e
    if man.get("status") != "completed":
        raise UserError(f"retain_ft.match_run={run_dir}: that run is {man.get('status')!r}, not completed; finish it first")
    t = man.get("phases_s", {}).get("train")
    if not isinstance(t, (int, float)) or t <= 0:
        raise UserError(f"retain_ft.match_run={run_dir}: manifest.json has no phases_s.train time")
    # checkpoint writing is not training: train.max_time_s does not count it either
    return float(t) - float(man["phases_s"].get("train/checkpoint", 0.0))


@dataclass
class RetainFTConfig:
    match_run: str = opt("", "folder of a finished run (e.g. PMC) whose training wall time (manifest.json "
                             "phases_s.train less train/checkpoint) becomes train.max_time_s; set train.epochs high "
                             "so the time ends the run; empty: train.max_time_s / train.epochs as given")

    def validate(self) -> None:
        if self.match_run:
            matched_train_seconds(self.match_run)


class RetainFT(Method):
    """Fine-tune on retain pairs only (one per forget index, as drawn by the loop); forget rows are ignored."""

    name = "retain_ft"
    uses_primary_answers = False

    def __init__(self, cfg: RetainFTConfig):
        super().__init__(cfg)
        self.info: dict = {}
        self.max_time_s = 0.0

    def setup(self, ctx):
        self.max_time_s = ctx.cfg.train.max_time_s
        if self.cfg.match_run:
            t = matched_train_seconds(self.cfg.match_run)
            if self.max_time_s and self.max_time_s != t:
                log.warning("retain_ft.match_run overrides train.max_time_s=%s with %.1f s", self.max_time_s, t)
            self.max_time_s = t
            self.info = {"matched_run": str(self.cfg.match_run)}
        self.info["train_max_time_s"] = self.max_time_s

    def time_limit(self, ctx) -> float:
        """train.max_time_s, or the matched run's training time (retain_ft.match_run)."""
        return self.max_time_s

    def prepare(self, ctx, idx, ridx):
        ex = _encode(ctx, [ctx.retain[j] for j in ridx])
        return _build(ctx, ex, [])

    def loss(self, ctx, model, prep):
        lp, mask, _ = _scored(model, prep)
        nll = mean_nll(lp, mask)
        return nll, {"train/retain_nll": float(nll.detach())}

    def manifest_info(self) -> dict:
        return dict(self.info)
