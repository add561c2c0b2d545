"""Make MLX's Linux CPU backend use an optimised BLAS.

The Linux `mlx[cpu]` wheel links a reference BLAS (~2.6 GFLOP/s for float32 matmul here).
Loading OpenBLAS with RTLD_GLOBAL before the first `import mlx.core` makes MLX's BLAS symbols
resolve to it (~125 GFLOP/s on 2 cores). Set CUSTOMLLM_NO_OPENBLAS=1 to opt out, or
CUSTOMLLM_OPENBLAS=/path/to/libopenblas.so to choose the library.
"""

from __future__ import annotations

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

loaded: str | None = None


def preload_openblas() -> str | None:
    """Load OpenBLAS globally on Linux if found; returns its path (None if not used)."""
    global loaded
    if loaded or not sys.platform.startswith("linux") or os.environ.get("CUSTOMLLM_NO_OPENBLAS"):
        return loaded
    if "mlx.core" in sys.modules:
        return None  # too late: MLX has already bound its BLAS symbols
    wanted = os.environ.get("CUSTOMLLM_OPENBLAS")
    for path in (wanted,) if wanted else CANDIDATES:
        if path and os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded = path
            break
    return loaded
