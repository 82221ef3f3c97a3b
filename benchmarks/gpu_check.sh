#!/usr/bin/env bash
# ONE command for the lent GPU machine (device tool), finishing in under 8 minutes (BENCH_BUDGET_S=450 s
# for everything; each step runs under `timeout` so a hang cannot eat the budget). Prepare first, here:
#   bash benchmarks/prepare_gpu_check.sh        # .whl/ (missing packages) + .bench_assets/ (tokenizer)
# then run on the device with carry [".whl", ".bench_assets"]:   bash benchmarks/gpu_check.sh
# It installs the carried wheels, generates TOFU-format data of the real TOFU sizes on the machine
# (forget10 = 400 rows, retain90 = 3600), and with a random-init Llama-3.2-1B-architecture model
# (configs/model/Llama-3.2-1B-arch.yaml, 1.07B params), the SmolLM2 tokenizer, bf16, per-device batch
# 8 (+8 retain) times 5 warm-up + 100 GradDiff steps, then NPO, then 3 + 10 GradDiff steps on random
# 2048-token rows (MUSE-style long chunks: the MFU target), then the default TOFU evaluation of
# forget10 (holdout01), then 20 GradDiff steps each with trainer.args.joint_forward=true,
# nll_impl=chunked and (if the carried liger-kernel imports) nll_impl=liger, whose losses should equal
# train_graddiff.json's first 20. Writes under $OUT: train_graddiff.json, train_npo.json,
# train_longseq.json, eval_tofu.json, train_joint_forward.json, train_nll_chunked.json,
# train_nll_liger.json, host_graddiff.json, host_graddiff_joint.json (benchmarks/host_overhead.py: the
# host's share of a step), eval_tofu_gen128.json (the evaluation with generation batches of 128),
# train_compile.json (+trainer.args.torch_compile=true, if time is left),
# gpu_check.log (everything printed). CPU smoke test of this very script, here (tiny model, 3 steps):
#   BENCH_SMOKE=1 bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

SMOKE=${BENCH_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  PY=${PY:-.venv/bin/python}
  OUT=${OUT:-/tmp/bench_smoke_out}
  BUDGET=${BENCH_BUDGET_S:-420}
  MODEL=tiny-random-llama; WARMUP=2; STEPS=3; BATCH=8; AUTHORS=20; QA=4; PEAK=()
  EVAL_EXTRA=(--max-new-tokens 4)
  CAP_GD=150; CAP_NPO=150; CAP_LONG=90; LONG_LEN=256; LONG_STEPS=2; CAP_NLL=60; NLL_STEPS=1
  CAP_HOST=60; CAP_EVAL_GEN128=60; CAP_COMPILE=0   # torch.compile takes minutes on a CPU: not in the smoke test
else
  PY=${PY:-python3}
  BUDGET=${BENCH_BUDGET_S:-450}
  MODEL=Llama-3.2-1B-arch; WARMUP=5; STEPS=100; BATCH=8; AUTHORS=400; QA=10
  PEAK=(--peak-tflops "${PEAK_TFLOPS:-989}")   # H100 SXM / H200: 989 dense bf16 TFLOP/s
  EVAL_EXTRA=()
  CAP_GD=110; CAP_NPO=130; CAP_LONG=75; LONG_LEN=2048; LONG_STEPS=10; CAP_NLL=40; NLL_STEPS=15
  CAP_HOST=30; CAP_EVAL_GEN128=150; CAP_COMPILE=150
fi
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee -a "$LOG") 2>&1

remaining() { echo $(( BUDGET - SECONDS )); }
# step NAME CAP CMD...: run CMD under timeout min(CAP, time left - RESERVE). Its own lines go to
# stderr: callers send the command's stdout (the JSON, also written with --out) to /dev/null.
step() {
  local name=$1 cap=$2; shift 2
  local left; left=$(( $(remaining) - RESERVE ))
  local t=$(( cap < left ? cap : left ))
  if [ "$t" -lt 20 ]; then echo "== $name: skipped, ${left}s left" >&2; return 1; fi
  echo "== $name (timeout ${t}s, t=${SECONDS}s): $*" >&2
  timeout -k 10 "$t" "$@"
  local rc=$?
  echo "== $name: rc=$rc at t=${SECONDS}s" >&2
  return $rc
}

