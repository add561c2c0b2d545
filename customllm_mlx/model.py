"""CustomLLM in MLX: the twin of customllm_torch/model.py (same classes, order and names).

Differences are only what MLX forces: routed experts are held stacked (E, out, in) for
`mx.gather_mm`, the cache is a list with one mlx_lm `KVCache` per layer (`cache_latents`),
and `expert_bias` is a frozen array rather than a buffer.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import BatchKVCache, KVCache

from customllm.checkpoint import stack_experts, unstack_experts
from customllm.config import ModelConfig
from customllm_mlx.experts import SORT_MIN_PAIRS, StackedExperts, sigmoid, swiglu
from customllm_mlx.loss import cross_entropy, linear_cross_entropy, softmax

ModelArgs = ModelConfig  # the name mlx_lm's loader looks for


def cache_latents(cache: KVCache, c_kv: mx.array, k_rope: mx.array):
    """Append c_kv (B, T, L) and the rotated k_rope (B, H, T, rope) to one layer's cache and
    return both over every cached position: c_kv (B, S, L), k_rope (B, H, S, rope).

    The cache is mlx_lm's own `KVCache` holding the latent as a single head: keys c_kv
    (B, 1, S, L), values the heads' rope keys side by side (B, 1, S, H * rope). So mlx_lm's
    prompt-cache files save and load it, and its trimming works on it. Batched generation uses
    its `BatchKVCache` the same way (one offset per row, left padding masked)."""
    if not isinstance(cache, (KVCache, BatchKVCache)):
        raise ValueError(
            f"CustomLLM's latent cache is mlx_lm's KVCache, not {type(cache).__name__}: "
            "the latent (kv_latent_dim numbers per token and layer, plus the rope keys) is not "
            "quantized further (leave --kv-bits out)"
        )
    B, H, T, r = k_rope.shape
    keys, values = cache.update_and_fetch(
        c_kv[:, None], k_rope.transpose(0, 2, 1, 3).reshape(B, 1, T, H * r)
    )
    S = keys.shape[2]
    return keys[:, 0], values.reshape(B, S, H, r).transpose(0, 2, 1, 3)


def attention(q, k, v, scale: float, mask):
    """`mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)`; q (B, H, T, d),
    k and v (B, H or 1, S, d), mask None, "causal" (aligned to the last key), a boolean
    (True: attend) or an additive array. On the CPU with several queries the fast kernel falls
    back to plain ops with MLX's slow exp; the same ops with `loss.softmax` are faster
    (docs/linux-cpu.md)."""
    T, S = q.shape[2], k.shape[2]
    if T == 1 or mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = (q * scale) @ k.swapaxes(-1, -2)  # (B, H, T, S)
    if isinstance(mask, str):  # "causal"
        mask = causal_mask(T, S)
    if mask is not None and mask.dtype == mx.bool_:
        scores = mx.where(mask, scores, mx.array(-mx.inf, scores.dtype))
    elif mask is not None:
        scores = scores + mask
    return softmax(scores) @ v


class CustomRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Non-interleaved RoPE ("rotate_half"): `mx.fast.rope` with traditional=False."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim, self.theta = dim, theta

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        # x: (B, H, T, dim)
        return mx.fast.rope(
            x, self.dim, traditional=False, base=self.theta, scale=1.0, offset=offset
        )


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.hidden_size, config.num_attention_heads
        self.num_heads = h
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_latent_dim = config.v_head_dim, config.kv_latent_dim
        self.scale = 1.0 / math.sqrt(self.nope_dim + self.rope_dim)
        self.kv_proj_d = nn.Linear(d, config.kv_latent_dim, bias=False)
        self.q_proj_d = nn.Linear(d, config.q_latent_dim, bias=False)
        self.k_proj_u = nn.Linear(config.kv_latent_dim, h * self.nope_dim, bias=False)
        self.v_proj_u = nn.Linear(config.kv_latent_dim, h * self.v_dim, bias=False)
        self.q_proj_u = nn.Linear(config.q_latent_dim, h * self.nope_dim, bias=False)
        self.rope_k = nn.Linear(d, h * self.rope_dim, bias=False)
        self.rope_q = nn.Linear(config.q_latent_dim, h * self.rope_dim, bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=False)
        self.rotary_emb = RotaryEmbedding(self.rope_dim, config.rope_theta)

    def __call__(
        self,
        x: mx.array,
        offset: int,
        cache: KVCache | None = None,
        absorb: bool = False,
        mask: mx.array | None = None,
    ) -> mx.array:
        """`offset`: the first position, per row (B,) for a batched cache; `mask` (B, 1, T, S)
        bool for a batched cache (causal, left padding out), else causal."""
        B, T, _ = x.shape
        H = self.num_heads
        q_nope, q_rope, c_kv, k_rope = self.project(x, offset)
        if cache is not None:
            c_kv, k_rope = cache_latents(cache, c_kv, k_rope)
        if mask is None and T > 1:
            mask = "causal"  # lower-right aligned: queries sit at the end
        if absorb and self.absorbable:
            out = self.absorbed_attention(q_nope, q_rope, c_kv, k_rope, mask)
        else:
            S = c_kv.shape[1]
            k_nope = self.k_proj_u(c_kv).reshape(B, S, H, self.nope_dim).transpose(0, 2, 1, 3)
            v = self.v_proj_u(c_kv).reshape(B, S, H, self.v_dim).transpose(0, 2, 1, 3)
            q = mx.concatenate([q_nope, q_rope], axis=-1)  # (B, H, T, qk_head_dim)
            k = mx.concatenate([k_nope, k_rope], axis=-1)  # (B, H, S, qk_head_dim)
            out = attention(q, k, v, self.scale, mask)
        return self.merge_heads(out)

    def merge_heads(self, out: mx.array) -> mx.array:
        """Per-head values (B, H, T, v_dim) -> o_proj of the heads side by side (B, T, d)."""
        B, H, T, _ = out.shape
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, H * self.v_dim))

    def project(self, x: mx.array, offset: int | mx.array):
        """q_nope (B, H, T, nope), rotated q_rope (B, H, T, rope), c_kv (B, T, kv_latent_dim)
        and rotated k_rope (B, H, T, rope) of x (B, T, hidden) at positions offset + t."""
        B, T, _ = x.shape
        H = self.num_heads
        c_q = self.q_proj_d(x)  # (B, T, q_latent_dim)
        c_kv = self.kv_proj_d(x)  # (B, T, kv_latent_dim)
        q_nope = self.q_proj_u(c_q).reshape(B, T, H, self.nope_dim).transpose(0, 2, 1, 3)
        q_rope = self.rope_q(c_q).reshape(B, T, H, self.rope_dim).transpose(0, 2, 1, 3)
        k_rope = self.rope_k(x).reshape(B, T, H, self.rope_dim).transpose(0, 2, 1, 3)
        return q_nope, self.rotary_emb(q_rope, offset), c_kv, self.rotary_emb(k_rope, offset)

    def absorbed_attention(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Attention over the latent cache with k_proj_u folded into the query and v_proj_u
        applied after the weighted sum: q_nope . k_nope = (q_nope W_uk,h) . c_kv."""
        out_latent = self.latent_attention(self.absorb_query(q_nope), q_rope, c_kv, k_rope, mask)
        return self.absorb_values(out_latent)

    @property
    def absorbable(self) -> bool:
        """Whether the up-projections' matrices can be read (`linear_weight`) to absorb them."""
        return linear_weight(self.k_proj_u) is not None and linear_weight(self.v_proj_u) is not None

    def absorb_query(self, q_nope: mx.array) -> mx.array:
        """q_nope (B, H, T, nope) -> q_nope W_uk,h (B, H, T, kv_latent_dim)."""
        w_uk = linear_weight(self.k_proj_u)
        w_uk = w_uk.reshape(self.num_heads, self.nope_dim, self.kv_latent_dim)
        return q_nope @ w_uk[None].astype(q_nope.dtype)

    def absorb_values(self, out_latent: mx.array) -> mx.array:
        """Attention output over the latent (B, H, T, kv_latent_dim) -> per-head values."""
        w_uv = linear_weight(self.v_proj_u)
        w_uv = w_uv.reshape(self.num_heads, self.v_dim, self.kv_latent_dim)
        return out_latent @ w_uv.transpose(0, 2, 1)[None].astype(out_latent.dtype)

    def latent_attention(self, q_latent, q_rope, c_kv, k_rope, mask):
        """SDPA of q_latent (B, H, T, L) over the latent c_kv (B, S, L) as keys and values,
        with the rope scores q_rope . k_rope added -> (B, H, T, L)."""
        # The per-head rope scores go in as an additive mask, so SDPA sees the latent as ONE
        # key/value head shared by all query heads (no per-head copy of the cache).
        rope_scores = (q_rope * self.scale) @ k_rope.swapaxes(-1, -2)  # (B, H, T, S)
        if isinstance(mask, str):  # "causal"
            mask = causal_mask(*rope_scores.shape[-2:])
        if mask is not None:
            rope_scores = mx.where(mask, rope_scores, -mx.inf)
        c_kv = c_kv[:, None]  # (B, 1, S, L)
        return attention(q_latent, c_kv, c_kv, self.scale, rope_scores.astype(q_latent.dtype))


