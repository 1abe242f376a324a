# Sourced by the benchmarks/gpu_*.sh device scripts (`source benchmarks/gpu_env.sh` from the repo root):
# installs the carried wheels (.whl) into /tmp/site once per machine, puts the repo and them on
# PYTHONPATH, makes $OUT, and keeps Triton's cache in .triton-cache (carry it to reuse compiled kernels
# and fla's autotune results across device calls).
if [[ ! -f /tmp/site/.gla-wheels ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl && touch /tmp/site/.gla-wheels || exit 1
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton-cache FLA_CACHE_RESULTS=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$TRITON_CACHE_DIR"
