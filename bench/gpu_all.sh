#!/usr/bin/env bash
# Everything that needs a GPU, in one call: GPU tests, kernel micro-benchmark, throughput benchmarks.
# Usage on the device machine: bash bench/gpu_all.sh [quick]; results under $OUT (or /tmp/nanoserve-out).
set -u
OUT=${OUT:-/tmp/nanoserve-out}
mkdir -p "$OUT"
# The GPU image has torch/triton/transformers; the few small packages it may lack come as carried wheels
# (.device_wheels, filled by `pip download` on a machine with an index), since it reaches no registry.
for mod in xxhash pytest pytest_timeout; do
  python -c "import $mod" 2>/dev/null || pip install -q --no-deps --no-index --find-links .device_wheels \
    "$(echo $mod | tr _ -)" $([ $mod = pytest ] && echo pluggy iniconfig) >>"$OUT/pip.log" 2>&1
done
# The repo's folders as the nanoserve package, without installing it (the image has no network).
PKG=/tmp/nanoserve-pkg
mkdir -p $PKG/nanoserve
cp nanoserve_pkg/__init__.py $PKG/nanoserve/
for d in engine_pod kernels common gateway operator; do ln -sfn "$PWD/$d" "$PKG/nanoserve/$d"; done
export PYTHONSAFEPATH=1 PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
python - <<'PY' > "$OUT/env.txt" 2>&1
import torch, triton, transformers, sys
print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print(torch.cuda.get_device_name(), torch.cuda.device_count(), "GPUs")
PY
cat "$OUT/env.txt"
run() { echo "== $*"; "$@" 2>&1 | tee -a "$OUT/log.txt" | grep -E "RESULT|passed|failed|error|Error|card" ; }
run python -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_gpu.py -x
run python bench/attention_kernel.py
run python bench/throughput.py --profile
[ "${1:-}" = quick ] && exit 0
run python bench/throughput.py --enforce-eager
run python bench/throughput.py --block-size 256 --label graphs-block256
run python bench/throughput.py --prefix-sharing
if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  run python bench/throughput.py --tp 2 --label graphs-tp2
  run python bench/throughput.py --label graphs-tp1-same-machine
fi