def linear_weight(layer: nn.Module) -> mx.array | None:
    """The (out, in) matrix that `layer` applies, for the absorbed attention: a Linear's weight,
    a QuantizedLinear's dequantized, an mlx_lm LoRA layer's base plus its low-rank update; None
    for any other module (the attention then runs unabsorbed, through the module itself)."""
    if type(layer) is nn.Linear:
        return layer.weight
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(
            layer.weight,
            layer.scales,
            layer.get("biases"),
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )
    if type(layer).__name__ == "LoRALinear" and {"linear", "lora_a", "lora_b"} <= set(layer):
        base = linear_weight(layer.linear)
        if base is not None:
            update = (layer.scale * (layer.lora_a @ layer.lora_b)).T  # (out, in)
            return base + update.astype(base.dtype)
    return None


def causal_mask(T: int, S: int) -> mx.array:
    """Boolean mask (T, S) for T queries at the end of S keys (True = attend)."""
    return mx.arange(S)[None] <= mx.arange(S - T, S)[:, None]


def top_k_indices(x: mx.array, k: int) -> mx.array:
    """Indices of the k largest entries along the last axis (in no particular order)."""
    return mx.argpartition(-x, k - 1, axis=-1)[..., :k]


def balancing_bias(scores: mx.array, bias: mx.array, k: int, sweeps: int = 3) -> mx.array:
    """The expert bias (E,) under which top-k of `scores + bias` gives every expert the same
    share of this batch's N tokens (N * k / E), found from `bias` by `sweeps` Jacobi sweeps:
    each expert's bias in turn with the others held. A token picks expert i when
    score_i + bias_i beats t_i, the k-th largest biased score of the other experts, so expert
    i gets its share when bias_i sits at the (N k / E)-th smallest of t_i - score_i; a sweep
    sets every expert's bias so, with the others' from the sweep before. Centred
    (top-k ignores a common shift). No step size: it follows the router however fast the
    router moves (docs/architecture.md, "Balancing")."""
    N, E = scores.shape
    rank = min(max(round(N * k / E), 1), N - 1)
    bias = bias.astype(mx.float32)
    if k >= E or N < 2:  # every token takes every expert (or one token): nothing to balance
        return bias - bias.mean()
    for _ in range(sweeps):
        biased = scores + bias
        top = mx.sort(biased, axis=-1)
        kth, next_ = top[:, E - k : E - k + 1], top[:, E - k - 1 : E - k]  # k-th, (k+1)-th
        others = mx.where(biased >= kth, next_, kth)  # k-th largest among the other experts
        # (N, E): the bias_i needed to win each token, sorted (a full sort: MLX's CPU
        # partition is slower; torch takes its k-th values)
        margin = mx.sort(others - scores, axis=0)
        bias = (margin[rank - 1] + margin[rank]) / 2
        bias = bias - bias.mean()
    return bias


