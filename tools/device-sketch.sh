#!/usr/bin/env bash
# Train the sketch model on the lent GPU machine (the `device` tool), across calls of at most 10 minutes.
# The trainer runs as its own session (setsid), so it keeps training between calls while the machine is warm.
#
#   tools/device-sketch.sh start MINUTES   install the carried wheels, start training
#   tools/device-sketch.sh watch SECONDS   follow the log; export and evaluate each new DiT checkpoint on the CPU
#   tools/device-sketch.sh finish          wait for the trainer, pack the model folder into $OUT in parts
#
# Environment: DEVICE (cuda), CONFIG (default), RUN (runs/sketch). $OUT receives the log, the evaluations and,
# at finish, model.tar.part-* (join with `cat model.tar.part-* | tar x`).
set -u
phase=${1:?start, watch or finish}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-default}
RUN=${RUN:-runs/sketch}
. "$(dirname "$0")/device-env.sh"
mkdir -p "$RUN/evals"
log=$RUN/train.log

training() { pgrep -f "instrument.sketch.train --out $RUN --minutes" >/dev/null; }

evaluate_latest() {  # export the newest DiT checkpoint on the CPU and measure its prompt following
  local name
  name=$(cat "$RUN/checkpoints/latest" 2>/dev/null) || return
  case $name in dit-*|done-*) ;; *) return ;; esac
  [ -e "$RUN/evals/$name.started" ] && return
  touch "$RUN/evals/$name.started"
  (OMP_NUM_THREADS=6 python3 -m instrument.sketch.train --out "$RUN" --export-only "$RUN/evals/$name-model" &&
   OMP_NUM_THREADS=6 python3 -m instrument.sketch.evaluate --model "$RUN/evals/$name-model" --only following \
     --captions 40 --json "$RUN/evals/$name.json") >"$RUN/evals/$name.log" 2>&1 &
}

report() {
  cp "$log" "$OUT/" 2>/dev/null
  for f in "$RUN"/evals/*.log; do [ -e "$f" ] && grep -h "prompt following on" "$f" | sed "s|^|$(basename "$f" .log): |"; done
  for f in $(ls -t "$RUN"/evals/*.json 2>/dev/null | head -2); do cp "$f" "$OUT/"; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  true
}

case $phase in
start)
  minutes=${2:?minutes}
  [ -e "$log" ] && { echo "$RUN already holds a run"; exit 1; }
  setsid nohup python3 -m instrument.sketch.train --out "$RUN" --minutes "$minutes" --device "$DEVICE" \
    --config "$CONFIG" --checkpoint-every 300 >"$log" 2>&1 </dev/null &
  sleep 5; cat "$log"; report
  ;;
watch)
  seconds=${2:?seconds}
  end=$((SECONDS + seconds)); shown=0
  while [ $SECONDS -lt $end ]; do
    lines=$(wc -l <"$log"); [ "$lines" -gt "$shown" ] && { tail -n +$((shown + 1)) "$log"; shown=$lines; }
    evaluate_latest
    training || break
    sleep 10
  done
  tail -n +$((shown + 1)) "$log"; report
  ;;
finish)
  while training; do sleep 5; done
  tail -n 5 "$log"; report
  [ -f "$RUN/model/model_index.json" ] || { echo "no model folder in $RUN"; exit 1; }
  tar -C "$RUN" -cf - model | split -b 15m - "$OUT/model.tar.part-"
  ls -l "$OUT"
  ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac
