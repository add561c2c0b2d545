#!/usr/bin/env bash
# Set up (if needed) and run the test suite. `scripts/test.sh --slow` runs the slow tests only;
# `--compat` the torch tests under the oldest transformers pyproject.toml accepts; other
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
. .venv/bin/activate
python -c "import customllm_mlx._blas as b; print('MLX BLAS:', b.loaded or 'reference (slow)')" || true
if [ "${1:-}" = --compat ]; then
    shift
    # transformers' API moves between releases (5.2x renamed the outputs' past_key_values to
    # cache): the floor in pyproject.toml, installed beside the venv's own, must pass too
    floor=$(grep -o '"transformers>=[0-9.]*' pyproject.toml | head -1 | cut -d= -f2)
    target=.venv/compat-transformers-$floor
    # with its own dependencies (huggingface-hub, tokenizers of its day), first on the path
    [ -d "$target" ] || pip install -q --target "$target" "transformers==$floor"
    PYTHONPATH="$PWD/$target" python -c "import transformers as t; print('transformers', t.__version__)"
    PYTHONPATH="$PWD/$target" exec python -m pytest -q tests/test_model_torch.py \
        tests/test_loss_torch.py tests/test_train_torch.py tests/test_generate.py \
        tests/test_parity.py "$@"
fi
if [ "${1:-}" = --slow ]; then
    shift
    exec python -m pytest -m slow -q "$@"
fi
exec python -m pytest -q "$@"
