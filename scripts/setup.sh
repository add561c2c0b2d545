#!/usr/bin/env bash
# Create .venv and install the project. Usage: scripts/setup.sh [EXTRAS]  (default: mlx)
# On Linux it also installs Debian's OpenBLAS when possible: customllm_mlx preloads it so MLX's
# CPU matmuls run ~40x faster than with the reference BLAS its wheel links.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-mlx}"
if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/libopenblas.so.0 /usr/lib64/libopenblas.so.0 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        # A fresh machine may have no package lists yet: update them if the first try fails.
        { apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                && apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1; }; } \
            || echo "note: could not install libopenblas0-pthread; MLX will use its slow reference BLAS"
    else
        echo "note: install OpenBLAS (e.g. apt-get install libopenblas0-pthread) for fast MLX on Linux CPU"
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
if [[ "$extras" == *torch* || "$extras" == all ]]; then
    # CPU wheel pinned for tests/CI on this kind of machine; the package itself takes torch>=2.4.
    pip install -q "torch==${CUSTOMLLM_TORCH_VERSION:-2.13.0}"
fi
pip install -q -e ".[$extras]"
