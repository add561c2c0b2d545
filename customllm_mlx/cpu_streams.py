"""Data parallel over MLX CPU streams, inside one process, for MLX's Linux CPU backend.

MLX runs every CPU op on its stream's one thread; only the matmuls (OpenBLAS) use more cores.
On a 2-core CPU an OpenBLAS thread therefore spins idle through the part of a training step
that is elementwise work, gathers and small matmuls. The training step can instead split each
micro-batch into `parts` equal slices, run each slice's forward and backward on its own CPU
stream (its own thread) with OpenBLAS at cores / parts threads, and average the gradients: the
same update to float32 rounding, every core busy.

MLX orders an evaluation breadth-first only up to `MLX_BFS_MAX_WIDTH` (20) arrays wide, then
depth-first, and keeps at most 10 tasks in flight: at 20 the slices' ops reach the streams one
slice after the other, and the split step is slower than one stream. `customllm_mlx.setup_cpu()`
therefore sets MLX_BFS_MAX_WIDTH (unless set) where it loads OpenBLAS, before MLX reads it, and
the split is used only there. `python benchmarks/bench_train.py --preset tiny|small` compares the
two (rows compiled and compiled-onestream; docs/benchmarks.md, "Two CPU streams").

`--cpu-streams N` (or `CUSTOMLLM_CPU_STREAMS=N`) forces N slices (1: no split); by default 2
where OpenBLAS was loaded with 2 threads or more, in a single-process run, with an even batch.
CPU device only.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import mlx.core as mx
from mlx.utils import tree_map

from customllm_mlx import _blas

ENV = "CUSTOMLLM_CPU_STREAMS"


def breadth_first() -> bool:
    """Whether MLX will order evaluations breadth-first (see the module docstring)."""
    try:
        return int(os.environ.get(_blas.BFS_ENV, "") or _blas.MLX_BFS_WIDTH) >= _blas.BFS_WIDTH
    except ValueError:
        return False


def depth_first_for_checkpointing() -> bool:
    """Give MLX back its own depth-first evaluation order (MLX_BFS_MAX_WIDTH 20) where
    `setup_cpu` chose the breadth-first one: gradient checkpointing recomputes layers then one
    after another and frees each, where breadth-first order keeps many alive at once
    (docs/training.md, "Gradient checkpointing"); the two-stream split is off with it. MLX reads
    the order at its first evaluation: call this before any. Returns whether it changed it."""
    if not _blas.bfs_chosen_here or not breadth_first():
        return False
    os.environ[_blas.BFS_ENV] = str(_blas.MLX_BFS_WIDTH)
    return True


def stream_parts(batch_size: int, world_size: int = 1, wanted: int | None = None) -> int:
    """Slices per micro-batch on the CPU device: `wanted` (--cpu-streams), else
    $CUSTOMLLM_CPU_STREAMS, else 2 where the split pays (module docstring), else 1. Always 1 on
    a GPU."""
    if mx.default_device() != mx.cpu:
        return 1
    name = "--cpu-streams" if wanted is not None else ENV
    if wanted is None and os.environ.get(ENV, "").strip():
        try:
            wanted = int(os.environ[ENV])
        except ValueError as err:
            raise ValueError(f"{ENV} must be a whole number, got {os.environ[ENV]!r}") from err
    if wanted is not None:
        if wanted < 1 or batch_size % wanted:
            raise ValueError(f"{name} {wanted} must be >= 1 and divide --batch-size {batch_size}")
        return wanted
    usable = (_blas.threads() or 1) >= 2 and breadth_first() and world_size == 1
    return 2 if usable and batch_size % 2 == 0 else 1


def sliced_value_and_grad(model, loss_and_grad: Callable, parts: int, compiled: bool) -> Callable:
    """`(inputs, targets) -> ((loss, (lm_loss, load)), grads)` of `loss_and_grad(model, inputs,
    targets)` over `parts` equal slices of the batch, each on its own CPU stream: the slices'
    mean loss, LM loss and gradients, their summed expert load. The mean over slices is the
    batch's mean for a loss that is a mean over sequences of equal length (every position
    counted: packed batches).

    `compiled`: each slice is its own `mx.compile`, so the caller compiles the rest of its step
    apart from them. One compile over all slices merges their identical ops (MLX's compile
    merges equal constants and the broadcasts of them, whatever their stream) onto the first
    slice's stream, where the other slices' fused kernels cannot absorb them and read them as
    strided inputs, and the second half's elementwise kernels run their slow strided variants
    (docs/benchmarks.md, "Two CPU streams")."""
    if parts == 1:
        return lambda inputs, targets: loss_and_grad(model, inputs, targets)
    slices = on_streams(
        lambda inputs, targets: loss_and_grad(model, inputs, targets),
        parts,
        [model.state, mx.random.state],
        compiled,
    )

    def sliced(inputs, targets):
        xs, ys = mx.split(inputs, parts), mx.split(targets, parts)
        losses, lm_losses, loads, grads = [], [], [], []
        for i, on_stream in enumerate(slices):
            (loss, (lm_loss, load)), grad = on_stream(xs[i], ys[i])
            for kept, value in ((losses, loss), (lm_losses, lm_loss), (loads, load), (grads, grad)):
                kept.append(value)
        return (_mean(losses), (_mean(lm_losses), sum(loads[1:], loads[0]))), tree_map(
            lambda *g: _mean(g), *grads
        )

    return sliced


_streams: list = []  # the extra CPU streams of slices 1, 2, ...: each a thread, shared by all


def _slice_stream(i: int):
    """Slice i's stream: None for slice 0 (the default device's own stream), else an extra
    CPU stream, made once (MLX keeps a stream's thread for the whole process)."""
    while len(_streams) < i:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[i - 1] if i else None


def on_streams(fn: Callable, parts: int, state: list, compiled: bool) -> list[Callable]:
    """`fn` once per slice, slice 0 on the default stream and the others each on its own CPU
    stream, each compiled on its own with `compiled` (`state` its implicit inputs and
    outputs; see `sliced_value_and_grad` for why apart)."""
    functions = []
    for i in range(parts):

        def on_stream(*args, stream=_slice_stream(i)):
            if stream is None:
                return fn(*args)
            with mx.stream(stream):
                return fn(*args)

        functions.append(
            mx.compile(on_stream, inputs=state, outputs=state) if compiled else on_stream
        )
    return functions


def _mean(values) -> mx.array:
    return sum(values[1:], values[0]) / len(values)


@contextlib.contextmanager
def blas_threads_per_part(parts: int) -> Iterator[None]:
    """OpenBLAS at (its threads) // parts threads inside, restored after."""
    full = _blas.threads()
    if parts == 1 or full is None:
        yield
        return
    _blas.set_threads(max(1, full // parts))
    try:
        yield
    finally:
        _blas.set_threads(full)
