"""Text generation with the PyTorch model: the twin of customllm_mlx/generate.py.

Same loop as `mlx_lm.generate.stream_generate`: chunked prefill through the latent cache, then
one token per step (the model switches to absorbed attention for 1-token steps with a cache),
EOS or max_tokens stops, incremental detokenization, the same response fields and stats.
Samplers follow `mlx_lm.sample_utils.make_sampler` (see customllm/sampling.py) and draw from a
`torch.Generator`, so a seed makes sampling reproducible.

`max_kv_size`: the cache keeps the first 4 tokens and the most recent ones, at most
`max_kv_size` per layer. It bounds memory only: positions are learned and absolute, so
prompt + generation still cannot exceed max_position_embeddings.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import click
import torch

from customllm.cli import WEIGHT_DTYPES
from customllm.sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_PREFILL_STEP_SIZE,
    DEFAULT_REPETITION_CONTEXT_SIZE,
    ROTATING_KEEP,
    StreamingDetokenizer,
    check_request,
    encode_prompt,
    generate_options,
    generation_budget,
    peak_rss_gb,
    read_prompt,
    stream_text,
    validate_max_kv_size,
    validate_sampling,
)
from customllm_torch.model import CustomLLM, LatentKVCache

Sampler = Callable[[torch.Tensor], torch.Tensor]
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class GenerationResponse:
    """One step of `stream_generate` (the fields of mlx_lm's GenerationResponse)."""

    text: str  # the new text segment (may be empty while a character is incomplete)
    token: int
    logprobs: torch.Tensor  # (vocab,)
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: str | None = None  # "stop" (EOS), "length", or None before the last


# --- samplers --------------------------------------------------------------------------------


def greedy_sampler(logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs.argmax(-1)


def apply_top_p(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens until their mass reaches `top_p` (the token that crosses
    it included, ties with it too); the rest become -inf."""
    ordered, _ = logprobs.sort(-1, descending=True)
    probs = ordered.float().exp()
    mass_before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    kept = (mass_before < top_p * probs.sum(-1, keepdim=True)).sum(-1, keepdim=True)
    threshold = ordered.gather(-1, kept.clamp(min=1) - 1)
    return logprobs.masked_fill(logprobs < threshold, -float("inf"))


def apply_min_p(logprobs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the top token's."""
    floor = logprobs.max(-1, keepdim=True).values + math.log(min_p)
    return logprobs.masked_fill(logprobs < floor, -float("inf"))


def apply_top_k(logprobs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep exactly the `top_k` most probable tokens."""
    top = logprobs.topk(top_k, dim=-1)
    out = torch.full_like(logprobs, -float("inf"))
    return out.scatter(-1, top.indices, top.values)


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> Sampler:
    """logprobs (B, V) -> tokens (B,): argmax at temp 0, else top-p, min-p and top-k filters
    on the logprobs and one draw from softmax(filtered / temp) with `generator`."""
    validate_sampling(temp, top_p, min_p, top_k)
    if temp == 0:
        return greedy_sampler
    filters = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    def sampler(logprobs: torch.Tensor) -> torch.Tensor:
        for keep in filters:
            logprobs = keep(logprobs)
        probs = torch.softmax(logprobs.float() / temp, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return sampler


def make_logits_processors(
    repetition_penalty: float | None = None,
    repetition_context_size: int = DEFAULT_REPETITION_CONTEXT_SIZE,
) -> list[LogitsProcessor]:
    """Processors `(tokens, logits) -> logits` run before sampling. The repetition penalty
    divides positive (multiplies negative) logits of the last `repetition_context_size` tokens."""
    validate_sampling(repetition_penalty=repetition_penalty)
    if repetition_penalty is None or repetition_penalty == 0:
        return []

    def repetition_penalty_processor(tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if len(tokens) == 0:
            return logits
        tokens = tokens[-repetition_context_size:]
        selected = logits[:, tokens]
        logits = logits.clone()
        logits[:, tokens] = torch.where(
            selected < 0, selected * repetition_penalty, selected / repetition_penalty
        )
        return logits

    return [repetition_penalty_processor]


# --- cache -----------------------------------------------------------------------------------


class RotatingLatentKVCache(LatentKVCache):
    """A latent cache that holds the first `keep` tokens and the most recent ones.

    Before each update a layer's tokens are cut to `max_size - 1`, so a 1-token step attends
    to `max_size` tokens. `offset` counts every token seen: it is the absolute position.
    """

    def __init__(self, num_layers: int, max_size: int, keep: int = ROTATING_KEEP):
        super().__init__(num_layers)
        self.max_size, self.keep = max_size, min(keep, max_size - 1)
        self.seen = 0

    @property
    def offset(self) -> int:
        return self.seen

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        if layer_idx == len(self.layers) - 1:
            self.seen += c_kv.shape[1]
        if self.layers[layer_idx] is not None:
            old_c_kv, old_k_rope = self.layers[layer_idx]
            S, size = old_c_kv.shape[1], self.max_size - 1
            if S > size:
                recent = size - self.keep
                old_c_kv = torch.cat([old_c_kv[:, : self.keep], old_c_kv[:, S - recent :]], 1)
                old_k_rope = torch.cat(
                    [old_k_rope[:, :, : self.keep], old_k_rope[:, :, S - recent :]], 2
                )
            self.layers[layer_idx] = (old_c_kv, old_k_rope)
        return super().update(layer_idx, c_kv, k_rope)


def make_cache(model: CustomLLM, max_kv_size: int | None = None) -> LatentKVCache:
    """The latent cache of all layers; rotating when `max_kv_size` is below the context."""
    validate_max_kv_size(max_kv_size)
    num_layers = len(model.decoder_layers)
    if max_kv_size is None or max_kv_size >= model.model_config.max_position_embeddings:
        return LatentKVCache(num_layers)
    return RotatingLatentKVCache(num_layers, max_kv_size)


# --- generation ------------------------------------------------------------------------------


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA, driver memory on MPS, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 1e9
    return peak_rss_gb()


def eos_token_ids(model: CustomLLM, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS and the config's (mlx_lm.load stops on both)."""
    ids = {model.model_config.eos_token_id}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


@torch.inference_mode()
def stream_generate(
    model: CustomLLM,
    tokenizer: Any,
    prompt: str | list[int] | torch.Tensor,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Sampler | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    max_kv_size: int | None = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_cache: LatentKVCache | None = None,
) -> Iterator[GenerationResponse]:
    """Yield one `GenerationResponse` per new token; the last has `finish_reason` "stop" (EOS)
    or "length" (max_tokens or the end of the context). Raises `PromptTooLongError` (a
    ValueError) before generating when the prompt fills the context."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.flatten().tolist()
    ids = encode_prompt(tokenizer, prompt)
    offset = 0 if prompt_cache is None else prompt_cache.offset
    context = model.model_config.max_position_embeddings - offset
    max_tokens = generation_budget(len(ids), max_tokens, context)
    cache = make_cache(model, max_kv_size) if prompt_cache is None else prompt_cache
    sampler = sampler or greedy_sampler
    processors = logits_processors or []
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    detokenizer = StreamingDetokenizer(tokenizer)
    history = torch.tensor(ids, device=device)  # prompt + generated tokens, for the processors

    def step(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids[None], cache=cache, logits_to_keep=1).logits[:, -1].float()
        for processor in processors:
            logits = processor(history, logits)
        logprobs = logits - logits.logsumexp(-1, keepdim=True)
        return sampler(logprobs), logprobs[0]

    def response(n: int, finish_reason: str | None = None) -> GenerationResponse:
        return GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=peak_memory_gb(device),
            finish_reason=finish_reason,
        )

    tic = time.perf_counter()
    remaining = history
    while len(remaining) > 1:  # prefill all but the last prompt token, in chunks
        n = min(prefill_step_size, len(remaining) - 1)
        model(remaining[None, :n], cache=cache, logits_to_keep=1)
        remaining = remaining[n:]
    y, logprobs = step(remaining)

    for n in range(max_tokens):
        if n > 0:
            history = torch.cat([history, y])
            y, logprobs = step(y)
        token = int(y)
        if n == 0:
            prompt_tps = len(ids) / (time.perf_counter() - tic)
            tic = time.perf_counter()
        if token in eos:
            break
        detokenizer.add_token(token)
        if n + 1 == max_tokens:
            break
        yield response(n)
    detokenizer.finalize()
    yield response(n, finish_reason="stop" if token in eos else "length")


def generate(
    model: CustomLLM, tokenizer: Any, prompt: str | list[int], verbose: bool = False, **kwargs
) -> str:
    """The whole response text; with `verbose`, streamed and followed by the stats lines."""
    return stream_text(stream_generate(model, tokenizer, prompt, **kwargs), verbose)


# --- `customllm-torch generate` --------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda, else mps, else cpu; ValueError for a device this machine lacks."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise ValueError(f"--device {name}: not a torch device ({err})") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"--device {name}: MPS (Apple GPU) is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@click.command("generate")
@generate_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps.")
@click.option(
    "--dtype",
    type=click.Choice(WEIGHT_DTYPES),
    default="float32",
    show_default=True,
    help="Weights and compute dtype (bfloat16 halves what each decoded token reads).",
)
def generate_command(
    model_dir: str, prompt: str, seed: int | None, device: str, dtype: str, **options
) -> None:
    """Generate text from a model folder (the flags of `mlx_lm.generate`; no chat template)."""
    from customllm_torch.io import load

    prompt = read_prompt(prompt)
    try:
        torch_device = resolve_device(device)
        model, tokenizer = load(model_dir, device=torch_device, dtype=getattr(torch, dtype))
    except (OSError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    check_request(model_dir, tokenizer, model.model_config, prompt, options)
    generator = torch.Generator(device=torch_device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    sampler = make_sampler(
        options["temp"], options["top_p"], options["min_p"], options["top_k"], generator=generator
    )
    text = generate(
        model,
        tokenizer,
        prompt,
        verbose=options["verbose"],
        max_tokens=options["max_tokens"],
        sampler=sampler,
        logits_processors=make_logits_processors(
            options["repetition_penalty"], options["repetition_context_size"]
        ),
        max_kv_size=options["max_kv_size"],
        prefill_step_size=options["prefill_step_size"],
    )
    if not options["verbose"]:
        print(text)
