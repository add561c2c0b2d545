"""Text generation with the MLX model, built on mlx_lm's own generation loop.

`stream_generate` checks the prompt against the context, builds the latent cache and hands
the rest to `mlx_lm.generate.stream_generate`: chunked prefill through the cache, then one
token per step (the model switches to absorbed attention for 1-token steps with a cache), EOS
or max_tokens stops, incremental detokenization, and the same response objects and stats.
Samplers and logits processors are mlx_lm's (`make_sampler`, `make_logits_processors`).

`max_kv_size`: the cache keeps the first 4 tokens and the most recent ones, at most
`max_kv_size` per layer (mlx_lm's RotatingKVCache). It bounds memory only: positions are
learned and absolute, so prompt + generation still cannot exceed max_position_embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import click
import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.models.cache import KVCache
from mlx_lm.sample_utils import make_logits_processors as mlx_lm_make_logits_processors
from mlx_lm.sample_utils import make_sampler as mlx_lm_make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from customllm.sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP_SIZE,
    DEFAULT_REPETITION_CONTEXT_SIZE,
    ROTATING_KEEP,
    check_request,
    encode_prompt,
    generate_options,
    generation_budget,
    read_prompt,
    stream_text,
    validate_max_kv_size,
    validate_sampling,
)
from customllm_mlx.model import CustomLLM

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]

__all__ = [
    "GenerationResponse",
    "RotatingLatentKVCache",
    "generate",
    "make_cache",
    "make_logits_processors",
    "make_sampler",
    "stream_generate",
]


def make_sampler(
    temp: float = 0.0, top_p: float = 0.0, min_p: float = 0.0, top_k: int = 0
) -> Sampler:
    """logprobs (B, V) -> tokens (B,): argmax at temp 0, else top-p, min-p and top-k filters
    on the logprobs and one categorical draw at `temp` (seed with `mx.random.seed`)."""
    validate_sampling(temp, top_p, min_p, top_k)
    return mlx_lm_make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)


def make_logits_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int = DEFAULT_REPETITION_CONTEXT_SIZE,
) -> list[LogitsProcessor]:
    """Processors `(tokens, logits) -> logits` run before sampling. The repetition penalty
    divides positive (multiplies negative) logits of the last `repetition_context_size` tokens."""
    validate_sampling(repetition_penalty=repetition_penalty)
    return mlx_lm_make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )


class RotatingLatentKVCache(KVCache):
    """A latent cache (`customllm_mlx.model.cache_latents`) that holds the first `keep` tokens
    and the most recent ones.

    Before each update the stored tokens are cut to `max_size - 1`, so a 1-token step attends
    to `max_size` tokens. `offset` counts every token seen: it is the absolute position.
    """

    def __init__(self, max_size: int, keep: int = ROTATING_KEEP):
        super().__init__()
        self.max_size, self.keep = max_size, min(keep, max_size - 1)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.offset += keys.shape[2]
        if self.keys is not None:
            old_keys, old_values = self._window(self.max_size - 1)
            keys = mx.concatenate([old_keys, keys], axis=2)
            values = mx.concatenate([old_values, values], axis=2)
        self.keys, self.values = keys, values
        return keys, values

    def _window(self, size: int):
        S = self.keys.shape[2]
        if S <= size:
            return self.keys, self.values
        recent = size - self.keep
        return tuple(
            mx.concatenate([a[:, :, : self.keep], a[:, :, S - recent :]], axis=2)
            for a in (self.keys, self.values)
        )

    @property
    def meta_state(self):
        return tuple(map(str, (self.max_size, self.keep)))

    @meta_state.setter
    def meta_state(self, value):
        self.max_size, self.keep = map(int, value)

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        return 0

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        raise ValueError("--kv-bits: CustomLLM's latent cache is not quantized further")


def make_cache(model: CustomLLM, max_kv_size: int | None = None) -> list[KVCache]:
    """One latent cache per layer; rotating when `max_kv_size` is below the context."""
    validate_max_kv_size(max_kv_size)
    if max_kv_size is None or max_kv_size >= model.model_config.max_position_embeddings:
        return model.make_cache()
    return [RotatingLatentKVCache(max_kv_size) for _ in model.layers]


def stream_generate(
    model: CustomLLM,
    tokenizer: Any,
    prompt: str | list[int] | mx.array,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    max_kv_size: int | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_cache: list[KVCache] | None = None,
) -> Iterator[GenerationResponse]:
    """Yield one `GenerationResponse` per new token (`.text` is the new text segment, possibly
    empty while a character is incomplete); the last has `finish_reason` "stop" (EOS) or
    "length" (max_tokens or the end of the context). Raises `PromptTooLongError` (a
    ValueError) before generating when the prompt fills the context."""
    if isinstance(prompt, mx.array):
        prompt = prompt.tolist()
    if not isinstance(tokenizer, TokenizerWrapper):  # stop on the config's EOS too, as mlx_lm.load
        tokenizer = TokenizerWrapper(tokenizer, eos_token_ids=[model.model_config.eos_token_id])
    ids = encode_prompt(tokenizer, prompt)
    offset = 0 if prompt_cache is None else prompt_cache[0].offset
    context = model.model_config.max_position_embeddings - offset
    max_tokens = generation_budget(len(ids), max_tokens, context)
    if prompt_cache is None:
        prompt_cache = make_cache(model, max_kv_size)
    compile_decode_step(model)
    yield from mlx_lm_stream_generate(
        model,
        tokenizer,
        mx.array(ids),
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        prompt_cache=prompt_cache,
        prefill_step_size=prefill_step_size,
    )


def compile_decode_step(model: CustomLLM) -> None:
    """Compile the layers' one-token decode step before mlx_lm's clock starts: it times the
    prompt up to the first new token, and the compilation would count as prompt time."""
    if model.layers and model.layers[0]._decode_in is None and model.layers[0].self_attn.absorbable:
        mx.eval(model(mx.array([[0]]), cache=model.make_cache()))


def generate(
    model: CustomLLM, tokenizer: Any, prompt: str | list[int], verbose: bool = False, **kwargs
) -> str:
    """The whole response text; with `verbose`, streamed and followed by the stats lines."""
    return stream_text(stream_generate(model, tokenizer, prompt, **kwargs), verbose)


# --- `customllm-mlx generate` ----------------------------------------------------------------


@click.command("generate")
@generate_options
def generate_command(model_dir: str, prompt: str, seed: int | None, **options) -> None:
    """Generate text from a model folder (the flags of `mlx_lm.generate`; no chat template)."""
    from customllm_mlx.allocator import use_full_cpu_cache
    from customllm_mlx.io import load

    use_full_cpu_cache()
    prompt = read_prompt(prompt)
    try:
        model, tokenizer = load(model_dir)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    check_request(model_dir, tokenizer, model.model_config, prompt, options)
    if seed is not None:
        mx.random.seed(seed)
    text = generate(
        model,
        tokenizer,
        prompt,
        verbose=options["verbose"],
        max_tokens=options["max_tokens"],
        sampler=make_sampler(options["temp"], options["top_p"], options["min_p"], options["top_k"]),
        logits_processors=make_logits_processors(
            options["repetition_penalty"], options["repetition_context_size"]
        ),
        max_kv_size=options["max_kv_size"],
        prefill_step_size=options["prefill_step_size"],
    )
    if not options["verbose"]:
        print(text)
