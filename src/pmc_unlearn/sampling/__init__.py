"""Sampling answers from the current weights, behind one small interface (`sampling.interface`).

Backends are registered in `SAMPLERS`; PMC does not care which one runs. Each call takes a
seed, so results do not depend on what ran before (and a resumed run samples the same).

- `hf` (`sampling.hf`): `transformers` generate (the reference; slow on CPU: its top-p sorts the
  vocabulary).
- `fast` (`sampling.fast`): our own decode loop on the same model (`FastSampler`): each prompt
  prefilled once for its n samples, exact top-k/top-p without a full-vocab sort (`sampling.ops`),
  finished rows dropped, bf16 weights; its caches in `sampling.kv_cache`, the written-out Llama
  step in `sampling.decode_step`.
- `static` (`sampling.fast.StaticSampler`): the fast sampler on the static decode engine
  (`sampling.static`: static KV cache, each prompt's KV shared by its n samples, the one-token step
  replayed as a CUDA graph on GPU); Llama-like models, others fall back to `fast` with a log line.
- `vllm` (`sampling.vllm`): a vLLM engine fed the trained weights after every optimizer step
  (`pip install pmc-unlearn[vllm]`; see `VLLMSampler`).
"""

from __future__ import annotations

from pmc_unlearn.sampling.fast import FastSampler, StaticSampler, bf16_fast_here
from pmc_unlearn.sampling.hf import HFSampler
from pmc_unlearn.sampling.interface import Completion, Sampler, eos_ids, finish
from pmc_unlearn.sampling.vllm import StaleWeightsError, VLLMSampler

SAMPLERS = {"hf": HFSampler, "fast": FastSampler, "static": StaticSampler, "vllm": VLLMSampler}

__all__ = ["SAMPLERS", "Completion", "FastSampler", "HFSampler", "Sampler", "StaleWeightsError", "StaticSampler", "VLLMSampler", "bf16_fast_here",
           "eos_ids", "finish"]
