#!/usr/bin/env bash
# Set up (if needed) and run the test suite. `scripts/test.sh --slow` runs the slow tests only;
# other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh all
. .venv/bin/activate
python -c "import customllm_mlx._blas as b; print('MLX BLAS:', b.loaded or 'reference (slow)')" || true
if [ "${1:-}" = --slow ]; then
    shift
    exec python -m pytest -m slow -q "$@"
fi
exec python -m pytest -q "$@"
