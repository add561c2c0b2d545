"""Framework-free pieces of text generation, shared by customllm_mlx and customllm_torch.

Defaults and flags follow `mlx_lm.generate`; this module holds what does not need a framework:
argument checks, prompt encoding, the context budget, the streaming detokenizer, the stats lines.

Sampler semantics (both frameworks, as `mlx_lm.sample_utils.make_sampler`): the filters
(top-p, min-p, top-k) are applied once to the log-probabilities at temperature 1, each on the
full distribution, so the kept set is the intersection of the three; then one categorical draw
from softmax(kept logprobs / temp). temp == 0 is argmax. Logits processors (repetition penalty)
run on the logits before the sampler.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0  # CLI default (off); make_sampler's default 0.0 is off too
DEFAULT_MIN_P = 0.0
DEFAULT_TOP_K = 0
DEFAULT_PREFILL_STEP_SIZE = 2048
DEFAULT_REPETITION_CONTEXT_SIZE = 20
ROTATING_KEEP = 4  # --max-kv-size keeps the first tokens, as mlx_lm's RotatingKVCache does
SEPARATOR = "=" * 10


class PromptTooLongError(ValueError):
    """The prompt leaves no room in the model's context (max_position_embeddings)."""


def validate_sampling(
    temp: float = DEFAULT_TEMP,
    top_p: float = 0.0,
    min_p: float = DEFAULT_MIN_P,
    top_k: int = DEFAULT_TOP_K,
    repetition_penalty: float | None = None,
    vocab_size: int | None = None,
) -> None:
    """Raise ValueError naming the first out-of-range sampling argument.

    top_p outside (0, 1) and top_k == 0 mean "off"; top_k >= vocab_size is an error, as in mlx_lm.
    """
    if not (temp >= 0 and math.isfinite(temp)):
        raise ValueError(f"temp must be a finite number >= 0, got {temp}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
    if vocab_size is not None and top_k >= vocab_size:
        raise ValueError(f"top_k must be below the vocabulary size {vocab_size}, got {top_k}")
    if repetition_penalty is not None and not (
        repetition_penalty > 0 and math.isfinite(repetition_penalty)
    ):
        raise ValueError(f"repetition_penalty must be a positive number, got {repetition_penalty}")


def encode_prompt(tokenizer: Any, prompt: str | list[int]) -> list[int]:
    """Token ids of `prompt`, with special tokens added unless the text already starts with
    the BOS token (mlx_lm's rule). A list of ids is returned as is."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    bos = getattr(tokenizer, "bos_token", None)
    add_special_tokens = bos is None or not prompt.startswith(bos)
    return list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))


def read_prompt(prompt: str) -> str:
    """mlx_lm's prompt handling: `\\n` and `\\t` escapes become characters, `-` reads stdin.
    A prompt that is not valid UTF-8 is a click error."""
    if prompt == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        try:
            return data.decode("utf-8") if isinstance(data, bytes) else data
        except UnicodeDecodeError as err:
            raise click.BadParameter(
                f"standard input is not valid UTF-8 text ({err.reason} at byte {err.start})",
                param_hint="--prompt",
            ) from err
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # undecodable bytes of argv arrive as lone surrogates
        raise click.BadParameter(
            f"the prompt is not valid UTF-8 text (byte {err.start}); pass UTF-8",
            param_hint="--prompt",
        ) from err
    return prompt.replace("\\n", "\n").replace("\\t", "\t")


def generation_budget(prompt_tokens: int, max_tokens: int, max_position_embeddings: int) -> int:
    """How many tokens to generate: `max_tokens` (negative: no limit) cut to the room left.

    Positions are learned and absolute, so prompt + generated tokens can never exceed
    max_position_embeddings; generation then stops with finish_reason "length".
    """
    if prompt_tokens == 0:
        raise ValueError("the prompt is empty: it must hold at least one token")
    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (use -1 for no limit)")
    room = max_position_embeddings - prompt_tokens
    if room <= 0:
        raise PromptTooLongError(
            f"the prompt has {prompt_tokens} tokens but the model's context "
            f"(max_position_embeddings) is {max_position_embeddings} tokens; shorten the prompt "
            f"to at most {max_position_embeddings - 1} tokens to leave room for generation"
        )
    return room if max_tokens < 0 else min(max_tokens, room)


def validate_max_kv_size(max_kv_size: int | None) -> None:
    if max_kv_size is not None and max_kv_size < 1:
        raise ValueError(f"max_kv_size must be a positive integer, got {max_kv_size}")


def format_stats(response: Any) -> str:
    """The three stats lines of `mlx_lm.generate`, from a final response object."""
    return (
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec\n"
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {response.peak_memory:.3f} GB"
    )


def peak_rss_gb() -> float:
    """This process's peak resident memory in GB (0.0 where the OS does not report it)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes vs KiB


class StreamingDetokenizer:
    """Turns a stream of token ids into text segments that are always whole UTF-8 characters.

    The logic of mlx_lm's `NaiveStreamingDetokenizer`: decode the tokens of the current line,
    hold back text that ends in an incomplete character ("\\ufffd") or, when the tokenizer
    cleans up spaces, a trailing space; start a new line after "\\n" so decoding stays O(line).
    After `finalize()`, the joined segments equal `tokenizer.decode(tokens)`.
    """

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        probe = tokenizer.encode("a ,b", add_special_tokens=False)
        self._clean_spaces = " ," not in tokenizer.decode(probe)
        self.reset()

    def reset(self) -> None:
        self.offset = 0
        self.tokens: list[int] = []
        self._text = ""
        self._current_tokens: list[int] = []
        self._current_text = ""

    def add_token(self, token: int) -> None:
        self._current_tokens.append(token)
        self.tokens.append(token)

    def finalize(self) -> None:
        self._text += self._tokenizer.decode(self._current_tokens)
        self._current_tokens = []
        self._current_text = ""

    @property
    def text(self) -> str:
        if self._current_tokens:
            self._current_text = self._tokenizer.decode(self._current_tokens)
            if self._current_text.endswith("\ufffd"):
                self._current_text = self._current_text.rstrip("\ufffd")
            elif self._clean_spaces and self._current_text.endswith(" "):
                self._current_text = self._current_text[:-1]
        if self._current_text.endswith("\n"):
            self._text += self._current_text
            self._current_tokens.clear()
            self._current_text = ""
        return self._text + self._current_text

    @property
    def last_segment(self) -> str:
        """The text decoded since the previous call."""
        text = self.text
        segment = text[self.offset :]
        self.offset = len(text)
        return segment


def generate_options(command: Callable) -> Callable:
    """The flags of `mlx_lm.generate`, shared by `customllm-mlx generate` and
    `customllm-torch generate`."""
    options = [
        click.option(
            "--model", "model_dir", required=True, type=click.Path(), help="Model folder."
        ),
        click.option(
            "--prompt",
            "-p",
            default=DEFAULT_PROMPT,
            show_default=True,
            help="Prompt ('-' reads stdin).",
        ),
        click.option("--max-tokens", "-m", default=DEFAULT_MAX_TOKENS, show_default=True, type=int),
        click.option(
            "--temp", default=DEFAULT_TEMP, show_default=True, type=float, help="0 = greedy."
        ),
        click.option("--top-p", default=DEFAULT_TOP_P, show_default=True, type=float),
        click.option("--top-k", default=DEFAULT_TOP_K, show_default=True, type=int),
        click.option("--min-p", default=DEFAULT_MIN_P, show_default=True, type=float),
        click.option(
            "--repetition-penalty", default=None, type=float, help="e.g. 1.1; off by default."
        ),
        click.option(
            "--repetition-context-size",
            default=DEFAULT_REPETITION_CONTEXT_SIZE,
            show_default=True,
            type=click.IntRange(min=1),
        ),
        click.option(
            "--seed",
            default=None,
            type=click.IntRange(0, 2**32 - 1),
            help="PRNG seed for sampling (0 to 2**32 - 1).",
        ),
        click.option(
            "--max-kv-size",
            default=None,
            type=int,
            help="Cache at most this many tokens per layer (the first 4 and the most recent); "
            "bounds memory, not length: prompt + generation stay within max_position_embeddings.",
        ),
        click.option(
            "--prefill-step-size",
            default=DEFAULT_PREFILL_STEP_SIZE,
            show_default=True,
            type=click.IntRange(min=1),
        ),
        click.option("--verbose/--no-verbose", default=True, show_default=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def check_request(model_dir: str, tokenizer: Any, config: Any, prompt: str, options: dict) -> None:
    """Refuse, as a click error, a folder without tokenizer, bad sampling values, or a prompt
    that leaves no room in the context."""
    if tokenizer is None:
        raise click.ClickException(f"{model_dir} has no tokenizer files (tokenizer.json)")
    try:
        validate_sampling(
            options["temp"],
            options["top_p"],
            options["min_p"],
            options["top_k"],
            options["repetition_penalty"],
            config.vocab_size,
        )
        validate_max_kv_size(options["max_kv_size"])
        prompt_tokens = len(encode_prompt(tokenizer, prompt))
        budget = generation_budget(
            prompt_tokens, options["max_tokens"], config.max_position_embeddings
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    if budget < options["max_tokens"]:
        click.echo(
            f"note: --max-tokens {options['max_tokens']} does not fit the context: the prompt's "
            f"{prompt_tokens} tokens and {budget} generated fill max_position_embeddings "
            f"({config.max_position_embeddings}); generation stops there",
            err=True,
        )


def stream_text(responses: Iterable[Any], verbose: bool) -> str:
    """Join the responses' text. With `verbose`, stream it between `==========` lines and print
    the prompt/generation speed and peak memory lines of `mlx_lm.generate`."""
    if verbose:
        print(SEPARATOR, flush=True)
    text, response = "", None
    for response in responses:
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print(SEPARATOR)
        print(format_stats(response), flush=True)
    return text
