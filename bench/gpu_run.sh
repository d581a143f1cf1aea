#!/usr/bin/env bash
# One offline GPU job in stages, in order of information per second; each stage bounded, recorded, never fatal.
#
#   bash bench/gpu_run.sh --prepare        # here, where PyPI is reachable: makes bench/carry/ (under 62 MiB)
#   bash bench/gpu_run.sh                  # on the GPU machine, carrying bench/carry: ends by itself within DEADLINE
#   bash bench/gpu_run.sh --dry-run        # here: every stage's CPU smoke path in a bare environment (see below)
#   bash bench/gpu_run.sh --dry-run --install-only   # its install-and-import part alone (what the test suite runs)
#
# Stages: install (the carried wheels into a PYTHONPATH folder, bitsandbytes first) -> tiny_model -> environment
# (Python, torch, CUDA, the GPU and its peak, gcc, a Triton kernel, bitsandbytes' diagnostics) -> cuda_check ->
# gpu_check (ours at Mixtral-8x7B's layer dimensions: tokens/s, MFU, peak memory) -> plan_check (one setting, on the
# same checkpoint) -> fsdp2_one_gpu (the tiny recipe under accelerate/fsdp2.yaml) -> baselines (stock variants, if
# time is left). Each stage has its own limit (`timeout`), writes its JSON under $OUT and its log into
# $OUT/gpu_run.log; a failed stage is recorded and the next one runs; one that cannot fit before the deadline is
# skipped. summary.json is rewritten after every stage and a table is printed at the end. Files under $OUT (the
# device tool brings back 8): env.json cuda_check.json gpu_check.json plan_check.json fsdp2_one_gpu.json
# gpu_check_baselines.json summary.json gpu_run.log.
#
# The dry run builds a fresh virtual environment holding only torch, transformers, peft and accelerate at this
# checkout's .venv versions (what the GPU image has), plus pyarrow, pandas and pillow (too large to carry; the image
# has them), installs bench/carry into it exactly as the job does, with no index, and runs every stage on CPU.
#
# Settings (environment): OUT (default bench/results; for --dry-run $WORK/out), WORK (/tmp/finetune-gpu-run),
# DEADLINE (seconds for the whole job: 500, --dry-run 3000), ONLY (stage names, space-separated: run just these and
# record the others as skipped; later stages stand on install and tiny_model, so rerunning one stage on a warm
# machine is ONLY="install tiny_model gpu_check"), CARRY (bench/carry), PYTHON (default python3, else python),
# BARE_FROM (dry run: a Python whose packages the bare environment links to instead of pip-installing them, about a
# second instead of a minute; the test suite uses it), DRY_PYTHON (dry run: the venv's interpreter).
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
CARRY="${CARRY:-$HERE/carry}"
WORK="${WORK:-/tmp/finetune-gpu-run}"
BUDGET_MIB=62
MODE=job
INSTALL_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry ;;
    --install-only) INSTALL_ONLY=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_run: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
fail() { echo "gpu_run: $*" >&2; exit 2; }

find_python() {
  local c
  for c in "${PYTHON:-}" python3 python; do
    [[ -n "$c" ]] && command -v "$c" >/dev/null 2>&1 && { command -v "$c"; return 0; }
  done
  return 1
}
SUITE_PY="$ROOT/.venv/bin/python"
[[ -x "$SUITE_PY" ]] || SUITE_PY="$(find_python)" || fail "no python3 or python on PATH"

if [[ "$MODE" == prepare ]]; then
  cd "$ROOT" && exec "$SUITE_PY" bench/carry.py prepare --carry "$CARRY"
fi

[[ -f "$CARRY/requirements.txt" ]] || {
  [[ "$MODE" == dry ]] && fail "no carry folder $CARRY; make it with: bash bench/gpu_run.sh --prepare"
  echo "gpu_run: no carry folder $CARRY: the install stage will fail; later stages use what the image has" >&2
}
if [[ -d "$CARRY" ]]; then
  size=$(du -sb "$CARRY" | cut -f1)
  (( size <= BUDGET_MIB * 1024 * 1024 )) || fail "$CARRY takes $((size / 1024 / 1024)) MiB, over the ${BUDGET_MIB} MiB budget"
fi

if [[ "$MODE" == dry ]]; then
  OUT="${OUT:-$WORK/out}"
  DEADLINE="${DEADLINE:-3000}"
else
  OUT="${OUT:-$ROOT/bench/results}"
  DEADLINE="${DEADLINE:-500}"
fi
T0=$SECONDS
rm -rf "$WORK/logs" "$WORK/site" "$WORK/stages.jsonl" "$WORK/install.json"
mkdir -p "$OUT" "$WORK/logs"
LOG="$OUT/gpu_run.log"
: >"$LOG"
STAGES="$WORK/stages.jsonl"
: >"$STAGES"
SITE="$WORK/site"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false HF_HOME="$WORK/hf" FINETUNE_CACHE="$WORK/cache"
cd "$ROOT" || exit 2

# the seconds a stage may take: its own limit, or what is left before the deadline (10 s kept for the summary)
limit_for() {
  local left=$((DEADLINE - (SECONDS - T0) - 10))
  (( $1 < left )) && echo "$1" || echo "$left"
}

summary() {  # rewrite $OUT/summary.json from the stages so far; extra arguments go to gpu_summary.py
  local meta="{\"mode\": \"$MODE\", \"deadline_s\": $DEADLINE, \"elapsed_s\": $((SECONDS - T0)), \"python\": \"${PY:-}\"}"
  "$JOB_PY" "$HERE/gpu_summary.py" --stages "$STAGES" --out "$OUT" --install "$WORK/install.json" --meta "$meta" "$@"
}

record() {  # stage status rc seconds limit result reason
  "$JOB_PY" -c 'import json, sys
a = sys.argv[1:]
print(json.dumps({"stage": a[0], "status": a[1], "rc": int(a[2]), "seconds": int(a[3]), "limit": int(a[4]),
                  "result": a[5] or None, "reason": a[6] or None}))' "$@" >>"$STAGES"
  summary
}

# run_stage NAME LIMIT NEED RESULT -- COMMAND...: run COMMAND under `timeout` unless NEED seconds no longer fit
run_stage() {
  local name=$1 limit=$2 need=$3 result=$4
  shift 5
  local left=$((DEADLINE - (SECONDS - T0) - 10)) start=$SECONDS rc=0 status reason=""
  if [[ -n "${ONLY:-}" && $name != bare_env && " $ONLY " != *" $name "* ]]; then
    status=skipped
    reason="not in ONLY ($ONLY)"
  elif (( left < need )); then
    status=skipped
    reason="needs ${need}s, ${left}s left before the ${DEADLINE}s deadline"
  else
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s, at $((SECONDS - T0))s)" | tee -a "$LOG"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log" >>"$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
      0) status=ok ;;
      124|137) status=timeout; reason="ran past its ${limit}s limit" ;;
      *) status=failed; reason="exit $rc" ;;
    esac
  fi
  local took=$((SECONDS - start))
  echo "== $name: $status after ${took}s${reason:+ ($reason)}" | tee -a "$LOG"
  if [[ "$status" == failed || "$status" == timeout ]]; then
    tail -n 12 "$WORK/logs/$name.log" | sed 's/^/   | /'
  fi
  record "$name" "$status" "$rc" "$took" "$limit" "$result" "$reason"
  LAST_STATUS=$status
}

# ------------------------------------------------------------------------------------------- the interpreter
if [[ "$MODE" == dry ]]; then
  # the bare environment: only what the GPU image is assumed to hold, built fresh
  VENV="$WORK/venv"
  JOB_PY="$SUITE_PY"
  if [[ -n "${BARE_FROM:-}" ]]; then
    run_stage bare_env 120 10 "" -- "$BARE_FROM" "$HERE/bare_env.py" bare --dest "$VENV"
  else
    pins=$("$SUITE_PY" "$HERE/bare_env.py" image-pins) || fail "cannot read this checkout's versions with $SUITE_PY"
    # the interpreter the suite's .venv was made from: the local torch wheel is built for it
    base="${DRY_PYTHON:-$("$SUITE_PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')}"
    rm -rf "$VENV"
    run_stage bare_env 900 60 "" -- bash -c "'$base' -m venv '$VENV' && '$VENV/bin/python' -m pip install -q $pins"
  fi
  PY="$VENV/bin/python"
  if [[ "$LAST_STATUS" != ok ]]; then
    summary --print
    fail "the bare environment was not made (see $LOG)"
  fi
else
  PY="$(find_python)" || fail "no python3 or python on PATH"
  JOB_PY="$PY"
fi
echo "gpu_run: mode $MODE, python $PY ($("$PY" --version 2>&1)), OUT $OUT, deadline ${DEADLINE}s" | tee -a "$LOG"

