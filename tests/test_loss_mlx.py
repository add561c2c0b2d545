"""The fast MLX cross entropy and the fused lm_head + loss equal the unfused reference."""

from __future__ import annotations

from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

import numpy as np  # noqa: E402

from customllm_mlx.loss import (  # noqa: E402
    LOG2E,
    POLY_MIN_SIZE,
    _row_max,
    cross_entropy,
    exp,
    linear_cross_entropy,
    linear_nll_sum,
    softmax,
)
from customllm_mlx.model import causal_lm_loss  # noqa: E402


def test_exp_is_as_close_to_e_to_the_x_as_mlx_exp():
    x = mx.concatenate([mx.linspace(-87, 88, 100_001), mx.linspace(-20, 0, 100_001)])
    exact = np.exp(np.array(x, dtype=np.float64))
    ours = np.array(exp(x), dtype=np.float64)
    theirs = np.array(mx.exp(x), dtype=np.float64)
    ours_err, theirs_err = (np.abs(v - exact) / exact for v in (ours, theirs))
    assert ours_err.max() <= 1.5 * theirs_err.max()  # both ~4e-6: x * log2(e) rounds
    assert ours_err.mean() <= 1.5 * theirs_err.mean()
    x = mx.linspace(-2, 2, 100_001)  # small |x|: the polynomial's own error, float32 rounding
    exact = np.exp(np.array(x, dtype=np.float64))
    assert (np.abs(np.array(exp(x), dtype=np.float64) - exact) / exact).max() < 2.5e-7
    edges = mx.array([-mx.inf, -1000.0, -89.0, 0.0, 89.0, 1000.0, mx.inf, mx.nan])
    edges = exp(mx.concatenate([edges, mx.zeros(POLY_MIN_SIZE)]))[:8]
    assert edges[:4].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert edges[4:7].tolist() == [mx.inf] * 3 and mx.isnan(edges[7]).item()
    for dtype in (mx.float16, mx.bfloat16):
        low = exp(x.astype(dtype))
        assert low.dtype == dtype
        assert mx.allclose(low.astype(mx.float32), mx.exp(x.astype(dtype)), rtol=1e-2)


def test_exp_of_small_arrays_and_lean_callers_is_one_power_kernel():
    x = mx.linspace(-30, 5, POLY_MIN_SIZE)
    power = mx.power(2.0, x * LOG2E)
    assert mx.array_equal(exp(x[:-1]), power[:-1])
    assert mx.array_equal(exp(x, lean=True), power)
    assert not mx.array_equal(exp(x), power)  # the polynomial: equal only to rounding
    assert mx.allclose(exp(x), power, rtol=1e-6, atol=0)


def test_row_max_equals_max_over_the_last_axis():
    for shape in ((3, 64), (2, 1000), (5, 49152), (4, 49157)):
        x = mx.random.normal(shape, key=mx.random.key(sum(shape)))
        assert mx.array_equal(_row_max(x), x.max(-1, keepdims=True))


@pytest.mark.parametrize("shape", [(6, 40), (4, 3, 3000)])  # one power kernel; the polynomial
def test_softmax_equals_mlx_softmax_values_and_gradients(shape):
    x = 4 * mx.random.normal(shape, key=mx.random.key(0))
    x = mx.where(mx.random.uniform(shape=shape, key=mx.random.key(1)) < 0.3, -mx.inf, x)
    x[..., 0] = 0.0  # every row keeps one finite entry, as a causal mask does
    cotangent = mx.random.normal(shape, key=mx.random.key(2))

    def weighted(fn):
        return mx.value_and_grad(lambda x: (fn(x) * cotangent).sum())(x)

    ours, ours_grad = weighted(softmax)
    theirs, theirs_grad = weighted(lambda x: mx.softmax(x, axis=-1, precise=True))
    np.testing.assert_allclose(np.array(softmax(x)), np.array(mx.softmax(x, -1)), atol=2e-7)
    np.testing.assert_allclose(ours.item(), theirs.item(), rtol=1e-5)
    np.testing.assert_allclose(np.array(ours_grad), np.array(theirs_grad), atol=2e-6)
    assert (np.array(softmax(x))[np.isinf(np.array(x))] == 0).all()
    low = softmax(x.astype(mx.bfloat16))
    assert low.dtype == mx.bfloat16
    assert mx.allclose(low.astype(mx.float32), mx.softmax(x, -1), atol=1e-2)


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


def linear_leaves(n=37, d=24, v=300, seed=0):
    mx.random.seed(seed)
    h, w = mx.random.normal((n, d)), 0.3 * mx.random.normal((v, d))
    b, labels = 0.5 * mx.random.normal((v,)), mx.random.randint(0, v, (n,))
    labels[mx.array([3, 10, 11])] = -100
    return h, w, b, labels


def masked_reference(h, w, b, labels):
    valid = labels != -100
    ce = nn.losses.cross_entropy(h @ w.T + b, mx.where(valid, labels, 0), reduction="none")
    return (ce * valid).sum() / valid.sum()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 37, 64])
