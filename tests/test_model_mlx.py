"""The MLX model against docs/architecture.md, plus its folder IO and `init` CLI."""

# ruff: noqa: E402  (customllm_mlx must be imported before mlx.core: it preloads OpenBLAS)

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import TOKENIZER_VOCAB_SIZE

customllm_mlx = pytest.importorskip("customllm_mlx")

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.models.cache import KVCache
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from customllm.checkpoint import CONFIG_NAME, WEIGHTS_NAME, canonical_shapes
from customllm.config import ModelConfig
from customllm_mlx import experts as mlx_experts
from customllm_mlx import model as mlx_model
from customllm_mlx.cli import main as cli_main
from customllm_mlx.experts import CPU_BLOCK_ROWS, CPU_BLOCK_ROWS_CHUNKED, CPU_BLOCK_ROWS_PACKED
from customllm_mlx.model import (
    CustomLLM,
    LlamaMLP,
    causal_lm_loss,
)
from customllm_mlx.model import attention as model_attention


def build(config: ModelConfig, seed: int = 0, bias_std: float = 0.05) -> CustomLLM:
    """A model in eval mode with a non-zero routing bias."""
    mx.random.seed(seed)
    model = CustomLLM(config)
    for layer in model.decoder_layers:
        layer.mlp.expert_bias = bias_std * mx.random.normal(layer.mlp.expert_bias.shape)
    mx.eval(model.parameters())
    return model.eval()


def close(reference: mx.array) -> float:
    """Absolute tolerance for float32 logits: 1e-5 of their largest magnitude."""
    return 1e-5 * float(np.abs(np.array(reference)).max())


def random_ids(config: ModelConfig, B: int = 2, T: int = 24, seed: int = 1) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, config.vocab_size, size=(B, T)))


def loss_fn(model: CustomLLM, inputs: mx.array) -> mx.array:
    logits, aux_loss, _ = model(inputs, return_aux=True)
    return causal_lm_loss(logits, inputs) + aux_loss


def params(model: CustomLLM) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


# --- Layout -----------------------------------------------------------------------------------


def test_canonical_weights_have_the_checkpoint_keys_and_shapes(tiny_config):
    model = build(tiny_config)
    canonical = model.canonical_weights()
    assert {k: tuple(v.shape) for k, v in canonical.items()} == canonical_shapes(tiny_config)
    stacked = params(model)["decoder_layers.0.mlp.routed_experts.gate_proj.weight"]
    assert stacked.shape == (7, 128, 64)
    assert mx.array_equal(
        canonical["decoder_layers.0.mlp.routed_experts.3.gate_proj.weight"], stacked[3]
    )
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert not any(k.endswith("expert_bias") for k in trainable)
    assert sum(v.size for v in trainable.values()) == tiny_config.num_parameters()


# --- Decoding cache and absorption --------------------------------------------------------------


@pytest.mark.parametrize("absorb", [None, False, True])
def test_cached_decode_equals_full_forward(tiny_config, sharp_config, monkeypatch, absorb):
    monkeypatch.setattr(KVCache, "step", 8)  # make the buffers grow several times
    model = build(sharp_config)
    ids = random_ids(tiny_config, T=40)
    full = model(ids)

    cache = model.make_cache()
    chunks = [
        model(ids[:, :5], cache=cache, absorb=absorb),
        model(ids[:, 5:12], cache=cache, absorb=absorb),
    ]
    chunks += [model(ids[:, t : t + 1], cache=cache, absorb=absorb) for t in range(12, 40)]
    cached = mx.concatenate(chunks, axis=1)
    assert cache[0].offset == 40 and cache[0].keys.shape[2] >= 40
    keys, values = cache[0].keys_and_values()  # the latent as one head (cache_latents)
    assert keys.shape == (2, 1, 40, tiny_config.kv_latent_dim)
    assert values.shape == (2, 1, 40, 2 * tiny_config.qk_rope_head_dim)
    np.testing.assert_allclose(np.array(cached), np.array(full), atol=close(full), rtol=0)


def test_compiled_decode_step_equals_the_eager_layer(tiny_config, monkeypatch):
    """Decoding in eval mode runs DecoderLayer.decode_step (two compiled functions around the
    cache); train mode (dropout 0 in tiny) takes the eager layer: same logits and loads, also
    after the weights change under the compiled functions and for another batch size."""
    modes = []  # the mode of every decode_step call: eval only, once per layer and token
    real_decode_step = mlx_model.DecoderLayer.decode_step

    def decode_step(layer, *args):
        modes.append(layer.training)
        return real_decode_step(layer, *args)

    monkeypatch.setattr(mlx_model.DecoderLayer, "decode_step", decode_step)
    model = build(tiny_config)
    ids = random_ids(tiny_config, T=16)

    def decode(train: bool, cache, tokens):
        model.train(train)
        logits, _, routing = model(tokens, cache=cache, absorb=True, return_aux=True)
        model.eval()
        return logits, routing[:, 0]  # the loads (training adds the balancing bias)

    def compare(B: int, steps: int):
        fast, eager = model.make_cache(), model.make_cache()
        model(ids[:B, :8], cache=fast), model(ids[:B, :8], cache=eager)
        for t in range(8, 8 + steps):
            (a, load_a), (b, load_b) = (
                decode(False, fast, ids[:B, t : t + 1]),
                decode(True, eager, ids[:B, t : t + 1]),
            )
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, rtol=0)
            assert mx.array_equal(load_a, load_b)
        return a

    before = compare(B=2, steps=4)
    assert all(layer._decode_in is not None for layer in model.decoder_layers)
    model.update(
        {
            "lm_head": {"weight": 2 * model.lm_head.weight},
            "decoder_layers": [
                {"mlp": {"shared_experts": [{"down_proj": {"weight": -layer_weight}}]}}
                for layer_weight in (
                    layer.mlp.shared_experts[0].down_proj.weight for layer in model.decoder_layers
                )
            ],
        }
    )
    after = compare(B=2, steps=4)
    assert not np.allclose(np.array(after), np.array(before), atol=1e-3)
    compare(B=1, steps=2)
    assert modes == [False] * (4 + 4 + 2) * tiny_config.num_hidden_layers


