"""The fast MLX cross entropy equals mlx.nn.losses.cross_entropy, values and gradients."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

from customllm_mlx.loss import cross_entropy  # noqa: E402
from customllm_mlx.model import causal_lm_loss  # noqa: E402


def test_cross_entropy_equals_mlx_reference_values_and_gradients():
    mx.random.seed(0)
    logits = 4 * mx.random.normal((3, 17, 1000))
    targets = mx.random.randint(0, 1000, (3, 17))
    weights = mx.random.normal((3, 17))  # any cotangent: negative and zero ones too
    weights = mx.where(mx.arange(17) == 5, 0.0, weights)

    def ours(x):
        return (cross_entropy(x, targets) * weights).sum()

    def reference(x):
        return (nn.losses.cross_entropy(x, targets, reduction="none") * weights).sum()

    assert mx.allclose(
        cross_entropy(logits, targets),
        nn.losses.cross_entropy(logits, targets, reduction="none"),
        rtol=1e-5,
        atol=1e-5,
    )
    (value, grad), (ref_value, ref_grad) = (
        mx.value_and_grad(ours)(logits),
        mx.value_and_grad(reference)(logits),
    )
    assert abs(value.item() - ref_value.item()) < 1e-4 * abs(ref_value.item())
    assert mx.abs(grad - ref_grad).max().item() < 1e-6
    compiled = mx.compile(mx.grad(ours))(logits)
    assert mx.abs(compiled - ref_grad).max().item() < 1e-6


def test_causal_lm_loss_is_shifted_and_ignores_minus_100():
    mx.random.seed(1)
    logits = mx.random.normal((2, 6, 50))
    ids = mx.random.randint(0, 50, (2, 6))
    ids = mx.where((mx.arange(6) == 3) & (mx.arange(2)[:, None] == 0), -100, ids)
    targets = ids[:, 1:]
    ce = nn.losses.cross_entropy(logits[:, :-1], mx.maximum(targets, 0), reduction="none")
    valid = targets != -100
    expected = (ce * valid).sum() / valid.sum()
    assert abs(causal_lm_loss(logits, ids).item() - expected.item()) < 1e-5
    unshifted = nn.losses.cross_entropy(logits, mx.maximum(ids, 0)).mean()
    assert abs(causal_lm_loss(logits, ids).item() - unshifted.item()) > 1e-2
