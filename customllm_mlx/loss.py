"""Cross entropy for large vocabularies, written for speed on MLX's CPU backend.

MLX's Linux CPU `exp` is slow and `power(2, .)` not much better, so on the CPU `exp` below is
a compiled polynomial (docs/benchmarks.md, "MLX's exponential on the CPU"); `softmax` uses it
(the CPU attention's).
The backward pass recomputes the softmax from the log-sum-exp (recovered from the output) in
one elementwise pass, and subtracts at the targets with a scatter instead of building an
(N, vocab) one-hot.
The result equals `mlx.nn.losses.cross_entropy` to float32 rounding (tested).
"""

from __future__ import annotations

import math

import mlx.core as mx

LOG2E = 1.0 / math.log(2.0)
# below this many numbers `exp` takes power(2, .): one kernel, slower per number, no fixed cost
POLY_MIN_SIZE = 8192
_ROUND = 1.5 * 2**23  # float32 (y + _ROUND) - _ROUND is y rounded to an integer, for |y| < 2**22
_ROUND_BITS = 0x4B400000  # the bits of _ROUND: adding n to them gives those of _ROUND + n
# 2**f on [-1/2, 1/2], the degree-6 coefficients of Cephes' exp2f, highest first
_EXP2_COEFFICIENTS = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
    1.0,
)


@mx.compile
def _exp_cpu(x: mx.array) -> mx.array:
    # 2**y = 2**n * 2**f with n = round(y), f in [-1/2, 1/2]; 2**n written as float32 bits.
    # y is clipped to [-127, 128]: 2**-127 comes out 0 (exponent bits 0), 2**128 inf.
    # 2**f by Estrin's scheme, 4 ops deep where Horner's rule is 12: MLX's compiler fuses at
    # most 11 deep, so Horner's chain would cost one more pass over every logits chunk.
    y = mx.clip(x * LOG2E, -127.0, 128.0)
    shifted = y + _ROUND
    f = y - (shifted - _ROUND)
    f2 = f * f
    c = _EXP2_COEFFICIENTS  # c[6] + c[5] f + ... + c[0] f**6
    p = (c[5] * f + c[6]) + f2 * (c[3] * f + c[4]) + (f2 * f2) * (c[0] * f2 + (c[1] * f + c[2]))
    exponent = shifted.view(mx.int32) - (_ROUND_BITS - 127)  # n + 127
    return p * mx.left_shift(exponent, 23).view(mx.float32)


def exp(x: mx.array, lean: bool = False) -> mx.array:
    """e**x. On the CPU, for arrays of POLY_MIN_SIZE numbers or more, a polynomial compiled
    into a few fused kernels: as close to e**x as `mx.exp` (both within 1e-6 relative on
    [-20, 0], set by rounding x * log2(e) to float32), 0 below about e**-88 (float32's smallest
    normal is e**-87.3), and on MLX's Linux CPU faster than `power(2, .)` and `mx.exp`
    (docs/benchmarks.md). It keeps about three arrays of x's size alive between its kernels,
    and each kernel has a fixed cost: smaller arrays (decoding) and `lean` callers (whole
    logits) take `power(2, x * log2 e)`, one kernel. Elsewhere `mx.exp`."""
    if mx.default_device() != mx.cpu:
        return mx.exp(x)
    if lean or x.size < POLY_MIN_SIZE:
        return mx.power(2.0, x * LOG2E)
    return _exp_cpu(x.astype(mx.float32)).astype(x.dtype)


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis in float32 (x's dtype out) through `exp`, for the CPU
    attention (model.attention); -inf entries give 0. Equals `mx.softmax`, values and
    gradients, to float32 rounding (tests/test_loss_mlx.py)."""
    x32 = x.astype(mx.float32)
    e = exp(x32 - x32.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(x.dtype)


@mx.compile
def _softmax_grad(p: mx.array, cotangent: mx.array) -> mx.array:
    p, cotangent = p.astype(mx.float32), cotangent.astype(mx.float32)
    return p * (cotangent - (cotangent * p).sum(-1, keepdims=True))


@softmax.vjp
def _softmax_vjp(x, cotangent, output):
    return _softmax_grad(output, cotangent).astype(x.dtype)


@mx.custom_function
def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross entropy: logits (..., V) float32, targets (...) int -> (...)."""
    m = mx.stop_gradient(logits.max(-1, keepdims=True))
    total = exp(logits - m, lean=True).sum(-1)
    lse = m[..., 0] + mx.log(total)
    return lse - mx.take_along_axis(logits, targets[..., None], -1)[..., 0]


@cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangent, output):
    logits, targets = primals
    target_logit = mx.take_along_axis(logits, targets[..., None], -1)
    lse = output[..., None] + target_logit  # (..., 1), recovered from the forward output
    grad = exp(logits - lse, lean=True) * cotangent[..., None]  # cot * softmax
    flat = grad.reshape(-1, logits.shape[-1])  # then -cot at each target: a scatter, no one-hot
    flat = flat.at[mx.arange(flat.shape[0]), targets.flatten()].add(-cotangent.flatten())
    return flat.reshape(logits.shape).astype(logits.dtype), mx.zeros_like(targets)