def test_absorbed_attention_equals_non_absorbed(tiny_config, sharp_config):
    model = build(sharp_config)
    ids = random_ids(tiny_config, T=20)
    plain, absorbed = model(ids, absorb=False), model(ids, absorb=True)
    np.testing.assert_allclose(np.array(absorbed), np.array(plain), atol=close(plain), rtol=0)
    attn = model.decoder_layers[0].self_attn
    x = mx.random.normal((2, 20, tiny_config.hidden_size), key=mx.random.key(3))
    plain = attn(x, 0, absorb=False)
    np.testing.assert_allclose(
        np.array(attn(x, 0, absorb=True)), np.array(plain), atol=close(plain), rtol=0
    )


@pytest.mark.parametrize(
    "T, S, kv_heads, mask",
    [(48, 48, 2, "causal"), (16, 48, 2, "causal"), (48, 48, 1, "additive"), (16, 40, 2, None)],
)
def test_cpu_attention_equals_mlx_fast_sdpa(T, S, kv_heads, mask):
    """model.attention (the CPU path: plain ops with loss.softmax) against MLX's kernel:
    causal aligned to the last key, an additive mask over one shared key/value head."""
    keys = iter(mx.random.split(mx.random.key(0), 6))
    q = mx.random.normal((2, 2, T, 32), key=next(keys))
    k = mx.random.normal((2, kv_heads, S, 32), key=next(keys))
    v = mx.random.normal((2, kv_heads, S, 16), key=next(keys))
    cotangent = mx.random.normal((2, 2, T, 16), key=next(keys))
    if mask == "additive":
        mask = 3 * mx.random.normal((2, 2, T, S), key=next(keys))

    def weighted(fn):
        loss = lambda q, k, v: (fn(q, k, v, 0.2, mask) * cotangent).sum()  # noqa: E731
        return mx.grad(loss, argnums=(0, 1, 2))(q, k, v)

    def fast(q, k, v, scale, mask):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    ours, theirs = model_attention(q, k, v, 0.2, mask), fast(q, k, v, 0.2, mask)
    assert ours.shape == theirs.shape == (2, 2, T, 16)
    np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=2e-6)
    for a, b in zip(weighted(model_attention), weighted(fast), strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=2e-5)


def test_decoder_layers_change_the_logits(tiny_config):
    """The seed skipped the decoder layers: logits were lm_head(embeddings). The twin of the
    torch test: the logits are not that, and a change to the first layer's attention or the
    last layer's MoE moves them."""
    model = build(tiny_config)
    ids = random_ids(tiny_config)
    logits = np.array(model(ids))
    x = model.token_embeddings(ids) + model.position_embeddings(mx.arange(ids.shape[1]))
    assert np.abs(logits - np.array(model.lm_head(x))).max() > 1e-3
    for path in (
        ("decoder_layers", 0, "self_attn", "o_proj"),
        ("decoder_layers", -1, "mlp", "shared_experts", 0, "down_proj"),
    ):
        layer = model
        for step in path:
            layer = layer[step] if isinstance(step, int) else getattr(layer, step)
        saved = layer.weight
        layer.weight = saved + 0.1 * mx.random.normal(saved.shape)
        assert np.abs(np.array(model(ids)) - logits).max() > 1e-4, path
        layer.weight = saved
    np.testing.assert_array_equal(np.array(model(ids)), logits)


def test_attention_is_causal(tiny_config):
    model = build(tiny_config)
    ids = random_ids(tiny_config, T=16)
    changed = mx.concatenate([ids[:, :10], (ids[:, 10:] + 1) % tiny_config.vocab_size], axis=1)
    a, b = np.array(model(ids)), np.array(model(changed))
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-4


def test_context_limit_is_enforced(tiny_config):
    model = build(tiny_config)
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        model(random_ids(tiny_config, T=65))


# --- Training path: value_and_grad and mx.compile ---------------------------------------------


def test_value_and_grad_and_compiled_loss_equal_eager(tiny_config):
    model = build(tiny_config).train()
    ids = random_ids(tiny_config, B=2, T=32)
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    loss, grads = loss_and_grad(model, ids)
    grads = dict(tree_flatten(grads))

    compiled_loss = mx.compile(lambda inputs: loss_fn(model, inputs), inputs=model.state)
    assert abs(compiled_loss(ids).item() - loss.item()) <= 1e-6 * loss.item()
    compiled_grad = mx.compile(
        lambda inputs: loss_and_grad(model, inputs), inputs=model.state, outputs=model.state
    )
    c_loss, c_grads = compiled_grad(ids)
    again, _ = compiled_grad(ids)  # the model's state survives the compiled call
    assert again.item() == c_loss.item() and loss_fn(model, ids).item() == loss.item()
    assert abs(c_loss.item() - loss.item()) <= 1e-6 * loss.item()
    for key, value in tree_flatten(c_grads):
        np.testing.assert_allclose(np.array(value), np.array(grads[key]), atol=1e-6, rtol=1e-4)

    assert not any(k.endswith("expert_bias") for k in grads)
    assert set(grads) == set(dict(tree_flatten(model.trainable_parameters())))
    for name in (
        "mlp.router.weight",
        "mlp.routed_experts.down_proj.weight",
        "self_attn.rope_k.weight",
    ):
        assert mx.abs(grads[f"decoder_layers.1.{name}"]).max().item() > 0, name
    # the loss is the shifted LM loss plus the balance loss, about ln(vocab) at init
    assert abs(loss.item() - np.log(tiny_config.vocab_size)) < 0.5


def make_train_step(model: CustomLLM, optimizer, compiled: bool):
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(inputs):
        loss, grads = loss_and_grad(model, inputs)
        optimizer.update(model, grads)
        return loss

    if compiled:
        state = [model.state, optimizer.state]
        step = mx.compile(step, inputs=state, outputs=state)
    return step


