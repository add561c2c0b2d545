"""The PyTorch reference model against docs/architecture.md, plus its folder IO and `init` CLI."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import TOKENIZER_VOCAB_SIZE
from safetensors.torch import load_file, save_file

import customllm_torch
from customllm.checkpoint import WEIGHTS_NAME
from customllm.config import ModelConfig
from customllm_torch.cli import main as cli_main
from customllm_torch.model import CustomLLM, LatentKVCache, LlamaMLP, balancing_bias

torch.set_num_threads(min(4, torch.get_num_threads()))


def build(config: ModelConfig, seed: int = 0) -> CustomLLM:
    torch.manual_seed(seed)
    return CustomLLM(config).eval()


def close(reference: torch.Tensor) -> float:
    """Absolute tolerance for float32 logits: 1e-5 of their largest magnitude."""
    return 1e-5 * reference.abs().max().item()


def random_ids(config: ModelConfig, B: int = 2, T: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, T), generator=g)


@torch.no_grad()
def logits_of(model: CustomLLM, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(ids, **kwargs).logits


# --- Size and module tree ---------------------------------------------------------------------


def test_973m_parameter_count_on_meta():
    with torch.device("meta"):
        model = CustomLLM(ModelConfig.from_preset("973m"))
    count = sum(p.numel() for p in model.parameters())
    assert count == 973_122_048 == ModelConfig().num_parameters()
    assert model.num_parameters() == 973_122_048
    assert not any("expert_bias" in name for name, _ in model.named_parameters())
    assert "decoder_layers.0.mlp.expert_bias" in model.state_dict()


def test_973m_module_tree_names():
    with torch.device("meta"):
        text = repr(CustomLLM(ModelConfig()))
    expected = [
        "(token_embeddings): Embedding(49152, 768)",
        "(position_embeddings): Embedding(2048, 768)",
        "(dropout): Dropout(p=0.1",
        "(decoder_layers): ModuleList(",
        "(0-29): 30 x DecoderLayer(",
        "(self_attn): MultiHeadLatentAttention(",
        "(kv_proj_d): Linear(in_features=768, out_features=192, bias=False)",
        "(q_proj_d): Linear(in_features=768, out_features=192, bias=False)",
        "(k_proj_u): Linear(in_features=192, out_features=384, bias=False)",
        "(v_proj_u): Linear(in_features=192, out_features=768, bias=False)",
        "(q_proj_u): Linear(in_features=192, out_features=384, bias=False)",
        "(rope_k): Linear(in_features=768, out_features=384, bias=False)",
        "(rope_q): Linear(in_features=192, out_features=384, bias=False)",
        "(o_proj): Linear(in_features=768, out_features=768, bias=False)",
        "(rotary_emb): RotaryEmbedding()",
        "(mlp): LlamaMLP(",
        "(shared_experts): ModuleList(",
        "(0): DeepSeekExpertLayer(",
        "(routed_experts): ModuleList(",
        "(0-6): 7 x DeepSeekExpertLayer(",
        "(gate_proj): Linear(in_features=768, out_features=1536, bias=False)",
        "(up_proj): Linear(in_features=768, out_features=1536, bias=False)",
        "(down_proj): Linear(in_features=1536, out_features=768, bias=False)",
        "(act_fn): SiLU()",
        "(router): Linear(in_features=768, out_features=7, bias=False)",
        "(input_norm): CustomRMSNorm()",
        "(post_attn_norm): CustomRMSNorm()",
        "(attn_dropout): Dropout(p=0.3",
        "(mlp_dropout): Dropout(p=0.3",
        "(lm_head): Linear(in_features=768, out_features=49152, bias=True)",
        "Model parameters: 973.12M",
    ]
    missing = [line for line in expected if line not in text]
    assert not missing, f"module tree lacks {missing}"
    assert text.index("(kv_proj_d)") < text.index("(o_proj)") < text.index("(rotary_emb)")


# --- Forward pass -----------------------------------------------------------------------------


def test_decoder_layers_change_the_logits(tiny_config):
    """The seed skipped the decoder layers: logits were lm_head(embeddings)."""
    model = build(tiny_config)
    ids = random_ids(tiny_config)
    logits = logits_of(model, ids)
    with torch.no_grad():
        pos = torch.arange(ids.shape[1])
        x = model.token_embeddings(ids) + model.position_embeddings(pos)
        assert (logits - model.lm_head(x)).abs().max() > 1e-3
        for weight in (
            model.decoder_layers[0].self_attn.o_proj.weight,
            model.decoder_layers[-1].mlp.shared_experts[0].down_proj.weight,
        ):
            saved = weight.clone()
            weight.add_(torch.randn_like(weight) * 0.1)
            assert (logits_of(model, ids) - logits).abs().max() > 1e-4
            weight.copy_(saved)
    torch.testing.assert_close(logits_of(model, ids), logits, rtol=0, atol=0)


def test_attention_is_causal(tiny_config):
    model = build(tiny_config)
    ids = random_ids(tiny_config, T=12)
    logits = logits_of(model, ids)
    for t in (0, 4, 10):
        changed = ids.clone()
        changed[:, t + 1 :] = (ids[:, t + 1 :] + 1) % tiny_config.vocab_size
        other = logits_of(model, changed)
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-6)
        if t + 1 < ids.shape[1]:
            assert (other[:, t + 1 :] - logits[:, t + 1 :]).abs().amax(-1).min() > 0
        changed_here = ids.clone()
        changed_here[:, t] = (ids[:, t] + 1) % tiny_config.vocab_size
        assert (logits_of(model, changed_here)[:, t] - logits[:, t]).abs().max() > 1e-5


def test_rope_angles_are_made_once_per_forward(tiny_config):
    """cos and sin of the positions are made once a forward and shared by every layer (made
    in each layer, they were ~20 small kernels a layer: launches on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    assert tiny_config.num_hidden_layers > 1
    model = build(tiny_config)
    with CountOps() as counter:
        logits_of(model, random_ids(tiny_config))
    assert counter.names.count("cos") == 1 and counter.names.count("sin") == 1


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(tiny_config):
    model = build(tiny_config)
    with torch.no_grad():  # spread the logits so that shifted and unshifted losses differ
        torch.nn.init.normal_(model.token_embeddings.weight, std=1.0)
        torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    ids = random_ids(tiny_config, B=2, T=10)
    labels = ids.clone()
    labels[0, 3] = labels[1, 7] = labels[1, 8] = -100
    out = model(ids, labels=labels)
    logits = out.logits.detach().float()

    log_probs = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = log_probs.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    expected = -(picked * keep).sum() / keep.sum()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.lm_loss.detach(), expected, rtol=1e-5, atol=1e-5)

    unshifted = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert abs(unshifted.item() - expected.item()) > 0.1

    model.train()  # dropout is 0 in tiny: training adds the aux loss to the same LM loss
    out = model(ids, labels=labels)
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    torch.testing.assert_close(out.lm_loss.detach(), expected, rtol=1e-5, atol=1e-5)


