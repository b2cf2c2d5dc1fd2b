#!/usr/bin/env bash
# The LoRA trainers and the hf chat backend at the paper's scale on one GPU (docs/scale.md):
# `esvr bench train` with a random model of Llama-3-8B's shape, then the gpu tests.
#
#   bash infra/gpu/device_check.sh      # from the repository root; results under $OUT
#
# The machine needs torch, transformers (with huggingface_hub 1.x), peft and accelerate. What else
# the bench imports comes as wheels in .whl/, installed into a folder of their own:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     trl==1.16.0 datasets==4.8.5 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0 \
#     requests==2.34.2 urllib3==2.8.0 idna==3.20 charset_normalizer==3.5.3 certifi==2026.10.19.post1
# (datasets 4.8 rather than 5.x: 5.x needs huggingface_hub >= 1.31, transformers 5.17 may have less.)
# Without CUDA the same steps run with the tiny model, as a rehearsal. Each step has its own time limit, and all of them fit in
# BUDGET_S (default 420 s); a step that would not fit is skipped and says so. Output goes to
# $OUT/log as it comes, each step's numbers to $OUT/<step>.json.
set -uo pipefail

OUT=${OUT:-$PWD/gpu-check-out}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
TEE=$!
START=$SECONDS

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python  # a development checkout: its own environment
fi

# Carried wheels (WHEELS, default .whl) into a folder of their own; unpacked as zip files where
# this Python has no pip.
WHEELS=${WHEELS:-.whl}
SITE=${TMPDIR:-/tmp}/esvr-check-site
rm -rf "$SITE" && mkdir -p "$SITE"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
            || echo "== the wheels in $WHEELS do not install here: using this Python's own packages"
    else
        for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE"; done
    fi
fi

# The esvr package from this checkout, laid out as pyproject.toml maps it (esvr.flows = flows/,
# esvr.tasks = tasks/, ...): links, no install. Nothing the bench imports needs Prefect or MLflow.
SRC=${TMPDIR:-/tmp}/esvr-check-src
rm -rf "$SRC" && mkdir -p "$SRC/esvr"
cp esvr/__init__.py "$SRC/esvr/"
for d in flows tasks models prompts; do ln -s "$PWD/$d" "$SRC/esvr/$d"; done

export PYTHONPATH="$SRC:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if ! command -v "${CC:-cc}" gcc clang >/dev/null; then
    # Triton compiles a small launcher with the system's C compiler before its first kernel; without
    # one, TRL's chunked log-probabilities take their plain-torch path instead of failing.
    echo "== no C compiler: TRL's Triton kernels are switched off"
    mkdir -p "$SRC/no-cc"
    cat >"$SRC/no-cc/sitecustomize.py" <<'EOF'
import transformers.utils
import transformers.utils.import_utils

transformers.utils.is_triton_available = transformers.utils.import_utils.is_triton_available = lambda *a, **k: False
EOF
    export PYTHONPATH="$SRC/no-cc:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HF_HOME=${TMPDIR:-/tmp}/esvr-check-hf OMP_WAIT_POLICY=PASSIVE
# -P: the checkout's own esvr/ folder (only __init__.py) must not shadow the layout above
PYP=("$PY" -P)

step() {  # step NAME LIMIT_S COMMAND...: run within the limit and what is left of the budget
    local name=$1 limit=$2 left
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return  # ONLY="gpu-tests dpo" runs just the named steps
    fi
    left=$((BUDGET_S - (SECONDS - START)))
    if ((left < 30)); then
        echo "== $name: skipped, ${left}s of the budget left"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name ($(date +%T), limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 5 "$limit" "$@"
    echo "== $name: exit $? after $((SECONDS - t0))s"
}

echo "== machine"
nvidia-smi 2>/dev/null || echo "no nvidia-smi"
"${PYP[@]}" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "pydantic", "huggingface_hub", "pyarrow", "tokenizers"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as exc:
        print(f"{name}: NOT IMPORTABLE: {type(exc).__name__}: {exc}")
import torch
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import esvr.tasks.bench.train  # the whole chain of the bench
print("esvr.tasks.bench.train imports")
EOF

if "${PYP[@]}" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    STEPS=(--steps 6 --warmup 2)
    VAR_STEPS=(--steps 4 --warmup 2)
else
    echo "== no CUDA: the same steps with the tiny model"
    STEPS=(--steps 2 --warmup 1)
    VAR_STEPS=(--steps 2 --warmup 1)
fi
BENCH=("${PYP[@]}" -m esvr.flows.cli bench train --config configs/paper.yaml)

# (a) the TVD SFT settings with gradient checkpointing: 2,048 tokens, micro-batch 4, sdpa
step sft 150 "${BENCH[@]}" --no-dpo --gradient-checkpointing "${STEPS[@]}" --json "$OUT/sft.json"
# (b) variants: without checkpointing at a smaller micro-batch, with it at a larger one
step sft-nogc-b2 100 "${BENCH[@]}" --no-dpo "${VAR_STEPS[@]}" --no-gradient-checkpointing --batch-size 2 --json "$OUT/sft-nogc-b2.json"
step sft-gc-b8 100 "${BENCH[@]}" --no-dpo "${VAR_STEPS[@]}" --batch-size 8 --json "$OUT/sft-gc-b8.json"
# (c) DPO with the reference generator's settings (2 pairs per micro-batch)
step dpo 120 "${BENCH[@]}" --no-sft "${VAR_STEPS[@]}" --json "$OUT/dpo.json"
# (d) generation through the hf chat backend at batch 1/8/32/64, 32 new tokens
step generate 120 "${BENCH[@]}" --no-sft --no-dpo --generate --json "$OUT/generate.json"
# (e) the gpu tests of the bench and of the trainers. The trainers' tests build their tiny model with
# the bundled model's tokenizer: a folder `models/SmolLM2-135M-Instruct` under $ESVR_CACHE_DIR with its
# config and tokenizer files (no weights: a few MB that can travel) is enough; without one they skip.
GPU_TESTS=(tests/test_bench_train.py)
[ -f "${ESVR_CACHE_DIR:-/nonexistent}/models/SmolLM2-135M-Instruct/tokenizer.json" ] && GPU_TESTS+=(tests/test_training.py)
step gpu-tests 120 "${PYP[@]}" -m pytest -m gpu "${GPU_TESTS[@]}" -q -p no:cacheprovider -rs
# last, if time is left: no checkpointing at the paper's micro-batch (may run out of memory)
step sft-nogc-b4 100 "${BENCH[@]}" --no-dpo "${VAR_STEPS[@]}" --no-gradient-checkpointing --batch-size 4 --json "$OUT/sft-nogc-b4.json"

echo "== done in $((SECONDS - START))s"
grep -h "^goal:\|^sft:\|^dpo:\|^generate\|out of memory" "$OUT/log" | awk '!seen[$0]++'
exec >&- 2>&-
wait "$TEE"  # the log is complete before the script ends
