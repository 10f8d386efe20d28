#!/usr/bin/env bash
# Train the sketch model on the lent GPU machine (the `device` tool), across calls of at most 10 minutes.
# The trainer runs as its own session (setsid), so it keeps training between calls while the machine is warm.
#
#   tools/device-sketch.sh start MINUTES   install the carried wheels, start training
#   tools/device-sketch.sh watch SECONDS   follow the log; export and evaluate each new DiT checkpoint on the CPU
#   tools/device-sketch.sh finish          wait for the trainer and the last evaluation, pack the model into $OUT
#   tools/device-sketch.sh stop            stop the trainer now (SIGTERM: it checkpoints and exports its model),
#                                          pack the model into $OUT: a run the session's device time cannot
#                                          finish, to go on elsewhere with --dit-from
#   tools/device-sketch.sh more MINUTES    after finish, on the same machine: resume the run bit for bit with a
#                                          larger budget (training past a budget to see where the curve goes)
#                                          (EVALUATE=0: no evaluation on the GPU machine, when its time is short)
#   tools/device-sketch.sh times           time a training step per batch size first (tools/sketch-step-times.py;
#                                          TIMES_ARGS: its options, e.g. "--dit-batches 32 --dit-outline-weights 0,16")
#
# A machine taken back mid-run: unpack the newest latest-model.tar.part-* into runs/carry here, carry it, and
# start again with TRAIN_ARGS="--dit-from runs/carry/<name>-model <the lost run's settings>" (README: training).
#
# Environment: DEVICE (cuda), CONFIG (default), RUN (runs/sketch), SCHEDULES (below), TRAIN_ARGS (more
# `train` options), COMPILE (1 or a torch.compile mode: train --compile [MODE], at start and at more),
# CHECKPOINT_EVERY (steps, 1500; each DiT checkpoint is exported and evaluated, one at a time). $OUT
# receives the log, the evaluations (evals.tgz), the newest evaluated checkpoint's model
# (latest-model.tar.part-*) and, at finish and stop, model.tar.part-* (join with `cat model.tar.part-* | tar x`)
# in its place; with TRAINING_WEIGHTS=1 also training-model.tar.part-*, the last checkpoint's training weights
# rather than their EMA (`train --export-weights training`: what the EMA's lag costs).
# Two runs side by side on one GPU (an A/B in one session's device time): give each its own RUN and a TAG
# that prefixes its files in $OUT (TAG=a- RUN=runs/a ...; $OUT takes 8 files in all, so 4 a run).
set -u
phase=${1:?start, watch, finish, stop, more or times}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-default}
RUN=${RUN:-runs/sketch}
TAG=${TAG:-}
. "$(dirname "$0")/device-env.sh"
mkdir -p "$RUN/evals"
log=$RUN/train.log
case ${COMPILE:-0} in 0) compile= ;; 1) compile=--compile ;; *) compile="--compile $COMPILE" ;; esac

# The trainer is found by the process id it writes at start and more, not by a pattern: pgrep -f also matches any
# shell whose command line holds the pattern, such as a device call that waits on the trainer, and stop's pkill
# then killed that call before it could pack the model (the fifteenth run's second part).
spawn() {  # spawn PIDFILE COMMAND...: in its own session; the bash that writes the id execs it, so the id is COMMAND's
  local pidfile=$1; shift
  setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null &
}
alive() {  # alive PIDFILE WORD: the id in PIDFILE, while that process still runs with WORD in its command line
  local pid
  pid=$(cat "$1" 2>/dev/null) && grep -qa "$2" "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}
launch() { spawn "$RUN/trainer.pid" python3 -m instrument.sketch.train "$@"; }
trainer_pid() { alive "$RUN/trainer.pid" instrument.sketch.train; }
training() { trainer_pid >/dev/null; }

# Each checkpoint is measured under several 4-step schedules (the model trains on uniform sigmas too, so
# any of them may serve best): NAME=T1,T2,T3,T4@SHIFT, or NAME=native for the schedule the run trained with.
SCHEDULES=${SCHEDULES:-native=native s8=1000,750,500,250@8 s3=1000,750,500,250@3 late=1000,950,850,300@1}

# The evaluation in flight is found by the process id it writes, as the trainer is: a pattern matched any run's
# evaluations, so with two runs side by side each one's evaluations held back the other's.
evaluating() { alive "$RUN/evals/evaluator.pid" "$(basename "$0")" >/dev/null; }

evaluate_latest() {  # export the newest DiT checkpoint on the CPU and measure it, in its own session
  local name             # (a device call's leftover processes end with it; these run on into the next call)
  name=$(cat "$RUN/checkpoints/latest" 2>/dev/null) || return
  case $name in dit-*|done-*) ;; *) return ;; esac
  [ -e "$RUN/evals/$name.started" ] && return
  evaluating && return   # one at a time: the evaluations share the host's cores with the trainer's loop
  touch "$RUN/evals/$name.started"
  # niced: unniced, the evaluations' 16 threads took the trainer's host thread from it (the eighth run's
  # rate swung between 3.2 and 5.3 steps a second, 50 steps at a time, with the evaluations coming and going)
  spawn "$RUN/evals/evaluator.pid" nice -n 19 bash "$0" evaluate "$name" >/dev/null 2>&1
}