# ------------------------------------------------------------------------------------------- stages
run_stage install "$(limit_for 300)" 20 "" -- \
  "$PY" "$HERE/carry.py" install --carry "$CARRY" --target "$SITE" --json "$WORK/install.json"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
run_stage tiny_model "$(limit_for 120)" 10 "" -- "$PY" "$HERE/carry.py" tiny --carry "$CARRY" --cache "$FINETUNE_CACHE"
run_stage environment "$(limit_for 180)" 20 env.json -- "$PY" "$HERE/gpu_env.py" --out "$OUT/env.json"

if (( ! INSTALL_ONLY )); then
  TINY="$FINETUNE_CACHE/tiny-random-mixtral"
  MODEL_DIR="$WORK/model"
  if [[ "$MODE" == dry ]]; then
    run_stage cuda_check "$(limit_for 900)" 60 cuda_check_cpu.json -- \
      "$PY" "$HERE/cuda_check.py" --cpu --out "$OUT/cuda_check_cpu.json"
    run_stage gpu_check "$(limit_for 600)" 60 gpu_check.json -- \
      "$PY" "$HERE/gpu_check.py" --cpu-smoke --variants ours --work-dir "$MODEL_DIR" --out "$OUT/gpu_check.json"
    lim=$(limit_for 600)
    run_stage plan_check "$lim" 60 plan_check.json -- "$PY" "$HERE/plan_check.py" --device cpu --shape test \
      --layers 1 --seq 128 --checkpointing on --steps 1 --dtype float32 --tokenizer "$TINY" --work-dir "$MODEL_DIR" \
      --timeout $((lim - 30)) --budget $((lim - 30)) --out "$OUT/plan_check.json"
    CONFIG=accelerate/cpu-fsdp2.yaml
    STEPS=1
  else
    run_stage cuda_check "$(limit_for 150)" 40 cuda_check.json -- \
      "$PY" "$HERE/cuda_check.py" --out "$OUT/cuda_check.json"
    lim=$(limit_for 200)
    run_stage gpu_check "$lim" 90 gpu_check.json -- "$PY" "$HERE/gpu_check.py" --variants ours \
      --work-dir "$MODEL_DIR" --budget $((lim - 15)) --variant-timeout $((lim - 15)) --out "$OUT/gpu_check.json"
    lim=$(limit_for 120)
    run_stage plan_check "$lim" 60 plan_check.json -- "$PY" "$HERE/plan_check.py" --device cuda --shape real \
      --seq 4096 --checkpointing on --dtype bfloat16 --steps 2 --tokenizer "$TINY" --work-dir "$MODEL_DIR" \
      --timeout $((lim - 15)) --budget $((lim - 15)) --out "$OUT/plan_check.json"
    CONFIG=accelerate/fsdp2.yaml
    STEPS=4
  fi
  # FSDP2 through accelerate on one process: on a GPU the experts sharded at load onto it, bf16 mixed precision
  rm -rf "$WORK/fsdp2"
  run_stage fsdp2_one_gpu "$(limit_for 150)" 60 fsdp2_one_gpu.json -- "$PY" -m accelerate.commands.launch \
    --config_file "$CONFIG" --num_processes 1 -m finetune run recipes/tiny-mixtral-sft.yaml --overwrite \
    --set output_dir="$WORK/fsdp2" --set training.max_steps=$STEPS --set data.eval_fraction=0 \
    --set tracking.sample_prompts=0
  [[ -f "$WORK/fsdp2/metrics.json" ]] && cp "$WORK/fsdp2/metrics.json" "$OUT/fsdp2_one_gpu.json" && summary
  if [[ "$MODE" == dry ]]; then
    run_stage baselines "$(limit_for 600)" 60 gpu_check_baselines.json -- "$PY" "$HERE/gpu_check.py" --cpu-smoke \
      --variants stock,dequant --work-dir "$MODEL_DIR" --out "$OUT/gpu_check_baselines.json"
  else
    lim=$(limit_for 300)
    run_stage baselines "$lim" 100 gpu_check_baselines.json -- "$PY" "$HERE/gpu_check.py" --variants stock,dequant \
      --work-dir "$MODEL_DIR" --budget $((lim - 15)) --variant-timeout $(((lim - 15) / 2)) \
      --out "$OUT/gpu_check_baselines.json"
  fi
fi

# ------------------------------------------------------------------------------------------- summary
summary --print | tee -a "$LOG"
echo "gpu_run: $((SECONDS - T0))s in all; wrote $OUT/summary.json and $LOG" | tee -a "$LOG"
! grep -qE '"status": "(failed|timeout)"' "$STAGES"
