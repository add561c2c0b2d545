"""lm_head + cross entropy fused for training: the (tokens, vocab) logits are never stored.

The rows are processed a chunk at a time: the chunk's logits, their log-sum-exp and the softmax
gradient are formed while the chunk is in cache, and the gradient is turned at once into the
gradients of the hidden states, the weight and the bias; backward only scales them by the
incoming gradient. No GEMM is recomputed, one exp pass replaces log_softmax's forward and
backward passes, and the peak holds one chunk of logits instead of three full (N, vocab) arrays.
Equals `F.cross_entropy(F.linear(h, W, b), labels)` to float32 rounding (tests/test_loss_torch.py);
`benchmarks/bench_train.py` measures what it is worth against transformers' unfused loss.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def default_chunk_rows(hidden_size: int, device: torch.device) -> int:
    """Rows per chunk. On CPU twice the hidden size rounded up to a power of two (128..1024): with
    one exp pass and no (rows, vocab) scaling pass left, larger chunks win by keeping the GEMMs
    big (docs/benchmarks.md, "Fused lm_head"); on accelerators a large chunk, for the same
    reason."""
    if device.type != "cpu":
        return 2048
    return min(1024, max(128, 2 << max(hidden_size - 1, 1).bit_length()))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows):
        needs = ctx.needs_input_grad
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        targets = labels.clamp(min=0)
        scale = valid.float() / count  # d(mean loss)/d(per-row loss); 0 on ignored rows
        w = weight.to(hidden.dtype)
        b = None if bias is None else bias.to(torch.float32)
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grad_weight = None
        if needs[1]:  # float32 accumulation across chunks
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None if bias is None or not needs[2] else torch.zeros_like(b)
        total = hidden.new_zeros((), dtype=torch.float32)
        fused_bias = b is not None and hidden.dtype == torch.float32
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t, s = hidden[rows], targets[rows], scale[rows]
            if fused_bias:
                logits = torch.addmm(b, h, w.t())  # the bias seeds the GEMM: one pass less
            else:
                logits = (h @ w.t()).float()
                if b is not None:
                    logits += b
            picked = torch.arange(logits.shape[0], device=logits.device)
            target_logit = logits[picked, t]
            m = logits.amax(-1, keepdim=True)
            e = logits.sub_(m).exp_()  # in place: one exp pass for the loss and the gradient
            e_sum = e.sum(-1)
            total += ((m[:, 0] + e_sum.log() - target_logit) * valid[rows]).sum()
            if not any(needs[:3]):
                continue
            # d loss / d logits = r * e - s at the targets, with r = s / e_sum. e goes into the
            # GEMMs unscaled (r scales their small operands or outputs); the -s terms are added
            # for all rows after the loop: no (rows, vocab) pass to scale e or to index into it.
            r = s / e_sum  # (rows,)
            if grad_bias is not None:
                grad_bias += r @ e
            e = e.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(e, w, out=grad_hidden[rows])
                grad_hidden[rows] *= r[:, None].to(hidden.dtype)
            if grad_weight is not None:
                h_scaled = h * r[:, None].to(h.dtype)
                if e.dtype == torch.float32:
                    grad_weight.addmm_(e.t(), h_scaled)
                else:  # low-precision GEMM, float32 accumulation across chunks
                    grad_weight += (e.t() @ h_scaled).float()
        if grad_hidden is not None:
            grad_hidden -= (scale[:, None] * w[targets].float()).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight.index_add_(0, targets, -scale[:, None] * hidden.float())
        if grad_bias is not None:
            grad_bias.index_add_(0, targets, -scale)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_output).to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: autocast's where it is on for x's device, else x's (for
    GEMMs that autocast does not reach: this loss's, the MoE's grouped GEMMs)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross entropy of `hidden @ weight.T + bias` (float32) against `labels`, skipping
    labels equal to -100. hidden (..., D), labels (...) already aligned (shifted by the caller)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden.shape[0]} hidden states")
    chunk_rows = chunk_rows or default_chunk_rows(hidden.shape[-1], hidden.device)
    hidden = hidden.to(compute_dtype(hidden))  # the GEMMs in autocast's dtype, as F.linear's
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk_rows)
