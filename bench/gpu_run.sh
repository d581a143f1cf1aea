#!/usr/bin/env bash
# One offline GPU job: install what the image lacks from bench/wheels, then measure and predict the same shape.
#
#   bash bench/gpu_run.sh            # on the GPU node: writes $OUT (default bench/results) gpu_check.json, plan_check.json
#   bash bench/gpu_run.sh --dry-run  # anywhere: wheels present, importable, under 64 MiB; our code imports
#
# The image is assumed to hold torch, transformers, peft and accelerate (and pyarrow, which `datasets` needs and which
# is too large for the 64 MiB budget). Make the wheels folder once, where PyPI is reachable, for the image's Python:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_24_x86_64 \
#       --platform manylinux2014_x86_64 -d bench/wheels bitsandbytes trl datasets dill multiprocess xxhash
#
# (bench/wheels is in .gitignore: wheels are never committed.) Measured here: bitsandbytes 0.50.2 manylinux x86_64
# is 41.1 MiB, trl 0.9 MiB, datasets 0.6 MiB; the whole folder stays under 64 MiB.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
WHEELS="${WHEELS:-$HERE/wheels}"
OUT="${OUT:-$HERE/results}"
LIMIT=$((64 * 1024 * 1024))
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# modules our check imports, and the wheel that provides each when the image lacks it
MODULES="torch transformers peft accelerate safetensors bitsandbytes trl datasets yaml pydantic typer rich psutil"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
fail() { echo "gpu_run: $*" >&2; exit 2; }

[[ -d "$WHEELS" ]] || fail "no wheels folder $WHEELS; make it with the pip download command at the top of $0"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
(( ${#wheels[@]} )) || fail "$WHEELS holds no .whl files; make them with the pip download command at the top of $0"
size=$(cat "${wheels[@]}" | wc -c)
echo "wheels: ${#wheels[@]} files, $((size / 1024 / 1024)) MiB (limit 64 MiB)"
(( size <= LIMIT )) || fail "wheels take $((size / 1024 / 1024)) MiB, over the 64 MiB limit"

if (( DRY )); then
  # install the wheels into a scratch folder and import them from there, ahead of whatever this machine has
  scratch="$(mktemp -d)"; trap 'rm -rf "$scratch"' EXIT
  "$PY" -m pip install --quiet --no-index --no-deps --target "$scratch" "${wheels[@]}" >/dev/null \
    || fail "the wheels do not install with pip --no-index"
  for w in "${wheels[@]}"; do
    name="$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')"
    PYTHONPATH="$scratch:$PYTHONPATH" "$PY" -c "import importlib, sys; importlib.import_module(sys.argv[1])" "$name" \
      2>/dev/null || echo "  note: $(basename "$w") installed but '$name' did not import on this machine"
  done
  PYTHONPATH="$scratch:$PYTHONPATH" "$PY" - "$MODULES" <<'EOF' || fail "something the GPU check needs is missing"
import importlib, sys
missing = []
for m in sys.argv[1].split():
    try:
        importlib.import_module(m)
    except Exception as e:
        missing.append(f"{m} ({type(e).__name__}: {e})")
for m in ("finetune.plan", "finetune.train"):
    importlib.import_module(m)
sys.path.insert(0, "bench")
for m in ("gpu_check", "plan_check", "bench_moe"):
    importlib.import_module(m)
if missing:
    print("missing:", *missing, sep="\n  ")
    sys.exit(1)
print("dry run: every module imports (wheels first on the path); the GPU check and the planner are ready")
EOF
  exit 0
fi

# install only what the image lacks, from the folder, never from an index
for m in $MODULES; do
  "$PY" -c "import $m" 2>/dev/null && continue
  echo "installing for $m from $WHEELS"
  "$PY" -m pip install --no-index --no-deps --find-links "$WHEELS" "${wheels[@]}" >/dev/null || fail "pip install failed"
  break
done
mkdir -p "$OUT"
cd "$ROOT"
"$PY" bench/gpu_check.py --variants ours --out "$OUT/gpu_check.json"
"$PY" bench/plan_check.py --device cuda --shape real --seq 2048,4096 --dtype bfloat16 --steps 2 --out "$OUT/plan_check.json"
# FSDP2's CUDA path on this one GPU: experts staged in host memory and moved by fully_shard, 4-bit attention packed
# in bf16, bf16 mixed precision (the CPU tests cover the sharding itself; they cannot cover these moves)
if "$PY" -m accelerate.commands.launch --config_file accelerate/fsdp2.yaml --num_processes 1 -m finetune run \
    recipes/tiny-mixtral-sft.yaml --overwrite --set output_dir="$OUT/fsdp2_one_gpu" --set training.max_steps=4 \
    --set data.eval_fraction=0 >"$OUT/fsdp2_one_gpu.log" 2>&1; then
  echo "fsdp2 on one GPU: trained, see $OUT/fsdp2_one_gpu/metrics.json"
else
  echo "fsdp2 on one GPU: FAILED, see $OUT/fsdp2_one_gpu.log"
fi
echo "wrote $OUT/gpu_check.json (tokens/s, MFU) and $OUT/plan_check.json (predicted vs measured peak)"