def test_prompt_longer_than_context_is_a_clear_error(tiny_config):
    model = build(dataclasses.replace(tiny_config, max_position_embeddings=16))
    with pytest.raises(ValueError, match="17 tokens exceeds the context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = LatentKVCache(len(model.decoder_layers))
    with torch.no_grad():
        model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)


# --- Mixture of experts -----------------------------------------------------------------------


def make_mlp(config: ModelConfig, seed: int = 0, **overrides) -> LlamaMLP:
    torch.manual_seed(seed)
    mlp = LlamaMLP(dataclasses.replace(config, **overrides))
    with torch.no_grad():
        mlp.expert_bias.copy_(torch.randn(config.n_routed_experts) * 0.3)
    return mlp


def naive_scores(mlp: LlamaMLP, x_flat: torch.Tensor) -> torch.Tensor:
    logits = (x_flat @ mlp.router.weight.T).float()
    return logits.sigmoid() if mlp.router_score == "sigmoid" else logits.softmax(-1)


@pytest.mark.parametrize(
    "router_score, norm_topk_prob, scaling", [("sigmoid", True, 1.0), ("softmax", False, 2.5)]
)
def test_moe_equals_naive_per_token_loop(tiny_config, router_score, norm_topk_prob, scaling):
    mlp = make_mlp(
        tiny_config,
        router_score=router_score,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=scaling,
    )
    x = torch.randn(2, 9, tiny_config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, _, routing = mlp(x)
        x_flat = x.reshape(-1, x.shape[-1])
        scores = naive_scores(mlp, x_flat)
        expected, chosen, unbiased = [], [], []
        for n in range(x_flat.shape[0]):
            s = scores[n]
            idx = torch.topk(s + mlp.expert_bias, mlp.top_k).indices
            unbiased.append(set(torch.topk(s, mlp.top_k).indices.tolist()))
            chosen.append(set(idx.tolist()))
            w = s[idx]
            if norm_topk_prob:
                w = w / w.sum()
            w = w * scaling
            out = mlp.shared_experts[0](x_flat[n])
            for weight, e in zip(w, idx.tolist(), strict=True):
                out = out + weight * mlp.routed_experts[e](x_flat[n])
            expected.append(out)
    torch.testing.assert_close(
        y.reshape(-1, x.shape[-1]), torch.stack(expected), rtol=1e-5, atol=1e-5
    )
    assert chosen != unbiased, "the bias should change some selections in this test"
    counts = torch.zeros(tiny_config.n_routed_experts, dtype=torch.long)
    for experts in chosen:
        counts[list(experts)] += 1
    assert torch.equal(routing[0], counts.float())


def test_bias_changes_selection_not_weights(tiny_config):
    mlp = make_mlp(tiny_config)
    x_flat = torch.randn(16, tiny_config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mlp.expert_bias.zero_()
        scores0, idx0, _ = mlp.route(x_flat)
        favoured = int(scores0.mean(0).argmin())  # the least-liked expert
        mlp.expert_bias[favoured] = 10.0
        scores1, idx1, weights1 = mlp.route(x_flat)
    torch.testing.assert_close(scores1, scores0, rtol=0, atol=0)
    assert (idx1 == favoured).any(-1).all(), "a large bias forces its expert into every top-k"
    assert not (idx0 == favoured).any(-1).all()
    chosen_scores = scores0.gather(-1, idx1)
    expected = (
        chosen_scores / chosen_scores.sum(-1, keepdim=True) * tiny_config.routed_scaling_factor
    )
    torch.testing.assert_close(weights1, expected, rtol=1e-6, atol=1e-7)


def sign_routing(load: torch.Tensor) -> torch.Tensor:
    """routing (layers, 2, E) for the "sign" rule: the loads and no balancing bias."""
    return torch.stack([load.float(), torch.zeros(load.shape)], dim=1)


def test_sign_bias_update_moves_toward_balance(tiny_config):
    config = dataclasses.replace(tiny_config, bias_update="sign", bias_update_rate=1e-3)
    model, rate = build(config), 1e-3
    # layer 0: mean load 15/7 ~ 2.14, experts 0, 2, 4 over it; layer 1: perfectly balanced
    load = torch.tensor([[6, 0, 3, 1, 4, 1, 0], [2, 2, 2, 2, 2, 2, 2]])
    model.update_expert_bias(sign_routing(load))
    signs = torch.tensor([[-1.0, 1, -1, 1, -1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    for layer, sign in zip(model.decoder_layers, signs, strict=True):
        assert torch.equal(layer.mlp.expert_bias, rate * sign), layer.mlp.expert_bias
    model.update_expert_bias(sign_routing(load))  # a second step moves the same way again
    torch.testing.assert_close(model.decoder_layers[0].mlp.expert_bias, 2 * rate * signs[0])
    assert not any(p.grad is not None for p in model.parameters())


def test_sign_bias_update_leaves_experts_at_the_mean_load_alone(tiny_config):
    config = dataclasses.replace(tiny_config, bias_update="sign", bias_update_rate=1e-3)
    model = build(config)
    load = torch.tensor([[6, 0, 2, 2, 2, 1, 1], [6, 0, 2, 2, 2, 1, 1]])  # mean load is 2
    model.update_expert_bias(sign_routing(load))
    expected = 1e-3 * torch.tensor([-1.0, 1, 0, 0, 0, 1, 1])
    assert torch.equal(model.decoder_layers[0].mlp.expert_bias, expected)


def test_solve_bias_update_moves_toward_the_batch_mean(tiny_config):
    config = dataclasses.replace(tiny_config, bias_update_rate=0.5)
    model = build(config)
    E, k = config.n_routed_experts, config.num_experts_per_tok
    target = torch.tensor([0.3, -0.1, 0.0, 0.2, -0.2, -0.1, -0.1])
    # two micro-batches of 30 and 40 tokens: the token-weighted mean of their targets
    first, second = target + 0.07, target - 0.0525
    tokens = torch.tensor([30.0, 40.0])
    load = (tokens.sum() * k / E).expand(E)
    layer = torch.stack([load, first * tokens[0] + second * tokens[1]])
    model.update_expert_bias(torch.stack([layer] * config.num_hidden_layers))
    torch.testing.assert_close(model.decoder_layers[0].mlp.expert_bias, 0.5 * target)


def test_solve_bias_update_goes_further_by_the_maxvio(tiny_config):
    config = dataclasses.replace(tiny_config, bias_update_rate=0.2)
    E = config.n_routed_experts
    target = torch.tensor([0.3, -0.1, 0.0, 0.2, -0.2, -0.1, -0.1])
    for top, share in ((1.5, 0.7), (1.1, 0.3), (3.5, 1.0)):
        model = build(config)
        load = torch.tensor([top] + [(E - top) / (E - 1)] * (E - 1)) * 20  # mean 20: 70 tokens
        layer = torch.stack([load, target * 70])
        model.update_expert_bias(torch.stack([layer] * config.num_hidden_layers))
        torch.testing.assert_close(model.decoder_layers[0].mlp.expert_bias, share * target)


def test_balancing_bias_balances_a_drifted_batch(tiny_config):
    rng = np.random.default_rng(0)
    N, E, k = 512, tiny_config.n_routed_experts, tiny_config.num_experts_per_tok
    logits = np.linspace(0.0, 0.8, E)[None] + 0.04 * rng.standard_normal((N, E))
    scores = torch.from_numpy(logits).float().sigmoid()

    def loads(bias):
        return torch.bincount(torch.topk(scores + bias, k).indices.flatten(), minlength=E)

    assert loads(torch.zeros(E)).max() == N  # unbiased: every token on the same 2 experts
    bias = balancing_bias(scores, torch.zeros(E), k)
    assert abs(bias.sum().item()) < 1e-6
    assert loads(bias).max() / (N * k / E) <= 1.1, loads(bias)


def test_aux_loss_matches_formula(tiny_config):
    coef = 0.1
    mlp = make_mlp(tiny_config, aux_loss_coef=coef)
    B, T = 3, 8
    x = torch.randn(B, T, tiny_config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, aux_loss, _ = mlp(x)
        E, k = tiny_config.n_routed_experts, tiny_config.num_experts_per_tok
        per_sequence = []
        for b in range(B):
            s = naive_scores(mlp, x[b])  # (T, E)
            idx = torch.topk(s, k).indices  # the raw scores' top-k (DeepSeek-V3, eq. 18)
            count = torch.zeros(E)
            for row in idx:
                count[row] += 1
            f = E / (k * T) * count
            P = (s / s.sum(-1, keepdim=True)).mean(0)
            per_sequence.append(coef * (f * P).sum())
    torch.testing.assert_close(aux_loss, torch.stack(per_sequence).mean(), rtol=1e-5, atol=1e-7)
    off = make_mlp(tiny_config, aux_loss_coef=0.0)
    assert off(x)[1].item() == 0.0


def test_cached_inference_skips_the_aux_loss(tiny_config):
    """A cached call in eval mode (generation) does not compute the aux loss; uncached or
    training calls do, and the logits do not depend on it."""
    config = dataclasses.replace(tiny_config, aux_loss_coef=0.1)
    model, ids = build(config), random_ids(config)
    with torch.no_grad():
        full = model(ids)
        cached = model(ids, use_cache=True)
        model.train()
        training = model(ids, use_cache=True)
    assert full.aux_loss.item() > 0 and cached.aux_loss.item() == 0.0
    torch.testing.assert_close(training.aux_loss, full.aux_loss)
    torch.testing.assert_close(cached.logits, full.logits)


def test_dispatch_runs_experts_only_on_routed_tokens(tiny_config):
    mlp = make_mlp(tiny_config)
    x = torch.randn(2, 10, tiny_config.hidden_size, generator=torch.Generator().manual_seed(5))
    x_flat = x.reshape(-1, x.shape[-1])
    seen: dict[int, torch.Tensor] = {}

    def recorder(e):
        def hook(module, inputs, output):
            seen[e] = inputs[0].detach().clone()

        return hook

    handles = [
        expert.register_forward_hook(recorder(e)) for e, expert in enumerate(mlp.routed_experts)
    ]
    with torch.no_grad():
        mlp(x)
        _, idx, _ = mlp.route(x_flat)
    for handle in handles:
        handle.remove()
    assert sum(rows.shape[0] for rows in seen.values()) == x_flat.shape[0] * mlp.top_k
    for e in range(tiny_config.n_routed_experts):  # without grad, one with no token is skipped
        tokens = (idx == e).any(-1).nonzero()[:, 0]
        if len(tokens) == 0:
            assert e not in seen
        else:
            torch.testing.assert_close(seen[e], x_flat[tokens], rtol=0, atol=0)


needs_grouped_mm = pytest.mark.skipif(
    not hasattr(F, "grouped_mm"), reason="torch.nn.functional.grouped_mm needs torch >= 2.10"
)


@needs_grouped_mm
@pytest.mark.parametrize("autocast", [False, True])
def test_grouped_experts_equal_the_per_expert_loop(tiny_config, autocast, monkeypatch):
    """The grouped-GEMM experts (CUDA's default) against the per-expert loop, forced both ways
    on the CPU: outputs and the gradients of the input and of every expert weight, with an
    expert that gets no token (its weights' gradient 0), in float32 and under bfloat16
    autocast. Fails with the gate and up weights stacked apart, or the offsets off by a group.
    Both give the idle expert a zero gradient, not None (as MLX does)."""
    mlp = make_mlp(tiny_config)
    with torch.no_grad():
        mlp.expert_bias[3] = -100.0  # expert 3 is never chosen
    x = torch.randn(2, 24, tiny_config.hidden_size, generator=torch.Generator().manual_seed(7))
    calls = []
    grouped_mm = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    results = {}
    for grouped in (False, True):
        mlp.grouped = grouped
        mlp.zero_grad()
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, aux, routing = mlp(xg)
        (y.float().square().mean() + aux).backward()
        grads = {n: p.grad.clone() for n, p in mlp.named_parameters() if "routed" in n}
        results[grouped] = (y.detach(), xg.grad, grads, routing[0])
        assert len(calls) == (2 if grouped else 0)
    (y0, gx0, gw0, load0), (y1, gx1, gw1, load1) = results[False], results[True]
    assert load0[3] == 0 and torch.equal(load0, load1)
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(gx1, gx0, **tol)
    assert set(gw1) == set(gw0) and all(gw0[n].abs().sum() > 0 for n in gw0 if ".3." not in n)
    for name in gw0:
        torch.testing.assert_close(gw1[name], gw0[name], **tol)
    assert all(gw1[n].abs().sum() == 0 for n in gw1 if ".3." in n)


@needs_grouped_mm
@pytest.mark.slow
def test_grouped_experts_compile_under_bfloat16_autocast(tiny_config):
    """torch.compile of the model on the grouped path (CUDA's default) under bfloat16 autocast,
    as `customllm-torch train --dtype bfloat16` runs it: one graph (no host sync breaks it,
    which CUDA graphs need too), and the loss equals eager's (~30 s here)."""
    model = build(tiny_config).train()
    for layer in model.decoder_layers:
        layer.mlp.grouped = True
    ids = random_ids(tiny_config, B=2, T=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(ids, labels=ids).loss
        compiled = torch.compile(model, fullgraph=True)(ids, labels=ids).loss
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert model.decoder_layers[0].mlp.routed_experts[0].gate_proj.weight.grad is not None


def test_grouped_experts_only_by_default_on_cuda(tiny_config):
    mlp = make_mlp(tiny_config)
    assert mlp.grouped is None and not mlp.use_grouped(torch.zeros(4, tiny_config.hidden_size))
    mlp.grouped = True
    assert mlp.use_grouped(torch.zeros(4, tiny_config.hidden_size))


@pytest.mark.parametrize(
    "capability, dtype, fast",
    [
        ((9, 0), torch.bfloat16, True),  # H100, H200
        ((10, 0), torch.bfloat16, True),  # B200
        ((9, 0), torch.float32, False),  # float32: torch's fallback, a host sync per call
        ((8, 0), torch.bfloat16, False),  # A100: the fallback too
        ((12, 0), torch.bfloat16, False),  # consumer Blackwell: the fallback
    ],
)
def test_grouped_gemms_by_default_only_where_torch_has_the_kernel(
    monkeypatch, capability, dtype, fast
):
    from customllm_torch.model import fast_grouped_mm

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert fast_grouped_mm(torch.device("cuda"), dtype) is fast
    assert not fast_grouped_mm(torch.device("cpu"), torch.bfloat16)


def test_expert_counts_equal_bincount():
    idx = torch.randint(0, 7, (3, 50, 2), generator=torch.Generator().manual_seed(0))
    counts = customllm_torch.model.expert_counts(idx.flatten(1), 7)
    expected = torch.stack([torch.bincount(row.flatten(), minlength=7) for row in idx])
    assert counts.dtype == torch.int64 and torch.equal(counts, expected)
    flat = customllm_torch.model.expert_counts(idx.flatten(), 7)
    assert torch.equal(flat, torch.bincount(idx.flatten(), minlength=7))


# --- Cached decoding --------------------------------------------------------------------------


@pytest.mark.parametrize("absorb", [False, True])
def test_cached_step_by_step_equals_full_forward(tiny_config, sharp_config, absorb):
    model = build(sharp_config)
    ids = random_ids(tiny_config, B=2, T=10)
    full = logits_of(model, ids)
    cache = LatentKVCache(len(model.decoder_layers))
    steps = [logits_of(model, ids[:, t : t + 1], cache=cache, absorb=absorb) for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=close(full))
    assert cache.offset == 10


@pytest.mark.parametrize("absorb", [False, True])
def test_prefill_then_decode_equals_full_forward(tiny_config, sharp_config, absorb):
    model = build(sharp_config)
    ids = random_ids(tiny_config, B=2, T=12)
    full = logits_of(model, ids)
    out = model(ids[:, :6], use_cache=True, absorb=absorb)
    cache = out.cache
    chunk = logits_of(model, ids[:, 6:9], cache=cache, absorb=absorb)  # a multi-token chunk
    steps = [logits_of(model, ids[:, t : t + 1], cache=cache) for t in range(9, 12)]
    torch.testing.assert_close(out.logits.detach(), full[:, :6], rtol=0, atol=close(full))
    torch.testing.assert_close(chunk, full[:, 6:9], rtol=0, atol=close(full))
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 9:], rtol=0, atol=close(full))
    per_token = tiny_config.kv_cache_numbers_per_token
    assert cache.nbytes() == 2 * 12 * per_token * 4 * len(model.decoder_layers)


# --- Configuration ----------------------------------------------------------------------------


def test_config_validation_errors():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ModelConfig.from_preset("nope")
    with pytest.raises(ValueError, match=r"num_attention_heads=9 does not divide the 384-wide"):
        ModelConfig(num_attention_heads=9)
    with pytest.raises(ValueError, match="num_attention_heads=5 does not divide"):
        ModelConfig.from_preset("small", num_attention_heads=5)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig(num_experts_per_tok=8)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": "64"}, "hidden_size must be an integer, got '64'"),
        ({"hidden_size": None}, "hidden_size must be an integer, got None"),
        ({"num_hidden_layers": 2.0}, "num_hidden_layers must be an integer"),
        ({"lm_head_bias": 1}, "lm_head_bias must be true or false"),
        ({"embd_dropout": "0.1"}, "embd_dropout must be a number"),
        ({"rms_norm_eps": "x"}, "rms_norm_eps must be a number"),
        ({"rope_theta": -1}, "rope_theta must be positive"),
        ({"initializer_range": 0}, "initializer_range must be positive"),
        ({"aux_loss_coef": -1e-4}, "aux_loss_coef must be finite and not negative"),
        ({"eos_token_id": 256}, "eos_token_id must be a token id below vocab_size=256"),
        ({"hidden_sise": 32}, "unknown field 'hidden_sise': did you mean 'hidden_size'"),
        # config.json stores the head dims: an edited head count is checked against them
        ({"num_attention_heads": 9}, "num_attention_heads=9 does not divide the 32-wide"),
        ({"num_attention_heads": 4}, "qk_nope_head_dim=16 does not match hidden_size=64"),
        (
            {"v_head_dim": 16},
            "v_head_dim=16 does not match hidden_size=64 and num_attention_heads=2: it is 64 / "
            "heads = 32",
        ),
    ],
)
def test_config_json_values_are_checked_and_named(tmp_path, change, message):
    """Each bad config.json value is named (it was a TypeError from deep in the model, or a
    model built with the default in place of a misspelt field)."""
    values = {**ModelConfig.from_preset("tiny", vocab_size=256).to_dict(), **change}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=f"config.json: {re.escape(message)}"):
        ModelConfig.from_json(tmp_path)
    # transformers' keys near a field name stay extra
    ok = ModelConfig.from_dict({**ModelConfig().to_dict(), "head_dim": 64, "attention_dropout": 0})
    assert ok.extra["head_dim"] == 64


def test_config_json_round_trip(tmp_path):
    config = ModelConfig.from_preset("small", rope_theta=500000.0, router_score="softmax")
    config.to_json(tmp_path / "config.json")
    assert ModelConfig.from_json(tmp_path / "config.json") == config
    assert ModelConfig.from_json(tmp_path) == config
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "customllm"
    assert CustomLLM(ModelConfig.from_preset("tiny")).model_config == ModelConfig.from_preset(
        "tiny"
    )


# --- Folder IO --------------------------------------------------------------------------------


def test_save_load_round_trip(tiny_config, tmp_path):
    model = build(tiny_config)
    with torch.no_grad():
        model.decoder_layers[1].mlp.expert_bias.copy_(torch.arange(7.0) * 1e-3)
    customllm_torch.save(model, tmp_path / "m")
    assert set(load_file(str(tmp_path / "m" / WEIGHTS_NAME))) == set(model.state_dict())
    loaded, tokenizer = customllm_torch.load(tmp_path / "m")
    assert tokenizer is None and not loaded.training
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    ids = random_ids(tiny_config)
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=0)


def test_save_unwraps_and_casts(tiny_config, tmp_path):
    model = build(tiny_config)
    customllm_torch.save(torch.compile(model), tmp_path / "m", dtype=torch.bfloat16)
    weights = load_file(str(tmp_path / "m" / WEIGHTS_NAME))
    assert not any(key.startswith("_orig_mod.") for key in weights)
    assert weights["lm_head.weight"].dtype == torch.bfloat16
    assert weights["decoder_layers.0.mlp.expert_bias"].dtype == torch.float32
    loaded, _ = customllm_torch.load(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert loaded.decoder_layers[0].mlp.expert_bias.dtype == torch.float32  # as stored
    # RoPE frequencies are made in float32 inside forward: no buffer for .to(bf16) to round
    assert not list(loaded.decoder_layers[0].self_attn.rotary_emb.buffers())


def test_from_pretrained_and_save_pretrained(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build(tiny_config)
    ids = random_ids(tiny_config)
    customllm_torch.save(model, tmp_path / "saved")
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert isinstance(auto, CustomLLM)
    torch.testing.assert_close(logits_of(auto, ids), logits_of(model, ids), rtol=0, atol=0)

    model.save_pretrained(tmp_path / "hf")
    loaded, _ = customllm_torch.load(tmp_path / "hf")
    assert loaded.model_config == tiny_config
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), rtol=0, atol=0)


def test_from_pretrained_refuses_a_config_that_does_not_fit_the_weights(tiny_config, tmp_path):
    """transformers' loader alone builds 30 layers from a config.json without
    num_hidden_layers (28 random) or drops layer 1 with num_hidden_layers 1, with only a load
    report; both are errors here, and so are NaN weights and a tokenizer past the vocabulary."""
    from transformers import AutoModelForCausalLM

    folder = customllm_torch.save(build(tiny_config), tmp_path / "m")
    assert (folder / WEIGHTS_NAME).stat().st_mode & 0o044 == 0o044  # readable like MLX's
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({k: v for k, v in values.items() if k != "num_hidden_layers"})
    )
    with pytest.raises(ValueError, match="lacks num_hidden_layers"):
        AutoModelForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**values, "num_hidden_layers": 1}))
    with pytest.raises(ValueError, match="do not fit config.json.*unexpected keys"):
        AutoModelForCausalLM.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(values))
    assert AutoModelForCausalLM.from_pretrained(folder).model_config == tiny_config

    weights = load_file(str(folder / WEIGHTS_NAME))
    weights["decoder_layers.1.mlp.router.weight"][0, 0] = float("nan")
    save_file(weights, str(folder / WEIGHTS_NAME))
    with pytest.raises(ValueError, match="'decoder_layers.1.mlp.router.weight' holds NaN"):
        customllm_torch.load(folder)


