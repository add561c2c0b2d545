#!/usr/bin/env bash
# Set up (if needed) and run the test suite. `scripts/test.sh --slow` runs the slow tests only;
# `--compat` the torch tests under the oldest transformers pyproject.toml accepts; other
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
. .venv/bin/activate
python -c "import customllm_mlx as c; print('MLX BLAS:', c.setup_cpu() or 'reference (slow)')" || true
if [ "${1:-}" = --compat ]; then
    # The oldest versions pyproject.toml accepts, each installed beside the venv's own (with
    # its dependencies of its day) and first on the path, must pass too: transformers' API
    # moves (5.2x renamed the outputs' past_key_values to cache) and MLX before 0.32.3
    # miscompiles a bit view inside mx.compile on the CPU (customllm_mlx.loss.exp: inf).
    shift
    floor() { grep -o "\"$1>=[0-9.]*" pyproject.toml | head -1 | cut -d= -f2; }
    overlay() {  # overlay DIR REQUIREMENT...: install once, print the folder
        [ -d "$1" ] || pip install -q --target "$@" >&2
        echo "$PWD/$1"
    }
    # with the kernels of its day: the venv's newer kernels (a dependency of current
    # transformers) breaks an older transformers at import
    tf=$(overlay ".venv/compat/transformers-$(floor transformers)-kernels" \
        "transformers==$(floor transformers)" "kernels>=0.10.2,<0.11")
    PYTHONPATH="$tf" python -c "import transformers as t; print('transformers', t.__version__)"
    PYTHONPATH="$tf" python -m pytest -q tests/test_model_torch.py tests/test_loss_torch.py \
        tests/test_train_torch.py tests/test_generate.py tests/test_parity.py "$@"
    mlx=$(floor 'mlx\[cpu\]')
    lm=$(overlay ".venv/compat/mlx-$mlx" --no-deps "mlx==$mlx" "mlx-cpu==$mlx" \
        "mlx-lm==$(floor mlx-lm)")
    PYTHONPATH="$lm" python -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, 'mlx-lm', mlx_lm.__version__)"
    PYTHONPATH="$lm" exec python -m pytest -q tests/test_model_mlx.py tests/test_loss_mlx.py \
        tests/test_train_mlx.py tests/test_generate.py tests/test_parity.py "$@"
fi
if [ "${1:-}" = --slow ]; then
    shift
    exec python -m pytest -m slow -q "$@"
fi
exec python -m pytest -q "$@"