def test_linear_cross_entropy_equals_unfused_values_and_gradients(bias, chunk_rows):
    h, w, b, labels = linear_leaves()
    if not bias:
        b = mx.zeros_like(b)

    def fused(h, w, b):
        return 2.5 * linear_cross_entropy(h, w, b if bias else None, labels, chunk_rows)

    def reference(h, w, b):
        return 2.5 * masked_reference(h, w, b, labels)

    ours = mx.value_and_grad(fused, argnums=(0, 1, 2))(h, w, b)
    ref = mx.value_and_grad(reference, argnums=(0, 1, 2))(h, w, b)
    assert abs(ours[0].item() - ref[0].item()) < 1e-5
    for name, a, r in zip("hwb", ours[1], ref[1], strict=True):
        if name == "b" and not bias:
            assert mx.all(a == 0).item()  # no bias: nothing flows into the zeros
            continue
        assert mx.allclose(a, r, rtol=1e-5, atol=1e-7).item(), name


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 1, 16, 37])
def test_linear_nll_sum_is_the_unfused_loss_sum_and_count(bias, chunk_rows):
    """The evaluation's loss (no gradient formed): sum and count of the counted labels."""
    h, w, b, labels = linear_leaves()
    total, count = linear_nll_sum(h, w, b if bias else None, labels, chunk_rows)
    valid = labels != -100
    assert 0 < valid.sum().item() < labels.size  # some labels ignored
    assert count.item() == valid.sum().item()
    reference = masked_reference(h, w, b if bias else mx.zeros_like(b), labels) * valid.sum()
    assert total.dtype == mx.float32
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    compiled = mx.compile(lambda h: linear_nll_sum(h, w, None, labels, 16)[0])(h)
    assert compiled.item() == pytest.approx(linear_nll_sum(h, w, None, labels)[0].item(), 1e-5)


def test_linear_cross_entropy_compiles_and_handles_bfloat16_and_all_ignored():
    h, w, b, labels = linear_leaves(n=64, d=32, v=500)
    step = mx.compile(mx.value_and_grad(lambda h: linear_cross_entropy(h, w, b, labels, 16)))
    eager = mx.value_and_grad(lambda h: masked_reference(h, w, b, labels))
    (lc, gc), (le, ge) = step(h), eager(h)
    assert abs(lc.item() - le.item()) < 1e-5 and mx.allclose(gc, ge, atol=1e-7).item()

    hb, wb = h.astype(mx.bfloat16), w.astype(mx.bfloat16)
    loss, (gh, gw) = mx.value_and_grad(
        lambda h, w: linear_cross_entropy(h, w, b, labels, 16), argnums=(0, 1)
    )(hb, wb)
    assert loss.dtype == mx.float32 and abs(loss.item() - le.item()) < 2e-2
    assert gh.dtype == mx.bfloat16 and gw.dtype == mx.bfloat16
    gw_ref = mx.grad(lambda w: masked_reference(h, w, b, labels))(w)
    assert mx.allclose(gw.astype(mx.float32), gw_ref, atol=2e-3).item()

    none = mx.full(labels.shape, -100)
    loss, g = mx.value_and_grad(lambda h: linear_cross_entropy(h, w, b, none))(h)
    assert loss.item() == 0.0 and mx.all(g == 0).item()
    with pytest.raises(ValueError, match="63 labels for 64 hidden states"):
        linear_cross_entropy(h, w, b, labels[:-1])


def test_model_training_loss_equals_the_logits_loss_and_its_gradients(tiny_config):
    from mlx.utils import tree_flatten

    from customllm_mlx.model import CustomLLM

    mx.random.seed(0)
    model = CustomLLM(tiny_config)  # the tiny preset has no dropout
    ids = mx.random.randint(0, tiny_config.vocab_size, (2, 13))
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def fused(model):
        lm, aux, _ = model.training_loss(inputs, targets)
        return lm + aux

    def unfused(model):
        logits, aux, _ = model(inputs, return_aux=True)
        return nn.losses.cross_entropy(logits, targets).mean() + aux

    a, ga = nn.value_and_grad(model, fused)(model)
    b, gb = nn.value_and_grad(model, unfused)(model)
    assert abs(a.item() - b.item()) < 1e-5
    for (name, x), (_, y) in zip(tree_flatten(ga), tree_flatten(gb), strict=True):
        assert mx.allclose(x, y, rtol=1e-4, atol=1e-7).item(), name


def test_older_mlx_is_refused_with_a_clear_error():
    """MLX before 0.32.3 miscompiles the bit view `exp` is built on (checked at 0.32.2)."""
    import customllm_mlx

    customllm_mlx.check_mlx_version("0.32.3")
    customllm_mlx.check_mlx_version("0.33.0.dev20261101")
    for old in ("0.32.2", "0.29.2", "0.22.0"):
        with pytest.raises(ImportError, match=f"needs mlx>=0.32.3, found {old}"):
            customllm_mlx.check_mlx_version(old)
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    wanted = ".".join(map(str, customllm_mlx.MIN_MLX))
    assert f"mlx>={wanted};" in pyproject and f"mlx[cpu]>={wanted};" in pyproject