report() {
  cp "$log" "$OUT/${TAG}train.log" 2>/dev/null
  for f in "$RUN"/evals/*.log; do
    [ -e "$f" ] && grep -hE "prompt following on|shape following \(stream\) on|word use \(|shape denoising \(|word ablation" "$f" | sed "s|^|$(basename "$f" .log): |"
  done
  tar -C "$RUN" -czf "$OUT/${TAG}evals.tgz" --exclude='*-model' evals 2>/dev/null
  # the newest exported checkpoint comes back each call, so a machine taken back mid-run loses little
  latest=$(ls -td "$RUN"/evals/*-model 2>/dev/null | head -1)
  [ -n "$latest" ] && tar -C "$(dirname "$latest")" -cf - "$(basename "$latest")" | split -b 15m - "$OUT/${TAG}latest-model.tar.part-"
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  true
}

case $phase in
times)
  python3 tools/sketch-step-times.py --device "$DEVICE" --steps 5 --json "$OUT/step-times.json" ${TIMES_ARGS:-} 2>&1 \
    | grep -v Warning
  ;;
evaluate)
  name=${2:?checkpoint name}
  OMP_NUM_THREADS=4 python3 -m instrument.sketch.train --out "$RUN" --export-only "$RUN/evals/$name-model" \
    >"$RUN/evals/$name-export.txt" 2>&1 || exit
  for entry in $SCHEDULES; do
    label=${entry%%=*}; spec=${entry#*=}; args=()
    [ "$spec" = native ] || args=(--schedule "${spec%@*}" --shift "${spec#*@}")
    OMP_NUM_THREADS=3 python3 -m instrument.sketch.evaluate --model "$RUN/evals/$name-model" --only following \
      --captions 60 "${args[@]}" --json "$RUN/evals/$name-$label.json" >"$RUN/evals/$name-$label.log" 2>&1 &
  done
  # whether it uses its colour, shape and background words (seconds; README: word use)
  OMP_NUM_THREADS=2 python3 -m instrument.sketch.evaluate --model "$RUN/evals/$name-model" --only words \
    --json "$RUN/evals/$name-words.json" >"$RUN/evals/$name-words.log" 2>&1 &
  # whether ablating a colour word takes its colour away, the object's and the background's (README: word ablation)
  OMP_NUM_THREADS=2 python3 -m instrument.sketch.evaluate --model "$RUN/evals/$name-model" --only ablation \
    --ablations 10 --json "$RUN/evals/$name-ablation.json" >"$RUN/evals/$name-ablation.log" 2>&1 &
  # whether a shape word overrides the outline the noised frames show (README: shape denoising)
  OMP_NUM_THREADS=3 python3 -m instrument.sketch.evaluate --model "$RUN/evals/$name-model" --only denoising \
    --shape-frames 6000 --json "$RUN/evals/$name-denoising.json" >"$RUN/evals/$name-denoising.log" 2>&1 &
  # whether the stream draws the caption's shape, and frame by frame whether later chunks keep it (the reader
  # trains first, about a minute)
  OMP_NUM_THREADS=4 python3 -m instrument.sketch.evaluate --model "$RUN/evals/$name-model" --only shapes \
    --captions 60 --shape-frames 6000 --json "$RUN/evals/$name-shapes.json" >"$RUN/evals/$name-shapes.log" 2>&1 &
  wait
  ;;
start)
  minutes=${2:?minutes}
  [ -e "$log" ] && { echo "$RUN already holds a run"; exit 1; }
  launch --out "$RUN" --minutes "$minutes" --device "$DEVICE" --config "$CONFIG" \
    --checkpoint-every ${CHECKPOINT_EVERY:-1500} $compile ${TRAIN_ARGS:-} >"$log" 2>&1
  sleep 5; cat "$log"; report
  ;;
more)
  minutes=${2:?minutes}
  training && { echo "still training: finish first"; exit 1; }
  [ -e "$RUN/checkpoints/latest" ] || { echo "$RUN holds no run to go on with"; exit 1; }
  echo "--- more: resumed with a budget of $minutes minutes" >>"$log"
  launch --out "$RUN" --minutes "$minutes" --device "$DEVICE" --checkpoint-every ${CHECKPOINT_EVERY:-1500} \
    $compile --resume >>"$log" 2>&1
  sleep 5; tail -n 3 "$log"; report
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
stop)
  pid=$(trainer_pid) && kill -TERM "$pid"
  while training; do sleep 2; done
  tail -n 3 "$log"; report
  ;;
finish)
  while training; do sleep 5; done
  if [ "${EVALUATE:-1}" = 1 ]; then
    while evaluating; do sleep 5; done  # an earlier checkpoint's, which would make the last one wait its turn
    evaluate_latest; sleep 2
    while evaluating; do sleep 5; done
  fi
  tail -n 5 "$log"; report
  ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac

case $phase in
stop|finish)
  [ -f "$RUN/model/model_index.json" ] || { echo "no model folder in $RUN"; exit 1; }
  tar -C "$RUN" -cf - model | split -b 15m - "$OUT/${TAG}model.tar.part-"
  # the model that came back supersedes the newest checkpoint's (and $OUT holds at most 8 files)
  rm -f "$OUT/${TAG}"latest-model.tar.part-*
  if [ "${TRAINING_WEIGHTS:-0}" = 1 ]; then
    python3 -m instrument.sketch.train --out "$RUN" --export-only "$RUN/training-model" --export-weights training \
      2>&1 | tail -n 1
    tar -C "$RUN" -cf - training-model | split -b 15m - "$OUT/${TAG}training-model.tar.part-"
  fi
  ls -l "$OUT"
  ;;
esac
