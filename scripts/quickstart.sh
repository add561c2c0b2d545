#!/usr/bin/env bash
# Quick start: set up MLX, train the `tiny` preset on the built-in stories with the built-in
# 938-token tokenizer (a few minutes on a laptop CPU, no download), then write a story.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh mlx
. .venv/bin/activate
out="${OUT:-runs/quickstart}"
steps="${STEPS:-2000}"
if [ -d "$out/checkpoint-$steps" ]; then  # run again: the trained model is there, generate
    echo "quickstart: $out/checkpoint-$steps is already trained (OUT=another/folder starts anew)"
else  # a run cut short (Ctrl-C saves a checkpoint) continues where it stopped
    resume=()
    compgen -G "$out/checkpoint-*" >/dev/null && resume=(--resume)
    customllm-mlx train --preset tiny --data builtin --steps "$steps" --batch-size 16 \
        --out "$out" --eval-every 500 --save-every 500 --prompt "Once upon a time" "${resume[@]}"
fi
customllm-mlx generate --model "$out/checkpoint-$steps" -p "Once upon a time" -m 100 --temp 0.7 --seed 0