echo "== gpu_check $(date -u +%FT%TZ) smoke=$SMOKE budget=${BUDGET}s repo=$REPO"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

if [ "$SMOKE" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || { echo "wheel install failed"; exit 1; }
fi

# Preflight: every import the runs need, and the versions (seconds, instead of a failure minutes in)
"$PY" - <<'EOF' || { echo "== preflight failed: see above"; exit 2; }
import importlib, importlib.metadata as md
for m in ("torch", "transformers", "accelerate", "datasets", "hydra", "omegaconf", "rouge_score", "nltk", "scipy",
          "sklearn", "pyarrow", "pandas", "huggingface_hub", "tokenizers", "fsspec", "dill", "multiprocess"):
    importlib.import_module(m)
print({d: md.version(d) for d in ("torch", "transformers", "accelerate", "datasets", "hydra-core", "omegaconf",
       "pyarrow", "pandas", "huggingface-hub", "tokenizers", "fsspec", "numpy", "peft", "scipy", "scikit-learn")})
import torch
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
import sys; sys.path.insert(0, "src")
import data, evals, model, trainer  # noqa: F401  the project's own modules import
EOF

TOK=$REPO/.bench_assets/smollm2-tokenizer
[ -f "$TOK/tokenizer.json" ] || { echo "no $TOK: run benchmarks/prepare_gpu_check.sh here and carry .bench_assets"; exit 3; }
TOFU=/tmp/bench_tofu_${AUTHORS}x${QA}
"$PY" scripts/synthetic_tofu.py --out "$TOFU" --n-authors "$AUTHORS" --qa-per-author "$QA" >/dev/null \
  || { echo "data generation failed"; exit 4; }
echo "== data: $TOFU ($(wc -l < "$TOFU/forget10.json") forget10 rows, $(wc -l < "$TOFU/retain90.json") retain90 rows)"

RUN=(--model "$MODEL" --tokenizer "$TOK" --tofu "$TOFU" --batch-size "$BATCH" --warmup-steps "$WARMUP" "${PEAK[@]}")
COMMON=("${RUN[@]}" --steps "$STEPS")
RESERVE=$(( CAP_NPO + 150 ))   # keep time for NPO, the long-sequence step and part of the evaluation
step GradDiff "$CAP_GD" "$PY" benchmarks/train_throughput.py "${COMMON[@]}" --method GradDiff \
  --out "$OUT/train_graddiff.json" >/dev/null
RESERVE=150   # keep time for the long-sequence step and part of the evaluation
step NPO "$CAP_NPO" "$PY" benchmarks/train_throughput.py "${COMMON[@]}" --method NPO \
  --out "$OUT/train_npo.json" >/dev/null
RESERVE=75
step longseq "$CAP_LONG" "$PY" benchmarks/train_throughput.py --model "$MODEL" --tokenizer "$TOK" --tofu "$TOFU" \
  --method GradDiff --synthetic-seq-len "$LONG_LEN" --batch-size "$BATCH" --warmup-steps 3 --steps "$LONG_STEPS" \
  "${PEAK[@]}" --out "$OUT/train_longseq.json" >/dev/null
RESERVE=$(( 3 * CAP_NLL ))   # the evaluation gets what is left but the three short runs; partial numbers after every pass
step eval_tofu "$BUDGET" "$PY" benchmarks/eval_time.py --model "$MODEL" --tokenizer "$TOK" --tofu "$TOFU" \
  --forget-split forget10 --holdout-split holdout01 "${EVAL_EXTRA[@]}" --out "$OUT/eval_tofu.json" >/dev/null
# joint_forward=true, nll_impl=chunked and =liger: the first 20 GradDiff losses, to compare with
# train_graddiff.json's (defaults: separate forward passes, logits), and their steps/s
RESERVE=$(( 2 * CAP_NLL ))
step joint_forward "$CAP_NLL" "$PY" benchmarks/train_throughput.py "${RUN[@]}" --steps "$NLL_STEPS" --method GradDiff \
  --out "$OUT/train_joint_forward.json" trainer.args.joint_forward=true >/dev/null
RESERVE=$CAP_NLL
step nll_chunked "$CAP_NLL" "$PY" benchmarks/train_throughput.py "${RUN[@]}" --steps "$NLL_STEPS" --method GradDiff \
  --out "$OUT/train_nll_chunked.json" trainer.args.nll_impl=chunked >/dev/null
RESERVE=0
if "$PY" -c "import liger_kernel" 2>/dev/null; then
  step nll_liger "$CAP_NLL" "$PY" benchmarks/train_throughput.py "${RUN[@]}" --steps "$NLL_STEPS" --method GradDiff \
    --out "$OUT/train_nll_liger.json" trainer.args.nll_impl=liger >/dev/null
else
  echo "== nll_liger: skipped, liger_kernel does not import"
fi
# The host's share of a step (skeleton model: the 1B model's 16 layers at tiny widths), eager and
# with one forward pass per step; then torch.compile on the real model. Only with the time left.
step host_overhead "$CAP_HOST" "$PY" benchmarks/host_overhead.py --method GradDiff --out "$OUT/host_graddiff.json" >/dev/null
step host_overhead_joint "$CAP_HOST" "$PY" benchmarks/host_overhead.py --method GradDiff \
  --out "$OUT/host_graddiff_joint.json" trainer.args.joint_forward=true >/dev/null
# The evaluation again with generation batches of 128 (the fixed size before batch_size: auto, which
# on this GPU puts each of forget10's generation sets in one batch: 4 decoding loops of 200 steps
# instead of 10 for its 844 prompts; a random model never stops early, each step is launch-bound).
GEN128=(eval.tofu.metrics.forget_Q_A_ROUGE.batch_size=128)
for part in retain ra wf; do GEN128+=("eval.tofu.metrics.model_utility.pre_compute.${part}_Q_A_ROUGE.batch_size=128"); done
step eval_tofu_gen128 "$CAP_EVAL_GEN128" "$PY" benchmarks/eval_time.py --model "$MODEL" --tokenizer "$TOK" --tofu "$TOFU" \
  --forget-split forget10 --holdout-split holdout01 "${EVAL_EXTRA[@]}" --out "$OUT/eval_tofu_gen128.json" \
  "${GEN128[@]}" >/dev/null
step torch_compile "$CAP_COMPILE" "$PY" benchmarks/train_throughput.py "${RUN[@]}" --steps 30 --method GradDiff \
  --out "$OUT/train_compile.json" +trainer.args.torch_compile=true >/dev/null

echo "== summary (t=${SECONDS}s)"
"$PY" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
for name in ("train_graddiff.json", "train_npo.json", "train_longseq.json", "eval_tofu.json", "eval_tofu_gen128.json",
             "train_joint_forward.json", "train_nll_chunked.json", "train_nll_liger.json", "host_graddiff.json",
             "host_graddiff_joint.json", "train_compile.json"):
    path = os.path.join(out, name)
    if not os.path.isfile(path):
        print(f"{name}: missing"); continue
    d = json.load(open(path))
    m = d.get("machine", {})
    if d.get("benchmark") == "train_throughput":
        keys = ("params", "steps_per_s", "s_per_step", "padded_tokens_per_s", "padded_tokens_per_step", "mfu",
                "batch_shape", "peak_memory", "cuda_syncs_per_warmup_step")
        print(name, m.get("gpu") or m.get("cpu"), {k: d.get(k) for k in keys})
        print("   loss first steps:", [round(x, 5) for x in d.get("loss_first_steps", [])])
        if name.startswith(("train_nll_", "train_joint", "train_compile")) and os.path.isfile(os.path.join(out, "train_graddiff.json")):
            base = json.load(open(os.path.join(out, "train_graddiff.json"))).get("loss_first_steps", [])
            pairs = list(zip(base, d.get("loss_first_steps", [])))
            print(f"   vs logits over {len(pairs)} steps: max |diff| {max((abs(a - b) for a, b in pairs), default=None)}")
    elif d.get("benchmark") == "host_overhead":
        print(name, m.get("gpu") or m.get("cpu"), {k: d.get(k) for k in ("method_args", "median_step_ms", "mean_step_ms")})
    else:
        keys = ("complete", "wall_s", "model_load_s", "forward_s", "generation_s", "other_s", "forward_calls",
                "pairs_evaluated", "generate_calls", "decode_forward_calls", "prompts_generated", "peak_memory",
                "summary")
        print(name, m.get("gpu") or m.get("cpu"), {k: d.get(k) for k in keys})
EOF
echo "== done at t=${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
