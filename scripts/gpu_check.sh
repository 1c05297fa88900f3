#!/usr/bin/env bash
# Every GPU check of the speed issue in one go, sized for one H200 in under 8 minutes:
#   bash scripts/gpu_check.sh            benchmark table (BERT-Base/Large, seq 128/512, hf vs lbllm
#                                        and each optimization), CUDA exactness tests, LAMB step
#                                        against the memory-bandwidth floor
#   bash scripts/gpu_check.sh science    the large-batch comparison at GPU size
#                                        (scripts/batch_scaling_experiment.py --gpu)
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh [science]
#                                        the same commands, CPU-sized (tiny model, few steps): what
#                                        CI runs, so the script cannot rot between GPU sessions
# On an offline GPU host without deepspeed/datasets/hjson/pydantic, copy the project with .whl/
# (bash ../shared/tools/gpu-host-wheels.sh writes it); they are installed to /tmp/site here.
# Results: $OUT (default out/gpu_check/): bench.json, bench.md, optim.txt, exactness.txt, science/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-bench}
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PY" -c 'import deepspeed, hjson, pydantic' 2>/dev/null; then
  [ -d .whl ] || { echo "gpu_check: deepspeed is not importable and there is no .whl/ (run bash ../shared/tools/gpu-host-wheels.sh)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if [ -n "${GPU_CHECK_DRY:-}" ]; then
  DEV=cpu; MODELS=tiny; SEQS=128; STEPS=2; WARM=1; OPTIM="--model base --rounds 1 --device cpu"
  EXACT_DEVICE=cpu; EXACT_TESTS="exact_sparse"; SCIENCE="--smoke"  # CI runs the rest of them itself
else
  DEV=cuda; MODELS=base,large; SEQS=128,512; STEPS=10; WARM=3; OPTIM="--model large --rounds 3 --device cuda"
  EXACT_DEVICE=cuda; EXACT_TESTS="exact"; SCIENCE="--gpu --squad_epochs 0"
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print("gpu_check:", torch.cuda.get_device_name())'
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
fi
t0=$(date +%s)
if [ "$MODE" = science ]; then
  timeout 470 "$PY" scripts/batch_scaling_experiment.py $SCIENCE --out "$OUT/science" | tee "$OUT/science.txt"
  echo "gpu_check science: done in $(( $(date +%s) - t0 )) s; $OUT/science/results.md"
  exit 0
fi
failed=""  # each check runs even when an earlier one failed; the exit code says if any did
echo "== 1/3 pretraining throughput ($MODELS, seq $SEQS)"
timeout 250 "$PY" scripts/bench_pretrain.py --device $DEV --models $MODELS --seqs $SEQS --steps $STEPS \
  --warmup $WARM ${BENCH_DATA:+--data "$BENCH_DATA"} --json "$OUT/bench.json" | tee "$OUT/bench.txt" || failed+=" bench"
[ -f "$OUT/bench.json" ] && "$PY" scripts/bench_pretrain.py --render "$OUT/bench.json" > "$OUT/bench.md"
echo "== 2/3 exactness of each fast path against the plain path (device $EXACT_DEVICE)"
LBLLM_TEST_DEVICE=$EXACT_DEVICE timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_bench_pretrain.py -k "$EXACT_TESTS" \
  2>&1 | tee "$OUT/exactness.txt" || failed+=" exactness"
echo "== 3/3 LAMB step against the memory-bandwidth floor"
timeout 80 "$PY" scripts/bench_optim.py $OPTIM 2>&1 | tee "$OUT/optim.txt" || failed+=" optim"
echo "gpu_check: done in $(( $(date +%s) - t0 )) s; table in $OUT/bench.md${failed:+; FAILED:$failed}"
[ -z "$failed" ]