IGNORE_INDEX = -100


def _row_max(x: mx.array) -> mx.array:
    """x (R, V) -> (R, 1), the max of each row; on MLX's CPU first across 8 strided slices of
    the row, then within the slice: faster than x.max(-1) there."""
    R, V = x.shape
    if V % 8 or mx.default_device() != mx.cpu:
        return x.max(-1, keepdims=True)
    return x.reshape(R, 8, V // 8).max(1).max(-1, keepdims=True)


def default_chunk_rows(hidden_size: int) -> int:
    """Rows per chunk of `linear_cross_entropy`. On CPU about hidden/2 (128..1024): fewer rows
    are slower, more cost peak memory for little speed (docs/benchmarks.md, "Fused lm_head").
    On the GPU a large chunk keeps the GEMMs big."""
    if mx.default_device() != mx.cpu:
        return 2048
    return min(1024, max(128, (1 << max(hidden_size - 1, 1).bit_length()) // 2))


def _rows(hidden: mx.array, labels: mx.array, chunk_rows: int | None):
    """hidden (..., D) and labels (...) as rows (N, D) and (N,), and the rows per chunk."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden.shape[0]} hidden states")
    return hidden, labels, chunk_rows or default_chunk_rows(hidden.shape[-1])


def _chunk_logits(h: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    logits = (h @ weight.T).astype(mx.float32)
    return logits if bias is None else logits + bias.astype(mx.float32)


def _chunk_softmax(logits: mx.array, targets: mx.array, ones: mx.array):
    """For a chunk of rows: e = exp(logits - row max), its row sums (R, 1) (`ones` (V, 1): a
    GEMV, faster than e.sum(-1) on MLX's CPU), the log-sum-exp and the target logits."""
    m = mx.stop_gradient(_row_max(logits))
    e = exp(logits - m)
    e_sum = e @ ones
    lse = m[:, 0] + mx.log(e_sum[:, 0])
    return e, e_sum, lse, mx.take_along_axis(logits, targets[:, None], -1)[:, 0]


@mx.custom_function
def _linear_cross_entropy(hidden, weight, bias, labels, chunk_rows):
    """(mean loss, and its gradients for hidden, weight, bias), all formed in one pass."""
    valid = labels != IGNORE_INDEX
    count = mx.maximum(valid.sum(), 1).astype(mx.float32)
    targets = mx.where(valid, labels, 0)
    scale = valid.astype(mx.float32) / count
    low_precision = hidden.dtype != mx.float32
    total, grad_hidden = mx.array(0.0), []
    grad_weight = mx.zeros(weight.shape, mx.float32)
    grad_bias = mx.zeros((1, weight.shape[0]), mx.float32)
    ones = mx.ones((weight.shape[0], 1), mx.float32)
    seed = None  # the bias seeds the logits GEMM (addmm): one pass less than adding it after
    if bias is not None and {hidden.dtype, weight.dtype, bias.dtype} == {mx.float32}:
        seed = mx.broadcast_to(bias, (min(chunk_rows, hidden.shape[0]), bias.shape[0]))
        if mx.default_device() == mx.cpu:
            # addmm starts from a copy of its first operand; MLX's CPU copy from a broadcast
            # row is a slow general-strided loop, from a contiguous (rows, vocab) array a
            # memcpy: the rows are tiled once (one chunk's logits more memory) and copied
            # from there
            seed = mx.contiguous(seed)
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t, s = (a[start : start + chunk_rows] for a in (hidden, targets, scale))
        if start:  # finish the previous chunk first, so only one chunk's logits are alive
            h = mx.depends(h, [total, grad_weight, grad_bias, grad_hidden[-1]])
        if seed is not None:
            logits = mx.addmm(seed[: h.shape[0]], h, weight.T)
        else:
            logits = _chunk_logits(h, weight, bias)
        e, e_sum, lse, target_logit = _chunk_softmax(logits, t, ones)
        total = total + ((lse - target_logit) * s).sum()
        # d loss / d logits = r * e - s at the targets, with r = s / e_sum. e goes into the
        # GEMMs unscaled (r scales their small operands or outputs); the -s terms are added
        # for all rows after the loop: no (rows, vocab) pass to scale e or to scatter into it.
        r = s / e_sum[:, 0]  # (rows,)
        grad_bias = grad_bias + r[None] @ e
        e = e.astype(hidden.dtype)
        grad_hidden.append((e @ weight) * r[:, None].astype(hidden.dtype))
        h_scaled = h * r[:, None].astype(h.dtype)
        if low_precision:  # low-precision GEMM, float32 accumulation across chunks
            grad_weight = grad_weight + (e.T @ h_scaled).astype(mx.float32)
        else:
            grad_weight = mx.addmm(grad_weight, e.T, h_scaled)
    at_targets = scale[:, None] * hidden.astype(mx.float32)  # (N, D): -this at target rows
    grad_weight = grad_weight.at[targets].add(-at_targets)
    grad_bias = grad_bias[0].at[targets].add(-scale)
    grad_hidden = mx.concatenate(grad_hidden) - (scale[:, None] * weight[targets]).astype(
        hidden.dtype
    )
    return total, grad_hidden, grad_weight, grad_bias


@_linear_cross_entropy.vjp
def _linear_cross_entropy_vjp(primals, cotangents, outputs):
    hidden, weight, bias, labels, _ = primals
    c = cotangents[0]
    grads = [
        (outputs[1] * c).astype(hidden.dtype),
        (outputs[2] * c).astype(weight.dtype),
        None if bias is None else (outputs[3] * c).astype(bias.dtype),
    ]
    return (*grads, mx.zeros_like(labels), 0)


def linear_nll_sum(
    hidden: mx.array,
    weight: mx.array,
    bias: mx.array | None,
    labels: mx.array,
    chunk_rows: int | None = None,
) -> tuple[mx.array, mx.array]:
    """(sum of the float32 cross entropies of `hidden @ weight.T + bias` against `labels`,
    number of labels counted), skipping -100: the loss alone, for evaluation, chunk by chunk
    as `linear_cross_entropy` (no (N, vocab) logits stored) but forming no gradient (a third
    of its GEMMs); held-out evaluation uses it (docs/benchmarks.md, "Held-out evaluation")."""
    hidden, labels, chunk_rows = _rows(hidden, labels, chunk_rows)
    valid = labels != IGNORE_INDEX
    targets = mx.where(valid, labels, 0)
    ones = mx.ones((weight.shape[0], 1), mx.float32)
    total = mx.array(0.0)
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t, v = (a[start : start + chunk_rows] for a in (hidden, targets, valid))
        if start:  # one chunk's logits alive at a time
            h = mx.depends(h, [total])
        _, _, lse, target_logit = _chunk_softmax(_chunk_logits(h, weight, bias), t, ones)
        total = total + mx.where(v, lse - target_logit, 0.0).sum()
    return total, valid.sum()


def linear_cross_entropy(
    hidden: mx.array,
    weight: mx.array,
    bias: mx.array | None,
    labels: mx.array,
    chunk_rows: int | None = None,
) -> mx.array:
    """Mean float32 cross entropy of `hidden @ weight.T + bias` against `labels`, skipping
    labels equal to -100; hidden (..., D), labels (...) already aligned (shifted by the caller).

    For training: the (N, vocab) logits are never stored. Each chunk of rows is turned into
    its share of the loss and of the gradients of hidden, weight and bias in the forward pass
    (the softmax is computed once, where `cross_entropy` computes it in forward and backward);
    the vjp only scales them. Evaluating the loss therefore also computes the gradients:
    outside training use `cross_entropy` on the logits."""
    hidden, labels, chunk_rows = _rows(hidden, labels, chunk_rows)
    return _linear_cross_entropy(hidden, weight, bias, labels, chunk_rows)[0]
