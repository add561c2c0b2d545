"""CustomLLM in MLX. On Linux CPU, importing this package first loads OpenBLAS for MLX's matmuls."""

from customllm_mlx._blas import preload_openblas

preload_openblas()

from customllm_mlx.io import load, save  # noqa: E402
from customllm_mlx.model import CustomLLM  # noqa: E402

__all__ = ["CustomLLM", "load", "save"]
