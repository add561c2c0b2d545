#!/usr/bin/env bash
# The GPU run of the benchmarks (docs/benchmarks.md): on a CUDA machine, in one command,
#   1. bench_train.py, torch rows (ours and transformers' DeepseekV3), 973m, bfloat16 autocast
#      with float32 weights (as `customllm-torch train --dtype bfloat16`), batch 8 x 256 (the
#      benchmark configuration), MFU against the bf16 GEMM peak measured in the same run;
#   2. the same with torch.compile;
#   3. `customllm-torch train` itself for a few steps on that device (tokens/s from its log);
#      stage product_compiled: the same with `--compile ${PRODUCT_COMPILE_MODE:-default}`;
#   4. the MLX rows on the GPU where `import mlx.core` works there (mlx[cuda] installed).
# Each step writes its JSON and log to OUT before the next starts, so a run cut short keeps
# what it finished. Needs torch (a CUDA build) and transformers; MLX is optional.
#
# Set up on the CUDA machine, from the repository root:
#   bash scripts/setup.sh torch && . .venv/bin/activate
#   # or, where a CUDA build of torch is installed already: pip install -e ".[torch]"
#   pip install "mlx[cuda]"                               # optional: the MLX rows of step 4
# then run the benchmark:
#   bash benchmarks/gpu_bench.sh OUT                  # from the repo root
#   DEVICE=cpu PRESET=tiny BATCH=2 SEQ=32 STEPS=2 TRAIN_STEPS=3 GEMM_N=256 \
#       bash benchmarks/gpu_bench.sh /tmp/gpu_bench   # the same script, checked on a CPU
#
# The tokenizer for step 3: TOKENIZER, a tokenizer folder or a Hugging Face hub name (default
# HuggingFaceTB/cosmo2-tokenizer, downloaded on first use).
#
# STAGES picks and orders the steps (default: torch_eager mlx product torch_compiled, the one
# most likely to run long last; also "product_compiled", step 3 with --compile, and "generate":
# bench_generate.py's torch rows, prefill and decode, with ours' per-expert loop as a row on
# CUDA; each step writes a log and a JSON); DEADLINE (seconds, 0 = none) stops each step at
# what is left of it, so a time limit cuts a step, not the whole run and its files; RUN_DIR is
# where step 3 writes its 973m checkpoint (default: a temporary folder, not OUT, which keeps
# the results alone); TORCH_ONLY, the --only of step 1 (default: every eager torch row);
# TORCH_COMPILED_ONLY, step 2's (default: both; transformers' compiled model took over 5
# minutes on an H200: 'customllm/torch/compiled' alone), TORCH_COMPILE_MODE its torch.compile
# mode (reduce-overhead: CUDA graphs, for a step bound by launches, as 973m at 8 x 256 is);
# MLX_ONLY, step 4's (default: ours and mlx_lm's compiled rows; on CUDA mlx_lm's fails: MLX has
# no VJP of its masked attention there).
set -uo pipefail

OUT=${1:-gpu_bench_out}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-973m}
BATCH=${BATCH:-8}
SEQ=${SEQ:-256}
STEPS=${STEPS:-10}
TRAIN_STEPS=${TRAIN_STEPS:-30}
GEMM_N=${GEMM_N:-8192}
PYTHON=${PYTHON:-python3}
STAGES=${STAGES:-torch_eager mlx product torch_compiled}
DEADLINE=${DEADLINE:-0}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
RUN_DIR=${RUN_DIR:-$(mktemp -d)/run_torch}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

step() {  # step NAME COMMAND...: run, keep its log, remember a failure, go on
    local name=$1 limit=()
    shift
    if [ "$DEADLINE" -gt 0 ]; then
        local left=$((DEADLINE - SECONDS))
        [ "$left" -gt 20 ] || { echo "== $name skipped: ${left}s left of DEADLINE"; status=1; return; }
        limit=(timeout "$left")
    fi
    echo "== $name: $* ($SECONDS s in)"
    "${limit[@]}" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed (rc $rc)"; status=1; }
}

"$PYTHON" - <<'EOF' | tee "$OUT/environment.log"
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
EOF

bench=(benchmarks/bench_train.py --preset "$PRESET" --batch "$BATCH" --seq-len "$SEQ"
       --steps "$STEPS" --gemm-n "$GEMM_N" --dtype bfloat16)
TOKENIZER=${TOKENIZER:-HuggingFaceTB/cosmo2-tokenizer}

for stage in $STAGES; do
    case $stage in
    torch_eager)
        step train_torch_eager "$PYTHON" "${bench[@]}" --frameworks torch --device "$DEVICE" \
            --only "${TORCH_ONLY:-eager}" --json "$OUT/train_torch_eager.json" ;;
    torch_compiled)
        step train_torch_compiled "$PYTHON" "${bench[@]}" --frameworks torch --device "$DEVICE" \
            --only "${TORCH_COMPILED_ONLY:-/compiled}" --torch-compile \
            ${TORCH_COMPILE_MODE:+--torch-compile-mode "$TORCH_COMPILE_MODE"} \
            --json "$OUT/train_torch_compiled.json" ;;
    product | product_compiled)
        name=product_torch_train out=$RUN_DIR compile=()
        if [ "$stage" = product_compiled ]; then
            name=product_torch_train_compiled out=$RUN_DIR-compiled
            compile=(--compile "${PRODUCT_COMPILE_MODE:-default}")
        fi
        step "$name" "$PYTHON" -m customllm_torch.cli train --device "$DEVICE" \
            --preset "$PRESET" --dtype bfloat16 --data builtin --tokenizer "$TOKENIZER" \
            --seq-len "$SEQ" --batch-size "$BATCH" --steps "$TRAIN_STEPS" --warmup-steps 5 \
            --eval-every 0 --save-every 0 --sample-every 0 --log-every 5 --out "$out" \
            "${compile[@]}" ;;
    mlx)
        if "$PYTHON" -c "import mlx.core" 2>/dev/null; then
            step train_mlx "$PYTHON" "${bench[@]}" --frameworks mlx \
                --only "${MLX_ONLY:-customllm/mlx/compiled\$,deepseek_v3/mlx/compiled\$}" \
                --json "$OUT/train_mlx.json"
        else
            echo "== train_mlx skipped: MLX is not installed here"
        fi ;;
    generate)
        step generate_torch "$PYTHON" benchmarks/bench_generate.py --preset "$PRESET" \
            --frameworks torch --device "$DEVICE" --dtype bfloat16 \
            --contexts "${GEN_CONTEXTS:-128,1024}" \
            --json "$OUT/generate_torch.json" ;;
    *) echo "unknown stage $stage (torch_eager, torch_compiled, product, product_compiled, mlx," \
            "generate)"; exit 2 ;;
    esac
done
exit $status
