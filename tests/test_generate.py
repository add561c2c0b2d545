"""Generation in both frameworks: samplers, penalties, the latent cache, stats, CLIs, ecosystem.

A tiny random model with the test tokenizer's vocabulary is saved once (torch `save`) and loaded by
customllm_mlx, customllm_torch, `mlx_lm.load` and transformers' `from_pretrained`.
"""

# ruff: noqa: E402  (customllm_mlx must be imported before mlx.core: it preloads OpenBLAS)

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from conftest import TOKENIZER_VOCAB_SIZE

customllm_mlx = pytest.importorskip("customllm_mlx")  # first: preloads OpenBLAS before mlx.core
torch = pytest.importorskip("torch")
pytest.importorskip("mlx_lm")

import mlx.core as mx
from click.testing import CliRunner
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

import customllm_mlx.generate as mlx_gen
import customllm_torch.generate as torch_gen
from customllm.checkpoint import WEIGHTS_NAME
from customllm.config import ModelConfig
from customllm.sampling import (
    PromptTooLongError,
    StreamingDetokenizer,
    format_stats,
    generation_budget,
)
from customllm.tokenizer import load_tokenizer
from customllm_mlx.cli import main as mlx_cli
from customllm_mlx.model import CustomLLM as MLXModel
from customllm_torch.cli import main as torch_cli
from customllm_torch.model import CustomLLM as TorchModel

PROMPT = "Once upon a time there was a little"
N_TOKENS = 12
CONTEXT = 64
STATS = [
    r"Prompt: \d+ tokens, \d+\.\d{3} tokens-per-sec",
    r"Generation: \d+ tokens, \d+\.\d{3} tokens-per-sec",
    r"Peak memory: \d+\.\d{3} GB",
]

