"""MLX's CPU buffer cache, raised to what the Metal backend keeps by default.

MLX's CPU allocator caches at most 32 MiB of freed buffers (`CommonAllocator` in
mlx/backend/no_gpu/allocator.cpp); Metal's cache is as large as its memory limit. Past 32 MiB,
every buffer a step frees goes back to the OS and the next step's allocation comes back as
fresh, zero-filled pages: large elementwise ops and the training step run markedly slower
(docs/benchmarks.md, "MLX's CPU buffer cache"; `python benchmarks/bench_train.py`, rows compiled
and compiled-mlxcache).
"""

from __future__ import annotations

import os

import mlx.core as mx

ENV = "CUSTOMLLM_MLX_CACHE_LIMIT"  # bytes; 0 keeps MLX's own default
MLX_CPU_DEFAULT = 32 << 20  # MLX's own CPU cache limit


def use_full_cpu_cache() -> int | None:
    """On the CPU backend, let MLX cache freed buffers up to its memory limit (or
    $CUSTOMLLM_MLX_CACHE_LIMIT bytes). Returns the limit set; None on a GPU, or when the
    variable is 0."""
    if mx.default_device() != mx.cpu:
        return None
    wanted = os.environ.get(ENV, "").strip()
    try:
        limit = int(wanted) if wanted else mx.get_memory_limit()
    except ValueError as err:
        raise ValueError(f"{ENV} must be a number of bytes, got {wanted!r}") from err
    if limit <= 0:
        return None
    mx.set_cache_limit(limit)
    return limit
