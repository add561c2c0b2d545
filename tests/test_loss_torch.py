"""The fused torch lm_head + cross entropy equals the unfused loss, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from customllm_torch.loss import default_chunk_rows, linear_cross_entropy
from customllm_torch.model import CustomLLM, causal_lm_loss


def leaves(n=37, d=24, v=300, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g)).requires_grad_()
    b = (0.5 * torch.randn(v, generator=g)).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[3, 10, 11]] = -100
    return h, w, b, labels


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 37, 64])
def test_equals_unfused_cross_entropy_values_and_gradients(bias, chunk_rows):
    h, w, b, labels = leaves(bias=bias)
    reference = F.cross_entropy(F.linear(h, w, b), labels, ignore_index=-100)
    fused = linear_cross_entropy(h, w, b, labels, chunk_rows=chunk_rows)
    assert torch.allclose(fused, reference, rtol=1e-6, atol=1e-6)
    scale = 2.5  # the incoming gradient is applied in backward
    fused_grads, ref_grads = grads(scale * fused, (h, w, b)), grads(scale * reference, (h, w, b))
    for ours, ref in zip(fused_grads, ref_grads, strict=True):
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-7)


def test_only_the_requested_gradients_and_no_grad_mode():
    h, w, b, labels = leaves()
    w.requires_grad_(False)
    (gh, gb) = grads(linear_cross_entropy(h, w, b, labels, chunk_rows=8), (h, b))
    rh, rb = grads(F.cross_entropy(F.linear(h, w, b), labels), (h, b))
    assert torch.allclose(gh, rh, atol=1e-7) and torch.allclose(gb, rb, atol=1e-7)
    with torch.no_grad():
        value = linear_cross_entropy(h, w, b, labels)
    assert torch.allclose(value, F.cross_entropy(F.linear(h, w, b), labels), rtol=1e-6)


def test_all_labels_ignored_gives_zero_loss_and_zero_gradients():
    h, w, b, labels = leaves()
    loss = linear_cross_entropy(h, w, b, torch.full_like(labels, -100))
    assert loss.item() == 0.0
    assert all(g.abs().max() == 0 for g in grads(loss, (h, w, b)))


def test_bfloat16_inputs_match_the_float32_loss():
    h, w, b, labels = leaves(n=64, d=32, v=500)
    reference = F.cross_entropy(F.linear(h, w, b), labels)
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    fused = linear_cross_entropy(hb, wb, b, labels, chunk_rows=16)
    assert fused.dtype == torch.float32
    assert abs(fused.item() - reference.item()) < 2e-2
    gh, gw, gb = grads(fused, (hb, wb, b))
    assert (gh.dtype, gw.dtype, gb.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    rw = grads(reference, (w,))[0]
    assert torch.allclose(gw.float(), rw, atol=2e-3)


def test_label_count_must_match_the_hidden_states():
    h, w, b, labels = leaves()
    with pytest.raises(ValueError, match="36 labels for 37 hidden states"):
        linear_cross_entropy(h, w, b, labels[:-1])


def test_default_chunk_rows_follows_the_hidden_size():
    cpu = torch.device("cpu")
    assert [default_chunk_rows(d, cpu) for d in (16, 64, 256, 300, 768, 4096)] == [
        128,
        128,
        512,
        1024,
        1024,
        1024,
    ]


def test_model_training_loss_is_fused_and_equals_the_logits_loss(tiny_config):
    torch.manual_seed(0)
    model = CustomLLM(tiny_config).train()  # the tiny preset has no dropout
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    ids[0, 5] = -100  # ignored as a label (it is never looked up: labels only)
    inputs = ids.clamp(min=0)
    fused = model(inputs, labels=ids)
    assert fused.logits is None  # never materialised in training
    fused_grads = torch.autograd.grad(fused.loss, list(model.parameters()), allow_unused=True)
    full = model(inputs, labels=ids, return_logits=True)
    # next-token cross entropy of the logits, the -100 label left out, written out here
    by_hand = F.cross_entropy(full.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(full.lm_loss, by_hand, rtol=1e-6)
    assert torch.allclose(causal_lm_loss(full.logits, ids), by_hand, rtol=1e-6)
    assert torch.allclose(fused.lm_loss, full.lm_loss, rtol=1e-6)
    full_grads = torch.autograd.grad(full.loss, list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), fused_grads, full_grads, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), name
    shifted = model(inputs[:, :-1], shift_labels=ids[:, 1:])  # the trainer's form
    expected = F.cross_entropy(full.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(shifted.lm_loss, expected, rtol=1e-5)


def test_autocast_bfloat16_matches_the_unfused_autocast_loss_with_float32_gradients():
    h, w, b, labels = leaves(n=64, d=32, v=500)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(h, w, b, labels, chunk_rows=16)
        unfused = F.cross_entropy(F.linear(h, w, b).float(), labels)
    assert fused.dtype == torch.float32
    assert abs(fused.item() - unfused.item()) < 1e-2  # both from bfloat16 logits
    gh, gw, gb = grads(fused, (h, w, b))
    rh, rw, rb = grads(unfused, (h, w, b))
    assert (gh.dtype, gw.dtype, gb.dtype) == (torch.float32,) * 3  # the leaves' dtypes
    assert torch.allclose(gw, rw, atol=2e-3) and torch.allclose(gb, rb, atol=1e-4)
