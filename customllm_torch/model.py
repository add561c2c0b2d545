"""CustomLLM in PyTorch: the reference implementation of docs/architecture.md.

Twin of customllm_mlx/model.py: same classes, same order, same variable names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from customllm.config import MODEL_TYPE, ModelConfig, check_complete, with_legacy_defaults
from customllm_torch.loss import IGNORE_INDEX, compute_dtype, linear_cross_entropy


class CustomLLMConfig(PretrainedConfig):
    """The Hugging Face face of `ModelConfig` (same fields, same config.json)."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        names = set(ModelConfig.__dataclass_fields__) - {"extra"}
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        config = ModelConfig(**values)  # validates and derives head dims
        for name in names - {"eos_token_id", "bos_token_id"}:
            setattr(self, name, getattr(config, name))
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(
            eos_token_id=config.eos_token_id, bos_token_id=config.bos_token_id, **kwargs
        )

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """A config.json read by `from_pretrained`: complete (no field takes the 973m
        preset's value unseen), with the balancing rule of files written before it existed."""
        check_complete(config_dict, "config.json")
        return super().from_dict(with_legacy_defaults(config_dict), **kwargs)

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> CustomLLMConfig:
        values = config.to_dict()
        values.pop("model_type")
        return cls(**{k: v for k, v in values.items() if k in ModelConfig.__dataclass_fields__})

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(
            {k: getattr(self, k) for k in ModelConfig.__dataclass_fields__ if k != "extra"}
        )