def test_compiled_train_step_matches_eager_and_never_trains_expert_bias(tiny_config):
    ids = random_ids(tiny_config, B=2, T=32)
    losses = {}
    for mode in ("eager", "compiled"):
        model = build(tiny_config).train()
        bias = [layer.mlp.expert_bias for layer in model.decoder_layers]
        optimizer = optim.AdamW(learning_rate=1e-2, weight_decay=0.1)
        step = make_train_step(model, optimizer, compiled=mode == "compiled")
        losses[mode] = []
        for _ in range(3):
            losses[mode].append(step(ids).item())
            mx.eval(model.state, optimizer.state)
        for layer, before in zip(model.decoder_layers, bias, strict=True):
            assert mx.array_equal(layer.mlp.expert_bias, before)
    np.testing.assert_allclose(losses["compiled"], losses["eager"], rtol=1e-4)
    assert losses["eager"][-1] < losses["eager"][0]


def test_causal_lm_loss_shifts_and_ignores_minus_100():
    logits = mx.random.normal((1, 4, 5))
    inputs = mx.array([[1, 2, -100, 4]])
    expected = (
        -(nn.log_softmax(logits[0, 0])[2] + nn.log_softmax(logits[0, 2])[4]) / 2
    )  # position t predicts token t+1; the -100 target is skipped
    assert abs(causal_lm_loss(logits, inputs).item() - expected.item()) < 1e-6


# --- Mixture of experts -----------------------------------------------------------------------


def naive_moe(mlp: LlamaMLP, x: np.ndarray, config: ModelConfig):
    """Per token: sigmoid scores, top-k of scores + bias, normalised weights, each chosen
    expert computed on that token alone; plus the sequence-wise balance loss (which counts the
    top-k of the raw scores)."""
    p = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(mlp.parameters())}
    silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
    B, T, D = x.shape
    k, E = config.num_experts_per_tok, config.n_routed_experts
    y, chosen, scores_all = np.zeros_like(x, dtype=np.float64), np.zeros((B, T, k), int), []
    for b in range(B):
        for t in range(T):
            h = x[b, t].astype(np.float64)
            scores = 1 / (1 + np.exp(-(p["router.weight"] @ h)))
            idx = np.argsort(-(scores + p["expert_bias"]))[:k]
            w = scores[idx] / scores[idx].sum() * config.routed_scaling_factor
            out = 0.0
            for e, w_e in zip(idx, w, strict=True):
                g = p["routed_experts.gate_proj.weight"][e] @ h
                u = p["routed_experts.up_proj.weight"][e] @ h
                out = out + w_e * (p["routed_experts.down_proj.weight"][e] @ (silu(g) * u))
            g, u = (
                p["shared_experts.0.gate_proj.weight"] @ h,
                p["shared_experts.0.up_proj.weight"] @ h,
            )
            y[b, t] = out + p["shared_experts.0.down_proj.weight"] @ (silu(g) * u)
            chosen[b, t] = idx
            scores_all.append(scores)
    scores = np.array(scores_all).reshape(B, T, E)
    raw_top = np.argsort(-scores, axis=-1)[..., :k]
    counts = np.stack([np.bincount(raw_top[b].ravel(), minlength=E) for b in range(B)])
    f = counts * E / (k * T)
    P = (scores / scores.sum(-1, keepdims=True)).mean(1)
    aux = config.aux_loss_coef * (f * P).sum(-1).mean()
    return y, chosen, aux


@pytest.fixture
def gather_mm_calls(monkeypatch) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """(input shape, expert indices) of every `mx.gather_mm` call while the test runs."""
    calls = []
    original = mx.gather_mm

    def spy(x, w, *args, rhs_indices=None, **kwargs):
        calls.append((x.shape, np.array(rhs_indices)))
        return original(x, w, *args, rhs_indices=rhs_indices, **kwargs)

    monkeypatch.setattr(mlx_experts.mx, "gather_mm", spy)
    return calls


@pytest.mark.parametrize("T", [12, 40, 150])  # pairs: 48 direct, 160 sorted, 600 blocked (CPU)
def test_gather_mm_dispatch_equals_naive_per_token_loop(tiny_config, T):
    model = build(tiny_config, bias_std=0.1)
    mlp = model.decoder_layers[0].mlp
    x = mx.random.normal((2, T, tiny_config.hidden_size), key=mx.random.key(5))
    y, aux, routing = mlp(x)
    y_ref, chosen, aux_ref = naive_moe(mlp, np.array(x), tiny_config)
    np.testing.assert_allclose(np.array(y), y_ref, atol=1e-5, rtol=1e-4)
    assert np.array_equal(np.array(routing[0]), np.bincount(chosen.ravel(), minlength=7))
    assert abs(aux.item() - aux_ref) <= 1e-5 * aux_ref


