#!/usr/bin/env bash
# The two-phase mixed-batch recipe (You et al. 2020; NVIDIA's BERT recipe) in one command:
#   phase 1: seq 128 shards, ds_configs/lamb_64k.json (batch 64k, warmup 2000 of 7038)
#   phase 2: seq 512 shards, ds_configs/lamb_32k.json (batch 32k, re-warmup 200 of 1563),
#            starting from phase 1's fp32 weights and LAMB moments (OUT/phase1/phase_state.pt);
#            step count, bias correction and LR schedule restart. Phase 2 may use another
#            number of nodes or ZeRO stage.
#
#   scripts/pretrain_two_phase.sh OUT DATA_128 DATA_512 [extra pretrain_bert.py args...]
#
# Environment: LAUNCHER (default: "deepspeed"; e.g. "deepspeed --hostfile hosts" or
# "python" for one process), PHASE1_CONFIG, PHASE2_CONFIG, MODEL_CONFIG (default large).
# Re-running the same command continues: a finished phase (phase_state.pt written at its
# end) is skipped, an interrupted one resumes from its newest checkpoint (--resume auto;
# pass --save_interval N to checkpoint during a phase).
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 OUT DATA_128 DATA_512 [extra pretrain_bert.py args...]" >&2
    exit 2
fi
OUT=$1; DATA1=$2; DATA2=$3; shift 3
LAUNCHER=${LAUNCHER:-deepspeed}
PHASE1_CONFIG=${PHASE1_CONFIG:-ds_configs/lamb_64k.json}
PHASE2_CONFIG=${PHASE2_CONFIG:-ds_configs/lamb_32k.json}
MODEL_CONFIG=${MODEL_CONFIG:-large}
cd "$(dirname "$0")/.."
for d in "$DATA1" "$DATA2"; do
    [ -f "$d/manifest.json" ] || { echo "$0: error: $d has no manifest.json (prepare it with data_prep/create_shards.py)" >&2; exit 2; }
done

if [ -f "$OUT/phase1/phase_state.pt" ] && [ -d "$OUT/phase1/final" ]; then
    echo "[two-phase] phase 1 already finished in $OUT/phase1"
else
    echo "[two-phase] phase 1: $PHASE1_CONFIG on $DATA1"
    $LAUNCHER pretrain_bert.py --deepspeed_config "$PHASE1_CONFIG" --data_dir "$DATA1" \
        --output_dir "$OUT/phase1" --model_config "$MODEL_CONFIG" --phase 1 --resume auto "$@"
fi
echo "[two-phase] phase 2: $PHASE2_CONFIG on $DATA2, from $OUT/phase1"
$LAUNCHER pretrain_bert.py --deepspeed_config "$PHASE2_CONFIG" --data_dir "$DATA2" \
    --output_dir "$OUT/phase2" --model_config "$MODEL_CONFIG" --phase 2 --init_checkpoint "$OUT/phase1" \
    --resume auto "$@"
echo "[two-phase] done: $OUT/phase2/final"
