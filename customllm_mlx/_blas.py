"""Make MLX's Linux CPU backend use an optimised BLAS: `setup_cpu`, where a program starts.

The Linux `mlx[cpu]` wheel links a reference BLAS, far slower for float32 matmuls
(docs/linux-cpu.md). Loading OpenBLAS with RTLD_GLOBAL before the first `import mlx.core`
makes MLX's BLAS symbols resolve to it. `threads` / `set_threads` read and set its thread count
(cpu_streams.py runs its training step on fewer).
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)

# MLX orders an evaluation breadth-first up to this many arrays wide (then depth-first); set
# where OpenBLAS is loaded, before MLX reads it, for the training step's CPU streams
# (cpu_streams.py)
BFS_ENV, BFS_WIDTH = "MLX_BFS_MAX_WIDTH", 1 << 20
MLX_BFS_WIDTH = 20  # MLX's own default: depth-first past 20 arrays

loaded: str | None = None
bfs_chosen_here = False  # whether setup_cpu set BFS_ENV (not the user)
_library: ctypes.CDLL | None = None


def setup_cpu(openblas: str | None = None) -> str | None:
    """On Linux, load OpenBLAS for MLX's CPU matmuls and have MLX order evaluations breadth-first
    (for the training step's CPU streams, cpu_streams.py). Call it before anything imports
    `mlx.core`; afterwards it can only warn, naming the fix. Does nothing elsewhere.

    `openblas`: the library's path, or "none" to keep MLX's own BLAS; default: the environment's
    CUSTOMLLM_OPENBLAS (same values), else the first of CANDIDATES that exists. Returns the path
    of the OpenBLAS that MLX uses, None when none. Idempotent."""
    global loaded, bfs_chosen_here
    if loaded or not sys.platform.startswith("linux"):
        return loaded
    wanted = openblas or os.environ.get("CUSTOMLLM_OPENBLAS") or ""
    if wanted.lower() == "none":
        return None
    paths = [p for p in ((wanted,) if wanted else CANDIDATES) if os.path.exists(p)]
    if wanted and not paths:
        raise FileNotFoundError(f"OpenBLAS library {wanted} does not exist")
    if "mlx.core" in sys.modules:  # MLX has already bound its BLAS symbols
        mapped = _mapped_library("libopenblas")
        if mapped:  # loaded before MLX all the same (LD_PRELOAD): MLX uses it
            loaded = mapped
            _bind(ctypes.CDLL(mapped, mode=ctypes.RTLD_GLOBAL))
        elif paths:
            warnings.warn(
                "customllm_mlx.setup_cpu: mlx.core was imported first, so MLX's CPU matmuls run "
                "on its slow reference BLAS; call customllm_mlx.setup_cpu() before importing mlx "
                f"(or mlx_lm), or start the process with LD_PRELOAD={paths[0]} "
                "(docs/linux-cpu.md)",
                RuntimeWarning,
                stacklevel=2,
            )
        return loaded
    for path in paths:
        try:
            library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = path
        _bind(library)
        if BFS_ENV not in os.environ:  # MLX reads it once, at its first evaluation
            os.environ[BFS_ENV], bfs_chosen_here = str(BFS_WIDTH), True
        break
    return loaded


def _mapped_library(name: str) -> str | None:
    """The path of a shared library whose file name starts with `name` that this process has
    mapped (/proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith(name):
                    return path
    except OSError:
        pass
    return None


def _bind(library: ctypes.CDLL) -> None:
    global _library
    try:
        library.openblas_get_num_threads.restype = ctypes.c_int
        library.openblas_set_num_threads.argtypes = [ctypes.c_int]
        library.openblas_get_corename.restype = ctypes.c_char_p
    except AttributeError:  # a BLAS without OpenBLAS's thread controls
        return
    _library = library


# the cores whose OpenBLAS kernels include the small-matrix GEMM ("direct sgemm") path, which
# runs small products on unpacked operands (OpenBLAS's kernel/x86_64 small-matrix sources)
SMALL_GEMM_CORES = ("skylakex", "cooperlake", "sapphirerapids")


def corename() -> str | None:
    """The core OpenBLAS chose its kernels for ("Cooperlake", "Haswell", ...); None without it."""
    return _library.openblas_get_corename().decode() if _library is not None else None


def small_gemm_kernel(core: str | None = None) -> bool:
    """Whether the BLAS that MLX's CPU backend calls runs small GEMMs unpacked: OpenBLAS on a
    core with its small-matrix kernels (`core`, default: the loaded library's)."""
    core = corename() if core is None else core
    return core is not None and core.lower() in SMALL_GEMM_CORES


def threads() -> int | None:
    """OpenBLAS's thread count, or None when this module did not load OpenBLAS."""
    return _library.openblas_get_num_threads() if _library is not None else None


def set_threads(count: int) -> None:
    """Set OpenBLAS's thread count (the process's: every later matmul); no-op without it."""
    if _library is not None:
        _library.openblas_set_num_threads(max(1, int(count)))
