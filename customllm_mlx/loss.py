"""Cross entropy for large vocabularies, written for speed on MLX's CPU backend.

MLX's Linux CPU `exp` is slow (~13x torch's); `2**x` is ~3x faster there, so the
log-sum-exp uses `power(2, x * log2(e))`. The backward pass recomputes the softmax from the
log-sum-exp (recovered from the output) in one elementwise pass, and subtracts at the targets
with a scatter instead of building an (N, vocab) one-hot.
The result equals `mlx.nn.losses.cross_entropy` to float32 rounding (tested).
"""

from __future__ import annotations

import math

import mlx.core as mx

LOG2E = 1.0 / math.log(2.0)


@mx.custom_function
def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross entropy: logits (..., V) float32, targets (...) int -> (...)."""
    m = mx.stop_gradient(logits.max(-1, keepdims=True))
    total = mx.power(2.0, (logits - m) * LOG2E).sum(-1)
    lse = m[..., 0] + mx.log(total)
    return lse - mx.take_along_axis(logits, targets[..., None], -1)[..., 0]


@cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangent, output):
    logits, targets = primals
    target_logit = mx.take_along_axis(logits, targets[..., None], -1)
    lse = output[..., None] + target_logit  # (..., 1), recovered from the forward output
    grad = mx.power(2.0, (logits - lse) * LOG2E) * cotangent[..., None]  # cot * softmax
    flat = grad.reshape(-1, logits.shape[-1])  # then -cot at each target: a scatter, no one-hot
    flat = flat.at[mx.arange(flat.shape[0]), targets.flatten()].add(-cotangent.flatten())
    return flat.reshape(logits.shape).astype(logits.dtype), mx.zeros_like(targets)
