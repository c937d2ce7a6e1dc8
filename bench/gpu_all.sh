#!/usr/bin/env bash
# Everything that needs a GPU, in one call: GPU tests, kernel micro-benchmark, throughput benchmarks.
# Usage on the device machine: bash bench/gpu_all.sh [stage ...]; no stage = all of them.
# Stages: tests tp kernel tune gemm throughput gc profile variants fp8kv tp2 structured moe spec routing serving anchor (tune, gemm, gc (a gc.freeze() A/B) and
# offline, the default throughput run alone: only when named; anchor: Nano-vLLM from .anchor, a copy of ../shared/anchor, run twice on the same model folder). Results under $OUT (or /tmp/nanoserve-out).
set -u
OUT=${OUT:-/tmp/nanoserve-out}
mkdir -p "$OUT"
STAGES=" ${*:-tests tp kernel throughput profile variants fp8kv tp2 structured moe spec routing serving anchor} "
want() { [[ "$STAGES" == *" $1 "* ]]; }
# The GPU image has torch/triton/transformers; the few small packages it may lack come as carried wheels
# (.device_wheels, filled by `pip download` on a machine with an index), since it reaches no registry.
for mod in xxhash pytest pytest_timeout uvloop; do
  python -c "import $mod" 2>/dev/null || python -m pip install -q --no-deps --no-index --find-links .device_wheels \
    "$(echo $mod | tr _ -)" $([ $mod = pytest ] && echo pluggy iniconfig) >>"$OUT/pip.log" 2>&1
done
# xgrammar (structured output) with its small dependencies; torch, triton and transformers are the image's
# (--no-deps: pip would look for those in the folder too, and fail).
python -c "import pydantic" 2>/dev/null || python -m pip install -q --no-deps --no-index --find-links .device_wheels \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions >>"$OUT/pip.log" 2>&1
python -c "import tvm_ffi" 2>/dev/null || python -m pip install -q --no-deps --no-index --find-links .device_wheels \
  apache-tvm-ffi >>"$OUT/pip.log" 2>&1
python -c "import xgrammar" 2>/dev/null || python -m pip install -q --no-deps --no-index --find-links .device_wheels \
  xgrammar==0.2.9 >>"$OUT/pip.log" 2>&1
python -c "import xgrammar" || echo "xgrammar did not install: see $OUT/pip.log"
# jsonschema and hypothesis for tests/engine/test_structured_output.py (the structured stage runs it here too).
python -c "import jsonschema, hypothesis" 2>/dev/null || python -m pip install -q --no-deps --no-index \
  --find-links .device_wheels jsonschema jsonschema-specifications referencing rpds-py attrs hypothesis \
  sortedcontainers >>"$OUT/pip.log" 2>&1