class LatentKVCache:
    """Per layer: `c_kv` (B, T, kv_latent_dim) and rotated `k_rope` (B, H, T, rope_dim)."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    @property
    def offset(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.offset

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        if self.layers[layer_idx] is not None:
            old_c_kv, old_k_rope = self.layers[layer_idx]
            c_kv = torch.cat([old_c_kv, c_kv], dim=1)
            k_rope = torch.cat([old_k_rope, k_rope], dim=2)
        self.layers[layer_idx] = (c_kv, k_rope)
        return c_kv, k_rope

    def nbytes(self) -> int:
        return sum(c.nbytes + k.nbytes for c, k in filter(None, self.layers))

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.layers = [
            None if kv is None else (kv[0][beam_idx], kv[1][beam_idx]) for kv in self.layers
        ]


class CustomRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RotaryEmbedding(nn.Module):
    """Non-interleaved RoPE ("rotate_half"). `angles` makes cos and sin once per forward, in
    float32 and then the compute dtype (no buffer for .to() to round); each layer applies them.
    Made per layer, they cost ~20 small kernels a layer (on a GPU, launches)."""

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim, self.theta = dim, theta

    def angles(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, dim) of positions `pos` (T,), or (B, 1, T, dim) of per-row `pos` (B, T)."""
        arange = torch.arange(0, self.dim, 2, dtype=torch.float32, device=pos.device)
        inv_freq = 1.0 / self.theta ** (arange / self.dim)
        angles = pos.float()[..., None] * inv_freq  # (..., T, dim/2)
        if angles.dim() == 3:
            angles = angles[:, None]  # (B, 1, T, dim/2): one row of positions per sequence
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cos, sin = (t.to(x.dtype) for t in rope)  # x: (B, H, T, dim)
        return x * cos + rotate_half(x) * sin


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

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LatentKVCache | None = None,
        layer_idx: int = 0,
        absorb: bool = False,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`keys` (B, S) bool: the positions that hold tokens (False: padding), cache included;
        None: all of them."""
        B, T, _ = x.shape
        H = self.num_heads
        q_nope, q_rope, c_kv, k_rope = self.project(x, rope)
        if cache is not None:
            c_kv, k_rope = cache.update(layer_idx, c_kv, k_rope)
        S = c_kv.shape[1]
        # the absorbed form reads k_proj_u / v_proj_u's weights: a plain Linear's only (an
        # adapter or a quantized layer around them computes with other weights)
        absorb = absorb and type(self.k_proj_u) is nn.Linear and type(self.v_proj_u) is nn.Linear
        # No padding nor cached prefix: SDPA's own causal kernel (flash on CPU and CUDA); else
        # a boolean mask aligned to the end
        causal = keys is None and T == S and T > 1 and not absorb
        if keys is not None:
            mask = padded_causal_mask(T, keys)
        else:
            mask = None if causal else causal_mask(T, S, x.device)
        if absorb:
            out = self.absorbed_attention(q_nope, q_rope, c_kv, k_rope, mask)
        else:
            k_nope = self.k_proj_u(c_kv).view(B, S, H, self.nope_dim).transpose(1, 2)
            v = self.v_proj_u(c_kv).view(B, S, H, self.v_dim).transpose(1, 2)
            q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, qk_head_dim)
            k = torch.cat([k_nope, k_rope], dim=-1)  # (B, H, S, qk_head_dim)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale
            )
        return self.merge_heads(out)

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Per-head values (B, H, T, v_dim) -> o_proj of the heads side by side (B, T, d)."""
        B, H, T, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """q_nope (B, H, T, nope), rotated q_rope (B, H, T, rope), c_kv (B, T, kv_latent_dim)
        and rotated k_rope (B, H, T, rope) of x (B, T, hidden); `rope`: the positions' cos, sin."""
        B, T, _ = x.shape
        H = self.num_heads
        c_q = self.q_proj_d(x)  # (B, T, q_latent_dim)
        c_kv = self.kv_proj_d(x)  # (B, T, kv_latent_dim)
        q_nope = self.q_proj_u(c_q).view(B, T, H, self.nope_dim).transpose(1, 2)
        q_rope = self.rope_q(c_q).view(B, T, H, self.rope_dim).transpose(1, 2)
        k_rope = self.rope_k(x).view(B, T, H, self.rope_dim).transpose(1, 2)  # (B, H, T, rope)
        return q_nope, self.rotary_emb(q_rope, rope), c_kv, self.rotary_emb(k_rope, rope)

    def absorbed_attention(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Attention over the latent cache with k_proj_u folded into the query and v_proj_u
        applied after the weighted sum: q_nope . k_nope = (q_nope W_uk,h) . c_kv."""
        out_latent = self.latent_attention(self.absorb_query(q_nope), q_rope, c_kv, k_rope, mask)
        return self.absorb_values(out_latent)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (B, H, T, nope) -> q_nope W_uk,h (B, H, T, kv_latent_dim)."""
        w_uk = self.k_proj_u.weight.view(self.num_heads, self.nope_dim, self.kv_latent_dim)
        return torch.einsum("bhtn,hnl->bhtl", q_nope, w_uk)

    def absorb_values(self, out_latent: torch.Tensor) -> torch.Tensor:
        """Attention output over the latent (B, H, T, kv_latent_dim) -> per-head values."""
        w_uv = self.v_proj_u.weight.view(self.num_heads, self.v_dim, self.kv_latent_dim)
        return torch.einsum("bhtl,hvl->bhtv", out_latent, w_uv)  # (B, H, T, v_dim)

    def latent_attention(self, q_latent, q_rope, c_kv, k_rope, mask):
        """SDPA of q_latent (B, H, T, L) over the latent c_kv (B, S, L) as keys and values,
        with the rope scores q_rope . k_rope added -> (B, H, T, L)."""
        H = self.num_heads
        q = torch.cat([q_latent, q_rope], dim=-1)
        k = torch.cat([c_kv[:, None].expand(-1, H, -1, -1), k_rope], dim=-1)  # (B, H, S, L+rope)
        v = c_kv[:, None].expand(-1, H, -1, -1)  # (B, H, S, L)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


def padded_causal_mask(T: int, keys: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, S) boolean mask for T queries at the end of S keys, of which `keys` (B, S)
    hold tokens: causal, no padding, and each query its own position always (a padding
    query then attends to itself alone, not to nothing, which would give NaN)."""
    S = keys.shape[1]
    rows = torch.arange(T, device=keys.device)[:, None] + (S - T)
    cols = torch.arange(S, device=keys.device)[None, :]
    return ((cols <= rows) & keys[:, None, None, :]) | (cols == rows)


def causal_mask(T: int, S: int, device) -> torch.Tensor | None:
    """Boolean mask for T queries at the end of S keys (True = attend); None when T == 1."""
    if T == 1:
        return None
    offset = S - T
    rows = torch.arange(T, device=device)[:, None] + offset
    return torch.arange(S, device=device)[None, :] <= rows


class DeepSeekExpertLayer(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def expert_counts(
    idx: torch.Tensor, num_experts: int, counted: torch.Tensor | None = None
) -> torch.Tensor:
    """(..., n) expert choices -> (..., num_experts) int64 counts over the last axis, of the
    choices where `counted` (same shape, bool) is True if given. A scatter-add, not bincount
    or one_hot: on CUDA both read their input's range on the host, a sync in every layer."""
    counts = idx.new_zeros((*idx.shape[:-1], num_experts))
    ones = torch.ones_like(idx) if counted is None else counted.long()
    return counts.scatter_add_(-1, idx, ones)


def balancing_bias(
    scores: torch.Tensor, bias: torch.Tensor, k: int, sweeps: int = 3
) -> torch.Tensor:
    """The expert bias (E,) under which top-k of `scores + bias` gives every expert the same
    share of this batch's N tokens (N * k / E), found from `bias` by `sweeps` Jacobi sweeps.
    A token picks expert i when score_i + bias_i beats t_i, the k-th largest biased score of
    the other experts, so expert i gets its share when bias_i sits at the (N k / E)-th
    smallest of t_i - score_i; a sweep sets every expert's bias so, with the others' from the
    sweep before. Centred (top-k ignores a common shift). No step size: it follows the router
    however fast the router moves (docs/architecture.md, "Balancing")."""
    N, E = scores.shape
    rank = min(max(round(N * k / E), 1), N - 1)
    bias = bias.float()
    if k >= E or N < 2:  # every token takes every expert (or one token): nothing to balance
        return bias - bias.mean()
    for _ in range(sweeps):
        biased = scores + bias
        top = biased.sort(dim=-1).values
        kth, next_ = top[:, E - k : E - k + 1], top[:, E - k - 1 : E - k]  # k-th, (k+1)-th
        others = torch.where(biased >= kth, next_, kth)  # k-th largest among the other experts
        # (N, E): the bias_i needed to win each token; its rank-th and (rank+1)-th smallest
        margin = others - scores
        low = margin.kthvalue(rank, dim=0).values
        high = margin.kthvalue(rank + 1, dim=0).values
        bias = (low + high) / 2
        bias = bias - bias.mean()
    return bias


def fast_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch runs `grouped_mm` as one kernel for `dtype` on `device`: bfloat16 on CUDA
    GPUs of compute capability 9.x and 10.x (H100, H200, B200). Elsewhere (float32, A100,
    consumer GPUs, ROCm) it reads the offsets on the host and runs one mm per expert: a sync
    per call, and the weights stacked for nothing; the per-expert loop is no slower. (Under
    torch.compile its shape function also takes bfloat16 alone.)"""
    if not hasattr(F, "grouped_mm") or device.type != "cuda" or torch.version.hip:
        return False
    return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)


class LlamaMLP(nn.Module):
    """1 shared + n routed SwiGLU experts, top-k routing with the aux-loss-free bias
    (n_routed_experts 0: the shared expert alone, a dense SwiGLU).

    `grouped` picks how the routed experts run: None (default) as three grouped GEMMs
    (`grouped_experts`) where torch has a kernel for them (`fast_grouped_mm`), else one matmul
    chain per expert; True or False forces one (tests, benchmarks)."""

    grouped: bool | None = None

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, inter = config.hidden_size, config.intermediate_size
        self.num_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.router_score = config.router_score
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.aux_loss_coef = config.aux_loss_coef
        self.solve_bias = config.bias_update == "solve"
        self.shared_experts = nn.ModuleList(
            DeepSeekExpertLayer(d, inter) for _ in range(config.n_shared_experts)
        )
        if self.num_experts:
            self.routed_experts = nn.ModuleList(
                DeepSeekExpertLayer(d, inter) for _ in range(config.n_routed_experts)
            )
            self.router = nn.Linear(d, config.n_routed_experts, bias=False)
            self.register_buffer("expert_bias", torch.zeros(config.n_routed_experts))

    def route(self, x_flat: torch.Tensor):
        """Scores (N, E) in float32, chosen experts (N, k), and their weights (N, k)."""
        # the router in float32, autocast or not: its scores differ by less than bfloat16's
        # spacing once the hidden states grow alike
        with torch.autocast(x_flat.device.type, enabled=False):
            if type(self.router) is nn.Linear:
                logits = F.linear(x_flat.float(), self.router.weight.float())
            else:  # an adapter around it: its own forward, in its weights' dtype
                dtype = next(self.router.parameters()).dtype
                logits = self.router(x_flat.to(dtype)).float()
        scores = logits.sigmoid() if self.router_score == "sigmoid" else logits.softmax(-1)
        idx = torch.topk(scores.detach() + self.expert_bias.float(), self.top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return scores, idx, weights * self.routed_scaling_factor

    def forward(self, x: torch.Tensor, with_aux: bool = True, valid: torch.Tensor | None = None):
        """Returns (y, aux_loss, routing): routing (2, E) float32 holds the token-expert
        assignments per expert (the layer's expert load) and, in training with the "solve"
        bias update, the bias that would have balanced this batch times its token count
        (sums over micro-batches give a token-weighted mean; `balancing_bias`). aux_loss is 0
        without `with_aux` (a cached, generating call has no use for it). `valid` (B, T)
        bool: the tokens that count in all three (False: padding); None: every token."""
        B, T, D = x.shape
        x_flat = x.reshape(-1, D)  # (N, D)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        if not self.num_experts:
            y = sum(expert(x_flat) for expert in self.shared_experts)
            return y.view(B, T, D), aux_loss, x.new_zeros((2, 0), dtype=torch.float32)
        scores, idx, weights = self.route(x_flat)
        load = expert_counts(idx.flatten(), self.num_experts)  # every pair: dispatch runs them
        y = self.dispatch(x_flat, idx, weights.to(x.dtype), load)
        for expert in self.shared_experts:
            y = y + expert(x_flat)
        if with_aux:
            aux_loss = self.sequence_aux_loss(scores.view(B, T, -1), valid)
        counted, kept = load, scores.detach()
        if valid is not None:
            keep = valid.reshape(-1)
            counted = expert_counts(
                idx.flatten(), self.num_experts, keep.repeat_interleave(self.top_k)
            )
            kept = kept[keep]
        target = torch.zeros_like(self.expert_bias, dtype=torch.float32)
        if self.training and self.solve_bias:
            target = balancing_bias(kept, self.expert_bias, self.top_k) * kept.shape[0]
        return y.view(B, T, D), aux_loss, torch.stack([counted.float(), target])

    def dispatch(self, x_flat, idx, weights, load):
        """Run each routed expert only on its tokens: sort token-expert pairs by expert, gather
        the rows once, the experts over their contiguous slices, one scatter-add.
        `load` (E,): the token-expert pairs of each expert (the layer's expert load)."""
        flat_expert = idx.flatten()  # (N * k,)
        order = torch.argsort(flat_expert, stable=True)
        token_of_pair = order // self.top_k
        # (N * k, D), grouped by expert; index_select, whose backward is an index_add_, where
        # indexing's is an accumulating index_put_, slower (docs/benchmarks.md)
        rows = x_flat.index_select(0, token_of_pair)
        if self.use_grouped(rows):
            out = self.grouped_experts(rows, load)
        else:  # one matmul chain per expert over its slice: the sizes read on the host. In
            # training an expert with no rows runs too, on none: its weights get a zero
            # gradient, not None, as in the grouped GEMMs and in MLX (AdamW then treats it the
            # same everywhere); decoding skips it
            parts = rows.split(load.tolist())
            run_all = torch.is_grad_enabled()
            experts = zip(self.routed_experts, parts, strict=True)
            out = torch.cat([e(p) for e, p in experts if run_all or p.shape[0]])
        out = out * weights.flatten()[order, None]
        return torch.zeros_like(x_flat).index_add_(0, token_of_pair, out.to(x_flat.dtype))

    def use_grouped(self, rows: torch.Tensor) -> bool:
        """Grouped GEMMs by default where torch has a kernel for them (`fast_grouped_mm`), with
        widths whose rows are 16-byte aligned; `grouped` forces either way."""
        if self.grouped is not None:
            return self.grouped
        widths = (rows.shape[-1], self.routed_experts[0].gate_proj.out_features)
        aligned = all(w % 8 == 0 for w in widths)
        return aligned and fast_grouped_mm(rows.device, compute_dtype(rows))

    def grouped_experts(self, rows: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
        """The routed experts over `rows` (P, D), sorted by expert, `load[e]` rows each, as
        three grouped GEMMs (`torch.nn.functional.grouped_mm`) of the experts' weights stacked
        per call: no loop of small kernels per expert and no host sync on `load` (on CUDA the
        loop's launches, not its FLOPs, set a 973m step's time). Under autocast, in its dtype
        (grouped_mm is not autocast-aware); the weights stay per-expert parameters."""
        experts = self.routed_experts
        dtype = compute_dtype(rows)
        pairs = [w for e in experts for w in (e.gate_proj.weight, e.up_proj.weight)]
        gate_up = torch.stack(pairs).view(len(experts), -1, rows.shape[-1])  # (E, 2I, D)
        down = torch.stack([e.down_proj.weight for e in experts])  # (E, D, I)
        offs = load.cumsum(0, dtype=torch.int32)
        h = F.grouped_mm(rows.to(dtype), gate_up.to(dtype).transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)  # expert e's rows: its gate outputs, then its up outputs
        return F.grouped_mm(F.silu(gate) * up, down.to(dtype).transpose(-2, -1), offs=offs)

    def sequence_aux_loss(
        self, scores: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """aux_loss_coef * sum_i f_i P_i per sequence, averaged over the batch; f_i counts the
        top-k of the raw scores, without the bias (DeepSeek-V3, eq. 18); over the `valid`
        tokens (B, T) where given."""
        if self.aux_loss_coef == 0:
            return scores.new_zeros(())
        B, T, _ = scores.shape
        raw_top = torch.topk(scores.detach(), self.top_k, dim=-1).indices  # (B, T, k)
        probs = scores / scores.sum(-1, keepdim=True)
        if valid is None:
            counts = expert_counts(raw_top.flatten(1), self.num_experts).float()  # (B, E)
            f = counts * self.num_experts / (self.top_k * T)
            P = probs.mean(1)  # (B, E)
        else:
            counted = valid[..., None].expand(-1, -1, self.top_k).flatten(1)
            counts = expert_counts(raw_top.flatten(1), self.num_experts, counted).float()
            tokens = valid.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
            f = counts * self.num_experts / (self.top_k * tokens)
            P = (probs * valid[..., None]).sum(1) / tokens
        return self.aux_loss_coef * (f * P).sum(-1).mean()


class DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm attention and MLP blocks. A GradientCheckpointingLayer: after
    `model.gradient_checkpointing_enable()` its forward is recomputed in the backward pass
    instead of keeping its activations (x is passed by position for that)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MultiHeadLatentAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_norm = CustomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attn_norm = CustomRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn_dropout = nn.Dropout(config.attn_dropout)
        self.mlp_dropout = nn.Dropout(config.mlp_dropout)

    def forward(self, x, rope, cache=None, absorb=False, keys=None):
        """`keys` (B, S) bool: the positions that hold tokens, cache included (None: all)."""
        x = x + self.attn_dropout(
            self.self_attn(self.input_norm(x), rope, cache, self.layer_idx, absorb, keys)
        )
        with_aux = cache is None or self.training  # generating: no use for the aux loss
        valid = None if keys is None else keys[:, keys.shape[1] - x.shape[1] :]
        mlp_out, aux_loss, routing = self.mlp(self.post_attn_norm(x), with_aux, valid)
        return x + self.mlp_dropout(mlp_out), aux_loss, routing


# transformers' outputs name the cache `cache` since 5.2x, `past_key_values` before (5.17 on
# the CUDA image of our GPU runs); generation reads it under that name
CACHE_FIELD = (
    "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


@dataclass
class CustomLLMOutput(MoeCausalLMOutputWithPast):
    """Adds the per-layer expert loads (num_layers, n_routed_experts), the routing statistics
    that the bias update takes (num_layers, 2, n_routed_experts; LlamaMLP) and the pure LM
    loss; `.cache` is the latent cache whatever transformers calls the field."""

    expert_load: torch.Tensor | None = None
    routing: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None


if CACHE_FIELD != "cache":
    CustomLLMOutput.cache = property(lambda self: getattr(self, CACHE_FIELD))


class CustomLLM(PreTrainedModel, GenerationMixin):
    config_class = CustomLLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config: CustomLLMConfig | ModelConfig):
        if isinstance(config, ModelConfig):
            config = CustomLLMConfig.from_model_config(config)
        super().__init__(config)
        cfg = config.to_model_config()
        self.model_config = cfg
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.embd_dropout)
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.lm_head_bias)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, but weights that do not fit config.json are an error: its
        load report alone left random layers in (or dropped trained ones) without a word."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        wrong = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if wrong:
            kind, keys = next(iter(wrong.items()))
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(
                f"{source}: the weights do not fit config.json ({kind.replace('_', ' ')}: "
                f"{keys[0]!r}, {len(keys)} in all); do the weights and config.json belong "
                "together?"
            )
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        std = self.model_config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if module is getattr(self, "token_embeddings", None):
                std = self.model_config.embedding_init_std
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, CustomRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LlamaMLP) and module.num_experts:
            nn.init.zeros_(module.expert_bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.token_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.token_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: LatentKVCache | None = None,
        use_cache: bool | None = None,
        absorb: bool | None = None,
        logits_to_keep: int = 0,
        return_logits: bool | None = None,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CustomLLMOutput:
        """`labels` as in transformers (shifted here), or `shift_labels` already shifted:
        position t predicts shift_labels[:, t]. When training with labels, the loss is fused with
        lm_head (`linear_cross_entropy`) and `logits` is None unless `return_logits=True`.

        `attention_mask` (B, cached + T), 1 on tokens and 0 on padding, as a tokenizer pads
        (left for generation, right for training): padding is neither attended to nor counted
        in the loss, the expert loads or the aux loss, and each row's positions start at its
        first token (unless `position_ids` (B, T) are given)."""
        cache = kwargs.pop("past_key_values", None) if cache is None else cache
        if use_cache and cache is None:
            cache = LatentKVCache(len(self.decoder_layers))
        B, T = input_ids.shape
        offset = 0 if cache is None else cache.offset
        if offset + T > self.model_config.max_position_embeddings:
            raise ValueError(
                f"sequence of {offset + T} tokens exceeds the context of "
                f"{self.model_config.max_position_embeddings} (max_position_embeddings)"
            )
        absorb = cache is not None and T == 1 if absorb is None else absorb
        keys = None
        if attention_mask is not None:
            if attention_mask.shape != (B, offset + T):
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}; expected "
                    f"({B}, {offset + T}): the cached tokens and the new ones"
                )
            keys = attention_mask.bool()
            keys = None if keys.all() else keys  # no padding: the unmasked kernels
        if position_ids is not None:
            pos = position_ids
        elif keys is not None:
            pos = (keys.long().cumsum(-1) - 1).clamp(min=0)[:, offset:]
        else:
            pos = torch.arange(offset, offset + T, device=input_ids.device)
        if labels is not None and keys is not None:
            labels = labels.masked_fill(~keys[:, offset:], IGNORE_INDEX)
        x = self.dropout(self.token_embeddings(input_ids) + self.position_embeddings(pos))
        rope = self.decoder_layers[0].self_attn.rotary_emb.angles(pos, compute_dtype(x))
        aux_loss, routing = x.new_zeros((), dtype=torch.float32), []
        for layer in self.decoder_layers:
            x, layer_aux, stats = layer(x, rope, cache, absorb, keys)
            aux_loss = aux_loss + layer_aux
            routing.append(stats)
        routing = torch.stack(routing)
        if shift_labels is None and labels is not None:
            shift_labels = shifted(labels)
        if return_logits is None:
            return_logits = shift_labels is None or not (self.training and torch.is_grad_enabled())
        logits = loss = lm_loss = None
        if return_logits:
            logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        if shift_labels is not None:
            if logits is not None and not logits_to_keep:
                lm_loss = next_token_loss(logits, shift_labels)
            else:
                lm_loss = linear_cross_entropy(
                    x, self.lm_head.weight, self.lm_head.bias, shift_labels
                )
            loss = lm_loss + aux_loss if self.training else lm_loss
        return CustomLLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            logits=logits,
            expert_load=routing[:, 0],
            routing=routing,
            **{CACHE_FIELD: cache},
        )

    @torch.no_grad()
    def update_expert_bias(self, routing: torch.Tensor) -> None:
        """Aux-loss-free balancing, once per optimizer step, from `routing` (num_layers, 2, E)
        summed over the whole global batch (`CustomLLMOutput.routing`). "solve": each layer's
        bias moves toward the token-weighted mean of the micro-batches' balancing biases, by
        `bias_update_rate` + the layer's MaxVio of the way (at most all of it): at once where
        the loads are far apart, averaged over batches where they are close. "sign":
        bias_i += rate * sign(mean(load) - load_i)."""
        config = self.model_config
        if not config.n_routed_experts:
            return
        rate, load = config.bias_update_rate, routing[:, 0]
        if config.bias_update == "solve":
            tokens = load.sum(-1, keepdim=True) / config.num_experts_per_tok
            target = routing[:, 1] / tokens.clamp(min=1)
            mean = load.mean(-1).clamp(min=1e-9)
            share = (rate + load.amax(-1) / mean - 1).clamp(max=1.0)  # rate + MaxVio, at most 1
        for i, layer in enumerate(self.decoder_layers):
            bias = layer.mlp.expert_bias
            if config.bias_update == "solve":
                step = share[i] * (target[i] - bias.float())
            else:  # exact counts: sign(mean - load_i) = sign(total - E * load_i)
                counts = load[i].long()
                step = rate * torch.sign(counts.sum() - counts.numel() * counts).float()
            bias.add_(step.to(bias))

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        cache = kwargs.get("past_key_values") if cache is None else cache  # transformers < 5.2x
        if cache is not None and cache.offset:
            input_ids = input_ids[:, cache.offset :]
        inputs = {"input_ids": input_ids, "cache": cache, "use_cache": True}
        return inputs | {"attention_mask": attention_mask}

    def _supports_default_dynamic_cache(self) -> bool:
        return False

    def __repr__(self) -> str:
        return super().__repr__() + f"\nModel parameters: {self.num_parameters() / 1e6:.2f}M"


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits at t predict token t+1: mean cross entropy over labels != -100.

    The labels are shifted (the last position gets -100) rather than the logits sliced, which
    would copy the (B, T, vocab) logits."""
    return next_token_loss(logits, shifted(labels))


def next_token_loss(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Mean float32 cross entropy of logits (B, T, V) against already shifted labels (B, T)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX
    )


def shifted(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts (the next one); -100 at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def register() -> None:
    """Register with AutoConfig / AutoModelForCausalLM (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, CustomLLMConfig)
        AutoModelForCausalLM.register(CustomLLMConfig, CustomLLM)
    except ValueError:
        pass  # already registered