def test_load_errors_name_the_file_or_tensor(tiny_config, tmp_path):
    folder = tmp_path / "m"
    customllm_torch.save(build(tiny_config), folder)
    weights_path = folder / WEIGHTS_NAME
    good = load_file(str(weights_path))

    with pytest.raises(FileNotFoundError, match="model folder not found"):
        customllm_torch.load(tmp_path / "absent")

    def rewrite(weights):
        save_file(weights, str(weights_path))

    missing = dict(good)
    del missing["decoder_layers.1.mlp.router.weight"]
    rewrite(missing)
    with pytest.raises(
        ValueError, match=r"missing tensor 'decoder_layers\.1\.mlp\.router\.weight'"
    ):
        customllm_torch.load(folder)

    rewrite({**good, "decoder_layers.0.mlp.extra.weight": torch.zeros(2)})
    with pytest.raises(
        ValueError, match=r"unexpected tensor 'decoder_layers\.0\.mlp\.extra\.weight'"
    ):
        customllm_torch.load(folder)

    rewrite({**good, "lm_head.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"'lm_head\.bias' has shape \(3,\)"):
        customllm_torch.load(folder)

    weights_path.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        customllm_torch.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        customllm_torch.load(folder)


# --- CLI --------------------------------------------------------------------------------------


def test_cli_init_writes_a_loadable_folder(tmp_path, tokenizer_dir):
    runner = CliRunner()
    args = ["init", "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--seed", "3"]
    result = runner.invoke(cli_main, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    model, tokenizer = customllm_torch.load(tmp_path / "a")
    assert model.model_config == ModelConfig.from_preset("tiny", vocab_size=TOKENIZER_VOCAB_SIZE)
    assert tokenizer is not None and len(tokenizer) == model.model_config.vocab_size
    ids = torch.tensor([tokenizer.encode("Once upon a time")])
    assert logits_of(model, ids).shape == (1, ids.shape[1], model.model_config.vocab_size)
    config = model.model_config
    assert abs(model.token_embeddings.weight.std().item() - config.embedding_init_std) < 0.02
    assert abs(model.position_embeddings.weight.std().item() - config.initializer_range) < 2e-3

    again = runner.invoke(cli_main, [*args, "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    same, _ = customllm_torch.load(tmp_path / "b")
    assert torch.equal(same.lm_head.weight, model.lm_head.weight), "same seed, same weights"

    refused = runner.invoke(cli_main, [*args, "--out", str(tmp_path / "a")])
    assert refused.exit_code != 0 and "--force" in refused.output
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}")
    forced = runner.invoke(cli_main, [*args, "--out", str(tmp_path / "run"), "--force"])
    assert forced.exit_code != 0 and "holds files but no model" in forced.output
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}"


def test_cli_init_errors_are_clear(tmp_path, tokenizer_dir):
    runner = CliRunner()
    small_vocab = tmp_path / "small_vocab.json"
    ModelConfig.from_preset("tiny", vocab_size=1000).to_json(small_vocab)
    result = runner.invoke(
        cli_main,
        [
            "init",
            "--config",
            str(small_vocab),
            "--out",
            str(tmp_path / "m"),
            "--tokenizer",
            str(tokenizer_dir),
        ],
    )
    assert result.exit_code == 1
    assert f"{TOKENIZER_VOCAB_SIZE} tokens, more than the model's vocab_size 1000" in result.output
    assert isinstance(result.exception, SystemExit)  # a ClickException, not a traceback
    assert not (tmp_path / "m").exists()

    bad_heads = tmp_path / "bad_heads.json"
    bad_heads.write_text(json.dumps({**ModelConfig().to_dict(), "num_attention_heads": 9}))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2}))
    result = runner.invoke(
        cli_main, ["init", "--config", str(partial), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 1 and "partial.json lacks vocab_size" in result.output
    result = runner.invoke(
        cli_main, ["init", "--config", str(bad_heads), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 1 and "num_attention_heads=9" in result.output

    result = runner.invoke(cli_main, ["init", "--preset", "nope", "--out", str(tmp_path / "m")])
    assert result.exit_code == 1 and "unknown preset 'nope'" in result.output

    result = runner.invoke(cli_main, ["init", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "exactly one of --preset" in result.output


def test_cli_init_without_hub_writes_the_model_and_says_the_tokenizer_is_missing(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the hub
    result = CliRunner().invoke(
        cli_main, ["init", "--preset", "tiny", "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert "no tokenizer files written" in result.output and "--tokenizer" in result.output
    model, tokenizer = customllm_torch.load(tmp_path / "m")
    assert (
        tokenizer is None
        and model.num_parameters() == ModelConfig.from_preset("tiny").num_parameters()
    )
