"""CustomLLM in MLX: `CustomLLM`, `load`, `save`.

On a Linux CPU, call `setup_cpu()` before anything imports `mlx.core`: it gives MLX's matmuls
OpenBLAS (docs/linux-cpu.md). Importing this package has no such effect and leaves `mlx.core`
unimported until a model class or function is used; the commands call it as they start.
"""

import importlib
import importlib.metadata
import re

from customllm_mlx._blas import setup_cpu

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

_LAZY = {"CustomLLM": "customllm_mlx.model", "load": "customllm_mlx.io", "save": "customllm_mlx.io"}


def __getattr__(name: str):
    if name in _LAZY:  # imported on first use, so that setup_cpu() can still act before it
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'customllm_mlx' has no attribute {name!r}")


__all__ = ["CustomLLM", "load", "save", "setup_cpu"]
