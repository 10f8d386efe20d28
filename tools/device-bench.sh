#!/usr/bin/env bash
# One device call (the `device` tool, nvidia-h200) that benches the speed variants of a BENCHMARKS.md round:
# the real Wan2.1-T2V-1.3B configuration with random weights, TAEHV of random weights, 832x480, chunk 3,
# unbent and bent phases each. Each variant writes $OUT/<name>.json; the compile cache is shared, so only
# the first variant compiles cold.
#
#   tools/device-bench.sh [SECONDS]        # default 15 s timed per phase
#   DEVICE=cpu DECODER=wan SIZE=128x128 tools/device-bench.sh 1   # a dry run of the script on a CPU
#   VARIANTS="base overlap" tools/device-bench.sh 8             # some of the round's variants only
#
# Carry .whl (../shared/tools/gpu-wheels). Variants: name, then extra `instrument bench` arguments.
set -u
seconds=${1:-15}
DEVICE=${DEVICE:-cuda}
DECODER=${DECODER:-tiny}
SIZE=${SIZE:-832x480}
. "$(dirname "$0")/device-env.sh"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader 2>/dev/null
git rev-parse --short HEAD 2>/dev/null

variant() {
  local name=$1; shift
  case " ${VARIANTS:-$name} " in *" $name "*) ;; *) return ;; esac   # VARIANTS="a b": only those
  echo "== $name: $*"
  python3 -m instrument.cli bench --device "$DEVICE" --decoder "$DECODER" --size "$SIZE" --chunk 3 --seconds "$seconds" \
    --json "$OUT/$name.json" "$@" 2>&1 | grep -E "^\[.*(phase|bend overhead|FP8|profile:|error|tiny decoder)|Error|error:" | tail -n 12
}

# Round 12: the Wan VAE figure again (last measured in round 2, before the page-locked copy), the fastest
# setting as the reference, and play's knob-to-photon latency with the just-in-time control reads (--pacing
# latency, the default) against --pacing smooth, 1- and 3-frame chunks, on the random 1.3B model.
# TESTS=0 skips the GPU tests first; LATENCY=0 skips play (~4 minutes: 4 runs of warm-up + 25 s).
if [ "${TESTS:-1}" = 1 ] && [ "$DEVICE" = cuda ]; then
  python3 -m pytest -q -p no:cacheprovider -p no:logging tests/test_gpu.py 2>&1 | tail -n 15
fi
variant fp8-w9 --fp8 --window 9
variant wan-vae --decoder wan --phases unbent
if [ "${LATENCY:-1}" = 1 ] && [ "$DEVICE" = cuda ]; then
  for chunk in 3 1; do
    for pacing in latency smooth; do
      echo "== play latency: --chunk $chunk --pacing $pacing --fp8 --window 9, random 1.3B"
      python3 tools/play-latency.py --chunk "$chunk" --settle 5 --seconds 25 --json "$OUT/play-chunk$chunk-$pacing.json" -- \
        --device cuda --model random:1.3b --decoder tiny --fp8 --window 9 --size "$SIZE" --pacing "$pacing" 2>&1 \
        | grep -E "warm in|^played|Error|error" | tail -n 3
    done
  done
fi
ls -l "$OUT"