# Hand-made logits: softmax = [.6236, .2294, .0844, .0512, .0114]
LOGITS = [3.0, 2.0, 1.0, 0.5, -1.0]
FILTER_CASES = [  # (top_p, min_p, top_k) -> kept token ids
    ((0.0, 0.0, 2), {0, 1}),
    ((0.0, 0.0, 4), {0, 1, 2, 3}),
    ((0.5, 0.0, 0), {0}),
    ((0.8, 0.0, 0), {0, 1}),  # .6236 < .8 so token 1 is kept; .853 >= .8 stops
    ((0.9, 0.0, 0), {0, 1, 2}),
    ((0.0, 0.1, 0), {0, 1, 2}),  # p >= .1 * .6236
    ((0.0, 0.3, 0), {0, 1}),
    ((0.9, 0.0, 2), {0, 1}),  # intersection, each filter on the full distribution
    ((0.95, 0.1, 4), {0, 1, 2}),
]
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}  # chi-square critical values, p = 0.001


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random model (the test tokenizer's vocabulary, 64-token context) saved by
    customllm_torch."""
    from customllm_torch.io import save

    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "tiny", vocab_size=TOKENIZER_VOCAB_SIZE, max_position_embeddings=CONTEXT
    )
    path = tmp_path_factory.mktemp("generate") / "tiny"
    save(TorchModel(config).eval(), path, tokenizer=tokenizer_dir)
    return path


@pytest.fixture(scope="module")
def mlx_model(model_dir):
    from customllm_mlx.io import load

    return load(model_dir)


@pytest.fixture(scope="module")
def torch_model(model_dir):
    from customllm_torch.io import load

    return load(model_dir)


@pytest.fixture(params=["mlx", "torch"])
def framework(request, mlx_model, torch_model):
    """(name, model, tokenizer, generate module) for each framework."""
    model, tok = mlx_model if request.param == "mlx" else torch_model
    return request.param, model, tok, mlx_gen if request.param == "mlx" else torch_gen


def full_forward_logits(name: str, model, ids: list[int]) -> np.ndarray:
    """Last-position logits of a full forward pass without a cache."""
    if name == "mlx":
        return np.array(model(mx.array([ids]))[0, -1].astype(mx.float32))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float().numpy()


def tokens_of(module, model, tok, prompt, **kwargs) -> tuple[list[int], list]:
    responses = list(module.stream_generate(model, tok, prompt, **kwargs))
    last = responses[-1]
    tokens = [r.token for r in responses]
    if last.finish_reason == "stop":
        tokens = tokens[:-1]  # the EOS token is reported but is not part of the text
    return tokens, responses


# --- greedy decoding through the cache --------------------------------------------------------


@pytest.mark.parametrize("prefill_step_size", [2048, 3])
def test_greedy_equals_argmax_of_full_forward(framework, prefill_step_size):
    name, model, tok, module = framework
    ids = tok.encode(PROMPT)
    tokens, responses = tokens_of(
        module, model, tok, ids, max_tokens=N_TOKENS, prefill_step_size=prefill_step_size
    )
    seq = list(ids)
    for _ in range(N_TOKENS):
        seq.append(int(full_forward_logits(name, model, seq).argmax()))
    assert tokens == seq[len(ids) :]
    assert responses[-1].finish_reason == "length"
    assert responses[-1].generation_tokens == N_TOKENS
    assert responses[-1].prompt_tokens == len(ids)
    assert "".join(r.text for r in responses) == tok.decode(tokens)


def test_bfloat16_folder_decodes_greedily_in_float32_log_probabilities(model_dir, tmp_path):
    """A bfloat16 folder (convert --dtype bfloat16): the MLX model's logits are float32, so
    mlx_lm's log-softmax does not collapse the untrained model's close logits onto one value
    (greedy then picked token 0, EOS, at once); greedy = argmax of the full forward."""
    from customllm.convert import convert_folder
    from customllm_mlx.io import load

    model, tok = load(convert_folder(model_dir, tmp_path / "bf16", dtype="bfloat16"))
    assert model.lm_head.weight.dtype == mx.bfloat16
    ids = tok.encode(PROMPT)
    assert model(mx.array([ids])).dtype == mx.float32
    tokens, _ = tokens_of(mlx_gen, model, tok, ids, max_tokens=4)
    seq = list(ids)
    for _ in range(4):
        seq.append(int(full_forward_logits("mlx", model, seq).argmax()))
    assert tokens == seq[len(ids) :]


def test_mlx_and_torch_generate_the_same_greedy_tokens(mlx_model, torch_model):
    mlx_tokens, _ = tokens_of(mlx_gen, *mlx_model, PROMPT, max_tokens=N_TOKENS)
    torch_tokens, _ = tokens_of(torch_gen, *torch_model, PROMPT, max_tokens=N_TOKENS)
    assert mlx_tokens == torch_tokens


def test_eos_stops_generation(framework):
    name, model, tok, module = framework
    ids = tok.encode(PROMPT)
    free, _ = tokens_of(module, model, tok, ids, max_tokens=N_TOKENS)
    k = next(i for i in range(2, N_TOKENS) if free[i] not in free[:i])
    old = model.model_config
    model.model_config = dataclasses.replace(old, eos_token_id=free[k])  # stop at the k-th token
    try:
        tokens, responses = tokens_of(module, model, tok, ids, max_tokens=N_TOKENS)
    finally:
        model.model_config = old
    assert tokens == free[:k]
    assert responses[-1].finish_reason == "stop"
    assert responses[-1].token == free[k]
    assert "".join(r.text for r in responses) == tok.decode(free[:k])


def test_prompt_too_long_errors_and_generation_stops_at_the_context(framework):
    name, model, tok, module = framework
    with pytest.raises(PromptTooLongError, match=rf"\b{CONTEXT + 6}\b.*\b{CONTEXT}\b"):
        list(module.stream_generate(model, tok, [5] * (CONTEXT + 6), max_tokens=4))
    with pytest.raises(PromptTooLongError):
        list(module.stream_generate(model, tok, [5] * CONTEXT, max_tokens=4))
    _, responses = tokens_of(module, model, tok, [5] * (CONTEXT - 3), max_tokens=100)
    assert responses[-1].generation_tokens == 3
    assert responses[-1].finish_reason == "length"


def test_generation_budget():
    assert generation_budget(10, 100, 64) == 54
    assert generation_budget(10, 5, 64) == 5
    assert generation_budget(10, -1, 64) == 54
    with pytest.raises(ValueError, match="empty"):
        generation_budget(0, 5, 64)
    with pytest.raises(ValueError, match="non-zero"):
        generation_budget(3, 0, 64)


# --- samplers --------------------------------------------------------------------------------


def draw(name: str, sampler_kwargs: dict, logits: list[float], n: int, seed: int) -> np.ndarray:
    """`n` draws from one sampler over the same logprobs (batched as n rows)."""
    if name == "mlx":
        mx.random.seed(seed)
        sampler = mlx_gen.make_sampler(**sampler_kwargs)
        row = mx.array(logits)
        logprobs = mx.broadcast_to(row - mx.logsumexp(row), (n, len(logits)))
        return np.array(sampler(logprobs))
    generator = torch.Generator().manual_seed(seed)
    sampler = torch_gen.make_sampler(**sampler_kwargs, generator=generator)
    row = torch.tensor(logits)
    return sampler((row - row.logsumexp(-1)).expand(n, -1)).numpy()


def filtered_softmax(logits: list[float], kept: set[int], temp: float) -> np.ndarray:
    x = np.array(logits, dtype=np.float64) / temp
    x[[i for i in range(len(logits)) if i not in kept]] = -np.inf
    p = np.exp(x - x.max())
    return p / p.sum()


@pytest.mark.parametrize("name", ["mlx", "torch"])
@pytest.mark.parametrize(("filters", "kept"), FILTER_CASES)
def test_filters_keep_exactly_the_expected_tokens(name, filters, kept):
    top_p, min_p, top_k = filters
    samples = draw(name, dict(temp=1.0, top_p=top_p, min_p=min_p, top_k=top_k), LOGITS, 4000, 0)
    assert set(samples.tolist()) == kept


@pytest.mark.parametrize(("filters", "kept"), FILTER_CASES)
def test_torch_filters_mask_exactly_the_expected_tokens(filters, kept):
    top_p, min_p, top_k = filters
    row = torch.tensor([LOGITS])
    logprobs = row - row.logsumexp(-1, keepdim=True)
    if 0 < top_p < 1:
        logprobs = torch_gen.apply_top_p(logprobs, top_p)
    if min_p:
        logprobs = torch_gen.apply_min_p(logprobs, min_p)
    if top_k:
        logprobs = torch_gen.apply_top_k(logprobs, top_k)
    assert set(torch.isfinite(logprobs[0]).nonzero().flatten().tolist()) == kept


@pytest.mark.parametrize("name", ["mlx", "torch"])
@pytest.mark.parametrize(
    ("temp", "filters", "kept"),
    [(1.0, {}, {0, 1, 2, 3, 4}), (0.7, dict(top_k=3), {0, 1, 2}), (2.0, dict(top_p=0.8), {0, 1})],
)
def test_sampled_frequencies_match_the_filtered_softmax(name, temp, filters, kept):
    n = 20000
    samples = draw(name, dict(temp=temp, **filters), LOGITS, n, seed=1234)
    expected = filtered_softmax(LOGITS, kept, temp) * n
    counts = np.bincount(samples, minlength=len(LOGITS))
    assert set(np.nonzero(counts)[0].tolist()) == kept
    idx = sorted(kept)
    chi2 = (((counts[idx] - expected[idx]) ** 2) / expected[idx]).sum()
    assert chi2 < CHI2_999[len(idx) - 1], (counts, expected)


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_temp_zero_is_argmax_and_a_seed_repeats_draws(name):
    assert draw(name, dict(temp=0.0, top_k=2), [0.1, 2.0, 1.9], 5, 0).tolist() == [1] * 5
    a = draw(name, dict(temp=1.0), LOGITS, 50, seed=7)
    b = draw(name, dict(temp=1.0), LOGITS, 50, seed=7)
    c = draw(name, dict(temp=1.0), LOGITS, 50, seed=8)
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("module", [mlx_gen, torch_gen], ids=["mlx", "torch"])
def test_sampler_arguments_are_checked(module):
    for bad in (dict(temp=-1.0), dict(top_p=1.5), dict(min_p=-0.1), dict(top_k=-2)):
        with pytest.raises(ValueError):
            module.make_sampler(**bad)
    with pytest.raises(ValueError, match="repetition_penalty"):
        module.make_logits_processors(repetition_penalty=-1.0)


# --- repetition penalty ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_repetition_penalty_changes_the_argmax(name):
    logits, history = [[2.0, 1.9, -1.0, 0.5]], [0, 2]
    if name == "mlx":
        (processor,) = mlx_gen.make_logits_processors(repetition_penalty=1.5)
        out = np.array(processor(mx.array(history), mx.array(logits)))
    else:
        (processor,) = torch_gen.make_logits_processors(repetition_penalty=1.5)
        out = processor(torch.tensor(history), torch.tensor(logits)).numpy()
    np.testing.assert_allclose(out[0], [2.0 / 1.5, 1.9, -1.5, 0.5], rtol=1e-6)
    assert int(np.argmax(logits[0])) == 0 and int(out.argmax()) == 1


def test_the_sampler_receives_the_log_softmax_of_the_logits(framework):
    """What stream_generate hands the sampler at each step is log_softmax of the model's
    last-position logits (the seed's pipeline applied softmax twice; the sampler tests give
    `make_sampler` log-probabilities they make themselves)."""
    name, model, tok, module = framework
    seen = []

    def sampler(logprobs):  # greedy, recording its input
        row = logprobs[0]
        seen.append(np.array(row.astype(mx.float32)) if name == "mlx" else row.float().numpy())
        return mx.argmax(logprobs, axis=-1) if name == "mlx" else logprobs.argmax(-1)

    ids = tok.encode(PROMPT)
    tokens, _ = tokens_of(module, model, tok, ids, max_tokens=4, sampler=sampler)
    assert len(tokens) == 4 and len(seen) >= 4  # mlx_lm draws the next token ahead
    seq = list(ids)
    for logprobs, token in zip(seen, tokens, strict=False):
        logits = full_forward_logits(name, model, seq).astype(np.float64)
        expected = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        np.testing.assert_allclose(logprobs, expected, atol=1e-4, rtol=0)
        seq.append(token)


def test_repetition_penalty_is_applied_before_sampling(framework):
    """Greedy tokens with a penalty = argmax of the penalised full-forward logits."""
    name, model, tok, module = framework
    penalty, context = 1.8, 20
    ids = tok.encode(PROMPT)
    tokens, _ = tokens_of(
        module,
        model,
        tok,
        ids,
        max_tokens=8,
        logits_processors=module.make_logits_processors(penalty, context),
    )
    seq = list(ids)
    for _ in range(8):
        logits = full_forward_logits(name, model, seq)
        seen = seq[-context:]
        logits[seen] = np.where(logits[seen] < 0, logits[seen] * penalty, logits[seen] / penalty)
        seq.append(int(logits.argmax()))
    assert tokens == seq[len(ids) :]


# --- the latent cache ------------------------------------------------------------------------


def test_cache_holds_576_numbers_per_token_and_layer_at_973m_width():
    config = ModelConfig(
        num_hidden_layers=1,
        vocab_size=256,
        max_position_embeddings=64,
        intermediate_size=32,
        n_routed_experts=2,
        embd_dropout=0.0,
        attn_dropout=0.0,
        mlp_dropout=0.0,
    )
    assert config.kv_cache_numbers_per_token == ModelConfig().kv_cache_numbers_per_token == 576
    T = 10
    ids = np.arange(T)[None]

    mx.random.seed(0)
    mlx_model = MLXModel(config)
    mlx_cache = mlx_model.make_cache()
    mlx_model(mx.array(ids), cache=mlx_cache)
    assert len(mlx_cache) == 1
    assert sum(a.size for a in mlx_cache[0].keys_and_values()) == 576 * T
    assert mlx_cache[0].offset == T

    torch.manual_seed(0)
    torch_model = TorchModel(config).eval()
    torch_cache = torch_gen.make_cache(torch_model)
    with torch.no_grad():
        torch_model(torch.tensor(ids), cache=torch_cache)
    assert sum(a.numel() for a in torch_cache.layers[0]) == 576 * T
    assert torch_cache.nbytes() == 576 * T * 4


def test_max_kv_size_bounds_the_cache(framework):
    name, model, tok, module = framework
    ids = tok.encode(PROMPT)
    full, _ = tokens_of(module, model, tok, ids, max_tokens=N_TOKENS)
    wide, _ = tokens_of(module, model, tok, ids, max_tokens=N_TOKENS, max_kv_size=CONTEXT - 1)
    assert wide == full  # a window that never fills changes nothing

    window = 6
    cache = module.make_cache(model, max_kv_size=window)
    tokens, responses = tokens_of(module, model, tok, ids, max_tokens=N_TOKENS, prompt_cache=cache)
    assert responses[-1].generation_tokens == N_TOKENS
    stored = cache[0].keys.shape[2] if name == "mlx" else cache.layers[0][0].shape[1]
    assert stored == window  # the last 1-token step attended to `window` tokens
    # positions stay absolute (mlx_lm's loop has already fed the last token when it stops)
    offset = cache[0].offset if name == "mlx" else cache.offset
    assert offset == len(ids) + N_TOKENS - (name == "torch")
    with pytest.raises(ValueError, match="max_kv_size"):
        module.make_cache(model, max_kv_size=0)


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_rotating_cache_keeps_the_first_and_the_most_recent_tokens(name):
    """Token p stored as the number p: a 1-token step at position p attends to the first
    `keep` tokens, the max_size - keep - 1 before p, and p (all of them while they fit)."""
    max_size, keep, L, H, R = 6, 2, 3, 2, 4
    if name == "mlx":
        cache = mlx_gen.RotatingLatentKVCache(max_size, keep)
    else:
        cache = torch_gen.RotatingLatentKVCache(1, max_size, keep)
    for p in range(20):
        if name == "mlx":  # the latent as one head: c_kv (1, 1, S, L), rope keys (1, 1, S, H * R)
            c_kv, k_rope = cache.update_and_fetch(
                mx.full((1, 1, 1, L), p), mx.full((1, 1, 1, H * R), p)
            )
            c_kv, k_rope = c_kv[:, 0], k_rope.reshape(1, -1, H, R).transpose(0, 2, 1, 3)
        else:
            c_kv, k_rope = cache.update(0, torch.full((1, 1, L), p), torch.full((1, H, 1, R), p))
        recent = max_size - keep - 1
        expected = list(range(p + 1)) if p < max_size else [*range(keep), *range(p - recent, p + 1)]
        assert c_kv[0, :, 0].tolist() == expected, p
        assert k_rope[0, H - 1, :, R - 1].tolist() == expected, p
        assert cache.offset == p + 1


# --- stats and detokenization ----------------------------------------------------------------


def test_format_stats_is_mlx_lm_format():
    response = dataclasses.make_dataclass(
        "R", ["prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps", "peak_memory"]
    )(7, 123.45678, 12, 45.6, 0.0291)
    assert format_stats(response) == (
        "Prompt: 7 tokens, 123.457 tokens-per-sec\n"
        "Generation: 12 tokens, 45.600 tokens-per-sec\n"
        "Peak memory: 0.029 GB"
    )


def test_verbose_generate_prints_separators_text_and_stats(framework, capsys):
    name, model, tok, module = framework
    text = module.generate(model, tok, PROMPT, verbose=True, max_tokens=5)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "=========="
    assert "\n".join(lines[1:-4]) == text and text
    assert lines[-4] == "=========="
    for line, pattern in zip(lines[-3:], STATS, strict=True):
        assert re.fullmatch(pattern, line), line
    assert lines[-2].startswith("Generation: 5 tokens")


def test_streaming_detokenizer_never_splits_a_character(tokenizer):
    text = "Le café coûte 3€ — très cher! 🙂\nNext line 日本語."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = StreamingDetokenizer(tokenizer)
    segments = []
    for token in ids:
        detokenizer.add_token(token)
        segments.append(detokenizer.last_segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    assert "".join(segments) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in s for s in segments)
    assert len([s for s in segments if s]) > 5  # streamed, not all at the end


# --- ecosystem loading -----------------------------------------------------------------------


def test_mlx_lm_load_and_generate_match_ours(model_dir, mlx_model):
    import mlx_lm

    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.load(str(model_dir))
    model, wrapper = mlx_lm.load(str(model_dir), trust_remote_code=True)
    assert isinstance(model, MLXModel)
    theirs = [r.token for r in mlx_lm.stream_generate(model, wrapper, PROMPT, max_tokens=N_TOKENS)]
    ours, _ = tokens_of(mlx_gen, *mlx_model, PROMPT, max_tokens=N_TOKENS)
    assert theirs == ours
    text = mlx_lm.generate(model, wrapper, PROMPT, max_tokens=N_TOKENS)
    assert text.strip() == wrapper.decode(ours).strip()  # mlx_lm's BPE streamer trims a space

    result = CliRunner().invoke(
        mlx_cli, ["generate", "--model", str(model_dir), "-p", PROMPT, "-m", str(N_TOKENS)]
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1] == wrapper.decode(ours)


def test_transformers_from_pretrained_generate_matches_ours(model_dir, torch_model):
    from transformers import AutoModelForCausalLM

    import customllm_torch  # noqa: F401  (registers the Auto classes)

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert isinstance(hf, TorchModel)
    tok = torch_model[1]
    ids = tok(PROMPT, return_tensors="pt").input_ids
    out = hf.generate(ids, max_new_tokens=N_TOKENS, do_sample=False)
    theirs = out[0, ids.shape[1] :].tolist()
    ours, _ = tokens_of(torch_gen, *torch_model, PROMPT, max_tokens=N_TOKENS)
    assert theirs == ours

    result = CliRunner().invoke(
        torch_cli,
        [
            "generate",
            "--model",
            str(model_dir),
            "-p",
            PROMPT,
            "-m",
            str(N_TOKENS),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1] == tok.decode(ours)


def test_torch_cli_dtype_loads_and_runs_the_model_in_it(model_dir, monkeypatch):
    """`customllm-torch generate --dtype bfloat16`: weights and compute in bfloat16 (the routing
    bias stays float32), the same tokens as `generate` on a model loaded that way."""
    import customllm_torch.io as torch_io

    model, tok = torch_io.load(model_dir, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.decoder_layers[0].mlp.expert_bias.dtype == torch.float32
    ours, _ = tokens_of(torch_gen, model, tok, PROMPT, max_tokens=N_TOKENS)
    dtypes, load = [], torch_io.load
    monkeypatch.setattr(
        torch_io, "load", lambda *a, **kw: dtypes.append(kw["dtype"]) or load(*a, **kw)
    )
    args = ["generate", "--model", str(model_dir), "-p", PROMPT, "-m", str(N_TOKENS)]
    result = CliRunner().invoke(torch_cli, [*args, "--device", "cpu", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert dtypes == [torch.bfloat16] and result.output.splitlines()[1] == tok.decode(ours)


def test_hf_generate_uses_our_latent_cache(model_dir, tokenizer):
    """HF's loop feeds 1 token per step after the prompt, with our cache from `.cache`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir))
    seen = []
    forward = hf.forward

    def spy(input_ids, **kwargs):
        cache = kwargs.get("cache")
        seen.append((input_ids.shape[1], None if cache is None else cache.offset))
        return forward(input_ids, **kwargs)

    hf.forward = spy
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    hf.generate(ids, max_new_tokens=4, do_sample=False)
    assert n > 1 and seen == [(n, None), (1, n), (1, n + 1), (1, n + 2)]


# --- CLIs ------------------------------------------------------------------------------------


CLIS = [(mlx_cli, []), (torch_cli, ["--device", "cpu"])]


@pytest.mark.parametrize(("cli", "extra"), CLIS, ids=["mlx", "torch"])
def test_cli_output_format_and_seeded_sampling(cli, extra, model_dir):
    runner = CliRunner()
    args = ["generate", "--model", str(model_dir), "-p", PROMPT, "-m", "6", *extra]
    sampled = [*args, "--temp", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "3"]
    first, again = runner.invoke(cli, sampled), runner.invoke(cli, sampled)
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert lines[0] == lines[2] == "=========="
    for line, pattern in zip(lines[3:], STATS, strict=True):
        assert re.fullmatch(pattern, line), line
    assert lines[1] == again.output.splitlines()[1]

    quiet = runner.invoke(cli, [*args, "--no-verbose", "-p", "-"], input=PROMPT)
    assert quiet.exit_code == 0, quiet.output
    greedy = runner.invoke(cli, args)
    assert quiet.output.splitlines() == [greedy.output.splitlines()[1]]
    # --temp/--seed reach the sampler: the seeded draw is not the greedy text, another seed
    # draws other text (each seeded run repeats itself, so this holds every run)
    other_seed = runner.invoke(cli, [*sampled[:-1], "4"])
    assert lines[1] != greedy.output.splitlines()[1]
    assert lines[1] != other_seed.output.splitlines()[1]


@pytest.mark.parametrize(("cli", "extra"), CLIS, ids=["mlx", "torch"])
def test_cli_errors_name_the_problem(cli, extra, model_dir, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["generate", "--model", str(tmp_path / "nope"), *extra])
    assert missing.exit_code != 0 and str(tmp_path / "nope") in missing.output

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    no_weights = runner.invoke(cli, ["generate", "--model", str(broken), *extra])
    assert no_weights.exit_code != 0 and WEIGHTS_NAME in no_weights.output

    long_prompt = " ".join(["story"] * (CONTEXT + 10))
    too_long = runner.invoke(
        cli, ["generate", "--model", str(model_dir), "-p", long_prompt, *extra]
    )
    assert too_long.exit_code != 0
    assert "max_position_embeddings" in too_long.output and f"{CONTEXT}" in too_long.output

    bad_top_k = runner.invoke(
        cli, ["generate", "--model", str(model_dir), "--top-k", "49152", *extra]
    )
    assert bad_top_k.exit_code != 0 and "top_k" in bad_top_k.output

    for flag in ("--prefill-step-size", "--repetition-context-size"):
        for value in ("0", "-1"):
            bad = runner.invoke(cli, ["generate", "--model", str(model_dir), flag, value, *extra])
            assert bad.exit_code == 2 and flag in bad.output and "x>=1" in bad.output, bad.output
            assert bad.exception is None or isinstance(bad.exception, SystemExit)


@pytest.mark.parametrize(("cli", "extra"), CLIS, ids=["mlx", "torch"])
def test_cli_refuses_bad_prompts_seeds_and_damaged_folders(cli, extra, model_dir, tmp_path):
    """Invalid UTF-8 (an argument or stdin), a seed out of range, NaN weights and a tokenizer
    larger than the vocabulary: an `Error:` naming the problem, never a traceback."""
    import shutil

    runner = CliRunner()
    args = ["generate", "--model", str(model_dir), "-m", "2", *extra]
    surrogate = b"caf\xe9".decode("utf-8", "surrogateescape")  # how argv carries bad bytes
    for result in (
        runner.invoke(cli, [*args, "-p", surrogate]),
        runner.invoke(cli, [*args, "-p", "-"], input=b"caf\xe9 au lait"),
    ):
        assert result.exit_code == 2 and "not valid UTF-8" in result.output, result.output
    for seed in ("-1", str(2**70)):
        result = runner.invoke(cli, [*args, "--seed", seed])
        assert result.exit_code == 2 and "--seed" in result.output, result.output

    damaged = tmp_path / "nan"
    shutil.copytree(model_dir, damaged)
    weights = load_numpy(str(damaged / WEIGHTS_NAME))
    weights["lm_head.bias"][3] = np.nan
    save_numpy(weights, str(damaged / WEIGHTS_NAME))
    result = runner.invoke(cli, ["generate", "--model", str(damaged), *extra])
    assert result.exit_code == 1 and "'lm_head.bias' holds NaN" in result.output, result.output

    small = tmp_path / "small_vocab"
    shutil.copytree(model_dir, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 1000}))
    weights = load_numpy(str(model_dir / WEIGHTS_NAME))
    weights["token_embeddings.weight"] = weights["token_embeddings.weight"][:1000]
    weights["lm_head.weight"] = weights["lm_head.weight"][:1000]
    weights["lm_head.bias"] = weights["lm_head.bias"][:1000]
    save_numpy(weights, str(small / WEIGHTS_NAME))
    result = runner.invoke(cli, ["generate", "--model", str(small), *extra])
    assert result.exit_code == 1 and "more than the model's vocab_size 1000" in result.output


@pytest.mark.parametrize(("cli", "extra"), CLIS, ids=["mlx", "torch"])
def test_cli_says_when_max_tokens_does_not_fit_the_context(cli, extra, model_dir):
    args = ["generate", "--model", str(model_dir), "-p", PROMPT, "--no-verbose", *extra]
    cut = CliRunner().invoke(cli, [*args, "-m", str(CONTEXT + 5)])
    assert cut.exit_code == 0, cut.output
    assert f"--max-tokens {CONTEXT + 5} does not fit the context" in cut.output
    fits = CliRunner().invoke(cli, [*args, "-m", "3"])
    assert fits.exit_code == 0 and "does not fit" not in fits.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_torch_cli_names_a_missing_device(model_dir):
    for device in ("cuda", "cuda:7"):
        result = CliRunner().invoke(
            torch_cli, ["generate", "--model", str(model_dir), "--device", device]
        )
        assert result.exit_code == 1 and f"--device {device}: no CUDA device" in result.output
    bogus = CliRunner().invoke(
        torch_cli, ["generate", "--model", str(model_dir), "--device", "gpu0"]
    )
    assert bogus.exit_code == 1 and "--device gpu0: not a torch device" in bogus.output
