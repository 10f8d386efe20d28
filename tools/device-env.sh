# Sourced by the tools/device-*.sh scripts: what a run on the lent GPU machine needs first.
# The carried wheels (.whl, from ../shared/tools/gpu-wheels) are installed once per machine into
# /tmp/site; $OUT (the device tool's folder that comes back) defaults to out/device elsewhere.
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
fi
export PYTHONPATH=/tmp/site:$PWD
