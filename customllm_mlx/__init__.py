"""CustomLLM in MLX. On Linux CPU, importing this package first loads OpenBLAS for MLX's matmuls
and has MLX order its evaluations breadth-first (for the training step's CPU streams)."""

import os

from customllm_mlx._blas import BFS_ENV, BFS_WIDTH, preload_openblas

if preload_openblas():  # before MLX reads it (cpu_streams.py)
    os.environ.setdefault(BFS_ENV, str(BFS_WIDTH))

from customllm_mlx.io import load, save  # noqa: E402
from customllm_mlx.model import CustomLLM  # noqa: E402

__all__ = ["CustomLLM", "load", "save"]