# The repo's folders as the nanoserve package, without installing it (the image has no network).
PKG=/tmp/nanoserve-pkg
mkdir -p $PKG/nanoserve
for f in nanoserve_pkg/*.py; do ln -sfn "$PWD/$f" "$PKG/nanoserve/$(basename "$f")"; done  # cli.py, up.py
for d in engine_pod kernels common gateway operator; do ln -sfn "$PWD/$d" "$PKG/nanoserve/$d"; done
export PYTHONSAFEPATH=1 PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH} PYTHONFAULTHANDLER=1 NCCL_DEBUG=WARN
python - <<'PY' > "$OUT/env.txt" 2>&1
import torch, triton, transformers, sys
print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print(torch.cuda.get_device_name(), torch.cuda.device_count(), "GPUs")
PY
cat "$OUT/env.txt"
NGPU=$(python -c 'import torch; print(torch.cuda.device_count())')
# run LIMIT_S CMD...: a command that outlives its limit gets every Python stack dumped (faulthandler on
# SIGABRT, its spawned workers too) and is killed, so one hang cannot eat the whole device call.
descendants() { local c; echo "$1"; for c in $(ps -o pid= --ppid "$1"); do descendants "$c"; done; }
run() {
  local limit=$1; shift
  echo "== $*"
  ( "$@" >>"$OUT/log.txt" 2>&1 ) & local pid=$!
  for _ in $(seq "$limit"); do kill -0 $pid 2>/dev/null || break; sleep 1; done
  if kill -0 $pid 2>/dev/null; then
    echo "HUNG after ${limit}s: $*" | tee -a "$OUT/log.txt"
    nvidia-smi >>"$OUT/log.txt" 2>&1
    local tree; tree=$(descendants $pid)  # the command's processes only (not every python on the machine)
    kill -ABRT $tree 2>/dev/null; sleep 5; kill -9 $tree 2>/dev/null
  fi
  wait $pid
  echo "   exit $?"
  grep -E "RESULT|passed|failed|rror|HUNG" "$OUT/log.txt" | tail -n +$(( $(cat "$OUT/.seen" 2>/dev/null || echo 0) + 1 ))
  grep -cE "RESULT|passed|failed|rror|HUNG" "$OUT/log.txt" > "$OUT/.seen"
}
want tests && run 400 python -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_gpu.py tests/engine/test_gpu_moe.py tests/engine/test_gpu_fp8_weights.py tests/engine/test_fp8_kv_cache.py -k "not tp2"
want tp && [ "$NGPU" -ge 2 ] && run 150 python -m pytest -q -p no:cacheprovider tests/engine/test_gpu.py -k tp2
want kernel && run 200 python bench/attention_kernel.py
want kernel && run 100 python bench/sampling_kernel.py
want tune && run 300 python bench/attention_kernel.py --tune-prefill
want tune && run 300 python bench/attention_kernel.py --tune-decode
want tune && run 300 python bench/attention_kernel.py --tune-decode --fp8
want gemm && run 300 python bench/gemm.py
(want throughput || want offline) && run 200 python bench/throughput.py
want gc && run 200 python bench/throughput.py --gc-freeze --label graphs-gc-freeze
want gc && run 200 python bench/throughput.py --label graphs-again
want throughput && run 200 python bench/throughput.py --profile --label graphs-profiled
want profile && run 200 python bench/profile_steps.py
want variants && run 200 python bench/throughput.py --sync --label graphs-sync
want variants && run 200 python bench/throughput.py --enforce-eager
want variants && run 200 python bench/throughput.py --prefix-sharing
# An fp8 (e4m3) KV cache: the same workload, and its distance from the bf16 cache (logprobs, greedy agreement).
want fp8kv && run 200 python bench/throughput.py --kv-cache-dtype fp8 --profile --label fp8-kv-profiled
want fp8kv && run 200 python bench/throughput.py --kv-cache-dtype fp8 --label fp8-kv
want fp8kv && run 200 python bench/fp8_kv_accuracy.py --model qwen3-0.6b
want fp8kv && run 100 python bench/attention_kernel.py --fp8  # decode attention's bandwidth in fp8 bytes
if want tp2 && [ "$NGPU" -ge 2 ]; then
  run 150 python bench/throughput.py --tp 2 --profile --label graphs-tp2
  run 200 python bench/throughput.py --label graphs-tp1-same-machine
fi
# Structured output: constrained vs unconstrained at batch 1/64/256, the grammars in the grammar process (the
# default here) and on the engine thread alternating, and the mask's host and device cost; then its CPU tests
# here, where the bitmask is pinned (the one that needs two GPUs left out).
want structured && run 400 python bench/structured.py --shapes process inline --rounds 2 --timeline
# (not the random schemas: at bf16 a random model need not close them within max_tokens)
want structured && run 200 python -m pytest -q -p no:cacheprovider tests/engine/test_structured_output.py \
  -k "not preemption and not random_schemas"
want moe && run 400 python bench/moe.py
want moe && run 500 python bench/moe.py --model gpt-oss-20b --layers 4
# n-gram speculative decoding: the edit-style workload with and without it, and Nano-vLLM's workload with it
# (nothing there to match: the cost of looking).
NGRAM='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
want spec && run 200 python bench/throughput.py --repetitive --label repetitive
want spec && run 200 python bench/throughput.py --repetitive --speculative-config "$NGRAM" --label repetitive-ngram
want spec && run 200 python bench/throughput.py --speculative-config "$NGRAM" --label ngram
# ... and at smaller batches, where verify steps should pay (1, 16 and 64 edit-style requests)
for n in 1 16 64; do
  want spec && run 100 python bench/throughput.py --repetitive --num-prompts $n --label repetitive-$n
  want spec && run 100 python bench/throughput.py --repetitive --num-prompts $n --speculative-config "$NGRAM" \
    --label repetitive-$n-ngram
done
# Routing: 3 engines share the GPU; 6 system prompts of ~2,000 tokens, one engine's 320 blocks hold 2 of them.
want routing && run 420 python bench/routing.py --gpu --model qwen3-0.6b --system-words 2000 --kv-blocks 320 \
  --users 60 --turns 3 --rate 3 --think 0.3 --max-tokens 16
# Serving (bench/serving.py): one engine server (and a gateway in front), clients over HTTP, as users see it.
MODEL=$(python -c 'import sys; sys.path.insert(0, "bench"); from common import qwen3_0_6b_path; print(qwen3_0_6b_path())')
serve_and_bench() {  # serve_and_bench LABEL [env assignments]: the server, the gateway, the serving runs
  local label=$1; shift
  env "$@" python -m nanoserve.cli serve --model "$MODEL" --host 127.0.0.1 --port 8700 \
    --served-model-name bench --max-num-batched-tokens 16384 >>"$OUT/serve.log" 2>&1 & local srv=$!
  local direct="--url http://127.0.0.1:8700" via="--url http://127.0.0.1:8701 --metrics-url http://127.0.0.1:8700"
  local records="--records $OUT/serving_records.jsonl"  # each request's figures, for a closer look
  ready() { for _ in $(seq 240); do python -c "import urllib.request as u; u.urlopen('$1/ready')" 2>/dev/null && return; sleep 0.5; done; }
  ready http://127.0.0.1:8700
  # Each run other prompt ids (--salt): none finds the previous one's prompts in the prefix cache.
  run 150 python bench/serving.py $direct --both --salt 1 --label "$label-direct"
  # Gateways of each of GATEWAY_WORKERS processes (default 4, then 8) on the same port, one at a time; the
  # burst's TTFT varies by tens of ms from run to run, so direct runs alternate with the gateway's (SERVING_BURSTS
  # each): compare each gateway run with the direct runs beside it. The last gateway also takes the Poisson run.
  local w workers=(${GATEWAY_WORKERS:-4 8})
  for w in "${workers[@]}"; do
    python -m nanoserve.gateway --host 127.0.0.1 --port 8701 --engine http://127.0.0.1:8700 --log-level WARNING \
      --workers $w >>"$OUT/gateway.log" 2>&1 & local gw=$!
    ready http://127.0.0.1:8701
    for i in $(seq "${SERVING_BURSTS:-3}"); do
      run 150 python bench/serving.py $via --stream --salt $((10 * w + 2 * i)) --label "$label-gateway-w$w" $records
      run 150 python bench/serving.py $direct --stream --salt $((10 * w + 2 * i + 1)) --label "$label-direct-stream" \
        $records
    done
    # Paired bursts: the requests of one burst alternate between the gateway and the engine, so both halves
    # see the same engine (by_url in the result): the gateway's TTFT cost without the bursts' scatter.
    for i in $(seq "${SERVING_PAIRED:-2}"); do
      run 150 python bench/serving.py $via --paired-url http://127.0.0.1:8700 --stream --salt $((50 + 10 * w + i)) \
        --label "$label-paired-w$w" $records
    done
    [ $w != "${workers[-1]}" ] && { kill $gw; wait $gw 2>/dev/null; }
  done
  # Short prompts at once (256 x 32-64 tokens: one prefill step for all): no queue of prefill steps ahead of a
  # request, so its TTFT is the HTTP path's in a burst, through the gateway or not (alternating, 3 each).
  for i in 1 2 3; do
    run 100 python bench/serving.py $direct --stream --input-len 32 64 --output-len 64 128 --salt $((100 + 2 * i)) \
      --label "$label-short-direct" $records
    run 100 python bench/serving.py $via --stream --input-len 32 64 --output-len 64 128 --salt $((101 + 2 * i)) \
      --label "$label-short-gateway-w${workers[-1]}" $records
  done
  run 150 python bench/serving.py $direct --stream --num-prompts 300 --output-len 50 300 --rate 32 --salt 4 \
    --label "$label-poisson32"
  run 150 python bench/serving.py $via --stream --num-prompts 300 --output-len 50 300 --rate 32 --salt 5 \
    --label "$label-gateway-w${workers[-1]}-poisson32"
  kill $gw; kill $srv; wait $srv $gw 2>/dev/null
}
want serving && serve_and_bench default
want anchor && [ -d .anchor ] && run 400 bash .anchor/run.sh "$MODEL" bench
exit 0
