#!/usr/bin/env bash
# The GPU checks of BENCHMARKS.md ("Step cost", issue 12) in one command, for the lent GPU machine.
#
# Prepared here, run there (one `run` call of the device tool, carrying the wheels):
#
#   make device-wheels                                   # here: cp312 wheels of what the device image lacks -> .whl/
#   device run, carry [".whl"], timeout_s 600:  bash benchmarks/gpu/run_checks.sh
#
# It installs the wheels into a private folder (the image's own packages are left alone), checks that the
# package imports and that one DoGraph step on the GPU gives the plain Trainer's update with uniform weights,
# then times GPT-2 small (12x768, T = 512, bf16) at B = 16 and 48 against plain Trainer, profiles its
# phases, lists the ops (kernel time, host time, launches) a DoGraph step adds and times the sketch's own
# tensor math alone (the floor under the step ratio). Each part has its own
# time limit so that the whole fits in the device tool's 10 minutes; every log and
# JSON goes to $OUT (or ./gpu_out when $OUT is unset). Versions of the image are printed first: the image's
# torch/transformers are not this project's pins.
set -u
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
DEPS=/tmp/hf_dograph_deps
PY="${PY:-python3}"          # the image's python3 (it holds torch)
WHEELS="${WHEELS:-.whl}"     # the carried wheels
start=$(date +%s)
log() { echo "[$(( $(date +%s) - start ))s] $*" | tee -a "$OUT/run_checks.log"; }

log "installing $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) carried wheels into $DEPS"
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  log "no wheels in $WHEELS/: run 'make device-wheels' here and carry .whl"; exit 2
fi
$PY -m pip install -q --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl >>"$OUT/run_checks.log" 2>&1 || {
  log "pip install of the carried wheels failed (see run_checks.log)"; exit 2; }
export PYTHONPATH="$PWD:$DEPS:$PWD/benchmarks" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

$PY - <<'EOF' 2>&1 | tee -a "$OUT/run_checks.log"
import importlib, torch
for name in ("torch", "transformers", "accelerate", "datasets", "peft", "huggingface_hub"):
    print(f"{name} {importlib.import_module(name).__version__}")
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
import hf_dograph
print("hf_dograph", hf_dograph.__version__, "imports")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { log "the package does not import on this image: stop"; exit 3; }

log "smoke: uniform-weight DoGraph step = plain Trainer step on cuda"
timeout 90 $PY benchmarks/gpu/smoke_uniform.py 2>&1 | tee "$OUT/smoke.txt" | tail -3
[ "${PIPESTATUS[0]}" -eq 0 ] || log "smoke check FAILED (see smoke.txt); timing anyway"

log "step cost: 12x768, B = 16 and 48, T = 512, bf16, plain vs factored"
timeout 250 $PY benchmarks/step_cost.py --device cuda --models 12x768 --batch-sizes 16,48 --seq 512 --bf16 \
  --trainers plain,factored --rounds 20 --memory-runs 1 --json "$OUT/step_cost_gpu.json" >"$OUT/step_cost_gpu.txt" 2>&1
log "step cost exit $? (table: step_cost_gpu.txt)"

log "profile: 12x768, bf16, 40 steps"
timeout 110 $PY benchmarks/step_profile.py --device cuda --models 12x768 --bf16 --steps 40 \
  --json "$OUT/step_profile_gpu.json" >"$OUT/step_profile_gpu.txt" 2>&1
log "profile exit $? (table: step_profile_gpu.txt)"

log "op diff: 12x768, B = 16, bf16, 5 profiled steps each (kernel time vs host time, launches)"
timeout 80 $PY benchmarks/op_diff.py --device cuda --model 12x768 --batch 16 --seq 512 --bf16 --steps 5 \
  --warmup 2 --json "$OUT/op_diff_gpu.json" >"$OUT/op_diff_gpu.txt" 2>&1
log "op diff exit $? (table: op_diff_gpu.txt)"

# Last, so that it is the part cut if the call runs out of time: the sketch's own tensor math at 12x768.
log "sketch floor: 12x768, B = 16, T = 512, bf16, 10 rounds"
timeout 60 $PY benchmarks/sketch_floor.py --device cuda --models 12x768 --batch 16 --seq 512 --bf16 --rounds 10 \
  --reps 3 --bound 0.05 --layers --json "$OUT/sketch_floor_gpu.json" >"$OUT/sketch_floor_gpu.txt" 2>&1
log "sketch floor exit $? (table: sketch_floor_gpu.txt)"
log "done"