class DeepSeekExpertLayer(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class LlamaMLP(nn.Module):
    """1 shared + n routed SwiGLU experts, top-k routing with the aux-loss-free bias
    (n_routed_experts 0: the shared expert alone, a dense SwiGLU)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, inter = config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.router_score = config.router_score
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.aux_loss_coef = config.aux_loss_coef
        self.solve_bias = config.bias_update == "solve"
        self.shared_experts = [
            DeepSeekExpertLayer(d, inter) for _ in range(config.n_shared_experts)
        ]
        if self.num_experts:
            self.routed_experts = StackedExperts(d, inter, config.n_routed_experts)
            self.router = nn.Linear(d, config.n_routed_experts, bias=False)
            self.expert_bias = mx.zeros((config.n_routed_experts,))
            self.freeze(keys=["expert_bias"], recurse=False)  # state, never a gradient

    def route(self, x_flat: mx.array):
        """Scores (N, E) in float32, chosen experts (N, k), and their weights (N, k)."""
        # the router in float32 whatever the weights' dtype: its scores differ by less than
        # bfloat16's spacing once the hidden states grow alike
        logits = self.router(x_flat.astype(mx.float32)).astype(mx.float32)
        scores = sigmoid(logits) if self.router_score == "sigmoid" else mx.softmax(logits, -1)
        biased = mx.stop_gradient(scores + self.expert_bias.astype(mx.float32))
        idx = mx.stop_gradient(top_k_indices(biased, self.top_k))
        weights = mx.take_along_axis(scores, idx, axis=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdims=True)
        return scores, idx, weights * self.routed_scaling_factor

    def __call__(self, x: mx.array, with_aux: bool = True):
        """Returns (y, aux_loss, routing): routing (2, E) float32 holds the token-expert
        assignments per expert (the layer's expert load) and, in training with the "solve"
        bias update, the bias that would have balanced this batch times its token count
        (sums over micro-batches give a token-weighted mean; `balancing_bias`). aux_loss is 0
        without `with_aux` (a cached, generating call has no use for it)."""
        B, T, D = x.shape
        x_flat = x.reshape(-1, D)  # (N, D)
        y = mx.zeros_like(x_flat)
        for expert in self.shared_experts:
            y = y + expert(x_flat)
        aux_loss = mx.array(0.0)
        if not self.num_experts:
            return y.reshape(B, T, D), aux_loss, mx.zeros((2, 0))
        scores, idx, weights = self.route(x_flat)
        one_hot = mx.stop_gradient(idx[..., None] == mx.arange(self.num_experts))  # (N, k, E)
        load = one_hot.sum(axis=(0, 1))
        y = y + self.dispatch(x_flat, idx, weights.astype(x.dtype), load)
        if with_aux:
            aux_loss = self.sequence_aux_loss(scores.reshape(B, T, -1))
        target = mx.zeros((self.num_experts,))
        if self.training and self.solve_bias:
            target = balancing_bias(mx.stop_gradient(scores), self.expert_bias, self.top_k)
            target = target * x_flat.shape[0]
        return y.reshape(B, T, D), aux_loss, mx.stack([load.astype(mx.float32), target])

    def dispatch(self, x_flat, idx, weights, load):
        """Run each routed expert only on its tokens: with few pairs (decoding), each pair
        directly; otherwise sorted by expert, in whole blocks per expert on CPU.
        `load` (E,): the token-expert pairs of each expert (the layer's expert load)."""
        flat_expert = idx.flatten()  # (N * k,)
        if flat_expert.size < SORT_MIN_PAIRS:
            out = self.routed_experts(x_flat[:, None, None], idx, sorted_indices=False)
        else:
            order = mx.stop_gradient(mx.argsort(flat_expert))
            if self.routed_experts.blocked_dispatch(order.size):
                out = self.routed_experts.blocked(x_flat, flat_expert, order, load, self.top_k)
            else:
                out = self.sorted_experts(x_flat, flat_expert, order)
        return (out.reshape(*idx.shape, -1) * weights[..., None]).sum(axis=1)

    def sorted_experts(self, x_flat, flat_expert, order):
        """Expert outputs (N * k, D) in pair order, one (1, D) row per gather_mm batch entry
        (what the GPU kernels group by expert themselves, with sorted indices)."""
        # gather as (P, 1, D) directly: x[idx][:, None] sends CPU gather_mm down a slow path
        out = self.routed_experts(x_flat[(order // self.top_k)[:, None]], flat_expert[order])
        return out[:, 0][mx.argsort(order)]

    def sequence_aux_loss(self, scores: mx.array) -> mx.array:
        """aux_loss_coef * sum_i f_i P_i per sequence, averaged over the batch; f_i counts the
        top-k of the raw scores, without the bias (DeepSeek-V3, eq. 18)."""
        if self.aux_loss_coef == 0:
            return mx.array(0.0)
        T = scores.shape[1]
        raw_top = top_k_indices(mx.stop_gradient(scores), self.top_k)  # (B, T, k)
        one_hot = raw_top[..., None] == mx.arange(self.num_experts)  # (B, T, k, E)
        counts = one_hot.sum(axis=(1, 2)).astype(mx.float32)  # (B, E)
        f = counts * self.num_experts / (self.top_k * T)
        P = (scores / scores.sum(-1, keepdims=True)).mean(1)  # (B, E)
        return self.aux_loss_coef * (f * P).sum(-1).mean()


class Dropout(nn.Dropout):
    """nn.Dropout that can draw its mask from a given `key`."""

    def __call__(self, x: mx.array, key: mx.array | None = None) -> mx.array:
        if self._p_1 == 1 or not self.training:
            return x
        mask = mx.random.bernoulli(self._p_1, x.shape, key=key)
        return (mask * x) * (1 / self._p_1)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MultiHeadLatentAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_norm = CustomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attn_norm = CustomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_dropout = Dropout(config.attn_dropout)
        self.mlp_dropout = Dropout(config.mlp_dropout)
        self._decode_in = self._decode_out = None  # compiled on the first decode_step

    def __call__(self, x, offset, cache=None, absorb=False, key=None, mask=None):
        """`key`: draw the dropout masks from it (a checkpointed layer's recomputation draws
        the same), else from the global random state. `mask`: as MultiHeadLatentAttention's."""
        absorb = absorb and self.self_attn.absorbable
        if absorb and cache is not None and x.shape[1] == 1 and not self.training:
            return self.decode_step(x, offset, cache, mask)
        keys = (None, None) if key is None else mx.random.split(key)
        attn = self.self_attn(self.input_norm(x), offset, cache, absorb, mask)
        x = x + self.attn_dropout(attn, keys[0])
        with_aux = cache is None or self.training  # generating: no use for the aux loss
        mlp_out, aux_loss, routing = self.mlp(self.post_attn_norm(x), with_aux)
        return x + self.mlp_dropout(mlp_out, keys[1]), aux_loss, routing

    def decode_step(self, x, offset, cache, mask=None):
        """The same layer for one token with the latent cache (absorbed attention, no dropout,
        no aux loss), the steps before and after the cache as two compiled functions: a decode
        step is ~25 small ops per layer, and MLX's per-op cost (eager graph building and one
        kernel each) is most of a small model's decoding time (benchmarks/bench_generate.py)."""
        if self._decode_in is None:
            self._decode_in = mx.compile(self._project_token, inputs=self.state)
            self._decode_out = mx.compile(self._finish_token, inputs=self.state)
        q_latent, q_rope, c_kv, k_rope = self._decode_in(x, mx.array(offset))
        c_kv, k_rope = cache_latents(cache, c_kv, k_rope)
        out_latent = self.self_attn.latent_attention(q_latent, q_rope, c_kv, k_rope, mask)
        x, routing = self._decode_out(x, out_latent)
        return x, mx.array(0.0), routing

    def _project_token(self, x, offset):
        attn = self.self_attn
        q_nope, q_rope, c_kv, k_rope = attn.project(self.input_norm(x), offset)
        return attn.absorb_query(q_nope), q_rope, c_kv, k_rope

    def _finish_token(self, x, out_latent):
        x = x + self.self_attn.merge_heads(self.self_attn.absorb_values(out_latent))
        mlp_out, _, routing = self.mlp(self.post_attn_norm(x), with_aux=False)
        return x + mlp_out, routing


def checkpointed(layer: DecoderLayer, x: mx.array, offset: int):
    """`layer(x, offset)` with its activations recomputed in the backward pass instead of kept
    (what `mx.checkpoint` does). The recomputation waits for the cotangent of this layer's
    output: with nothing to wait for, a breadth-first evaluation (cpu_streams.py) recomputes
    every layer at once and keeps them all. Its dropout masks come from a key that is an
    input, so the recomputation draws the same ones."""
    names, values = zip(*tree_flatten(layer.trainable_parameters()), strict=True)

    def forward(key, x, *values):
        layer.update(tree_unflatten(list(zip(names, values, strict=True))))
        return layer(x, offset, key=mx.stop_gradient(key))  # the masks take no gradient

    run = mx.custom_function(forward)

    @run.vjp
    def run_vjp(primals, cotangents, outputs):
        key, x, *values = primals
        x = mx.depends(x, list(cotangents))
        _, grads = mx.vjp(lambda x, *v: forward(key, x, *v), [x, *values], list(cotangents))
        return (mx.zeros_like(key), *grads)

    # a key (two uint32 words) drawn from the global state, as the masks would have been
    key = mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32)
    return run(key, x, *values)


class CustomLLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.model_config = config
        self.model_type = "customllm"
        self.token_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.embd_dropout)
        self.decoder_layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.checkpoint_layers = False  # training: recompute each layer in the backward pass
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, initializer_range) for matrices, Normal(0, embedding_init_std) for the token
        embeddings, zeros for biases, ones for norms."""
        std = self.model_config.initializer_range
        embedding_std = self.model_config.embedding_init_std

        def init(path: str, value: mx.array) -> mx.array:
            if path.endswith("expert_bias") or path.endswith(".bias"):
                return mx.zeros_like(value)
            if value.ndim == 1:  # norm weights
                return mx.ones_like(value)
            scale = embedding_std if path.startswith("token_embeddings.") else std
            return scale * mx.random.normal(value.shape, dtype=value.dtype)

        self.update(tree_unflatten([(k, init(k, v)) for k, v in tree_flatten(self.parameters())]))

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.decoder_layers

    def quant_predicate(self, path: str, module: nn.Module) -> bool:
        """What quantization leaves in full precision (`nn.quantize`'s class_predicate, read
        by mlx_lm's convert -q): the routers, whose scores decide the experts."""
        return not path.endswith("mlp.router")

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.decoder_layers]

    def __call__(
        self,
        inputs: mx.array,
        cache: list[KVCache] | None = None,
        absorb: bool | None = None,
        return_aux: bool = False,
    ):
        """Logits (B, T, vocab) in float32; with `return_aux`, also the aux loss and the expert
        loads (num_layers, n_routed_experts). float32 whatever the weights' dtype: mlx_lm's
        sampling takes `logits - logsumexp(logits)` in the logits' dtype, and in bfloat16
        (spacing 0.0625 near ln(49,152) = 10.8) close logits collapse to one log-probability:
        greedy decoding of a bfloat16 folder picked token 0 (EOS). The torch twin's sampler
        reads its logits as float32 (`customllm_torch.generate`); training never forms logits."""
        x, aux_loss, routing = self.hidden_states(inputs, cache, absorb)
        logits = self.lm_head(x)
        if logits.dtype != mx.float32:
            logits = logits.astype(mx.float32)
        return (logits, aux_loss, routing) if return_aux else logits

    def training_loss(self, inputs: mx.array, shift_labels: mx.array):
        """(LM loss, aux loss, routing statistics) with lm_head fused into the loss
        (`linear_cross_entropy`: no logits stored, gradients formed in the forward pass).
        Position t predicts shift_labels[:, t]; -100 is ignored."""
        x, aux_loss, routing = self.hidden_states(inputs)
        return linear_cross_entropy(x, *self.lm_head_params(), shift_labels), aux_loss, routing

    def lm_head_params(self) -> tuple[mx.array, mx.array | None]:
        """lm_head's weight and bias (None without one, `lm_head_bias`: False)."""
        head = self.lm_head
        return linear_weight(head), head["bias"] if "bias" in head else None

    def hidden_states(self, inputs, cache=None, absorb=None):
        """The last decoder layer's output (B, T, hidden), the aux loss and the routing
        statistics (num_layers, 2, n_routed_experts): [:, 0] the expert loads (LlamaMLP)."""
        B, T = inputs.shape
        offset = 0 if cache is None else cache[0].offset
        batched = isinstance(offset, mx.array)  # mlx_lm's BatchKVCache: an offset per row
        end = (int(offset.max().item()) if batched else offset) + T
        if end > self.model_config.max_position_embeddings:
            raise ValueError(
                f"sequence of {end} tokens exceeds the context of "
                f"{self.model_config.max_position_embeddings} (max_position_embeddings)"
            )
        absorb = cache is not None and T == 1 if absorb is None else absorb
        mask = None
        if batched:  # left padding sits at negative positions, masked out
            pos = mx.maximum(offset[:, None] + mx.arange(T), 0)
            mask = cache[0].make_mask(T)
        else:
            pos = mx.arange(offset, offset + T)
        x = self.dropout(self.token_embeddings(inputs) + self.position_embeddings(pos))
        aux_loss, routing = mx.array(0.0), []
        checkpoint = self.checkpoint_layers and self.training and cache is None
        for i, layer in enumerate(self.decoder_layers):
            if checkpoint:
                x, layer_aux, stats = checkpointed(layer, x, offset)
            else:
                layer_cache = None if cache is None else cache[i]
                x, layer_aux, stats = layer(x, offset, layer_cache, absorb, mask=mask)
            aux_loss = aux_loss + layer_aux
            routing.append(stats)
        return x, aux_loss, mx.stack(routing)

    def update_expert_bias(self, routing: mx.array) -> None:
        """Aux-loss-free balancing, once per optimizer step, from `routing` (num_layers, 2, E)
        summed over the whole global batch (`hidden_states`). "solve": each layer's bias moves
        toward the token-weighted mean of the micro-batches' balancing biases, by
        `bias_update_rate` + the layer's MaxVio of the way (at most all of it): at once where
        the loads are far apart, averaged over batches where they are close. "sign":
        bias_i += rate * sign(mean(load) - load_i)."""
        config = self.model_config
        if not config.n_routed_experts:
            return
        rate, load = config.bias_update_rate, routing[:, 0]
        if config.bias_update == "solve":
            tokens = load.sum(-1, keepdims=True) / config.num_experts_per_tok
            target = routing[:, 1] / mx.maximum(tokens, 1)
            mean = mx.maximum(load.mean(-1), 1e-9)
            share = mx.minimum(rate + load.max(-1) / mean - 1, 1.0)  # rate + MaxVio, at most 1
        for i, layer in enumerate(self.decoder_layers):
            bias = layer.mlp.expert_bias
            if config.bias_update == "solve":
                step = share[i] * (target[i] - bias.astype(mx.float32))
            else:  # exact counts: sign(mean - load_i) = sign(total - E * load_i)
                counts = load[i].astype(mx.int32)
                step = rate * mx.sign(counts.sum() - counts.size * counts).astype(mx.float32)
            layer.mlp.expert_bias = bias + step.astype(bias.dtype)

    def sanitize(self, weights: dict) -> dict:
        """Canonical checkpoint keys -> this module's stacked-expert layout."""
        return stack_experts(weights, self.model_config, mx.stack)

    def canonical_weights(self) -> dict[str, mx.array]:
        """This module's parameters under the canonical keys of docs/architecture.md."""
        return unstack_experts(dict(tree_flatten(self.parameters())))


Model = CustomLLM  # the name mlx_lm's loader looks for


def causal_lm_loss(logits: mx.array, inputs: mx.array) -> mx.array:
    """Logits at t predict token t+1: mean cross entropy over targets != -100."""
    shift_logits = logits[:, :-1].astype(mx.float32)
    shift_labels = inputs[:, 1:]
    valid = shift_labels != -100
    ce = cross_entropy(shift_logits, mx.where(valid, shift_labels, 0))
    return (ce * valid).sum() / mx.maximum(valid.sum(), 1)
