#!/usr/bin/env bash
# Quick start: set up MLX, train the `tiny` preset on the built-in corpus for a few minutes,
# then generate from the result. Works offline: without Hugging Face hub access it first trains
# a small byte-level BPE tokenizer on the built-in corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh mlx
. .venv/bin/activate
out="${OUT:-runs/quickstart}"
steps="${STEPS:-600}"
tokenizer="${TOKENIZER:-}"
if [ -z "$tokenizer" ]; then
    if python -c "import sys; from customllm.tokenizer import hub_unreachable_reason as r; sys.exit(1 if r() else 0)"; then
        tokenizer=HuggingFaceTB/cosmo2-tokenizer
    else
        tokenizer="$out/tokenizer"
        [ -f "$tokenizer/tokenizer.json" ] || python -c "from customllm.tokenizer import train_tokenizer; train_tokenizer('builtin', 8192, '$tokenizer')"
    fi
fi
if [ -d "$out/checkpoint-$steps" ]; then  # run again: the trained model is there, generate
    echo "quickstart: $out/checkpoint-$steps is already trained (OUT=another/folder starts anew)"
else  # a run cut short (Ctrl-C saves a checkpoint) continues where it stopped
    resume=()
    compgen -G "$out/checkpoint-*" >/dev/null && resume=(--resume)
    customllm-mlx train --preset tiny --data builtin --tokenizer "$tokenizer" --steps "$steps" \
        --out "$out" --eval-every 200 --save-every 200 --prompt "The import statement" "${resume[@]}"
fi
customllm-mlx generate --model "$out/checkpoint-$steps" -p "The import statement" -m 60 --temp 0.7 --seed 0
