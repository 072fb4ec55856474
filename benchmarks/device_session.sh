#!/usr/bin/env bash
# One device session (a machine with 16 CPU cores and a GPU, lent for minutes): the callbacks' overhead on
# the GPU, the GPU recipe check with bf16 mixed precision, then the long-horizon panels and the short robustness grid on the CPU cores, with
# the guard's default band and the edge-of-stability band [1, 2] as a variant. Results land in $OUT as
# JSONL files, resumable; the reports are written afterwards on the development machine from them:
#   python -m benchmarks.long --results benchmarks/long.jsonl            (0 runs, then the report)
#   python -m benchmarks.robustness                                     (likewise)
# Usage (from the repo root): OUT=<dir> WORKERS=14 bash benchmarks/device_session.sh
set -u
OUT="${OUT:?set OUT}"
WORKERS="${WORKERS:-14}"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="${PYTHONPATH:-}:$PWD"
mkdir -p "$OUT"
nproc; nvidia-smi -L 2>/dev/null
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"

# 1. the callbacks' overhead on the GPU (alone on the machine: whole fits judged on wall time; the
#    section overhead_gpu of $OUT/RESULTS.md, to be copied into benchmarks/RESULTS.md)
timeout 420 python3 -m benchmarks.overhead --accelerator gpu --rounds 7 --out "$OUT" > "$OUT/overhead_gpu.log" 2>&1
tail -12 "$OUT/overhead_gpu.log"

# 2. the default recipe on the GPU in bf16 mixed precision (background, one GPU)
( timeout 240 python3 -m recipes.train trainer=gpu trainer.precision=bf16-mixed \
    hydra.run.dir="$OUT/gpu_run" > "$OUT/gpu_recipe.log" 2>&1; echo "recipe exit $?" >> "$OUT/gpu_recipe.log" ) &

# 3. long panels (all policies, the default guard) and the guard variant, then the short grid
python3 -m benchmarks.long --workers "$WORKERS" --results "$OUT/long.jsonl" --no-report --no-progress
python3 -m benchmarks.long --workers "$WORKERS" --policies stablelr --stablelr safety=1.0 recover_above=2.0 \
    --results "$OUT/long_eos.jsonl" --no-report --no-progress
python3 -m benchmarks.robustness --workers "$WORKERS" --results "$OUT/short.jsonl" --no-report --no-progress
python3 -m benchmarks.robustness --workers "$WORKERS" --policies stablelr --stablelr safety=1.0 recover_above=2.0 \
    --results "$OUT/short_eos.jsonl" --no-report --no-progress
wait
tail -5 "$OUT/gpu_recipe.log"
