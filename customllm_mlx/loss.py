"""Cross entropy for large vocabularies, written for speed on MLX's CPU backend.

MLX's Linux CPU `exp` is slow (~13x torch's); `2**x` is ~3x faster there, so the
log-sum-exp uses `power(2, x * log2(e))`. The backward pass recomputes the softmax from the
saved log-sum-exp in one elementwise pass instead of keeping an (N, vocab) array alive.
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
    probs = mx.power(2.0, (logits - lse) * LOG2E)
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    grad = cotangent[..., None] * (probs - onehot)
    return grad.astype(logits.dtype), mx.zeros_like(targets)