@pytest.mark.parametrize(
    "block_gemm, block_rows",
    [
        ("small", 32),
        ("packed", 32),
        ("packed", 64),
        ("chunked", 32),
        ("chunked", 16),
        ("chunked view", 16),
    ],
)
def test_blocked_cpu_dispatch_equals_sorted_rows_values_and_gradients(
    tiny_config, block_gemm, block_rows, monkeypatch
):
    """Enough tokens for the blocked layout (N * k >= E * block rows), uneven loads: one
    expert in every top-2, one never chosen, the rest partly filling their last block. Both
    gather_mm paths against plain matmuls (every expert on every token, then selected); the
    blocked one with its block GEMMs whole on untransposed operands (small blocks), whole on
    the weight's transposed view (packed), and in column chunks (the tiny preset's blocks
    made too large for the small-matrix kernel: 64 -> 128 in chunks of 64 columns, 128 -> 64
    of 32; the forward's weight copied into the chunks, or read as a transposed view), in
    blocks of 16, 32 and 64 rows."""
    monkeypatch.setattr(mlx_experts, "SMALL_BLOCK_GEMM", 100**3)  # OpenBLAS's, as here
    if block_gemm == "packed":
        monkeypatch.setattr(mlx_experts, "SMALL_BLOCK_GEMM", 0)
    if block_gemm.startswith("chunked"):
        monkeypatch.setattr(mlx_experts, "SMALL_BLOCK_GEMM", block_rows * 64 * 64)
        # the forward's weight a transposed view (wide inputs), else copied into chunks
        monkeypatch.setattr(mlx_experts, "CHUNK_VIEW_MIN_IN", 0 if "view" in block_gemm else 10**9)
        assert mlx_experts.chunk_columns(block_rows, 64, 128) == 64
        assert mlx_experts.chunk_columns(block_rows, 128, 64) == 32
    monkeypatch.setattr(mlx_experts, "cpu_block_rows", lambda *args: block_rows)
    model = build(tiny_config, bias_std=0.0)
    mlp = model.decoder_layers[0].mlp
    mlp.expert_bias = mx.array([5.0, -5.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    x = mx.random.normal((2, 150, tiny_config.hidden_size), key=mx.random.key(7))
    x_flat = x.reshape(-1, x.shape[-1])
    _, idx, weights = mlp.route(x_flat)
    flat_expert = idx.flatten()
    counts = np.bincount(np.array(flat_expert), minlength=7)
    assert counts[0] == 300 and counts[1] == 0 and flat_expert.size >= 7 * block_rows
    order = mx.argsort(flat_expert)
    counts = mx.array(counts)

    def dense_reference(x_flat):
        e = mlp.routed_experts
        outs = []
        for i in range(7):
            gate, up = x_flat @ e.gate_proj.weight[i].T, x_flat @ e.up_proj.weight[i].T
            outs.append((nn.silu(gate) * up) @ e.down_proj.weight[i].T)  # (N, D)
        every = mx.stack(outs, 1)  # (N, E, D)
        return mx.take_along_axis(every, idx[..., None], 1).reshape(-1, x_flat.shape[-1])

    paths = {
        "blocked": lambda x_flat: mlp.routed_experts.blocked(x_flat, flat_expert, order, counts, 2),
        "sorted": lambda x_flat: mlp.sorted_experts(x_flat, flat_expert, order),
        "reference": dense_reference,
    }

    def routed(x_flat, experts, path):
        mlp.routed_experts.update(experts)
        out = paths[path](x_flat)
        return (out * mx.cos(mx.arange(out.size).reshape(out.shape))).sum()  # any cotangent

    params = mlp.routed_experts.parameters()
    blocked, rows = paths["blocked"](x_flat), paths["sorted"](x_flat)
    assert blocked.shape == rows.shape == (600, x.shape[-1])
    np.testing.assert_allclose(np.array(blocked), np.array(rows), atol=1e-7, rtol=1e-5)
    grad = mx.grad(routed, argnums=(0, 1))
    gx_b, gw_b = grad(x_flat, params, "blocked")
    gx_s, gw_s = grad(x_flat, params, "sorted")
    gx_r, gw_r = grad(x_flat, params, "reference")
    for gx, gw in ((gx_b, gw_b), (gx_s, gw_s)):
        np.testing.assert_allclose(np.array(gx), np.array(gx_r), atol=1e-6, rtol=1e-5)
        for (name, a), (_, b) in zip(tree_flatten(gw), tree_flatten(gw_r), strict=True):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-6, rtol=1e-5, err_msg=name)
    y, _, _ = mlp(x)  # the layer takes the blocked path here, against the naive loop
    y_ref, chosen, _ = naive_moe(mlp, np.array(x), tiny_config)
    np.testing.assert_allclose(np.array(y), y_ref, atol=1e-5, rtol=1e-4)


def test_cpu_block_rows_by_what_openblas_runs_unpacked(monkeypatch):
    """32-row blocks where OpenBLAS's small-matrix kernel takes them whole (tiny); 16 where
    it takes 16-row blocks in column chunks (small, 973m); otherwise 64 where there are
    >= 16 x the padding's expectation of pairs (7 experts: 3,584), else 32."""
    monkeypatch.setattr(mlx_experts, "SMALL_BLOCK_GEMM", 100**3)
    assert CPU_BLOCK_ROWS == 32 and CPU_BLOCK_ROWS_PACKED == 64 and CPU_BLOCK_ROWS_CHUNKED == 16
    tiny, small, big, huge = (64, 128), (256, 512), (768, 1536), (4096, 8192)
    assert mlx_experts.cpu_block_rows(*tiny, 100_000, 7) == 32  # small-matrix kernel
    for shape in (small, big):
        for pairs in (2048, 4096):
            assert mlx_experts.cpu_block_rows(*shape, pairs, 7) == 16
    for shape in (huge,):  # 16 x 4096 x 16 columns is past the small kernel
        assert mlx_experts.cpu_block_rows(*shape, 4096, 7) == 64  # batch 8 x 256, top-2
        assert mlx_experts.cpu_block_rows(*shape, 3584, 7) == 64
        assert mlx_experts.cpu_block_rows(*shape, 3583, 7) == 32
        assert mlx_experts.cpu_block_rows(*shape, 2048, 7) == 32  # a 1,024-token prefill
    monkeypatch.setattr(mlx_experts, "SMALL_BLOCK_GEMM", 0)  # a BLAS without the kernel
    for shape in (tiny, small, big):
        assert mlx_experts.cpu_block_rows(*shape, 4096, 7) == 64
        assert mlx_experts.cpu_block_rows(*shape, 2048, 7) == 32
        assert mlx_experts.chunk_columns(16, *shape) is None


def test_small_block_gemm_only_where_openblas_has_the_small_kernel():
    """The small-matrix rules hold for OpenBLAS on the AVX-512 cores with that kernel; any
    other BLAS packs every GEMM, and the bound is 0."""
    from customllm_mlx import _blas

    for core, small in (("Cooperlake", True), ("SkylakeX", True), ("Haswell", False)):
        assert _blas.small_gemm_kernel(core) is small
    if _blas.loaded is None:  # no OpenBLAS (CUSTOMLLM_OPENBLAS=none, macOS): no core, no kernel
        assert _blas.corename() is None and not _blas.small_gemm_kernel()
    assert mlx_experts.SMALL_BLOCK_GEMM == (100**3 if _blas.small_gemm_kernel() else 0)


@pytest.mark.parametrize("regime", ["small", "packed", "chunked"])
def test_blocked_dispatch_sends_whole_blocks_of_one_expert(
    tiny_config, gather_mm_calls, regime, monkeypatch
):
    """32-row blocks where OpenBLAS's small-matrix kernel takes them, 16 in column chunks
    where it takes those (the kernel's bound lowered: 64 and 32 columns), 64 where it packs
    either way (and pairs are many: 28 x 64 tokens, top-2)."""
    bound = {"small": 100**3, "packed": 0, "chunked": 16 * 64 * 64}
    monkeypatch.setattr(mlx_experts, "SMALL_BLOCK_GEMM", bound[regime])
    g = {"small": CPU_BLOCK_ROWS, "packed": CPU_BLOCK_ROWS_PACKED}.get(regime, 16)
    calls = gather_mm_calls
    model = build(tiny_config)
    N, k, E = 28 * 64, 2, tiny_config.n_routed_experts
    model(random_ids(tiny_config, B=28, T=64))
    assert len(calls) == 3 * tiny_config.num_hidden_layers
    for (blocks, rows, d_in), index in calls:
        assert rows == g and blocks == (N * k + E * (g - 1)) // g  # < g padding per expert
        if regime == "chunked":  # (blocks, chunks): expert * chunks + chunk
            chunks = index.shape[1]
            assert chunks == {64: 128 // 64, 128: 64 // 32}[d_in]
            assert np.all(index % chunks == np.arange(chunks))
            index = index[:, 0] // chunks
        assert index.shape == (blocks,) and np.all(np.diff(index) >= 0)


def test_chunk_columns_bring_block_gemms_under_the_small_kernel(monkeypatch):
    """Blocks of up to 32 rows: the widest multiple of 16 that divides the output width and
    fits OpenBLAS's small kernel (rows x in x columns <= 100**3); None for blocks that fit
    whole, fit no chunk, or have 64 rows (their packing amortised)."""
    monkeypatch.setattr(mlx_experts, "SMALL_BLOCK_GEMM", 100**3)
    chunk = mlx_experts.chunk_columns
    assert chunk(32, 64, 128) is None  # tiny: whole
    assert chunk(32, 256, 512) == 64 and chunk(32, 512, 256) == 32  # small
    assert chunk(32, 768, 1536) == 32 and chunk(32, 1536, 768) == 16  # 973m
    assert chunk(16, 256, 512) == 128 and chunk(16, 512, 256) == 64  # small, 16 rows
    assert chunk(16, 768, 1536) == 64 and chunk(16, 1536, 768) == 32  # 973m, 16 rows
    assert chunk(32, 4096, 8192) is None  # 16 columns too many
    assert chunk(64, 256, 512) is None  # 64-row blocks
    assert chunk(32, 256, 528) == 48  # 64 would fit, but does not divide 528


def test_blocked_dispatch_fits_the_most_padding(tiny_config, monkeypatch):
    """Six experts one row past a whole block, the seventh two: 216 padding rows, E * (g - 1)
    less one, which fills the static row bound exactly (a row past it would be lost)."""
    g, E = 32, tiny_config.n_routed_experts
    monkeypatch.setattr(mlx_experts, "cpu_block_rows", lambda *args: g)
    mlp = build(tiny_config).decoder_layers[0].mlp
    counts = np.array([g + 1] * 6 + [2 * g + 2])  # 328 pairs, 164 tokens
    P = int(counts.sum())
    assert (-counts % g).sum() == E * (g - 1) - 1 and (P + E * (g - 1)) // g * g == P + 216
    flat_expert = mx.array(np.random.default_rng(0).permutation(np.repeat(np.arange(E), counts)))
    x_flat = mx.random.normal((P // 2, tiny_config.hidden_size), key=mx.random.key(3))
    order = mx.argsort(flat_expert)
    blocked = mlp.routed_experts.blocked(x_flat, flat_expert, order, mx.array(counts), 2)
    rows = mlp.sorted_experts(x_flat, flat_expert, order)
    np.testing.assert_allclose(np.array(blocked), np.array(rows), atol=1e-7, rtol=1e-5)


def test_routing_bias_changes_choice_not_weights(tiny_config):
    model = build(tiny_config, bias_std=0.0)
    mlp = model.decoder_layers[0].mlp
    x = mx.random.normal((48, tiny_config.hidden_size), key=mx.random.key(2))
    scores, idx, weights = mlp.route(x)
    mlp.expert_bias = mx.array([5.0] + [0.0] * 6)  # force expert 0 into every top-k
    scores_b, idx_b, weights_b = mlp.route(x)
    assert mx.array_equal(scores, scores_b)
    assert bool(mx.all(mx.any(idx_b == 0, axis=-1)))
    chosen = mx.take_along_axis(scores_b, idx_b, axis=-1)
    expected = chosen / chosen.sum(-1, keepdims=True) * tiny_config.routed_scaling_factor
    np.testing.assert_allclose(np.array(weights_b), np.array(expected), rtol=1e-6)


def test_each_expert_runs_only_on_its_tokens(tiny_config, gather_mm_calls):
    """gather_mm sees N*k rows sorted by expert, never N*E (every expert on every token)."""
    calls = gather_mm_calls
    model = build(tiny_config)
    B, T = 2, 16
    N, k, E = B * T, tiny_config.num_experts_per_tok, tiny_config.n_routed_experts
    model(random_ids(tiny_config, B=B, T=T))  # N * k < E * CPU_BLOCK_ROWS: one row per entry
    assert len(calls) == 3 * tiny_config.num_hidden_layers  # gate, up, down per layer
    for shape, expert in calls:
        assert shape[0] == N * k < N * E
        assert expert.shape == (N * k,) and np.all(np.diff(expert) >= 0)  # sorted by expert


def test_sign_bias_update_moves_toward_balance(tiny_config):
    config = dataclasses.replace(tiny_config, bias_update="sign", bias_update_rate=1e-3)
    model = build(config, bias_std=0.0)
    load = mx.array([[10, 0, 0, 0, 0, 0, 4]] * config.num_hidden_layers)
    model.update_expert_bias(mx.stack([load, mx.zeros_like(load)], axis=1))
    np.testing.assert_allclose(
        np.array(model.decoder_layers[1].mlp.expert_bias),
        [-1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, -1e-3],
    )


def test_solve_bias_update_moves_toward_the_batch_mean(tiny_config):
    """The "solve" rule takes bias_update_rate of the way to the token-weighted mean of the
    balancing biases that the micro-batches report (routing[:, 1] / tokens)."""
    config = dataclasses.replace(tiny_config, bias_update_rate=0.5)
    model = build(config, bias_std=0.0)
    E, k = config.n_routed_experts, config.num_experts_per_tok
    target = mx.array([0.3, -0.1, 0.0, 0.2, -0.2, -0.1, -0.1])
    tokens = 70
    load = mx.full((E,), tokens * k / E)
    routing = mx.stack([mx.stack([load, target * tokens])] * config.num_hidden_layers)
    model.update_expert_bias(routing)
    np.testing.assert_allclose(
        np.array(model.decoder_layers[0].mlp.expert_bias), 0.5 * np.array(target), atol=1e-7
    )
    model.update_expert_bias(routing)
    np.testing.assert_allclose(
        np.array(model.decoder_layers[1].mlp.expert_bias), 0.75 * np.array(target), atol=1e-7
    )


def test_solve_bias_update_goes_further_by_the_maxvio(tiny_config):
    """Rate 0.2 plus the batch's MaxVio of the way: 0.7 at max/mean 1.5, 0.3 at 1.1, and all
    of it when the loads are far apart (3.5)."""
    config = dataclasses.replace(tiny_config, bias_update_rate=0.2)
    E = config.n_routed_experts
    target = mx.array([0.3, -0.1, 0.0, 0.2, -0.2, -0.1, -0.1])
    for top, share in ((1.5, 0.7), (1.1, 0.3), (3.5, 1.0)):
        model = build(config, bias_std=0.0)
        load = mx.array([top] + [(E - top) / (E - 1)] * (E - 1)) * 20  # mean 20: 70 tokens
        routing = mx.stack([mx.stack([load, target * 70])] * config.num_hidden_layers)
        model.update_expert_bias(routing)
        np.testing.assert_allclose(
            np.array(model.decoder_layers[0].mlp.expert_bias), share * np.array(target), atol=1e-6
        )


def drifted_scores(N: int = 512, E: int = 7, seed: int = 0) -> np.ndarray:
    """Sigmoid scores whose experts differ by a common offset (up to 0.2) far larger than the
    spread across tokens (0.01): the router's state once its hidden states grow alike."""
    rng = np.random.default_rng(seed)
    logits = np.linspace(0.0, 0.8, E)[None] + 0.04 * rng.standard_normal((N, E))
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


def test_balancing_bias_balances_a_drifted_batch(tiny_config):
    scores = mx.array(drifted_scores())
    N, E, k = scores.shape[0], tiny_config.n_routed_experts, tiny_config.num_experts_per_tok

    def loads(bias):
        idx = mlx_model.top_k_indices(scores + bias, k)
        return np.bincount(np.array(idx).ravel(), minlength=E)

    assert loads(mx.zeros((E,))).max() == N  # unbiased: every token on the same 2 experts
    bias = mlx_model.balancing_bias(scores, mx.zeros((E,)), k)
    assert abs(float(bias.sum())) < 1e-6  # centred
    assert loads(bias).max() / (N * k / E) <= 1.1, loads(bias)


# --- Folder IO ----------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tiny_config, tmp_path, tokenizer_dir):
    tiny_config = dataclasses.replace(
        tiny_config, vocab_size=TOKENIZER_VOCAB_SIZE
    )  # the tokenizer's
    model = build(tiny_config)
    customllm_mlx.save(model, tmp_path / "m", tokenizer=tokenizer_dir)
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    loaded, tokenizer = customllm_mlx.load(tmp_path / "m")
    assert len(tokenizer) == TOKENIZER_VOCAB_SIZE
    assert loaded.training is False
    assert ModelConfig.from_json(tmp_path / "m") == tiny_config
    original = params(model)
    assert params(loaded).keys() == original.keys()
    for key, value in params(loaded).items():
        assert value.dtype == mx.float32 and mx.array_equal(value, original[key]), key
    file = load_numpy(str(tmp_path / "m" / WEIGHTS_NAME))
    assert set(file) == set(canonical_shapes(tiny_config))
    ids = random_ids(tiny_config)
    assert mx.array_equal(loaded(ids), model(ids))
    assert not any(
        k.endswith("expert_bias") for k, _ in tree_flatten(loaded.trainable_parameters())
    )


def test_bfloat16_save_and_load(tiny_config, tmp_path):
    model = build(tiny_config)
    customllm_mlx.save(model, tmp_path / "bf16", dtype="bfloat16")
    loaded, tokenizer = customllm_mlx.load(tmp_path / "bf16")
    assert tokenizer is None
    original = params(model)
    for key, value in params(loaded).items():
        if key.endswith("expert_bias"):  # routing state stays float32
            assert value.dtype == mx.float32 and mx.array_equal(value, original[key])
        else:
            assert value.dtype == mx.bfloat16, key
            assert mx.array_equal(value, original[key].astype(mx.bfloat16)), key
    widened, _ = customllm_mlx.load(tmp_path / "bf16", dtype=mx.float32)
    assert widened.lm_head.weight.dtype == mx.float32
    ids = random_ids(tiny_config)
    ref = np.array(model(ids))
    assert np.abs(np.array(widened(ids)) - ref).max() < 0.05 * np.abs(ref).max()
    with pytest.raises(ValueError, match="unknown dtype"):
        customllm_mlx.load(tmp_path / "bf16", dtype="int4")


def test_load_names_what_is_wrong(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        customllm_mlx.load(tmp_path / "missing")
    folder = customllm_mlx.save(build(tiny_config), tmp_path / "m")
    weights = load_numpy(str(folder / WEIGHTS_NAME))

    bad = dict(
        weights, **{"decoder_layers.0.self_attn.o_proj.weight": np.zeros((3, 3), np.float32)}
    )
    save_numpy(bad, str(folder / WEIGHTS_NAME))
    with pytest.raises(
        ValueError, match=r"'decoder_layers.0.self_attn.o_proj.weight' has shape \(3, 3\)"
    ):
        customllm_mlx.load(folder)

    bad = {k: v for k, v in weights.items() if k != "lm_head.bias"}
    save_numpy(bad, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="missing tensor 'lm_head.bias'"):
        customllm_mlx.load(folder)

    bad = dict(weights, **{"lm_head.scale": np.zeros(3, np.float32)})
    save_numpy(bad, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="unexpected tensor 'lm_head.scale'"):
        customllm_mlx.load(folder)

    save_numpy({"_orig_mod." + k: v for k, v in weights.items()}, str(folder / WEIGHTS_NAME))
    customllm_mlx.load(folder)  # wrapper prefixes are stripped

    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        customllm_mlx.load(folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        customllm_mlx.load(folder)


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_init_writes_a_loadable_folder(tmp_path, tokenizer_dir):
    runner = CliRunner()
    out = tmp_path / "tiny"
    args = [
        "init",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--tokenizer",
        str(tokenizer_dir),
        "--seed",
        "3",
    ]
    result = runner.invoke(cli_main, args)
    assert result.exit_code == 0, result.output
    assert "0.98M parameters" in result.output  # 977,024 with a 4,096-token vocabulary
    model, tokenizer = customllm_mlx.load(out)
    assert len(tokenizer) == model.model_config.vocab_size == TOKENIZER_VOCAB_SIZE
    assert model.model_config.eos_token_id == tokenizer.eos_token_id
    first = params(model)["decoder_layers.0.self_attn.q_proj_d.weight"]
    assert abs(np.array(first).std() - model.model_config.initializer_range) < 2e-3
    embeddings = np.array(params(model)["token_embeddings.weight"])
    assert abs(embeddings.std() - model.model_config.embedding_init_std) < 0.02

    again = runner.invoke(
        cli_main, ["init", "--preset", "tiny", "--out", str(out), "--tokenizer", str(tokenizer_dir)]
    )
    assert again.exit_code == 1 and "--force" in again.output
    same = runner.invoke(cli_main, [*args, "--force"])
    assert same.exit_code == 0
    reloaded, _ = customllm_mlx.load(out)
    assert mx.array_equal(params(reloaded)["lm_head.weight"], params(model)["lm_head.weight"])
    other = runner.invoke(cli_main, [*args[:-1], "4", "--force"])
    assert other.exit_code == 0
    reseeded, _ = customllm_mlx.load(out)
    assert not mx.array_equal(params(reseeded)["lm_head.weight"], params(model)["lm_head.weight"])


def test_cli_init_from_config_and_refusals(tmp_path, tokenizer_dir, tiny_config):
    runner = CliRunner()
    config_file = tmp_path / "config.json"
    tiny_config.to_json(config_file)
    result = runner.invoke(
        cli_main,
        [
            "init",
            "--config",
            str(config_file),
            "--out",
            str(tmp_path / "o"),
            "--tokenizer",
            str(tokenizer_dir),
        ],
    )
    assert (
        result.exit_code == 1
        and f"{TOKENIZER_VOCAB_SIZE} tokens, more than the model's vocab_size 256" in result.output
    )
    assert not isinstance(result.exception, ValueError) and not (tmp_path / "o").exists()

    matching = dataclasses.replace(tiny_config, vocab_size=TOKENIZER_VOCAB_SIZE)
    matching.to_json(config_file)
    result = runner.invoke(
        cli_main,
        [
            "init",
            "--config",
            str(config_file),
            "--out",
            str(tmp_path / "o"),
            "--tokenizer",
            str(tokenizer_dir),
            "--dtype",
            "bfloat16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / CONFIG_NAME).read_text())["max_position_embeddings"] == 64
    model, _ = customllm_mlx.load(tmp_path / "o")
    assert model.lm_head.weight.dtype == mx.bfloat16

    for args, message in [
        (["--preset", "huge"], "unknown preset 'huge'"),
        ([], "exactly one of --preset"),
        (["--preset", "tiny", "--config", str(config_file)], "exactly one of --preset"),
        (
            ["--preset", "tiny", "--tokenizer", str(tmp_path / "no-tokenizer")],
            "cannot load tokenizer",
        ),
    ]:
        result = runner.invoke(cli_main, ["init", "--out", str(tmp_path / "x"), *args])
        assert result.exit_code in (1, 2) and message in result.output, (args, result.output)
        assert not (tmp_path / "x").exists()
    (tmp_path / "broken.json").write_text("{not json")
    result = runner.invoke(
        cli_main, ["init", "--config", str(tmp_path / "broken.json"), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 1 and "not valid JSON" in result.output


def test_swiglu_equals_mlx_silu_times_up_values_and_gradients_at_any_magnitude():
    gate = mx.concatenate(
        [5 * mx.random.normal((4000,), key=mx.random.key(3)), mx.array([-1e4, -90.0, 0.0, 90.0])]
    )
    up = mx.random.normal(gate.shape, key=mx.random.key(5))
    cot = mx.random.normal(gate.shape, key=mx.random.key(4))

    def reference(gate, up):
        return nn.silu(gate) * up

    np.testing.assert_allclose(
        np.array(mlx_experts.swiglu(gate, up)), np.array(reference(gate, up)), atol=1e-6, rtol=1e-6
    )
    grads = mx.grad(lambda g, u: (mlx_experts.swiglu(g, u) * cot).sum(), argnums=(0, 1))
    ref = mx.grad(lambda g, u: (reference(g, u) * cot).sum(), argnums=(0, 1))(gate, up)
    for grad in (grads, mx.compile(grads)):  # op by op, and fused as in a compiled step
        for a, b in zip(grad(gate, up), ref, strict=True):
            np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-5, rtol=1e-5)
    half = mlx_experts.swiglu(gate.astype(mx.bfloat16), up.astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16 and bool(mx.all(mx.isfinite(half)))


@pytest.mark.parametrize("size", [14_000, 7])  # the polynomial exp (training) and power(2, .)
def test_router_sigmoid_equals_mlx_sigmoid_values_and_gradients(size):
    x = mx.concatenate(
        [5 * mx.random.normal((size,), key=mx.random.key(6)), mx.array([-1e4, -90.0, 0.0, 90.0])]
    )
    cot = mx.random.normal(x.shape, key=mx.random.key(8))
    np.testing.assert_allclose(
        np.array(mlx_experts.sigmoid(x)), np.array(mx.sigmoid(x)), atol=1e-7, rtol=1e-6
    )
    grad = mx.grad(lambda x: (mlx_experts.sigmoid(x) * cot).sum())
    ref = mx.grad(lambda x: (mx.sigmoid(x) * cot).sum())(x)
    for g in (grad, mx.compile(grad)):
        np.testing.assert_allclose(np.array(g(x)), np.array(ref), atol=1e-6, rtol=1e-5)


def test_cached_inference_skips_the_aux_loss(tiny_config):
    """A cached call in eval mode (generation) does not compute the aux loss; uncached or
    training calls do, and the logits do not depend on it."""
    config = dataclasses.replace(tiny_config, aux_loss_coef=0.1)
    model, ids = build(config), random_ids(config)
    full_logits, full_aux, _ = model(ids, return_aux=True)
    cached_logits, cached_aux, _ = model(ids, cache=model.make_cache(), return_aux=True)
    model.train()
    _, training_aux, _ = model(ids, cache=model.make_cache(), return_aux=True)
    assert full_aux.item() > 0 and cached_aux.item() == 0.0
    assert np.allclose(np.array(training_aux), np.array(full_aux), rtol=1e-6)
    assert np.allclose(np.array(cached_logits), np.array(full_logits), atol=1e-5)


def test_gradient_checkpointing_replays_the_dropout_masks(tiny_config, monkeypatch):
    """With dropout on, a checkpointed layer's recomputation draws the masks its forward drew:
    the gradients equal those of the same forward (same keys) without mx.checkpoint."""
    config = dataclasses.replace(tiny_config, attn_dropout=0.2, mlp_dropout=0.2)
    mx.random.seed(0)
    model = CustomLLM(config)
    model.train()
    model.checkpoint_layers = True
    tokens = mx.random.randint(0, config.vocab_size, (2, 17))

    def loss_and_grads():
        def loss_fn(m):
            lm, aux, _ = m.training_loss(tokens[:, :-1], tokens[:, 1:])
            return lm + aux

        mx.random.seed(5)
        loss, grads = nn.value_and_grad(model, loss_fn)(model)
        return loss.item(), dict(tree_flatten(grads))

    loss, grads = loss_and_grads()
    with monkeypatch.context() as patch:
        patch.setattr(mx, "checkpoint", lambda fn: fn)
        plain_loss, plain = loss_and_grads()
    assert loss == plain_loss
    for name, grad in grads.items():
        np.testing.assert_allclose(np.array(grad), np.array(plain[name]), atol=1e-6, err_msg=name)
    assert any(float(mx.abs(g).max()) > 0 for g in grads.values())


def wide_config(config: ModelConfig) -> ModelConfig:
    """`config` at widths that quantize in groups of 32 (973m's ratios, narrow)."""
    return dataclasses.replace(
        config, hidden_size=128, q_latent_dim=64, kv_latent_dim=64, intermediate_size=256,
        qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64, initializer_range=0.1,
    )  # fmt: skip


def wrap_quantized(model: CustomLLM, bits: int) -> None:
    nn.quantize(model, group_size=32, bits=bits)


def wrap_lora(model: CustomLLM, bits: int) -> None:
    """mlx_lm's LoRA on every linear layer (random, non-zero adapters), over a quantized
    model where `bits`."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 2.0, "dropout": 0.0})
    mx.random.seed(3)
    for _, module in model.named_modules():
        if "lora_b" in module:
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)


@pytest.mark.parametrize(
    "wrap, bits", [(wrap_quantized, 4), (wrap_quantized, 8), (wrap_lora, 0), (wrap_lora, 4)]
)
def test_cached_decode_through_quantized_and_adapted_layers_equals_full_forward(
    tiny_config, wrap, bits
):
    """The absorbed decode reads the up-projections' effective matrices (dequantized, base +
    low-rank update): cached generation equals the full forward of the same model."""
    model = build(wide_config(tiny_config))
    wrap(model, bits)
    assert type(model.layers[0].self_attn.k_proj_u) is not nn.Linear
    assert model.layers[0].self_attn.absorbable
    model.eval()
    ids = random_ids(tiny_config, T=20)
    full = model(ids)
    cache = model.make_cache()
    chunks = [model(ids[:, :6], cache=cache)]
    chunks += [model(ids[:, t : t + 1], cache=cache) for t in range(6, 20)]
    np.testing.assert_allclose(
        np.array(mx.concatenate(chunks, axis=1)), np.array(full), atol=1e-3, rtol=1e-4
    )


def test_openblas_set_up_too_late_warns_and_ld_preload_counts(tmp_path):
    """Importing the package sets up nothing; `setup_cpu()` after `import mlx.core` cannot swap
    the BLAS: a warning names the fix; with OpenBLAS preloaded (LD_PRELOAD) it finds and uses
    it."""
    import os
    import subprocess
    import sys

    from customllm_mlx import _blas

    if _blas.loaded is None:
        pytest.skip("no OpenBLAS here (or CUSTOMLLM_OPENBLAS=none)")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    code = "import sys, customllm_mlx; print(customllm_mlx._blas.loaded, 'mlx.core' in sys.modules)"
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert bare.stdout.split() == ["None", "False"], bare.stdout + bare.stderr
    code = "import mlx.core, customllm_mlx; print(customllm_mlx.setup_cpu())"
    late = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert late.returncode == 0 and late.stdout.strip() == "None", late.stderr
    assert f"LD_PRELOAD={_blas.loaded}" in late.stderr, late.stderr
    env["LD_PRELOAD"] = _blas.loaded
    early = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert early.returncode == 0 and "openblas" in early.stdout, early.stdout + early.stderr
    assert "RuntimeWarning" not in early.stderr, early.stderr
