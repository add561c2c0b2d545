"""The MLX code paths a GPU takes (Metal on a Mac, CUDA with mlx[cuda]), run on the CPU.

On a GPU every `mx.default_device() != mx.cpu` branch takes its other side:
- `mx.fast.scaled_dot_product_attention` in training;
- MLX's own `exp`;
- 2,048-row loss chunks;
- the sorted `gather_mm` MoE dispatch instead of CPU blocks;
- one stream per batch.

This CI has no GPU. Here `mx.default_device` reports the GPU while the arithmetic stays on the
CPU, so those branches run, and they must give what the CPU branches give. They are what a
Mac trains with.
"""

# ruff: noqa: E402  (customllm_mlx must be imported before mlx.core: it preloads OpenBLAS)

from __future__ import annotations

import pytest

customllm_mlx = pytest.importorskip("customllm_mlx")

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from conftest import TOKENIZER_DIR, TRAIN_TXT
from mlx.utils import tree_flatten, tree_map

from customllm.config import ModelConfig
from customllm.metrics import read_metrics
from customllm.training import TrainConfig
from customllm_mlx import cpu_streams
from customllm_mlx import train as train_mod
from customllm_mlx.model import CustomLLM


@pytest.fixture
def gpu_paths(monkeypatch):
    """Call it to make every device check in customllm_mlx answer "GPU" from then on."""
    return lambda: monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)


def build(config, seed: int = 0) -> CustomLLM:
    """A model with a routing bias and attention weights 3x their initial scale, so that the
    attention is far from uniform (at init a wrong scale or mask hides in the rounding)."""
    mx.random.seed(seed)
    model = CustomLLM(config)
    for layer in model.decoder_layers:
        layer.mlp.expert_bias = 0.05 * mx.random.normal(layer.mlp.expert_bias.shape)
        attn = layer.self_attn
        attn.update(tree_map(lambda w: 3 * w, attn.parameters()))
    mx.eval(model.parameters())
    return model


def logits_loss_and_grads(model: CustomLLM, ids: mx.array):
    """Logits, then the fused training loss (as `customllm-mlx train`) and its gradients."""
    model.eval()
    logits = model(ids)
    model.train()
    labels = mx.concatenate([ids[:, 1:], mx.full((ids.shape[0], 1), -100, ids.dtype)], 1)

    def loss_fn(model, ids):
        lm, aux, _ = model.training_loss(ids, labels)
        return lm + aux

    loss, grads = nn.value_and_grad(model, loss_fn)(model, ids)
    mx.eval(logits, loss, grads)
    return np.array(logits), loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}


def test_gpu_paths_equal_cpu_paths_values_and_gradients(tiny_config, gpu_paths, monkeypatch):
    """Logits, fused training loss and every gradient, CPU branches against GPU branches.
    The GPU side must use the fast attention kernel and the sorted dispatch. 2 x 64 tokens
    make 256 token-expert pairs, enough for the CPU's blocked dispatch."""
    ids = mx.array(np.random.default_rng(3).integers(0, tiny_config.vocab_size, (2, 64)))
    model = build(tiny_config)
    mlp = model.decoder_layers[0].mlp
    assert mlp.routed_experts.blocked_dispatch(ids.size * mlp.top_k)
    cpu = logits_loss_and_grads(model, ids)

    gpu_paths()
    assert not mlp.routed_experts.blocked_dispatch(ids.size * mlp.top_k)
    fast_calls = []
    sdpa = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(
        mx.fast,
        "scaled_dot_product_attention",
        lambda *a, **k: fast_calls.append(k.get("mask")) or sdpa(*a, **k),
    )
    gpu = logits_loss_and_grads(model, ids)
    assert fast_calls and set(fast_calls) == {"causal"}  # training and full forwards

    np.testing.assert_allclose(gpu[0], cpu[0], rtol=1e-4, atol=1e-5)
    assert abs(gpu[1] - cpu[1]) < 1e-5 * abs(cpu[1])
    assert gpu[2].keys() == cpu[2].keys()
    for name, grad in cpu[2].items():
        np.testing.assert_allclose(gpu[2][name], grad, rtol=1e-3, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("absorb", [False, True])
def test_gpu_paths_cached_decoding_equals_full_forward(tiny_config, gpu_paths, absorb):
    """The latent cache on the GPU branches: a prefill, a chunk after it (the fast kernel with
    a mask aligned to the end of the cache), then one token at a time, against one forward."""
    gpu_paths()
    model = build(tiny_config).eval()
    ids = mx.array(np.random.default_rng(4).integers(0, tiny_config.vocab_size, (2, 24)))
    full = model(ids)
    cache = model.make_cache()
    chunks = [model(ids[:, :8], cache=cache, absorb=absorb)]
    chunks.append(model(ids[:, 8:13], cache=cache, absorb=absorb))
    chunks += [model(ids[:, t : t + 1], cache=cache, absorb=absorb) for t in range(13, 24)]
    assert cache[0].offset == 24
    np.testing.assert_allclose(
        np.array(mx.concatenate(chunks, axis=1)), np.array(full), rtol=0, atol=1e-4
    )


def test_gpu_paths_train_like_the_cpu(tmp_path, gpu_paths):
    """`customllm-mlx train` (the run_training it calls) for 6 tiny steps on the GPU branches:
    one stream per batch, no CPU buffer cache. Its losses equal the CPU branches' run (two
    streams here) to float32 rounding, and they fall. The "sign" bias update: the "solve"
    rule averages the balancing biases of the CPU run's two slices (near, not equal to, the
    one-stream run's), and routing ties then part the runs after a few steps."""
    config = tmp_path / "sign.json"
    ModelConfig.from_preset("tiny", bias_update="sign", bias_update_rate=1e-3).to_json(config)
    opts = dict(
        config=str(config), data=str(TRAIN_TXT), tokenizer=str(TOKENIZER_DIR), seq_len=32,
        batch_size=4, lr=1e-2, warmup_steps=2, steps=6, eval_every=3, save_every=0,
        keep_last=0, sample_every=3, max_sample_tokens=4,
    )  # fmt: skip
    runs = {}
    for side in ("cpu", "gpu"):
        if side == "gpu":
            gpu_paths()
            assert cpu_streams.stream_parts(4) == 1
        out = tmp_path / side
        train_mod.run_training(TrainConfig(**opts, out=str(out)))
        records = read_metrics(out / "metrics.jsonl")
        runs[side] = (
            [r["loss"] for r in records if "loss" in r],
            [r["eval_loss"] for r in records if "eval_loss" in r],
        )
        assert (out / "checkpoint-6" / "model.safetensors").is_file()
    (cpu_loss, cpu_eval), (gpu_loss, gpu_eval) = runs["cpu"], runs["gpu"]
    assert len(gpu_loss) == 6 and len(gpu_eval) == 2
    np.testing.assert_allclose(gpu_loss, cpu_loss, rtol=1e-4)
    np.testing.assert_allclose(gpu_eval, cpu_eval, rtol=1e-4)
    assert gpu_loss[-1] < gpu_loss[0]
