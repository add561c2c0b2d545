"""CustomLLM in MLX. On Linux CPU, importing this package first loads OpenBLAS for MLX's matmuls
and has MLX order its evaluations breadth-first (for the training step's CPU streams)."""

import importlib.metadata
import os
import re

from customllm_mlx._blas import BFS_ENV, BFS_WIDTH, preload_openblas

# MLX before 0.32.3 miscompiles a bit `view` inside mx.compile on the CPU: loss.exp's 2**n
# came out wrong (inf), and with it every loss (tests fail at 0.32.2, pass at 0.32.3)
MIN_MLX = (0, 32, 3)


def check_mlx_version(version: str | None = None) -> None:
    """ImportError naming the problem where the installed MLX is older than MIN_MLX."""
    if version is None:
        try:
            version = importlib.metadata.version("mlx")
        except importlib.metadata.PackageNotFoundError:  # a source build: taken as it is
            return
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:3])
    if found < MIN_MLX:
        wanted = ".".join(map(str, MIN_MLX))
        raise ImportError(
            f"customllm_mlx needs mlx>={wanted}, found {version}: older MLX miscompiles the "
            f"CPU loss (pip install -U 'mlx>={wanted}')"
        )


check_mlx_version()
if preload_openblas():  # before MLX reads it (cpu_streams.py)
    os.environ.setdefault(BFS_ENV, str(BFS_WIDTH))

from customllm_mlx.io import load, save  # noqa: E402
from customllm_mlx.model import CustomLLM  # noqa: E402

__all__ = ["CustomLLM", "load", "save"]
