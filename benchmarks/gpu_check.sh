#!/usr/bin/env bash
# The prepared GPU check: the three figures that need a GPU, in one short run.
#
#   bash benchmarks/gpu_wheels.sh                 # here, once: wheels for the GPU machine into .whl/
#   bash benchmarks/gpu_check.sh                  # there (device tool, carry .whl): ≤ 8 min on one H100/H200
#   bash benchmarks/gpu_check.sh --cpu-smoke      # anywhere: the same scripts at toy sizes on CPU (a test runs it)
#
# 1. bf16 fused log-prob peak memory and time vs Liger-Kernel's chunked GRPO loss,
#    N = 16k tokens, D = 1536, V = 151936 (benchmarks/logprob_memory.py);
# 2. the recipe's update step on a Qwen2.5-1.5B-shaped random model, 4 × 4096 tokens, with MFU
#    (benchmarks/step_throughput.py);
# 3. native rollout tokens/s vs transformers `generate` (benchmarks/rollout_throughput.py);
# 4. vLLM tensor parallelism under torchrun: the recipe on 2 GPUs, 2 steps of configs/tiny_arith_vllm.yaml
#    with rollout.engine.tensor_parallel_size=2 (one engine for the TP group of ranks 0-1). Runs only with
#    >= 2 GPUs and vLLM installed; otherwise it prints why it was skipped (always so with --cpu-smoke).
# Results go to $OUT (the device tool brings them back) or $POLOPT_BENCH_RESULTS, else
# benchmarks/results/gpu_check/; each file carries the machine, versions, date and command.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
[ "${1:-}" = "--cpu-smoke" ] && mode=cpu
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/polopt_site .whl/*.whl
  export PYTHONPATH=/tmp/polopt_site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
export POLOPT_BENCH_RESULTS=${OUT:-${POLOPT_BENCH_RESULTS:-$PWD/benchmarks/results/gpu_check}}
mkdir -p "$POLOPT_BENCH_RESULTS"
"$PY" - <<'PYEOF'
import torch, sys
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}", flush=True)
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), flush=True)
PYEOF
status=0
run() {  # run NAME SECONDS CMD...: a failed or overlong step is reported and the next one still runs
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$POLOPT_BENCH_RESULTS/gpu_check.log"
  if ! timeout "$limit" "$@" 2>&1 | tee -a "$POLOPT_BENCH_RESULTS/gpu_check.log"; then
    echo "!! $name failed or ran past ${limit}s" | tee -a "$POLOPT_BENCH_RESULTS/gpu_check.log"; status=1
  fi
}
if [ "$mode" = gpu ]; then
  run logprob_memory 150 "$PY" benchmarks/logprob_memory.py --device cuda --tokens 16384 --dim 1536 --vocab 151936 --dtype bfloat16 --repeats 3
  run step_throughput 200 "$PY" benchmarks/step_throughput.py --device cuda --steps 3
  run rollout_throughput 120 "$PY" benchmarks/rollout_throughput.py --device cuda --dtype bfloat16 --threads 8 --repeats 3
else
  run logprob_memory 120 "$PY" benchmarks/logprob_memory.py --tokens 256 --dim 32 --vocab 512 --repeats 1 --threads 1
  run step_throughput 120 "$PY" benchmarks/step_throughput.py --batch 1 --prompt-len 8 --response-len 24 --steps 1 --warmup 0 --threads 1
  run rollout_throughput 120 "$PY" benchmarks/rollout_throughput.py --prompts 2 --samples 2 --prompt-len 8 --new-tokens 4 --repeats 1
fi
# 4. vLLM TP=2 under torchrun (polopt train = tune run = torchrun, 2 processes).
skip() { echo "== $1" | tee -a "$POLOPT_BENCH_RESULTS/gpu_check.log"; echo "-- skipped: $2" | tee -a "$POLOPT_BENCH_RESULTS/gpu_check.log"; }
gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
has_vllm=$("$PY" -c "import importlib.util; print(int(importlib.util.find_spec('vllm') is not None))" 2>/dev/null || echo 0)
if [ "$mode" != gpu ]; then
  skip vllm_tp2 "--cpu-smoke: the TP=2 engine check needs 2 GPUs"
elif [ "$gpus" -lt 2 ]; then
  skip vllm_tp2 "needs >= 2 GPUs, this machine has $gpus"
elif [ "$has_vllm" != 1 ]; then
  skip vllm_tp2 "vLLM is not installed (pip install 'polopt[vllm]')"
else
  tp2_out=$POLOPT_BENCH_RESULTS/vllm_tp2_run
  run vllm_tp2 300 "$PY" -m polopt train --nproc_per_node 2 --config tiny_arith_vllm \
    device=cuda rollout.engine.tensor_parallel_size=2 max_steps=2 "output_dir=$tp2_out" overwrite=true \
    validation.every_n_steps=0 checkpoint_every_n_steps=null save_final_model=false
  run vllm_tp2_result 60 "$PY" -c "import json, sys; s = json.load(open(sys.argv[1])); print(s); assert s['steps'] == 2, s" \
    "$tp2_out/summary.json"
fi
exit $status
