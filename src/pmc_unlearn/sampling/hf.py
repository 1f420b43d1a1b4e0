"""The `hf` backend: `transformers` generate (the reference; slow on CPU: its top-p sorts the vocabulary)."""

from __future__ import annotations

import contextlib

import torch

from pmc_unlearn.cpu import adapt_threads
from pmc_unlearn.formatting import collate_prompts
from pmc_unlearn.sampling.interface import Completion, eos_ids, finish, unwrap


class HFSampler:
    """`transformers` generate, batched over prompts x n, left-padded, in chunks of `batch_rows` rows."""

    def __init__(self, tokenizer, batch_rows: int = 64, bf16: bool = False):
        self.tok = tokenizer
        self.batch_rows = batch_rows
        self.bf16 = bf16

    @torch.no_grad()
    def sample(self, model, prompts, n, *, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=128, seed=0, greedy=False):
        model, n = unwrap(model, n, greedy)
        device = next(model.parameters()).device
        stop = eos_ids(model, self.tok)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(stop))
        results: list[list[Completion]] = [[] for _ in prompts]
        per_chunk = max(1, self.batch_rows // n)
        # Sort by length so a chunk pads little; results go back to their own slot.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        was_training = model.training
        model.eval()
        try:
            for c0 in range(0, len(order), per_chunk):
                adapt_threads()
                idx = order[c0 : c0 + per_chunk]
                batch = collate_prompts([prompts[i] for i in idx], pad)
                batch = {k: v.to(device) for k, v in batch.items()}
                kw = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stop))
                if greedy:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                else:
                    kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, num_return_sequences=n)
                with torch.random.fork_rng(devices=[]), self._autocast(device):
                    torch.manual_seed(seed + c0)
                    out = model.generate(**batch, **kw)
                new = out[:, batch["input_ids"].shape[1] :].tolist()
                for r, ids in enumerate(new):
                    results[idx[r // n]].append(finish(self.tok, ids, stop, max_new_tokens))
        finally:
            model.train(was_training)
        return results

    def _autocast(self, device):
        if self.bf16:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

